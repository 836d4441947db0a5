"""Pydantic models of the API's responses (they make the OpenAPI schema at /docs)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Result(BaseModel):
    id: int = Field(description="Stable image id")
    path: str = Field(description="Path relative to the photos folder (or @uploads/...)")
    score: float = Field(description="Cosine similarity to the query, in [-1, 1]")
    url: str = Field(description="Where to fetch the image")
    thumbnail_url: str = Field(description="Where to fetch a JPEG thumbnail")
    labels: list[str] = Field(default_factory=list, description="Labels of the image, if any")


class SearchResponse(BaseModel):
    results: list[Result]
    took_ms: float = Field(description="Server time for the query, milliseconds")


class AddResponse(BaseModel):
    ids: list[int] = Field(description="Ids of the added images, in upload order")


class DeleteResponse(BaseModel):
    deleted: int


class Health(BaseModel):
    status: str
    images: int


class Stats(BaseModel):
    images: int
    index_type: str
    embedding_dim: int
    image_size: int
    metric: str
    store_version: int
    lookalike_version: str


class ErrorResponse(BaseModel):
    error: str = Field(description="Machine-readable kind of error")
    detail: str = Field(description="What was wrong, for a person")


class LabelScore(BaseModel):
    label: str
    score: float = Field(description="Share of the neighbours' similarity weight carrying it, 0..1")


class SuggestResponse(BaseModel):
    labels: list[LabelScore] = Field(description="Suggested labels, best first")
    neighbours: list[Result] = Field(description="The look-alikes that voted")
    took_ms: float


class PageConfig(BaseModel):
    needs_api_key: bool = Field(description="Whether POST /images and DELETE need X-API-Key")
    dedupe_threshold: float = Field(
        description="Cosine at or above which two photos count as near-duplicates"
    )
    threshold_calibrated: bool = Field(
        description="Whether the threshold was measured for this store's model (else a default)"
    )


class ImageInfo(BaseModel):
    id: int = Field(description="Stable image id")
    path: str = Field(description="Path relative to the photos folder (or @uploads/...)")
    url: str = Field(description="Where to fetch the image")
    thumbnail_url: str = Field(description="Where to fetch a JPEG thumbnail")
    width: int
    height: int
    size: int = Field(description="File size, bytes")
    mtime: float = Field(description="File modification time, seconds since the epoch")
    labels: list[str] = Field(default_factory=list)


class ImagePage(BaseModel):
    images: list[ImageInfo]
    total: int = Field(description="Images matching the folder filter, all pages together")
    offset: int
    limit: int
    order: str
    folder: str | None


class Folder(BaseModel):
    path: str = Field(description="Folder relative to the photos folder ('' for the top level)")
    images: int = Field(description="Images directly in it")


class Folders(BaseModel):
    folders: list[Folder]
