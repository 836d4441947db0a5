"""The routes: thin functions from a request to the engine and back to a pydantic response.

Routes that run the model or FAISS are plain `def`, so FastAPI runs them in its thread pool and
the event loop stays free.
"""

from __future__ import annotations

import mimetypes
import os
import secrets
import time
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, File, Header, Path, Query, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, Response

from .. import __version__
from ..engine import Engine, Hit
from ..errors import NotFoundError
from ..images import read_file, thumbnail
from ..store import FORMAT_VERSION
from .schemas import (
    AddResponse,
    DeleteResponse,
    ErrorResponse,
    Health,
    LabelScore,
    Result,
    SearchResponse,
    Stats,
    SuggestResponse,
)

router = APIRouter()
ERRORS = {
    400: {"model": ErrorResponse, "description": "Not a usable image"},
    404: {"model": ErrorResponse, "description": "Unknown image id"},
    413: {"model": ErrorResponse, "description": "Upload over the size limit"},
    422: {"model": ErrorResponse, "description": "Invalid parameter"},
}
K = Annotated[int, Query(ge=1, le=100, description="Number of neighbours")]
# SQLite's INTEGER range: a larger number is no id at all (422), not a server error
ImageId = Annotated[int, Path(ge=-(2**63), le=2**63 - 1, description="Image id")]


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


EngineDep = Annotated[Engine, Depends(get_engine)]


def require_api_key(
    request: Request, x_api_key: Annotated[str | None, Header(description="API key")] = None
) -> None:
    """When LOOKALIKE_API_KEY is set, writes need it in the X-API-Key header."""
    expected = request.app.state.settings.api_key
    if expected and not (x_api_key and secrets.compare_digest(x_api_key, expected)):
        raise _Unauthorized()


class _Unauthorized(Exception):
    pass


def _results(hits: list[Hit]) -> list[Result]:
    return [
        Result(
            id=h.id,
            path=h.path,
            score=round(h.score, 6),
            url=f"/images/{h.id}",
            thumbnail_url=f"/images/{h.id}/thumbnail",
            labels=list(h.labels),
        )
        for h in hits
    ]


def _read_upload(file: UploadFile) -> bytes:
    file.file.seek(0)
    return file.file.read()


@router.post("/search", response_model=SearchResponse, responses=ERRORS, tags=["search"])
def search(engine: EngineDep, file: Annotated[UploadFile, File(description="An image")], k: K = 10):
    """The k stored images most similar to the uploaded one."""
    started = time.perf_counter()
    hits = engine.search_bytes(_read_upload(file), k)
    return SearchResponse(results=_results(hits), took_ms=(time.perf_counter() - started) * 1e3)


@router.get(
    "/images/{image_id}/similar", response_model=SearchResponse, responses=ERRORS, tags=["search"]
)
def similar(engine: EngineDep, image_id: ImageId, k: K = 10):
    """The k stored images most similar to a stored one (itself excluded)."""
    started = time.perf_counter()
    hits = engine.search_id(image_id, k)
    return SearchResponse(results=_results(hits), took_ms=(time.perf_counter() - started) * 1e3)


def _record(engine: Engine, image_id: int):
    record = engine.store.db.get(image_id)
    if record is None:
        raise NotFoundError(f"no image with id {image_id}")
    path = engine.store.file_path(record.path)
    if not path.is_file():
        raise NotFoundError(f"image {image_id} ({record.path}) is no longer on disk")
    return record, path


@router.get("/images/{image_id}", responses=ERRORS, response_class=FileResponse, tags=["images"])
def get_image(engine: EngineDep, image_id: ImageId):
    """The stored image file, as it is on disk."""
    _, path = _record(engine, image_id)
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return FileResponse(path, media_type=media_type)


@router.get(
    "/images/{image_id}/thumbnail", responses=ERRORS, response_class=Response, tags=["images"]
)
def get_thumbnail(
    request: Request,
    engine: EngineDep,
    image_id: ImageId,
    size: Annotated[
        int | None,
        Query(ge=16, le=1024, description="Longest side, pixels (default: the server's setting)"),
    ] = None,
):
    """A JPEG thumbnail of a stored image, made once and cached in the store."""
    size = size or request.app.state.settings.thumbnail_size
    record, path = _record(engine, image_id)
    cache = engine.store.root / "thumbnails" / f"{image_id}-{record.sha256[:12]}-{size}.jpg"
    if not cache.exists():
        data = thumbnail(read_file(path), size, max_pixels=engine.max_pixels)
        cache.parent.mkdir(exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{uuid.uuid4().hex}.tmp")  # unique per request
        tmp.write_bytes(data)
        os.replace(tmp, cache)
    return FileResponse(
        cache, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=86400"}
    )


@router.post(
    "/images",
    response_model=AddResponse,
    status_code=201,
    responses={**ERRORS, 401: {"model": ErrorResponse, "description": "Bad API key"}},
    dependencies=[Depends(require_api_key)],
    tags=["images"],
)
def add_images(engine: EngineDep, file: Annotated[list[UploadFile], File(description="Images")]):
    """Add images to the collection: stored under the store's uploads, indexed at once.

    All or nothing: if one file is not a usable image, none is added.
    """
    ids = engine.add_images([(f.filename or "upload", _read_upload(f)) for f in file])
    return AddResponse(ids=ids)


@router.delete(
    "/images/{image_id}",
    response_model=DeleteResponse,
    responses={**ERRORS, 401: {"model": ErrorResponse, "description": "Bad API key"}},
    dependencies=[Depends(require_api_key)],
    tags=["images"],
)
def delete_image(engine: EngineDep, image_id: ImageId):
    """Remove an image from the index and the table (an uploaded file is deleted too)."""
    engine.remove_image(image_id)
    return DeleteResponse(deleted=image_id)


@router.post("/suggest", response_model=SuggestResponse, responses=ERRORS, tags=["search"])
def suggest(
    engine: EngineDep,
    file: Annotated[UploadFile, File(description="An image")],
    k: K = 10,
    top: Annotated[int, Query(ge=1, le=100, description="Number of labels")] = 3,
):
    """Labels for the uploaded image from a similarity-weighted vote of its k look-alikes."""
    started = time.perf_counter()
    labels, hits = engine.suggest_bytes(_read_upload(file), k, top)
    return SuggestResponse(
        labels=[LabelScore(label=lab, score=round(s, 6)) for lab, s in labels],
        neighbours=_results(hits),
        took_ms=(time.perf_counter() - started) * 1e3,
    )


@router.get("/health", response_model=Health, tags=["service"])
def health(engine: EngineDep):
    """Ready when the model and index are loaded (they load before the server accepts requests)."""
    return Health(status="ok", images=len(engine.store.index))


@router.get("/stats", response_model=Stats, tags=["service"])
def stats(engine: EngineDep):
    """What the service holds."""
    store = engine.store
    store.refresh()
    return Stats(
        images=len(store.db),
        index_type=store.index.index_type,
        embedding_dim=store.dim,
        image_size=engine.image_size,
        metric=store.info.get("metric", "cosine"),
        store_version=FORMAT_VERSION,
        lookalike_version=__version__,
    )


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def page():
    """The web page: drop a photo, see its look-alikes."""
    from .app import STATIC_DIR

    return HTMLResponse((STATIC_DIR / "index.html").read_text(encoding="utf-8"))
