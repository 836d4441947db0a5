"""Near-duplicate groups of a store: every member linked directly to the kept photo.

Candidate pairs come from ``pairs`` (cosine >= the threshold, exact copies, close pHashes with
a high enough cosine, pairs that local features verify). Groups are then built as stars, never
as connected components: photos are taken in the keep rule's order (``keep``), and each photo
not yet in a group becomes the kept photo of a new group with every photo not yet in a group
that it has a candidate pair with. So a photo joins a group only on direct evidence against the
photo that is kept: groups cannot drift through chains of links (A~B~C with A and C
different), and the kept photo is the best of its group by the keep rule. No TensorFlow here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from .keep import (
    DEFAULT_KEEP,
    check_policy,
    measure,
    original_key,
    plain_key,
    reason,
)
from .pairs import (  # noqa: F401  (hash_links, PHASH_MAX: re-exported for eval and tests)
    PHASH_MAX,
    candidate_pairs,
    check_phash_max,
    check_threshold,
    hash_links,
)
from .thresholds import (  # noqa: F401  (re-exported: the CLI, the API and tests use them)
    FALLBACK_THRESHOLD,
    PHASH_COS_FLOOR,
    calibrated_threshold,
    capped_note,
    default_threshold,
    phash_floor,
)

if TYPE_CHECKING:
    from ..store import Store

# A cosine link less than BAND above the threshold needs a second witness: a pHash within
# WITNESS_PHASH bits or verified local features (docs/dedupe.md: on 252 intel_scenes photos,
# all different, the two pairs above the calibrated 0.792 scored 0.800 and 0.798, pHash 24 and
# 32 bits apart, no features verified)
BAND = 0.05
WITNESS_PHASH = 16
ASPECT_TOLERANCE = 0.02  # frames whose aspect ratios differ by more may be crops of each other
# (sha256 of a photo, of another): whether the first is a crop of the second, held by this
# process (the store's pair cache keeps them across runs: verification.CROP_VERSION)
_CROP_VERDICTS: OrderedDict[tuple[str, str], bool] = OrderedDict()
CROP_VERDICTS_HELD = 200_000


@dataclass(frozen=True)
class Member:
    """One image of a group and the evidence that put it there (against the kept image)."""

    id: int
    path: str  # relative to PHOTOS ('@uploads/...' for uploads)
    score: float  # cosine similarity to the kept image
    bytes: int
    width: int
    height: int
    mtime: float
    phash_distance: int | None = None  # pHash bits differing from the kept one; None: unknown
    link: str = "kept"  # kept, or what joined it: exact, cosine, phash, verified
    matches: int | None = None  # local-feature matches verified against the kept one
    quality: dict[str, Any] | None = None  # the keep rule's facts (keep.Quality.to_dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "path": self.path,
            "score": round(self.score, 6),
            "bytes": self.bytes,
            "width": self.width,
            "height": self.height,
            "link": self.link,
        }
        if self.phash_distance is not None:
            out["phash_distance"] = self.phash_distance
        if self.matches is not None:
            out["matches"] = self.matches
        if self.quality is not None:
            out["quality"] = self.quality
        return out


@dataclass(frozen=True)
class Group:
    """Near-duplicates: the one to keep, every member (the kept one first), and why."""

    keep: Member
    members: list[Member]
    reason: str = ""  # why the kept one was kept

    @property
    def others(self) -> list[Member]:
        """The members that are not kept."""
        return [m for m in self.members if m.id != self.keep.id]


def find_groups(
    store: Store,
    threshold: float | None = None,
    keep: str = DEFAULT_KEEP,
    phash_max: int | None = PHASH_MAX,
    verify: Callable | None = None,
    band: float = 0.0,
) -> list[Group]:
    """Groups of near-duplicate images in the store, in a deterministic order.

    Candidate pairs (``candidate_pairs``: cosine >= threshold, default default_threshold(store);
    pHash within phash_max bits with cosine >= PHASH_COS_FLOOR, None or negative: off; exact
    copies; pairs verify returns) are assembled into stars around the photos the keep rule
    ranks first (module docstring); pairs a reviewer marked "not duplicates" are left out, and
    a photo a reviewer chose to keep comes first. A cosine link under threshold + band needs a
    second witness (BAND; the callers use it at the calibrated default threshold, not at one a
    user gives). Groups are sorted by their smallest path;
    members list the kept one first, then by path.
    """
    from .review import reviewed

    check_policy(keep)
    t = default_threshold(store) if threshold is None else check_threshold(threshold)
    phash_max = check_phash_max(phash_max)
    links, matches = candidate_pairs(store, t, phash_max, verify, band)
    apart, preferred = reviewed(store)
    links = {p: kind for p, kind in links.items() if p not in apart}
    records, vectors = _records_and_vectors(store, links)
    nodes = sorted(vectors)
    quality = (
        {i: measure(store.file_path(records[i].path)) for i in nodes}
        if keep == DEFAULT_KEEP
        else {}
    )
    links = {
        p: kind
        for p, kind in links.items()
        if p[0] in vectors
        and p[1] in vectors
        and _witnessed(p, kind, t + band, vectors, records, matches)
    }
    rank = _rank(keep, records, quality, preferred)
    crops = _crops(store, links, records, rank) if keep == DEFAULT_KEEP else set()
    if crops:  # a crop is never kept over the photo it was cut from, however sharp
        rank = _rank(keep, records, quality, preferred, crops)
    groups = []
    for center, joined in _stars(nodes, links, rank):
        group = _group(center, joined, records, vectors, (links, matches), quality, keep, preferred)
        if crops & set(joined):
            group = replace(group, reason=group.reason + "; its crops come after it")
        groups.append(group)
    groups.sort(key=lambda g: min(m.path for m in g.members))
    return groups


def _records_and_vectors(store: Store, links: dict) -> tuple[dict, dict]:
    """The records and stored vectors of the linked photos (one snapshot, under the lock; a
    photo removed meanwhile has neither)."""
    nodes = sorted({i for p in links for i in p})
    with store.lock:
        records = store.db.get_many(nodes)
        nodes = [i for i in nodes if i in records]
        return records, dict(zip(nodes, store.index.reconstruct(np.array(nodes, np.int64))))


def _stars(nodes: list[int], links: dict, rank: Callable):
    """(kept photo, its members): each photo in the keep rule's order that is not yet in a
    group, with every photo not yet in a group that it has a link with (none: no group)."""
    adjacent: dict[int, list[int]] = {i: [] for i in nodes}
    for a, b in links:
        if a in adjacent and b in adjacent:
            adjacent[a].append(b)
            adjacent[b].append(a)
    taken: set[int] = set()
    for center in sorted(nodes, key=rank):
        joined = sorted(j for j in adjacent[center] if j not in taken)
        if center in taken or not joined:
            continue
        taken.update([center, *joined])
        yield center, joined


def _witnessed(pair, kind, band_top, vectors, records, matches) -> bool:
    """False for a cosine link under band_top (in the band above the threshold) without a
    second witness."""
    a, b = pair
    if kind != "cosine" or float(vectors[a] @ vectors[b]) >= band_top:
        return True
    from .verification import MIN_MATCHES

    dist = _hash_distance(records[a].phash, records[b].phash)
    return matches.get(pair, 0) >= MIN_MATCHES or (dist is not None and dist <= WITNESS_PHASH)


def _rank(
    keep: str, records: dict, quality: dict, preferred: set[int], crops: frozenset = frozenset()
) -> Callable[[int], tuple]:
    """Sort key of ids: a reviewer's choice first, then (``original``) photos that are no crop
    of another, then the keep rule's order."""
    if keep == DEFAULT_KEEP:
        return lambda i: (
            i not in preferred,
            i in crops,
            original_key(records[i].path, quality.get(i), records[i].size),
        )
    key = plain_key(keep)
    return lambda i: (i not in preferred, key(_plain(records[i])))


