"""The web page and what it needs from the app: its files, a favicon, its settings, and the API
docs served offline (Swagger UI's own files come from the swagger-ui-bundle-v2 package, not a CDN).
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from ..dedupe.grouping import calibrated_threshold, default_threshold
from ..errors import NotFoundError
from .deps import EngineDep, needs_api_key
from .schemas import PageConfig

STATIC_DIR = Path(__file__).parent / "static"
SWAGGER_FILES = ("swagger-ui-bundle.js", "swagger-ui.css")

router = APIRouter()


def _swagger_dir() -> Path:
    from swagger_ui_bundle import swagger_ui_path

    return Path(str(swagger_ui_path))


def _file(folder: Path, name: str, allowed) -> FileResponse:
    """A file of folder by its plain name, only if listed in allowed (no paths from the URL)."""
    if name not in allowed:
        raise NotFoundError(f"no file {name!r}")
    media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return FileResponse(folder / name, media_type=media_type, headers={"Cache-Control": "no-cache"})


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def page():
    """The web page: drop a photo, see its look-alikes; browse the collection."""
    return HTMLResponse((STATIC_DIR / "index.html").read_text(encoding="utf-8"))


@router.get("/static/{name}", include_in_schema=False)
def static_file(name: str):
    """The page's scripts, styles and icons (a flat folder, listed at start)."""
    return _file(STATIC_DIR, name, STATIC_FILES)


@router.get("/favicon.ico", include_in_schema=False)
def favicon():
    return _file(STATIC_DIR, "favicon.svg", STATIC_FILES)


@router.get("/config", response_model=PageConfig, tags=["service"])
def config(request: Request, engine: EngineDep):
    """What a client needs to know before it asks: whether writes need a key, and the cosine
    at or above which two photos count as near-duplicates."""
    store = engine.store
    return PageConfig(
        needs_api_key=needs_api_key(request),
        dedupe_threshold=round(default_threshold(store), 6),
        threshold_calibrated=calibrated_threshold(store) is not None,
    )


@router.get("/docs", include_in_schema=False)
def docs(request: Request):
    """Swagger UI, every file of it served here: it works without internet."""
    return get_swagger_ui_html(
        openapi_url=request.app.openapi_url,
        title=f"{request.app.title} - API",
        swagger_js_url="/docs/assets/swagger-ui-bundle.js",
        swagger_css_url="/docs/assets/swagger-ui.css",
        swagger_favicon_url="/static/favicon.svg",
        swagger_ui_parameters={"validatorUrl": None},  # no calls to validator.swagger.io
    )


@router.get("/docs/assets/{name}", include_in_schema=False)
def docs_asset(name: str):
    return _file(_swagger_dir(), name, SWAGGER_FILES)


STATIC_FILES = frozenset(p.name for p in STATIC_DIR.iterdir() if p.is_file())
