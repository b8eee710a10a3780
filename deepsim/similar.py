"""``beet similar``'s search: seed items in, similar items out.

Everything here takes a beets :class:`~beets.library.Library` and plain
options, so the plugin only parses its command line and prints.

The path of one search:

1. the seeds' vectors of the active model, in one query
   (:func:`deepsim.store.read_vectors`); seeds without one are reported in
   :attr:`SimilarResult.missing`, never dropped silently;
2. the query vector: the normalised mean of the seed vectors
   (:func:`find_similar`), or each seed on its own (:func:`find_similar_each`);
3. candidates, best first, from the saved Annoy index when it is fresh, or
   from exact search over the stored vectors (small libraries; missing, stale
   or damaged index; a small ``where`` set);
4. filters: seed exclusion, ``where`` (a beets query), at most
   ``max_per_artist`` / ``max_per_album`` results per artist / album; the
   candidate list grows until ``count`` results survive or everything has
   been searched;
5. the surviving items, loaded in one query, with ``deepsim_similarity`` and
   ``deepsim_distance`` set on them (in memory only) for ``$deepsim_similarity`` /
   ``$deepsim_distance`` in beets formats.

:mod:`deepsim.index` owns the saved index (:func:`deepsim.index.open_index`,
:func:`deepsim.index.refresh_index`); this module only ranks and filters.

No torch here.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from beets.dbcore import query as dbquery

from deepsim import store
from deepsim.errors import DeepsimError, ParameterError
from deepsim.identity import AudioIdentity, compare
from deepsim.index import (
    EXACT_THRESHOLD,
    SEARCH_FRACTION,
    ExactIndex,
    SearchIndex,
    open_index,
)
from deepsim.util import check_int

if TYPE_CHECKING:
    from beets.library import Item, Library

    from deepsim.dupes import VersionFolder

#: Fields set on returned items and albums (in memory only), named so that
#: they cannot collide with another plugin's types.
SIMILARITY_FIELD = "deepsim_similarity"
DISTANCE_FIELD = "deepsim_distance"

SearchBackend = Literal["auto", "exact"]


# --------------------------------------------------------------------------- results


@dataclass
class SimilarResult:
    """What a search found.

    Attributes
    ----------
    matches
        ``(item, similarity)`` pairs, best first; each item also carries
        ``item["deepsim_similarity"]`` and ``item["deepsim_distance"]`` (not stored).
    seeds
        The seed items whose vectors made the query.
    missing
        Seed items without a usable vector of the model (not embedded yet,
        failed, or a damaged value).
    stale
        ``(seed, "missing" | "changed")``: seeds whose file vanished or whose
        audio changed since their vector was computed; not used.
    left_out
        How many better-ranked tracks were left out because their file is
        ``"missing"`` on disk or its audio ``"changed"`` since embedding.
    backend
        ``"annoy"`` or ``"exact"``: what produced the candidates.
    index_state
        The saved index's state (``"fresh"``, ``"missing"``, ``"stale"``,
        ``"corrupt"``) or ``"unused"`` when it was not consulted (exact search
        requested, or a ``where`` set small enough to search exactly).
    index_reason
        Why, in a few words (for a log line).
    exhausted
        True when every candidate was examined: fewer than ``count`` matches
        means no more items pass the filters.
    """

    matches: list[tuple[Item, float]] = field(default_factory=list)
    seeds: list[Item] = field(default_factory=list)
    missing: list[Item] = field(default_factory=list)
    stale: list[tuple[Item, str]] = field(default_factory=list)
    left_out: dict[str, int] = field(default_factory=dict)
    backend: str = "exact"
    index_state: str = "unused"
    index_reason: str = ""
    exhausted: bool = False

    @property
    def items(self) -> list[Item]:
        """The matched items, best first."""
        return [item for item, _ in self.matches]


# --------------------------------------------------------------------------- items


load_items = store.items_by_ids


# --------------------------------------------------------------------------- where


Where = str | dbquery.Query | Sequence[str | dbquery.Query] | None


def parse_where(lib: Library, where: Where) -> dbquery.Query | None:
    """Parse a beets query string the way ``beet ls`` does (``None`` passes through).

    A sequence of queries (``-w`` given several times) must all match (AND).
    """
    if where is None or isinstance(where, dbquery.Query):
        return where
    if isinstance(where, (list, tuple)):
        parts = [q for q in (parse_where(lib, w) for w in where) if q is not None]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else dbquery.AndQuery(parts)
    if not isinstance(where, str):
        raise ParameterError(f"where must be a beets query string, got {where!r}")
    if not where.strip():
        return None
    from beets.dbcore import InvalidQueryError
    from beets.library import Item
    from beets.library.queries import parse_query_string

    context = getattr(lib, "music_dir_context", None)
    with context() if context is not None else contextlib.nullcontext():
        try:
            parsed, _sort = parse_query_string(where, Item)
        except (InvalidQueryError, ValueError) as exc:
            raise DeepsimError(f"invalid query {where!r}: {exc}") from exc
    return parsed


def where_ids(lib: Library, where: dbquery.Query, *, limit: int | None = None) -> np.ndarray | None:
    """Ids of the items matching ``where`` (one SQL query), or None for a slow query.

    A query on flexible attributes (or anything else beets cannot express in
    SQL) returns None: it is evaluated on candidate items instead.  With
    ``limit``, at most that many ids are returned (the query stops there).
    """
    sql_where = store.where_sql(where)
    if sql_where is None:
        return None
    return store.where_ids(lib, sql_where, limit=limit)


# --------------------------------------------------------------------------- filters


def _norm(text: Any) -> str:
    return " ".join(str(text or "").split()).casefold()


def _cap_keys(artist: Any, albumartist: Any, album: Any, album_id: Any) -> tuple[Any, Any]:
    """(artist key, album key) for the diversity caps; None where unknown (never capped)."""
    artist_key = _norm(artist) or _norm(albumartist) or None
    # The album as tagged: a beets album (album_id) can gather tracks of several
    # tagged albums (a folder imported with -A), and --max-per-album means the latter.
    if _norm(album):
        album_key: Any = ("name", _norm(albumartist) or _norm(artist), _norm(album))
    elif album_id:
        album_key = ("id", int(album_id))
    else:
        album_key = None
    return artist_key, album_key


def _check_cap(name: str, value: int | None) -> int:
    if value is None:
        return 0
    return check_int(name, value, minimum=0)


class _Candidates:
    """What the filters need to know of candidate ids, fetched in bulk and cached.

    For each id: None when the item no longer exists or fails the ``where``
    query, else its (artist, album) cap keys.  A ``where`` query that SQL can
    evaluate is added to one small SQL query per batch of candidates; only a
    slow one needs whole :class:`Item` objects.
    """

    def __init__(
        self,
        lib: Library,
        *,
        model_id: str,
        fast_where: store.WhereSQL | None,
        slow_where: dbquery.Query | None,
    ) -> None:
        self.lib = lib
        self.model_id = model_id
        self.fast_where = fast_where
        self.slow_where = slow_where
        self.facts: dict[int, tuple[Any, Any] | None] = {}
        self.paths: dict[int, bytes] = {}
        self.files: dict[int, str] = {}  # id -> "ok" | "missing" | "changed"

    def file_state(self, item_id: int) -> str:
        """Whether the candidate's file is there with the audio its vector was made from."""
        state = self.files.get(item_id)
        if state is None:
            audio = store.audio_identities(self.lib, self.model_id, [item_id]).get(item_id)
            change, _ = compare(AudioIdentity.parse(audio), self.paths.get(item_id) or b"")
            state = {"same": "ok", "retagged": "ok"}.get(change, change)
            self.files[item_id] = state
        return state

    def fetch(self, ids: Iterable[int]) -> None:
        unknown = sorted({int(i) for i in ids} - self.facts.keys())
        if not unknown:
            return
        for item_id in unknown:
            self.facts[item_id] = None
        if self.slow_where is not None:
            items = load_items(self.lib, unknown)
            for item_id, item in items.items():
                self.paths[item_id] = item.path
                if self.slow_where.match(item):
                    self.facts[item_id] = _cap_keys(
                        item.get("artist"),
                        item.get("albumartist"),
                        item.get("album"),
                        item.get("album_id"),
                    )
            return
        for item_id, artist, albumartist, album, album_id, path in store.cap_rows(
            self.lib, unknown, self.fast_where
        ):
            self.facts[item_id] = _cap_keys(artist, albumartist, album, album_id)
            self.paths[item_id] = path


