"""Duplicates over HTTP: the groups, the review actions, and the review page (/review).

Every route but the page needs the API key when the service has one (LOOKALIKE_API_KEY): the
groups name files, and the actions move them; the page asks for the key. Moves go to LOOKALIKE_DEDUPE_MOVE_TO only, are journalled
like the CLI's (lookalike.dedupe.actions) and undone by POST /duplicates/undo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from ..dedupe import actions, review
from ..dedupe.grouping import Group, Member
from ..dedupe.grouping import duplicates as find_duplicates
from ..dedupe.keep import KEEP_POLICIES
from ..errors import InvalidArgumentError, NotFoundError
from .deps import EngineDep, require_api_key
from .routes import ERRORS

router = APIRouter(tags=["dedupe"])
KEYED = [Depends(require_api_key)]  # every route but the page itself
MIN_THRESHOLD = 0.5  # below this a "duplicate" is merely a similar photo: refused (422)
MAX_GROUPS = 200  # groups per page at most
AUTH = {401: {"description": "Missing or wrong X-API-Key (when the service has a key)"}}
KEEP_PATTERN = "^(" + "|".join(KEEP_POLICIES) + ")$"


class Ids(BaseModel):
    """Images of one group, as the review page sends them."""

    ids: list[Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]] = Field(min_length=2)


class KeepChoice(BaseModel):
    """Keep `id` instead of the `others` of its group."""

    id: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
    others: list[Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]] = Field(default_factory=list)


class MoveOthers(BaseModel):
    """Move the `others` of a group to the service's dedupe folder; `keep` stays."""

    keep: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
    others: list[Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]] = Field(min_length=1)


@router.get("/duplicates", responses=ERRORS | AUTH, dependencies=KEYED)
def duplicates(
    engine: EngineDep,
    threshold: Annotated[
        float | None,
        Query(
            ge=MIN_THRESHOLD,
            le=1.0,
            description="Cosine threshold (default: the store's calibrated one)",
        ),
    ] = None,
    keep: Annotated[str, Query(pattern=KEEP_PATTERN, description="Which to keep")] = "original",
    offset: Annotated[int, Query(ge=0, le=10**9, description="Groups to skip")] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_GROUPS, description="Groups to return")] = 50,
) -> dict:
    """Groups of near-duplicates, as `lookalike dedupe --json` prints them, a page at a time
    (`total` groups in all); each member with the link that put it in its group."""
    return find_duplicates(engine.store, threshold, keep, offset=offset, limit=limit)


@router.post("/duplicates/keep", responses=ERRORS | AUTH, dependencies=KEYED)
def keep_instead(engine: EngineDep, choice: KeepChoice) -> dict:
    """Keep this one instead: it is kept in its group from now on."""
    review.prefer(engine.store, choice.id, choice.others)
    return {"kept": choice.id}


@router.post("/duplicates/apart", responses=ERRORS | AUTH, dependencies=KEYED)
def not_duplicates(engine: EngineDep, group: Ids) -> dict:
    """Not duplicates: these images never form a group again (remembered in the store)."""
    return {"pairs": review.mark_apart(engine.store, group.ids)}


@router.post("/duplicates/move", responses=ERRORS | AUTH, dependencies=KEYED)
def move_others(request: Request, engine: EngineDep, move: MoveOthers) -> dict:
    """Move the others of a group to the service's dedupe folder (journalled; undo)."""
    folder = request.app.state.settings.dedupe_move_to
    if folder is None:
        raise InvalidArgumentError(
            "moving is off: set LOOKALIKE_DEDUPE_MOVE_TO to a folder outside the photos and store"
        )
    if move.keep in move.others:
        raise InvalidArgumentError("the kept image cannot be one of the others")
    store = engine.store
    group = _group(store, move.keep, move.others)
    report = actions.apply_actions(store, actions.plan_actions(store, [group], Path(folder)))
    return report.to_dict()


@router.post("/duplicates/undo", responses=ERRORS | AUTH, dependencies=KEYED)
def undo(engine: EngineDep) -> dict:
    """Put back every moved file of the last clean-up (the CLI's or this page's)."""
    return actions.undo(engine.store).to_dict()


@router.get("/review", response_class=HTMLResponse, include_in_schema=False)
def review_page() -> HTMLResponse:
    """The Duplicates review page."""
    from .page import STATIC_DIR

    return HTMLResponse((STATIC_DIR / "duplicates.html").read_text(encoding="utf-8"))


def _group(store: Any, keep: int, others: list[int]) -> Group:
    """A Group of stored ids (the plan needs only ids and paths)."""
    records = store.db.get_many([keep, *others])
    for i in [keep, *others]:
        if i not in records:
            raise NotFoundError(f"no image with id {i}")
    members = [
        Member(i, r.path, 0.0, r.size, r.width, r.height, r.mtime)
        for i, r in ((i, records[i]) for i in [keep, *others])
    ]
    return Group(members[0], members)
