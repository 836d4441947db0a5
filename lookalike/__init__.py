"""lookalike: look-alike photo search and deduplication with a convolutional autoencoder and FAISS.

The Python API (lookalike.collection)::

    import lookalike

    with lookalike.open("store") as photos:
        best = photos.search("query.jpg", k=5)[0]
        print(best.path, best.score, best.labels)

Names are imported on first use, so ``import lookalike`` loads neither TensorFlow nor FAISS.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .version import __version__

__all__ = [
    "Collection",
    "DuplicateGroup",
    "LookalikeError",
    "Match",
    "Photo",
    "Suggestion",
    "__version__",
    "open",
]

if TYPE_CHECKING:
    from .collection import Collection, DuplicateGroup, Match, Photo, Suggestion, open
    from .errors import LookalikeError

_LAZY = {
    "open": "collection",
    "Collection": "collection",
    "DuplicateGroup": "collection",
    "Match": "collection",
    "Photo": "collection",
    "Suggestion": "collection",
    "LookalikeError": "errors",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'lookalike' has no attribute {name!r}")