def _crops(store: Store, links: dict, records: dict, rank: Callable) -> set[int]:
    """The photos that the keep rule ranks before a linked photo whose frame holds theirs (a
    crop of it: verification.cropped_from). Checked where the frames differ: the photo ranked
    first has fewer pixels or another aspect ratio (a re-encode or a resize of the same frame
    needs no geometry). Verdicts are kept by content: for the process (the service's pages)
    and in the store's pair cache (the next run)."""
    ordered = [(a, b) if rank(a) < rank(b) else (b, a) for a, b in links]
    pairs = [
        (first, other) for first, other in ordered if _frames_differ(records[first], records[other])
    ]
    key = {p: (records[p[0]].sha256, records[p[1]].sha256) for p in pairs}
    verdicts = _known_verdicts(store, set(key.values()))
    todo = sorted(set(key.values()) - verdicts.keys())
    if todo:
        paths = {r.sha256: r.path for r in sorted(records.values(), key=lambda r: -r.id)}
        verdicts.update(_new_verdicts(store, todo, paths))
    return {first for (first, _), k in key.items() if verdicts[k]}


def _known_verdicts(store: Store, keys: set[tuple[str, str]]) -> dict[tuple[str, str], bool]:
    """The verdicts of these (crop, photo) contents this process or the store's cache has."""
    from .verification import CROP_VERSION

    known = {k: _CROP_VERDICTS[k] for k in keys if k in _CROP_VERDICTS}
    rest = sorted(keys - known.keys())
    stored = {k: bool(v) for k, v in store.db.verified_inliers(rest, CROP_VERSION).items()}
    _remember(stored)
    return known | stored


