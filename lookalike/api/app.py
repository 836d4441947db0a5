"""create_app: the FastAPI application, its lifespan, upload limit and error handlers."""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import Settings, get_settings
from ..errors import (
    ImageError,
    InvalidArgumentError,
    LookalikeError,
    NotFoundError,
    StoreBusyError,
    StoreError,
)
from ..version import __version__
from . import browse, dedupe, page, routes
from .deps import Unauthorized

log = logging.getLogger(__name__)

STATUS = [  # first match wins
    (ImageError, 400, "bad_image"),
    (NotFoundError, 404, "not_found"),
    (InvalidArgumentError, 422, "invalid_argument"),
    (StoreError, 503, "store_unavailable"),
    (LookalikeError, 400, "error"),
]

HTTP_KINDS = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}  # framework errors


def error_response(status: int, kind: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": kind, "detail": detail}, status_code=status)


class _TooLarge(Exception):
    pass


class _TooSlow(Exception):
    pass


class BodyLimit:
    """ASGI middleware: bodies over max_bytes get 413 before being read into memory, bodies that
    stop arriving get 408.

    A Content-Length over the limit is refused at once; a chunked body is counted as it streams
    and cut off when it passes the limit. While a body is incomplete, each wait for its next
    part lasts at most timeout seconds (a Content-Length larger than what is sent would
    otherwise hold the connection for ever); then 408, and the connection is closed.
    """

    def __init__(self, app, max_bytes: int, timeout: float = 20.0):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_bytes
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > limit
                except ValueError:
                    too_big = False
                if too_big:
                    return await self._refuse(send)
        received = 0
        started = complete = False
        refusal: tuple[int, str, str] | None = None

        async def counting_receive():
            nonlocal received, refusal, complete
            if complete:  # the body is in: what follows is a wait for a disconnect
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except TimeoutError:
                refusal = (408, "timeout", f"request body not received within {self.timeout} s")
                raise _TooSlow from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > limit:
                    refusal = (413, "too_large", f"request body over the limit of {limit} bytes")
                    raise _TooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            if refusal:  # the app turned _TooLarge into its own error (FastAPI: 400): say ours
                if not started:
                    started = True
                    await self._refuse(send, *refusal)
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except (_TooLarge, _TooSlow):
            if not started:
                await self._refuse(send, *refusal)

    async def _refuse(
        self, send, status: int = 413, kind: str = "too_large", detail: str | None = None
    ):
        detail = detail or f"request body over the limit of {self.max_bytes} bytes"
        body = json.dumps({"error": kind, "detail": detail}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _open_engine(settings: Settings):
    """The engine of settings.store, with the service's limits (the model loaded once)."""
    from ..engine import Engine

    if settings.store is None:
        raise RuntimeError("no store configured: set LOOKALIKE_STORE or pass --store")
    return Engine.open(
        settings.store,
        max_pixels=settings.max_image_pixels,
        write_timeout=settings.write_timeout,
        max_decode_bytes=settings.max_decode_bytes,
    )


def create_app(settings: Settings | None = None, engine=None) -> FastAPI:
    """The app. Without an engine, the lifespan opens settings.store (loading the model once)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        own = engine is None
        app.state.engine = _open_engine(settings) if own else engine
        log.info(
            "serving %s (%d images)", app.state.engine.store.root, len(app.state.engine.store.db)
        )
        yield
        if own:
            app.state.engine.close()

    app = FastAPI(
        title="lookalike",
        version=__version__,
        description="Look-alike photo search: upload an image, get its nearest neighbours.",
        lifespan=lifespan,
        docs_url=None,  # served by .page from local files: no CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.thumb_dir = None
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["X-API-Key", "Content-Type"],
        )
    app.add_middleware(
        BodyLimit, max_bytes=settings.max_upload_bytes, timeout=settings.body_timeout_s
    )

    add_error_handlers(app)
    app.include_router(routes.router)
    app.include_router(browse.router)
    app.include_router(page.router)
    app.include_router(dedupe.router)  # /duplicates, its review actions and page /review
    return app


def add_error_handlers(app: FastAPI) -> None:
    """One JSON shape for every error: {"error": kind, "detail": message}; never a traceback."""

    @app.exception_handler(LookalikeError)
    async def lookalike_error(request: Request, exc: LookalikeError):
        for cls, status, kind in STATUS:
            if isinstance(exc, cls):
                response = error_response(status, kind, str(exc))
                if isinstance(exc, StoreBusyError):  # a long job holds the store: come back
                    response.headers["Retry-After"] = str(exc.retry_after)
                return response
        return error_response(400, "error", str(exc))  # pragma: no cover

    @app.exception_handler(Unauthorized)
    async def unauthorized(request: Request, exc: Exception):
        return error_response(401, "unauthorized", "missing or wrong X-API-Key header")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = HTTP_KINDS.get(exc.status_code, "http_error")
        response = error_response(exc.status_code, kind, str(exc.detail))
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where}: {err.get('msg')}")
        return error_response(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal", "internal error; see the server log")


def app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory` and multi-worker serving: settings from LOOKALIKE_*."""
    return create_app(Settings())
