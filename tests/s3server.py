"""A real S3 server for the object-storage tests: moto's standalone server on a free port.

The tests reach it as any S3-compatible endpoint is reached, through the environment
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY): nothing is mocked in-process, and
Ray workers started after the fixture inherit the same variables.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

ENV = {
    "AWS_ACCESS_KEY_ID": "lookalike-test",
    "AWS_SECRET_ACCESS_KEY": "lookalike-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """The endpoint URL of a moto S3 server running for the session (env variables set)."""
    pytest.importorskip("s3fs", reason='the S3 tests need pip install "lookalike[s3]"')
    server_mod = pytest.importorskip("moto.server", reason="the S3 tests need moto[server]")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request
    port = _free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in (*ENV, "AWS_ENDPOINT_URL")}
    os.environ.update(ENV, AWS_ENDPOINT_URL=endpoint)
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def s3_client():
    """A boto3 client of the test server (the environment names it)."""
    import boto3

    return boto3.client("s3")


def upload_folder(folder: Path, bucket: str, prefix: str) -> str:
    """Create bucket and upload every file under folder below prefix; returns s3://bucket/prefix."""
    client = s3_client()
    client.create_bucket(Bucket=bucket)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            key = f"{prefix}/{path.relative_to(folder).as_posix()}"
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
    return f"s3://{bucket}/{prefix}"
