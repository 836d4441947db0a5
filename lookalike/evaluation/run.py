"""`lookalike eval`: score a store's own search, and baselines, on the same images.

Every image of the store queries lookalike through :meth:`Engine.search_vectors` with its stored
vector, itself excluded -- exactly the answers of :meth:`Engine.search_id`, which the CLI and the
HTTP API serve -- and each baseline over the same files. Without a store, PHOTOS is trained on
and indexed into a temporary one first.

The three evaluations, one module each: :mod:`.retrieval` (labelled photos), :mod:`.neardup`
(ground-truth near-duplicate groups) and :mod:`.transforms` (edited copies made here); what they
share (the store's images, the rankers, the temporary store) is in :mod:`.collection`.
"""

from __future__ import annotations

from .neardup import evaluate_neardup, neardup_scores, read_groups
from .retrieval import evaluate_retrieval, label_of, retrieval_scores
from .transforms import TRANSFORMS, evaluate_transforms, make_transformed_set

__all__ = [
    "TRANSFORMS",
    "evaluate_neardup",
    "evaluate_retrieval",
    "evaluate_transforms",
    "label_of",
    "make_transformed_set",
    "neardup_scores",
    "read_groups",
    "retrieval_scores",
]