# --------------------------------------------------------------------------- search


def _read_vectors(
    lib: Library, model_id: str, ids: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Vectors of ``ids`` (all when None)."""
    return store.read_vectors(lib, model_id, ids=None if ids is None else ids.tolist())


class _Searcher:
    """The candidate source of one ``beet similar`` run, shared by its queries.

    ``allowed`` (the ids matching a small ``where`` set) restricts exact
    search to those items.  ``all_allowed`` lists every id matching a fast
    ``where``, for the exact fallback.
    """

    def __init__(
        self,
        lib: Library,
        model_id: str,
        *,
        index_dir: str | os.PathLike[str] | None,
        backend: SearchBackend,
        allowed: np.ndarray | None,
        all_allowed: Callable[[], np.ndarray] | None,
        search_fraction: float,
        search_k: int | None,
    ) -> None:
        self.lib = lib
        self.model_id = model_id
        self.all_allowed = all_allowed
        self.index_state = "unused"
        self.index_reason = ""
        self.index: SearchIndex = ExactIndex()
        if allowed is not None:
            self.index_reason = f"exact search over the {allowed.size} items matching the query"
            self._use_exact(allowed)
            return
        if backend == "exact":
            self.index_reason = "exact search requested"
        elif index_dir is None:
            self.index_state, self.index_reason = "missing", "no index directory"
        else:
            check = open_index(
                lib, model_id, index_dir, search_fraction=search_fraction, search_k=search_k
            )
            self.index_state, self.index_reason = check.state, check.reason
            if check.fresh and check.index is not None:
                self.index = check.index
                return
        self._use_exact(None)

    @property
    def backend(self) -> str:
        return self.index.backend

    def _use_exact(self, ids: np.ndarray | None) -> None:
        vec_ids, matrix = _read_vectors(self.lib, self.model_id, ids)
        self.index = ExactIndex().build(vec_ids, matrix) if vec_ids.size else ExactIndex()

    def fall_back_to_exact(self) -> None:
        """Search exactly from now on (the approximate search ran short of candidates)."""
        self._use_exact(self.all_allowed() if self.all_allowed is not None else None)

    def query(
        self, vector: np.ndarray, n: int, exclude: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        if len(self.index) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        return self.index.query(vector, n, exclude=exclude)


def _collect(
    searcher: _Searcher,
    candidates: _Candidates,
    vector: np.ndarray,
    *,
    count: int,
    exclude: np.ndarray,
    max_per_artist: int,
    max_per_album: int,
    fold: VersionFolder | None = None,
    seed_ids: Sequence[int] = (),
    left_out: dict[str, int] | None = None,
) -> tuple[list[tuple[int, float]], bool]:
    """Grow the candidate list until ``count`` pass the filters or all are searched.

    Returns ``(id, similarity)`` pairs, best first, and whether everything
    was searched; ``left_out`` counts the better-ranked candidates whose file
    is ``"missing"`` or ``"changed"``.  Each round filters the whole list
    again, so the result does not depend on how the list grew.
    """
    n = max(4 * count + int(exclude.size), 50)
    while True:
        size = len(searcher.index)
        ids, sims = searcher.query(vector, min(n, size), exclude)
        candidates.fetch(ids.tolist())
        folding = None if fold is None else fold.start(seed_ids)
        if fold is not None:
            fold.fetch(ids[: 2 * count + 16].tolist())  # the likely survivors, in bulk
        kept: list[tuple[int, float]] = []
        per_artist: dict[Any, int] = {}
        per_album: dict[Any, int] = {}
        if left_out is None:
            left_out = {}
        left_out.clear()
        for item_id, sim in zip(ids.tolist(), sims.tolist(), strict=True):
            facts = candidates.facts.get(item_id)
            if facts is None:
                continue  # removed since indexed, or rejected by `where`
            state = candidates.file_state(item_id)
            if state != "ok":
                left_out[state] = left_out.get(state, 0) + 1
                continue  # never a file that vanished or whose audio changed
            if folding is not None and folding.is_version(item_id):
                continue  # another version of a seed or of a better match
            artist, album = facts
            if max_per_artist and artist is not None:
                if per_artist.get(artist, 0) >= max_per_artist:
                    continue
                per_artist[artist] = per_artist.get(artist, 0) + 1
            if max_per_album and album is not None:
                if per_album.get(album, 0) >= max_per_album:
                    continue
                per_album[album] = per_album.get(album, 0) + 1
            kept.append((item_id, float(sim)))
            if folding is not None:
                folding.keep(item_id)
            if len(kept) == count:
                return kept, False
        if searcher.backend == "exact":
            if n >= size:
                return kept, True
            n *= 4
        else:
            n *= 4
            if n >= size // 4:
                # The filters reject most candidates: search exactly instead.
                searcher.fall_back_to_exact()
                n = len(searcher.index)


def _seed_ids(seeds: Sequence[Item]) -> list[int]:
    ids = []
    for seed in seeds:
        if getattr(seed, "id", None) is None:
            raise ParameterError(f"seed {seed!r} is not in a library (it has no id)")
        ids.append(store.item_id(seed))
    return ids


@dataclass
class _Plan:
    lib: Library
    searcher: _Searcher
    candidates: _Candidates
    seed_vectors: dict[int, np.ndarray]
    seed_files: dict[int, str]
    exclude: np.ndarray
    count: int
    max_per_artist: int
    max_per_album: int
    fold: VersionFolder | None = None
    #: Per-dimension factors applied to the query (a taste weight, see deepsim.taste).
    query_scale: np.ndarray | None = None


def _plan(
    lib: Library,
    seeds: Sequence[Item],
    *,
    model_id: str,
    index_dir: str | os.PathLike[str] | None,
    count: int,
    exclude_seeds: bool,
    where: Where,
    max_per_artist: int,
    max_per_album: int,
    backend: SearchBackend,
    exact_below: int,
    search_fraction: float,
    search_k: int | None,
    exclude_ids: Iterable[int] = (),
    fold: VersionFolder | None = None,
) -> _Plan:
    check_int("count", count, minimum=1)
    max_per_artist = _check_cap("max_per_artist", max_per_artist)
    max_per_album = _check_cap("max_per_album", max_per_album)
    if backend not in ("auto", "exact"):
        raise ParameterError(f"backend must be 'auto' or 'exact', got {backend!r}")
    check_int("exact_below", exact_below, minimum=0)
    if not seeds:
        raise DeepsimError("no seed items: the query matched nothing")
    seed_ids = _seed_ids(seeds)
    stored = store.read_stored(lib, model_id, ids=seed_ids)
    seed_vectors: dict[int, np.ndarray] = {}
    seed_files: dict[int, str] = {}
    paths = {store.item_id(s): s.path for s in seeds}
    for k, (item_id, audio) in enumerate(zip(stored.ids.tolist(), stored.audio, strict=True)):
        change, _ = compare(AudioIdentity.parse(audio), paths.get(item_id) or b"")
        if change in ("same", "retagged"):
            seed_vectors[item_id] = stored.matrix[k]
        else:
            seed_files[item_id] = change
    parsed = parse_where(lib, where)
    fast_where = store.where_sql(parsed) if parsed is not None else None
    slow_where = parsed if parsed is not None and fast_where is None else None
    allowed: np.ndarray | None = None
    all_allowed: Callable[[], np.ndarray] | None = None
    if fast_where is not None:
        # A small where-set is searched exactly; LIMIT keeps the probe cheap
        # when the set is large.
        limit = None if backend == "exact" else exact_below
        ids = store.where_ids(lib, fast_where, limit=limit)
        if limit is None or ids.size < limit:
            allowed = ids
        all_allowed = functools.partial(store.where_ids, lib, fast_where)
    searcher = _Searcher(
        lib,
        model_id,
        index_dir=index_dir,
        backend=backend,
        allowed=allowed,
        all_allowed=all_allowed,
        search_fraction=search_fraction,
        search_k=search_k,
    )
    excluded = {int(i) for i in exclude_ids} | (set(seed_ids) if exclude_seeds else set())
    exclude = np.asarray(sorted(excluded), np.int64)
    return _Plan(
        lib,
        searcher,
        _Candidates(lib, model_id=model_id, fast_where=fast_where, slow_where=slow_where),
        seed_vectors,
        seed_files,
        exclude,
        count,
        max_per_artist,
        max_per_album,
        fold,
    )


def _search(plan: _Plan, seeds: list[Item]) -> SimilarResult:
    used = [s for s in seeds if store.item_id(s) in plan.seed_vectors]
    result = SimilarResult(
        seeds=used,
        missing=[
            s
            for s in seeds
            if store.item_id(s) not in plan.seed_vectors and store.item_id(s) not in plan.seed_files
        ],
        stale=[
            (s, plan.seed_files[store.item_id(s)])
            for s in seeds
            if store.item_id(s) in plan.seed_files
        ],
    )
    if used:
        mean = np.mean(
            [plan.seed_vectors[store.item_id(s)] for s in used], axis=0, dtype=np.float64
        )
        norm = float(np.linalg.norm(mean))
        if not math.isfinite(norm) or norm < 1e-3:
            raise DeepsimError("the seed vectors cancel out: choose other seeds or use --each")
        vector = np.asarray(mean / norm, dtype=np.float32)
        gain = 1.0
        if plan.query_scale is not None:  # another taste weight: re-weight the query only
            scaled = vector * plan.query_scale
            gain = float(np.linalg.norm(scaled))
            vector = (scaled / gain).astype(np.float32)
        searcher = plan.searcher
        if len(searcher.index) and searcher.index.dim != vector.shape[0]:
            searcher.index_state = "corrupt"
            searcher.index_reason = (
                f"index dimension {searcher.index.dim} differs from the seed vectors' "
                f"({vector.shape[0]})"
            )
            searcher.fall_back_to_exact()
        found, result.exhausted = _collect(
            searcher,
            plan.candidates,
            vector,
            count=plan.count,
            exclude=plan.exclude,
            max_per_artist=plan.max_per_artist,
            max_per_album=plan.max_per_album,
            fold=plan.fold,
            seed_ids=[store.item_id(s) for s in used],
            left_out=result.left_out,
        )
        items = load_items(plan.lib, [i for i, _ in found])
        for item_id, cosine in found:
            sim = cosine * gain
            item = items.get(item_id)
            if item is None:
                continue  # removed while we searched
            item[SIMILARITY_FIELD] = round(sim, 4)
            item[DISTANCE_FIELD] = round(1.0 - sim, 4)
            result.matches.append((item, sim))
    result.backend = plan.searcher.backend
    result.index_state = plan.searcher.index_state
    result.index_reason = plan.searcher.index_reason
    return result


def find_similar(
    lib: Library,
    seeds: Sequence[Item],
    *,
    model_id: str,
    index_dir: str | os.PathLike[str] | None = None,
    count: int = 20,
    exclude_seeds: bool = True,
    where: Where = None,
    max_per_artist: int = 0,
    max_per_album: int = 0,
    backend: SearchBackend = "auto",
    exact_below: int = EXACT_THRESHOLD,
    search_fraction: float = SEARCH_FRACTION,
    search_k: int | None = None,
    query_scale: np.ndarray | None = None,
    exclude_ids: Iterable[int] = (),
    fold: VersionFolder | None = None,
) -> SimilarResult:
    """Items similar to the mean of ``seeds``.

    Parameters
    ----------
    lib
        The beets library.
    seeds
        Items of ``lib`` (e.g. ``list(lib.items(query))``).
    model_id
        The active model's id; only its vectors are used.
    index_dir
        Where :func:`deepsim.index.refresh_index` saves the index (``<config dir>/deepsim``);
        None: always search exactly.
    count
        How many items to return at most.
    exclude_seeds
        Never return a seed.
    where
        A beets query string (``"format:FLAC"``, ``"^genre:Christmas"``) or
        parsed query that results must match.
    max_per_artist, max_per_album
        At most this many results per artist / album (0: no limit).  Items
        with no artist (album) are not capped.
    backend
        ``"auto"``: the saved index when fresh, else exact; ``"exact"``: always exact.
    exact_below
        A ``where`` query matching fewer items than this is searched exactly
        over just those items.
    search_fraction, search_k
        Annoy search effort (see :class:`deepsim.index.AnnoyIndex`).
    query_scale
        Multiply the query vector by this before searching, and report
        similarities on that scale: another taste weight for a trained model's
        vectors without re-embedding (:func:`deepsim.taste.query_scale`).
    exclude_ids
        Item ids never returned (e.g. :func:`deepsim.outliers.outlier_ids`).
    fold
        Fold versions of one recording (:class:`deepsim.dupes.VersionFolder`):
        a version of a seed or of a better match is skipped.  None: keep all.

    Returns
    -------
    SimilarResult
        The matches and how they were found; seeds without a vector are in
        ``missing`` (with no seed vector at all, ``matches`` is empty).

    Raises
    ------
    DeepsimError
        No seeds, an invalid ``where`` query, or seed vectors that cancel out.
    ParameterError
        An invalid option value (a ``ValueError`` too).
    """
    seeds = list(seeds)
    plan = _plan(
        lib,
        seeds,
        model_id=model_id,
        index_dir=index_dir,
        count=count,
        exclude_seeds=exclude_seeds,
        where=where,
        max_per_artist=max_per_artist,
        max_per_album=max_per_album,
        backend=backend,
        exact_below=exact_below,
        search_fraction=search_fraction,
        search_k=search_k,
        exclude_ids=exclude_ids,
        fold=fold,
    )
    plan.query_scale = query_scale
    return _search(plan, seeds)


def find_similar_each(
    lib: Library,
    seeds: Sequence[Item],
    *,
    model_id: str,
    index_dir: str | os.PathLike[str] | None = None,
    count: int = 20,
    exclude_seeds: bool = True,
    where: Where = None,
    max_per_artist: int = 0,
    max_per_album: int = 0,
    backend: SearchBackend = "auto",
    exact_below: int = EXACT_THRESHOLD,
    search_fraction: float = SEARCH_FRACTION,
    search_k: int | None = None,
    query_scale: np.ndarray | None = None,
    exclude_ids: Iterable[int] = (),
    fold: VersionFolder | None = None,
) -> list[SimilarResult]:
    """One search per seed (``beet similar --each``), in seed order.

    Options are those of :func:`find_similar`; ``exclude_seeds`` excludes
    every seed from every result.  A seed without a vector gets a result with
    no matches and itself in ``missing``.  Each result has its own
    :class:`Item` objects, so ``$deepsim_similarity`` is right in each.
    """
    seeds = list(seeds)
    plan = _plan(
        lib,
        seeds,
        model_id=model_id,
        index_dir=index_dir,
        count=count,
        exclude_seeds=exclude_seeds,
        where=where,
        max_per_artist=max_per_artist,
        max_per_album=max_per_album,
        backend=backend,
        exact_below=exact_below,
        search_fraction=search_fraction,
        search_k=search_k,
        exclude_ids=exclude_ids,
        fold=fold,
    )
    plan.query_scale = query_scale
    return [_search(plan, [seed]) for seed in seeds]


# --------------------------------------------------------------------------- albums


@dataclass
class AlbumResult:
    """What :func:`find_similar_albums` found.

    ``albums`` best first, each with ``deepsim_similarity`` / ``deepsim_distance``
    set (in memory); ``seeds`` the seed albums that had a vector; ``similarities``
    in the order of ``albums``.
    """

    albums: list[Any] = field(default_factory=list)
    similarities: list[float] = field(default_factory=list)
    seeds: list[Any] = field(default_factory=list)
    left_out: int = 0


def album_vectors(
    lib: Library, model_id: str, *, where: Where = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(album ids, unit matrix)``: each album's normalised mean of its tracks' vectors.

    Only tracks matching ``where`` count; an album none of whose tracks has a
    vector is absent.  One read of the stored vectors.
    """
    ids, matrix = store.read_vectors(lib, model_id)
    parsed = parse_where(lib, where)
    if parsed is not None and ids.size:
        allowed = where_ids(lib, parsed)
        if allowed is None:
            items = load_items(lib, ids.tolist())
            keep = np.asarray([parsed.match(items[i]) if i in items else False for i in ids])
        else:
            keep = np.isin(ids, allowed)
        ids, matrix = ids[keep], matrix[keep]
    albums = store.album_ids(lib, ids.tolist())
    if not albums:
        return np.zeros(0, np.int64), np.zeros((0, matrix.shape[1] if matrix.ndim == 2 else 0))
    rows = np.asarray([albums.get(int(i), -1) for i in ids.tolist()], np.int64)
    has = rows >= 0
    album_ids, inverse = np.unique(rows[has], return_inverse=True)
    sums = np.zeros((album_ids.size, matrix.shape[1]), np.float64)
    np.add.at(sums, inverse, matrix[has])
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    ok = norms[:, 0] > 1e-6
    return album_ids[ok], (sums[ok] / norms[ok]).astype(np.float32)


def find_similar_albums(
    lib: Library,
    seeds: Sequence[Any],
    *,
    model_id: str,
    count: int = 20,
    exclude_seeds: bool = True,
    where: Where = None,
) -> AlbumResult:
    """Albums similar to the mean of the seed albums' vectors (exact search).

    An album's vector is the normalised mean of its tracks' vectors (of the
    tracks matching ``where``, when given); the query is the normalised mean
    of the seed albums' vectors.  ``left_out`` counts result albums all of
    whose tracks' files are missing on disk (they are not returned).
    """
    count = check_int("count", count, minimum=1)
    album_ids, matrix = album_vectors(lib, model_id, where=where)
    if where is not None:
        # the seeds' own vectors are all their tracks, whatever `where` keeps
        seed_ids, seed_matrix = album_vectors(lib, model_id)
    else:
        seed_ids, seed_matrix = album_ids, matrix
    position = {int(a): k for k, a in enumerate(seed_ids.tolist())}
    used = [album for album in seeds if store.item_id(album) in position]
    result = AlbumResult(seeds=used)
    if not used or album_ids.size == 0:
        return result
    mean = seed_matrix[[position[store.item_id(a)] for a in used]].mean(axis=0, dtype=np.float64)
    norm = float(np.linalg.norm(mean))
    if norm < 1e-3:
        raise DeepsimError("the seed albums' vectors cancel out: choose other seeds")
    sims = matrix @ (mean / norm).astype(np.float32)
    order = np.lexsort((album_ids, -sims))
    excluded = {store.item_id(a) for a in used} if exclude_seeds else set()
    for k in order.tolist():
        album_id = int(album_ids[k])
        if album_id in excluded:
            continue
        album = lib.get_album(album_id)
        if album is None:
            continue
        if not any(os.path.isfile(os.fsdecode(item.path)) for item in album.items()):
            result.left_out += 1
            continue
        sim = float(sims[k])
        album[SIMILARITY_FIELD] = round(sim, 4)
        album[DISTANCE_FIELD] = round(1.0 - sim, 4)
        result.albums.append(album)
        result.similarities.append(sim)
        if len(result.albums) == count:
            break
    return result
