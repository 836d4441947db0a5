"""What the routers share: the engine of the app, the API-key check and its error.

One level below the routers and the app, so that both import from here and never from each
other (fastapi/full-stack-fastapi-template keeps the same in `backend/app/api/deps.py`).
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Header, Request

from ..engine import Engine


class Unauthorized(Exception):
    """A write without the right X-API-Key; create_app maps it to 401."""


async def get_engine(request: Request) -> Engine:
    # async: a plain def dependency costs every request a hop to the thread pool and back
    return request.app.state.engine


EngineDep = Annotated[Engine, Depends(get_engine)]


def needs_api_key(request: Request) -> bool:
    """Whether writes need an X-API-Key header on this server."""
    return bool(request.app.state.settings.api_key)


def require_api_key(
    request: Request, x_api_key: Annotated[str | None, Header(description="API key")] = None
) -> None:
    """When LOOKALIKE_API_KEY is set, writes need it in the X-API-Key header.

    Compared as bytes (compare_digest refuses str with non-ASCII characters: that was a 500):
    the header's bytes as sent (the server decodes them as Latin-1) with the key in UTF-8.
    """
    expected = request.app.state.settings.api_key
    if expected and not (
        x_api_key and secrets.compare_digest(x_api_key.encode("latin-1"), expected.encode("utf-8"))
    ):
        raise Unauthorized()
