"""Song paths (``beet similar QUERY --to QUERY2``): from one sound to another in small steps.

The start point is the normalised mean of the seeds' vectors, the end point
that of the targets'.  ``count`` waypoints are spaced evenly along the great
circle between them (spherical linear interpolation), and each waypoint gets
the unused track nearest to it, in order; every step is a small move on the
sphere and no track appears twice.  The playlist starts with the seed nearest
the start point and ends with the target nearest the end point.

Candidates pass the same filters as ``beet similar``: a ``where`` query, at
most ``max_per_artist`` / ``max_per_album`` tracks per artist / album
(the two ends are not counted), ``exclude_ids`` (e.g. album outliers) and
version folding (:class:`deepsim.dupes.VersionFolder`; the two ends count,
so no other version of them appears in between).  The search is exact over
the stored vectors (one matrix product for all waypoints).  No torch here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from deepsim import store
from deepsim.errors import DeepsimError
from deepsim.similar import (
    DISTANCE_FIELD,
    SIMILARITY_FIELD,
    _cap_keys,
    load_items,
    parse_where,
    where_ids,
)
from deepsim.util import check_int

if TYPE_CHECKING:
    from beets.dbcore import query as dbquery
    from beets.library import Item, Library

    from deepsim.dupes import VersionFolder

_CAP_FIELDS = ("artist", "albumartist", "album", "album_id")


@dataclass
class PathStep:
    """One track of a path: its similarity to the start point, the end point and its waypoint."""

    item: Item
    to_start: float
    to_end: float
    to_waypoint: float


@dataclass
class PathResult:
    """A path, start and end included; ``missing`` lists seeds/targets without a vector."""

    steps: list[PathStep] = field(default_factory=list)
    missing: list[Item] = field(default_factory=list)
    exhausted: bool = False

    @property
    def items(self) -> list[Item]:
        return [step.item for step in self.steps]

    def lines(self, fmt: str, *, verbose: bool = False) -> list[str]:
        """Each track in the beets format ``fmt``; ``verbose``: led by its similarity to
        the start and the end, under a header."""
        out = ["start    end  track"] if verbose else []
        for step in self.steps:
            line = format(step.item, fmt)
            out.append(f"{step.to_start:5.3f}  {step.to_end:5.3f}  {line}" if verbose else line)
        return out


def slerp(start: np.ndarray, end: np.ndarray, ts: Sequence[float]) -> np.ndarray:
    """Points at fractions ``ts`` of the great circle from ``start`` to ``end`` (unit vectors)."""
    cos = float(np.clip(start @ end, -1.0, 1.0))
    theta = math.acos(cos)
    if theta < 1e-6:
        return np.repeat(start[None, :], len(ts), axis=0)
    t = np.asarray(ts, np.float64)[:, None]
    points = (np.sin((1 - t) * theta) * start + np.sin(t * theta) * end) / math.sin(theta)
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points.astype(np.float32)


def _mean(matrix: np.ndarray, what: str) -> np.ndarray:
    mean = matrix.mean(axis=0, dtype=np.float64)
    norm = float(np.linalg.norm(mean))
    if not math.isfinite(norm) or norm < 1e-3:
        raise DeepsimError(f"the {what} vectors cancel out: choose other {what}s")
    return (mean / norm).astype(np.float32)


def _pool(
    lib: Library, model_id: str, where: str | dbquery.Query | None
) -> tuple[np.ndarray, np.ndarray]:
    """Ids and vectors of the tracks a path may use (those matching ``where``)."""
    ids, matrix = store.read_vectors(lib, model_id)
    parsed = parse_where(lib, where)
    if parsed is None or not ids.size:
        return ids, matrix
    allowed = where_ids(lib, parsed)
    if allowed is None:  # a slow query: evaluate it on the items
        items = load_items(lib, ids.tolist())
        allowed = np.asarray([i for i, item in items.items() if parsed.match(item)], np.int64)
    keep = np.isin(ids, allowed)
    return ids[keep], matrix[keep]


def find_path(
    lib: Library,
    seeds: Sequence[Item],
    targets: Sequence[Item],
    *,
    model_id: str,
    count: int = 20,
    where: str | dbquery.Query | None = None,
    max_per_artist: int = 0,
    max_per_album: int = 0,
    exclude_ids: Iterable[int] = (),
    fold: VersionFolder | None = None,
) -> PathResult:
    """A playlist from ``seeds`` to ``targets`` with ``count`` tracks in between.

    Parameters
    ----------
    lib
        The beets library.
    seeds, targets
        Items of ``lib``: where the path starts and where it arrives.
    model_id
        The active model's id.
    count
        Waypoints between the two ends (the playlist has ``count + 2`` tracks
        when enough candidates pass the filters; ``exhausted`` tells when not).
    where, max_per_artist, max_per_album, exclude_ids, fold
        Filters, as in :func:`deepsim.similar.find_similar`.

    Raises
    ------
    DeepsimError
        No seed or no target with a vector, a track among both, or vectors
        that cancel out.
    """
    count = check_int("count", count, minimum=1)
    max_per_artist = check_int("max_per_artist", max_per_artist, minimum=0)
    max_per_album = check_int("max_per_album", max_per_album, minimum=0)
    seeds, targets = list(seeds), list(targets)
    if not seeds or not targets:
        raise DeepsimError("a path needs seed tracks and target tracks")
    ends = {store.item_id(s) for s in seeds} & {store.item_id(t) for t in targets}
    if ends:
        raise DeepsimError(f"{len(ends)} track(s) are both a seed and a target")
    end_ids = [store.item_id(i) for i in (*seeds, *targets)]
    vec_ids, vecs = store.read_vectors(lib, model_id, ids=end_ids)
    row = {int(i): k for k, i in enumerate(vec_ids.tolist())}
    result = PathResult(missing=[i for i in (*seeds, *targets) if store.item_id(i) not in row])
    used_seeds = [s for s in seeds if store.item_id(s) in row]
    used_targets = [t for t in targets if store.item_id(t) in row]
    if not used_seeds or not used_targets:
        which = "seed" if not used_seeds else "target"
        raise DeepsimError(f"no {which} track has a {model_id} vector yet")
    start = _mean(vecs[[row[store.item_id(s)] for s in used_seeds]], "seed")
    end = _mean(vecs[[row[store.item_id(t)] for t in used_targets]], "target")
    first = max(used_seeds, key=lambda s: float(vecs[row[store.item_id(s)]] @ start))
    last = max(used_targets, key=lambda t: float(vecs[row[store.item_id(t)]] @ end))

    ids, matrix = _pool(lib, model_id, where)
    blocked = set(end_ids) | {int(i) for i in exclude_ids}
    keep = ~np.isin(ids, np.fromiter(blocked, np.int64, count=len(blocked)))
    ids, matrix = ids[keep], matrix[keep]
    waypoints = slerp(start, end, [k / (count + 1) for k in range(1, count + 1)])
    chosen = _walk(
        lib,
        ids,
        matrix,
        waypoints,
        max_per_artist,
        max_per_album,
        fold,
        [store.item_id(first), store.item_id(last)],
    )
    result.exhausted = len(chosen) < count

    order = [store.item_id(first), *[i for i, _ in chosen], store.item_id(last)]
    items = load_items(lib, order)
    vec_ids, vecs = store.read_vectors(lib, model_id, ids=order)
    vec_row = {int(i): k for k, i in enumerate(vec_ids.tolist())}
    point_sim = {
        store.item_id(first): float(vecs[vec_row[store.item_id(first)]] @ start),
        store.item_id(last): float(vecs[vec_row[store.item_id(last)]] @ end),
        **dict(chosen),
    }
    for item_id in order:
        item = items.get(item_id)
        if item is None or item_id not in vec_row:
            continue  # removed meanwhile
        vector = vecs[vec_row[item_id]]
        step = PathStep(item, float(vector @ start), float(vector @ end), point_sim[item_id])
        item[SIMILARITY_FIELD] = round(step.to_waypoint, 4)
        item[DISTANCE_FIELD] = round(1.0 - step.to_waypoint, 4)
        result.steps.append(step)
    return result


def _walk(
    lib: Library,
    ids: np.ndarray,
    matrix: np.ndarray,
    waypoints: np.ndarray,
    max_per_artist: int,
    max_per_album: int,
    fold: VersionFolder | None,
    ends: list[int],
) -> list[tuple[int, float]]:
    """For each waypoint in turn, the nearest unused candidate that passes the filters."""
    if not ids.size:
        return []
    sims = matrix @ waypoints.T
    facts: dict[int, tuple[Any, Any]] = {}
    if max_per_artist or max_per_album:
        facts = {
            i: _cap_keys(*row)
            for i, row in store.read_item_fields(lib, ids.tolist(), _CAP_FIELDS).items()
        }
    folding = None if fold is None else fold.start(ends)
    used: set[int] = set()
    per_artist: dict[Any, int] = {}
    per_album: dict[Any, int] = {}
    chosen: list[tuple[int, float]] = []
    for k in range(waypoints.shape[0]):
        order = np.argsort(-sims[:, k], kind="stable")
        if fold is not None:
            fold.fetch(ids[order[:64]].tolist())
        for r in order.tolist():
            item_id = int(ids[r])
            if item_id in used:
                continue
            artist, album = facts.get(item_id, (None, None))
            if (
                max_per_artist
                and artist is not None
                and per_artist.get(artist, 0) >= max_per_artist
            ):
                continue
            if max_per_album and album is not None and per_album.get(album, 0) >= max_per_album:
                continue
            if folding is not None and folding.is_version(item_id):
                continue
            used.add(item_id)
            if artist is not None:
                per_artist[artist] = per_artist.get(artist, 0) + 1
            if album is not None:
                per_album[album] = per_album.get(album, 0) + 1
            if folding is not None:
                folding.keep(item_id)
            chosen.append((item_id, float(sims[r, k])))
            break
    return chosen
