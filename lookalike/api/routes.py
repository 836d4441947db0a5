"""The routes: thin functions from a request to the engine and back to a pydantic response.

Routes that run the model or FAISS are plain `def`, so FastAPI runs them in its thread pool and
the event loop stays free.
"""

from __future__ import annotations

import mimetypes
import time
from typing import Annotated

from fastapi import APIRouter, Depends, File, Path, Query, Request, UploadFile
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel

from ..engine import Hit
from ..store import FORMAT_VERSION
from ..version import __version__
from .deps import EngineDep, require_api_key
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
from .thumbnails import SIZES, cached_thumbnail, stored_file, thumbnail_size

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


def _json(model: BaseModel) -> Response:
    """The model as JSON, serialised here in the route's thread: returning the model instead
    makes FastAPI validate and serialise it again in another hop to the thread pool (0.2-0.4
    ms a request at 100 req/s); the response_model still documents it."""
    return Response(model.model_dump_json(), media_type="application/json")


def _read_upload(file: UploadFile) -> bytes:
    file.file.seek(0)
    return file.file.read()


@router.post("/search", response_model=SearchResponse, responses=ERRORS, tags=["search"])
def search(engine: EngineDep, file: Annotated[UploadFile, File(description="An image")], k: K = 10):
    """The k stored images most similar to the uploaded one."""
    started = time.perf_counter()
    hits = engine.search_bytes(_read_upload(file), k)
    took_ms = (time.perf_counter() - started) * 1e3
    return _json(SearchResponse(results=_results(hits), took_ms=took_ms))


@router.get(
    "/images/{image_id}/similar", response_model=SearchResponse, responses=ERRORS, tags=["search"]
)
def similar(engine: EngineDep, image_id: ImageId, k: K = 10):
    """The k stored images most similar to a stored one (itself excluded)."""
    started = time.perf_counter()
    hits = engine.search_id(image_id, k)
    took_ms = (time.perf_counter() - started) * 1e3
    return _json(SearchResponse(results=_results(hits), took_ms=took_ms))


@router.get("/images/{image_id}", responses=ERRORS, response_class=FileResponse, tags=["images"])
def get_image(engine: EngineDep, image_id: ImageId):
    """The stored image file, as it is on disk."""
    _, path = stored_file(engine, image_id)
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
        Query(
            ge=1,
            le=SIZES[-1],
            description=f"Longest side, pixels; served at the next of {SIZES} up "
            "(default: the server's setting)",
        ),
    ] = None,
):
    """A JPEG thumbnail of a stored image, made once and cached in the store.

    Only a few sizes are made (a size in between gets the next one up), so the cache stays
    small whatever sizes clients ask for; the thumbnails go when their image is deleted.
    """
    size = thumbnail_size(size or request.app.state.settings.thumbnail_size)
    data = cached_thumbnail(engine, image_id, size)
    headers = {"Cache-Control": "public, max-age=86400", "X-Thumbnail-Size": str(size)}
    return Response(data, media_type="image/jpeg", headers=headers)


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
    """Remove an image from the index and the table (an uploaded file and thumbnails too)."""
    engine.remove_image(image_id)  # thumbnails go with the row (Store.remove_images)
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
    return _json(
        SuggestResponse(
            labels=[LabelScore(label=lab, score=round(s, 6)) for lab, s in labels],
            neighbours=_results(hits),
            took_ms=(time.perf_counter() - started) * 1e3,
        )
    )


@router.get("/health", response_model=Health, tags=["service"])
def health(engine: EngineDep):
    """Ready when the model and index are loaded (they load before the server accepts requests)."""
    engine.store.refresh()  # another process may have changed the store since the last query
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
