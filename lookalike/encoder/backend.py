"""TensorFlow and Keras, imported once and quietly: the only place lookalike imports them.

TensorFlow writes its C++ log lines (absl's "All log messages before absl::InitializeLog()",
oneDNN, cpu_feature_guard, grappler's) straight to file descriptor 2, and some of them ignore
``TF_CPP_MIN_LOG_LEVEL``. So the import, and the export (lookalike.encoder.export), run inside
:func:`native_logs_dropped`: descriptor 2 points at a temporary file, and afterwards whatever
is not one of those lines is written back to stderr (a Python warning or traceback is kept).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TF's errors surface as Python exceptions
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

_NATIVE_LOG = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\)"
    r"|[IWEF]\d{4} [\d:.]+ +\d+ [\w./-]+:\d+\]"  # absl/glog prefix: I0000 00:00:17.1 123 f.cc:1]
    r"|To enable the following instructions: )"
)


@contextmanager
def native_logs_dropped() -> Iterator[None]:
    """Run a block with TensorFlow's C++ log lines on file descriptor 2 dropped."""
    sys.stderr.flush()
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            kept = [
                line
                for line in sink.read().decode(errors="replace").splitlines(keepends=True)
                if not _NATIVE_LOG.match(line)
            ]
            if kept:
                sys.stderr.write("".join(kept))


def _import() -> tuple:
    try:
        with native_logs_dropped():
            import keras
            import tensorflow as tf
    except ImportError as exc:  # a query-only install: say what to install, not a traceback
        from ..errors import LookalikeError

        raise LookalikeError(
            f"training or exporting a model needs TensorFlow ({exc.name} is not installed): "
            "pip install 'lookalike[train]'"
        ) from exc
    for name in ("tensorflow", "absl", "tf2onnx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return tf, keras


tf, keras = _import()

__all__ = ["keras", "native_logs_dropped", "tf"]