def _new_verdicts(store: Store, todo: list, paths: dict[str, str]) -> dict:
    """Match each (crop, photo) pair of contents; the verdicts of files whose bytes are their
    rows' are kept (in the process, and in the store when its writer lock is free)."""
    from .verification import CROP_VERSION, WORKERS, checked_features, cropped_from, save_cached

    shas = sorted({s for k in todo for s in k})
    with ThreadPoolExecutor(WORKERS) as pool:  # OpenCV releases the GIL
        files = [store.file_path(paths[s]) for s in shas]
        seen = dict(zip(shas, pool.map(checked_features, files, shas)))
        found = dict(
            zip(todo, pool.map(lambda k: cropped_from(seen[k[0]][0], seen[k[1]][0]), todo))
        )
    sound = {k: crop for k, crop in found.items() if seen[k[0]][1] and seen[k[1]][1]}
    _remember(sound)
    save_cached(store, [(a, b, int(crop)) for (a, b), crop in sound.items()], CROP_VERSION)
    return found


def _remember(verdicts: dict[tuple[str, str], bool]) -> None:
    _CROP_VERDICTS.update(verdicts)
    while len(_CROP_VERDICTS) > CROP_VERDICTS_HELD:
        _CROP_VERDICTS.popitem(last=False)


def _frames_differ(first: Any, other: Any) -> bool:
    """Whether FIRST may be a crop of OTHER: fewer pixels, or an aspect ratio that differs."""
    aspects = first.width * other.height, other.width * first.height
    smaller = first.width * first.height < other.width * other.height
    return smaller or abs(aspects[0] - aspects[1]) > ASPECT_TOLERANCE * max(aspects)


def _plain(rec: Any) -> Member:
    return Member(rec.id, rec.path, 0.0, rec.size, rec.width, rec.height, rec.mtime)


def _group(center, joined, records, vectors, links, quality, keep, preferred) -> Group:
    """The Group of a kept id and the ids joined to it, with the evidence of each."""
    ref = vectors[center]
    links, matches = links
    members = []
    for i in [center, *joined]:
        rec, q = records[i], quality.get(i)
        pair = (min(i, center), max(i, center))
        kind = "kept" if i == center else links[pair]
        members.append(
            Member(
                i,
                rec.path,
                1.0 if i == center else float(vectors[i] @ ref),
                rec.size,
                rec.width,
                rec.height,
                rec.mtime,
                _hash_distance(rec.phash, records[center].phash),
                kind,
                matches.get(pair) if i != center else None,
                q.to_dict() if q is not None else None,
            )
        )
    members.sort(key=lambda m: (m.id != center, m.path))
    why = "chosen in review" if center in preferred else reason(keep, members[0], quality)
    return Group(members[0], members, why)


def _hash_distance(a: int | None, b: int | None) -> int | None:
    """Bits in which two stored pHashes (signed int64) differ; None if either is unknown."""
    return None if a is None or b is None else ((a ^ b) & 0xFFFF_FFFF_FFFF_FFFF).bit_count()


def groups_to_dict(
    groups: list[Group], threshold: float, phash_max: int | None = None
) -> dict[str, Any]:
    """The JSON of `lookalike dedupe --json` and GET /duplicates: threshold and groups (and
    phash_max, the pHash distance that also joined photos, when given). Each group names the
    kept photo and why; each member gives the link that put it in the group."""
    out: dict[str, Any] = {"threshold": round(float(threshold), 6)}
    if phash_max is not None:
        out["phash_max"] = phash_max
    out["groups"] = [
        {"keep": g.keep.path, "reason": g.reason, "members": [m.to_dict() for m in g.members]}
        for g in groups
    ]
    return out


def duplicates(
    store: Store,
    threshold: float | None = None,
    keep: str = DEFAULT_KEEP,
    phash_max: int | None = PHASH_MAX,
    offset: int = 0,
    limit: int | None = None,
) -> dict:
    """find_groups as the JSON-ready dict of GET /duplicates (threshold None: the default);
    groups[offset:offset + limit] only, with "total" the number of groups."""
    store.refresh()
    store.require_complete()  # groups need every row embedded by one model
    t = default_threshold(store) if threshold is None else check_threshold(threshold)
    phash_max = check_phash_max(phash_max)
    from .verification import verified_pairs

    band = BAND if threshold is None else 0.0
    groups = find_groups(store, t, keep, phash_max, verified_pairs, band)
    page = groups[offset : None if limit is None else offset + limit]
    out = groups_to_dict(page, t, phash_max)
    out.update(total=len(groups), offset=offset)
    if threshold is None and t >= 1.0:  # why so few: the page shows it
        out["note"] = capped_note(store.info.get("dedupe_calibration") or {})
    return out
