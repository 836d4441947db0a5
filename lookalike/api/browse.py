"""Browsing the collection: a page of images at a time, newest first or by path, in one folder.

Read-only SQL over the store's images table (the columns of lookalike.index.meta.SCHEMA).
"""

from __future__ import annotations

import threading
from collections import Counter
from enum import Enum
from typing import Annotated

from fastapi import APIRouter, Query

from .deps import EngineDep
from .schemas import ErrorResponse, Folder, Folders, ImageInfo, ImagePage

router = APIRouter(tags=["browse"])

MAX_LIMIT = 500


class Order(str, Enum):
    newest = "newest"  # file modification time, newest first
    path = "path"  # by folder, then name


ORDER_SQL = {Order.newest: "mtime DESC, id DESC", Order.path: "path, id"}


def _folder_filter(folder: str | None) -> tuple[str, list]:
    """SQL condition and parameters: images directly in folder ('' is the top level)."""
    if folder is None:
        return "1", []
    folder = folder.strip("/")
    if not folder:
        return "instr(path, '/') = 0", []
    prefix = folder + "/"
    return (
        "substr(path, 1, ?) = ? AND instr(substr(path, ?), '/') = 0",
        [len(prefix), prefix, len(prefix) + 1],
    )


def _info(row) -> ImageInfo:
    image_id, path, size, mtime, width, height, labels = row
    return ImageInfo(
        id=image_id,
        path=path,
        url=f"/images/{image_id}",
        thumbnail_url=f"/images/{image_id}/thumbnail",
        width=width,
        height=height,
        size=size,
        mtime=mtime,
        labels=labels.split("|") if labels else [],
    )


@router.get(
    "/images",
    response_model=ImagePage,
    responses={422: {"model": ErrorResponse, "description": "Invalid parameter"}},
)
def list_images(
    engine: EngineDep,
    offset: Annotated[int, Query(ge=0, le=2**62, description="Images to skip")] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Images per page")] = 48,
    order: Annotated[Order, Query(description="newest first, or by path")] = Order.newest,
    folder: Annotated[
        str | None,
        Query(max_length=4096, description="Only images directly in this folder ('' = top level)"),
    ] = None,
) -> ImagePage:
    """A page of the collection's images (no embeddings), with the total for paging."""
    where, params = _folder_filter(folder)
    conn = engine.store.db.conn
    total = conn.execute(f"SELECT COUNT(*) FROM images WHERE {where}", params).fetchone()[0]
    rows = conn.execute(
        f"SELECT id, path, size, mtime, width, height, labels FROM images WHERE {where} "
        f"ORDER BY {ORDER_SQL[order]} LIMIT ? OFFSET ?",
        [*params, limit, offset],
    ).fetchall()
    return ImagePage(
        images=[_info(r) for r in rows],
        total=total,
        offset=offset,
        limit=limit,
        order=order.value,
        folder=None if folder is None else folder.strip("/"),
    )


_folders_cache: dict[tuple[str, int], list[Folder]] = {}
_folders_lock = threading.Lock()


@router.get("/folders", response_model=Folders)
def folders(engine: EngineDep) -> Folders:
    """Every folder that holds images, by path, with how many it holds directly."""
    db = engine.store.db
    key = (str(db.path), db.generation)  # every write bumps the generation
    with _folders_lock:
        cached = _folders_cache.get(key)
    if cached is None:
        counts = Counter(
            path.rpartition("/")[0] for (path,) in db.conn.execute("SELECT path FROM images")
        )
        cached = [Folder(path=p, images=n) for p, n in sorted(counts.items())]
        with _folders_lock:
            _folders_cache.clear()
            _folders_cache[key] = cached
    return Folders(folders=cached)
