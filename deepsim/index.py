"""Nearest-neighbour search over L2-normalised vectors, with interchangeable backends.

Two implementations of one interface, :class:`VectorIndex` (as benfred/implicit
does for its CPU and GPU models):

:class:`AnnoyIndex`
    Approximate search with `Annoy <https://github.com/spotify/annoy>`_
    (angular metric, beets item ids as Annoy ids).  Its file is memory-mapped,
    so loading costs nothing; used for large libraries.
:class:`ExactIndex`
    Brute force with numpy (one float32 matrix-vector product).  Needs every
    vector in memory; used for small libraries and as the fallback whenever the
    saved index is missing, stale or damaged.

Both answer :meth:`VectorIndex.query` with item ids and cosine similarities in
[-1, 1], best first.

An index is saved under a directory (the plugin passes
``<beets config dir>/deepsim/``) as ``index-<model id>.ann`` (or ``.npz``) plus
a JSON sidecar ``index-<model id>.json`` recording the model id, the vector
count, the dimension, the build parameters and the store fingerprint the
index was built from (the position of the store's vector change log, see
:func:`deepsim.store.change_state`, so that upkeep reads only what changed
since).  :func:`load_index` returns the saved index only when
the sidecar matches the current model id and fingerprint and the file is the
one the sidecar describes (size, modification time, a digest of sampled
blocks); anything else is reported as ``missing``, ``stale`` or ``corrupt`` in
an :class:`IndexCheck`, never raised, so the caller can fall back to exact
search or rebuild.  All writes are atomic (temporary file + :func:`os.replace`).

No torch here: this module is on the ``beet similar`` path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from deepsim import store
from deepsim.errors import AnnIndexError
from deepsim.util import atomic_temp_path, atomic_write, get_logger

#: Below this many vectors no Annoy index is kept: exact search (which reads
#: every vector from the library, ~10-20 µs each) costs a few tens of ms, about
#: what checking, mapping and querying a saved index costs.  Above it exact
#: search falls behind fast (4x at 5k, 6x at 10k vectors; see
#: ``docs/performance.md``).  Also the size below which a ``where`` set is
#: searched exactly instead of filtering Annoy's candidates.
EXACT_THRESHOLD = 2_000

#: Annoy trees built per index.  With :data:`SEARCH_FRACTION` this gives a
#: recall@10 against exact search of 0.9935-0.9985 on clustered, anisotropic,
#: non-negative 400-d vectors (100k items, 300 or 2,000 clusters) and builds
#: 100k × 400-d in about 3 s on two idle cores (50 trees: +0.0015 recall, 2.5x
#: the build time).
DEFAULT_N_TREES = 20

#: Annoy inspects ``max(n * n_trees, SEARCH_FRACTION * count)`` nodes per query
#: (its ``search_k``): 0.25 gave recall@10 0.9875 on the 2,000-cluster set, 0.5
#: gives ≥ 0.99 on both, for 4-10 ms per query at 100k items.
SEARCH_FRACTION = 0.5

#: ...but never more than this many nodes: at 1M vectors, 100k nodes (0.1 of the index)
#: gave recall@10 1.0 against exact search, like 0.5, for 88 ms a query instead of 248 ms
#: (20k nodes: 0.9938, 4 ms); see ``docs/performance.md``.
MAX_SEARCH_K = 100_000

#: The changes kept beside a saved index (vectors written since its build,
#: searched exactly, and built ids filtered out) are folded into a rebuild
#: once they pass this share of it: 5 % of 100k is 5,000 vectors, 2 ms of
#: exact search and 8 MB of delta file; a rebuild costs seconds.
REBUILD_SHARE = 0.05

#: Version of the sidecar layout; a sidecar of another version is stale.
SIDECAR_FORMAT = 3

#: Annoy ids are signed 32-bit integers.
MAX_ANNOY_ID = 2**31 - 1

if TYPE_CHECKING:
    from beets.library import Library

_log = get_logger(__name__)

Backend = Literal["annoy", "exact"]
State = Literal["fresh", "missing", "stale", "corrupt"]

_SAMPLE_BLOCK = 64 * 1024
_SAMPLE_BLOCKS = 64
_EDGE_BYTES = 1024 * 1024


# --------------------------------------------------------------------------- helpers


def _as_vectors(ids: Any, matrix: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``(ids, matrix)`` and return int64 ids and a row-normalised float32 matrix."""
    ids_arr = np.asarray(ids)
    mat = np.asarray(matrix, dtype=np.float32)
    if ids_arr.ndim != 1:
        raise ValueError(f"ids must be one-dimensional, got shape {ids_arr.shape}")
    if ids_arr.size and not np.issubdtype(ids_arr.dtype, np.integer):
        raise ValueError(f"ids must be integers, got dtype {ids_arr.dtype}")
    ids_arr = ids_arr.astype(np.int64, copy=False)
    if mat.ndim != 2:
        raise ValueError(f"matrix must be two-dimensional, got shape {mat.shape}")
    if mat.shape[0] != ids_arr.shape[0]:
        raise ValueError(f"{ids_arr.shape[0]} ids but {mat.shape[0]} matrix rows")
    if mat.shape[1] < 1:
        raise ValueError(f"vectors must have at least one dimension, got shape {mat.shape}")
    if ids_arr.size:
        if ids_arr.min() < 0:
            raise ValueError(f"ids must be non-negative, got {int(ids_arr.min())}")
        if np.unique(ids_arr).size != ids_arr.size:
            raise ValueError("ids must be unique")
    if not np.isfinite(mat).all():
        raise ValueError("matrix contains NaN or infinite values")
    norms = np.linalg.norm(mat, axis=1, keepdims=True)
    if mat.shape[0] and float(norms.min()) == 0.0:
        bad = int(ids_arr[int(np.argmin(norms[:, 0]))])
        raise ValueError(f"the vector of id {bad} is zero")
    return ids_arr, np.ascontiguousarray(mat / norms, dtype=np.float32)


def _as_query(vector: Any, dim: int) -> np.ndarray:
    """Validate a query vector and return it L2-normalised as float32."""
    vec = np.asarray(vector, dtype=np.float32)
    if vec.shape != (dim,):
        raise ValueError(f"query vector must have shape ({dim},), got {vec.shape}")
    norm = float(np.linalg.norm(vec))
    if not math.isfinite(norm) or norm == 0.0:
        raise ValueError(f"query vector must be finite and non-zero, got norm {norm}")
    return vec / norm


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    return int(n)


def _exclude_array(exclude: Iterable[int] | np.ndarray | None) -> np.ndarray:
    if exclude is None:
        return np.zeros(0, np.int64)
    if isinstance(exclude, np.ndarray):
        return np.unique(exclude.astype(np.int64, copy=False))
    return np.unique(np.fromiter((int(i) for i in exclude), np.int64))


def _order(ids: np.ndarray, sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort by decreasing similarity, ties by increasing id."""
    order = np.lexsort((ids, -sims))
    return ids[order].astype(np.int64, copy=False), sims[order].astype(np.float32, copy=False)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and :func:`os.replace`."""
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def _sampled_digest(path: Path, size: int, salt: str) -> str:
    """BLAKE2b of ``salt``, the first and last MiB and evenly spaced 64 KiB blocks.

    Reads a few MiB whatever the file size (all of a file below 2 MiB), so
    checking an index costs milliseconds; with the size and modification
    time it tells a replaced, truncated or rewritten file from the one a
    sidecar describes.  The salt binds the sidecar's structural fields (see
    :meth:`Sidecar.salt`) to the file, so an edited sidecar is caught too.
    """
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{salt}|{size}".encode())
    with open(path, "rb") as handle:
        offsets = {0, max(0, size - _EDGE_BYTES)}
        offsets.update(int(k * size / _SAMPLE_BLOCKS) for k in range(_SAMPLE_BLOCKS))
        for offset in sorted(offsets):
            handle.seek(offset)
            length = _EDGE_BYTES if offset in (0, max(0, size - _EDGE_BYTES)) else _SAMPLE_BLOCK
            digest.update(offset.to_bytes(8, "little"))
            digest.update(handle.read(length))
    return digest.hexdigest()


# --------------------------------------------------------------------------- interface


class SearchIndex(ABC):
    """What a search needs: nearest neighbours of a vector by cosine similarity.

    Ids are non-negative integers (beets item ids).
    """

    #: Backend name, as used in :data:`BACKENDS` and in the sidecar.
    backend: ClassVar[Backend]

    @property
    @abstractmethod
    def dim(self) -> int:
        """Vector dimension (0 before :meth:`build`)."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of indexed vectors."""

    @abstractmethod
    def query(
        self, vector: Any, n: int, *, exclude: Iterable[int] | np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` nearest ids of ``vector``, best first.

        Parameters
        ----------
        vector
            ``(dim,)`` query, normalised here.
        n
            How many results at most; fewer when the index has fewer (non-excluded)
            vectors, or, for approximate backends, when the search found fewer.
        exclude
            Ids never returned.

        Returns
        -------
        ids, similarities
            int64 ids and float32 cosine similarities in [-1, 1], sorted by
            decreasing similarity (ties by increasing id).
        """


class VectorIndex(SearchIndex):
    """A search index that is built from vectors and saved to one file.

    Build with :meth:`build` (or load a saved one with :meth:`load`), then
    :meth:`query`.
    """

    #: File name suffix of a saved index.
    suffix: ClassVar[str]

    @property
    @abstractmethod
    def max_id(self) -> int:
        """The largest indexed id (-1 when empty or unknown)."""

    @abstractmethod
    def build(self, ids: Any, matrix: Any) -> VectorIndex:
        """Index ``matrix`` (``(n, dim)``, rows need not be normalised) under ``ids``.

        Returns ``self``.  Raises :class:`ValueError` for unusable input
        (shape mismatch, duplicate or negative ids, zero or non-finite rows).
        """

    @abstractmethod
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index to ``path`` atomically."""

    @classmethod
    @abstractmethod
    def load(cls, path: str | os.PathLike[str], *, dim: int, count: int) -> VectorIndex:
        """Load an index saved by :meth:`save`.

        Raises :class:`~deepsim.errors.AnnIndexError` when the file is
        unreadable or does not hold ``count`` vectors of dimension ``dim``.
        """


# --------------------------------------------------------------------------- exact


class ExactIndex(VectorIndex):
    """Brute-force cosine search: one float32 matrix-vector product per query."""

    backend: ClassVar[Backend] = "exact"
    suffix: ClassVar[str] = ".npz"

    def __init__(self) -> None:
        self._ids = np.zeros(0, np.int64)
        self._matrix = np.zeros((0, 0), np.float32)

    @property
    def dim(self) -> int:
        return int(self._matrix.shape[1])

    def __len__(self) -> int:
        return int(self._ids.shape[0])

    @property
    def ids(self) -> np.ndarray:
        """The indexed ids, in build order."""
        return self._ids

    @property
    def max_id(self) -> int:
        """The largest indexed id (-1 when empty)."""
        return int(self._ids.max()) if self._ids.size else -1

    def build(self, ids: Any, matrix: Any) -> ExactIndex:
        self._ids, self._matrix = _as_vectors(ids, matrix)
        return self

    def query(
        self, vector: Any, n: int, *, exclude: Iterable[int] | np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        n = _check_n(n)
        if len(self) == 0 or n == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        vec = _as_query(vector, self.dim)
        sims = self._matrix @ vec
        excluded = _exclude_array(exclude)
        if excluded.size:
            positions = np.flatnonzero(~np.isin(self._ids, excluded))
        else:
            positions = np.arange(len(self))
        if n < positions.size:
            # Keep the n best, plus every tie of the n-th best, so that the id
            # tie-break in _order is the same whatever argpartition picked.
            best = np.argpartition(-sims[positions], n - 1)[:n]
            cutoff = sims[positions[best]].min()
            positions = positions[sims[positions] >= cutoff]
        ids, out = _order(self._ids[positions], np.clip(sims[positions], -1.0, 1.0))
        return ids[:n], out[:n]

    def save(self, path: str | os.PathLike[str]) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, ids=self._ids, matrix=self._matrix)
        _atomic_write_bytes(Path(path), buffer.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, dim: int, count: int) -> ExactIndex:
        try:
            with np.load(os.fspath(path), allow_pickle=False) as data:
                ids, matrix = data["ids"], data["matrix"]
        except (OSError, ValueError, KeyError, EOFError) as exc:
            raise AnnIndexError(f"{os.fspath(path)}: unreadable exact index ({exc})") from exc
        if matrix.shape != (count, dim) or ids.shape != (count,):
            raise AnnIndexError(
                f"{os.fspath(path)}: holds {matrix.shape} vectors, expected ({count}, {dim})"
            )
        index = cls()
        try:
            index.build(ids, matrix)
        except ValueError as exc:
            raise AnnIndexError(f"{os.fspath(path)}: {exc}") from exc
        return index


# --------------------------------------------------------------------------- annoy


class AnnoyIndex(VectorIndex):
    """Approximate cosine search with Annoy (angular metric).

    Parameters
    ----------
    n_trees
        Trees to build; more trees, better recall, slower build, bigger file.
    search_fraction
        A query inspects ``max(n * n_trees, min(search_fraction * len(self),
        MAX_SEARCH_K))`` nodes (Annoy's ``search_k``).
    search_k
        A fixed ``search_k`` instead (``None`` or -1: as above).
    n_jobs
        Threads used to build the trees (-1: all cores).
    seed
        Annoy's random seed, for reproducible builds.
    """

    backend: ClassVar[Backend] = "annoy"
    suffix: ClassVar[str] = ".ann"

    def __init__(
        self,
        *,
        n_trees: int = DEFAULT_N_TREES,
        search_fraction: float = SEARCH_FRACTION,
        search_k: int | None = None,
        n_jobs: int = -1,
        seed: int = 42,
    ) -> None:
        if isinstance(n_trees, bool) or not isinstance(n_trees, int) or n_trees < 1:
            raise ValueError(f"n_trees must be a positive integer, got {n_trees!r}")
        if not 0.0 <= search_fraction <= 1.0:
            raise ValueError(f"search_fraction must be in [0, 1], got {search_fraction!r}")
        if search_k is not None and (
            isinstance(search_k, bool) or not isinstance(search_k, int) or search_k < -1
        ):
            raise ValueError(f"search_k must be -1, None or a positive integer, got {search_k!r}")
        if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs == 0 or n_jobs < -1:
            raise ValueError(f"n_jobs must be -1 or a positive integer, got {n_jobs!r}")
        self.n_trees = n_trees
        self.search_fraction = search_fraction
        self.search_k = None if search_k in (None, -1, 0) else search_k
        self.n_jobs = n_jobs
        self.seed = seed
        self._annoy: Any = None
        self._dim = 0
        self._count = 0
        self._max_id = -1

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def max_id(self) -> int:
        return self._max_id

    def __len__(self) -> int:
        return self._count

    def build(self, ids: Any, matrix: Any) -> AnnoyIndex:
        import annoy

        ids_arr, mat = _as_vectors(ids, matrix)
        if ids_arr.size and int(ids_arr.max()) > MAX_ANNOY_ID:
            raise ValueError(f"Annoy ids must be below 2**31, got {int(ids_arr.max())}")
        index = annoy.AnnoyIndex(mat.shape[1], "angular")
        index.set_seed(self.seed)
        # Row by row: one 40M-element list for 100k × 400 is 2-3x slower to build.
        for item_id, row in zip(ids_arr.tolist(), mat, strict=True):
            index.add_item(item_id, row.tolist())
        index.build(self.n_trees, n_jobs=self.n_jobs)
        self._annoy, self._dim, self._count = index, int(mat.shape[1]), int(ids_arr.size)
        self._max_id = int(ids_arr.max()) if ids_arr.size else -1
        return self

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The indexed (unit) vectors of ``ids``, which must be in the index."""
        annoy_index = self._require()
        out = np.zeros((len(ids), self._dim), np.float32)
        for row, item_id in enumerate(np.asarray(ids, np.int64).tolist()):
            out[row] = annoy_index.get_item_vector(item_id)
        return out

    def _require(self) -> Any:
        if self._annoy is None:
            raise AnnIndexError("the Annoy index is empty: build or load it first")
        return self._annoy

    def query(
        self, vector: Any, n: int, *, exclude: Iterable[int] | np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        n = _check_n(n)
        annoy_index = self._require()
        vec = _as_query(vector, self.dim)
        excluded = _exclude_array(exclude)
        if n == 0 or self._count == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        want = min(n + int(excluded.size), self._count)
        if self.search_k is not None:
            search_k = self.search_k
        else:
            share = min(int(self.search_fraction * self._count), MAX_SEARCH_K)
            search_k = max(want * self.n_trees, share)
        found, dists = annoy_index.get_nns_by_vector(
            vec.tolist(), want, search_k=search_k, include_distances=True
        )
        ids = np.asarray(found, np.int64)
        # Angular distance is sqrt(2 - 2 cos) on normalised vectors.
        sims = np.clip(1.0 - np.square(np.asarray(dists, np.float64)) / 2.0, -1.0, 1.0)
        if excluded.size:
            keep = ~np.isin(ids, excluded)
            ids, sims = ids[keep], sims[keep]
        ids, out = _order(ids, sims.astype(np.float32))
        return ids[:n], out[:n]

    def save(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        tmp = atomic_temp_path(path)
        index = self._require()
        try:
            index.save(os.fspath(tmp))
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        dim: int,
        count: int,
        max_id: int | None = None,
        n_trees: int = DEFAULT_N_TREES,
        trees: int | None = None,
        search_fraction: float = SEARCH_FRACTION,
        search_k: int | None = None,
    ) -> AnnoyIndex:
        """Memory-map a saved index.

        ``max_id`` (the largest id, when known) is checked against Annoy's item
        count (Annoy allocates every id up to the largest), ``trees`` (what the
        build produced, default ``n_trees``) against its tree count: Annoy
        builds fewer trees than asked for a few hundred items or less.
        """
        import annoy

        if dim < 1:
            raise AnnIndexError(f"{os.fspath(path)}: invalid dimension {dim}")
        index = annoy.AnnoyIndex(dim, "angular")
        try:
            index.load(os.fspath(path))
        except (OSError, RuntimeError, ValueError) as exc:
            raise AnnIndexError(f"{os.fspath(path)}: unreadable Annoy index ({exc})") from exc
        problem = None
        if max_id is not None and index.get_n_items() != max_id + 1:
            problem = f"holds {index.get_n_items()} Annoy items, expected {max_id + 1}"
        elif index.get_n_trees() != (n_trees if trees is None else trees):
            problem = f"has {index.get_n_trees()} trees, expected {trees or n_trees}"
        if problem is not None:
            index.unload()
            raise AnnIndexError(f"{os.fspath(path)}: {problem}")
        loaded = cls(n_trees=n_trees, search_fraction=search_fraction, search_k=search_k)
        loaded._annoy, loaded._dim, loaded._count = index, int(dim), int(count)
        loaded._max_id = -1 if max_id is None else int(max_id)
        return loaded


#: Backends by name.
BACKENDS: dict[str, type[VectorIndex]] = {"annoy": AnnoyIndex, "exact": ExactIndex}


# --------------------------------------------------------------------------- on disk


def _safe_name(model_id: str) -> str:
    if not isinstance(model_id, str) or not model_id:
        raise ValueError(f"model_id must be a non-empty string, got {model_id!r}")
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", model_id)
    if safe != model_id:
        # Keep distinct ids distinct after sanitising.
        safe += "-" + hashlib.blake2b(model_id.encode(), digest_size=4).hexdigest()
    return safe


def index_paths(
    directory: str | os.PathLike[str], model_id: str, *, backend: str = "annoy"
) -> tuple[Path, Path]:
    """``(index file, sidecar)`` paths of ``model_id``'s index under ``directory``."""
    suffix = BACKENDS[backend].suffix if backend in BACKENDS else None
    if suffix is None:
        raise ValueError(f"unknown index backend {backend!r}; choose one of {sorted(BACKENDS)}")
    stem = f"index-{_safe_name(model_id)}"
    base = Path(os.fspath(directory))
    return base / f"{stem}{suffix}", base / f"{stem}.json"


def _aux_path(directory: str | os.PathLike[str], model_id: str, kind: str) -> Path:
    """``ids`` (the built vectors' item ids, ascending), ``delta`` (changes since) or ``lock``
    (``rows``: the file of sidecar format 2, removed with the index)."""
    suffix = {"ids": ".ids.npy", "rows": ".rows.npy", "delta": ".delta.npz", "lock": ".lock"}[kind]
    return Path(os.fspath(directory)) / f"index-{_safe_name(model_id)}{suffix}"


@dataclass(frozen=True)
class Sidecar:
    """What a saved index was built from (the JSON next to the index file).

    ``n_trees`` is the setting the index was built with; ``trees`` what Annoy
    actually built (fewer for a few hundred items, where one tree holds every
    item).  ``pinned``: built on request (``deepsim-index -f``) below the
    small-library threshold, so kept there.  ``delta_count``/``dropped_count``
    and ``delta_digest`` describe the delta file: vectors written since the
    build (searched exactly beside the index) and built ids no longer current.
    ``fingerprint`` is the store's state the index *with its delta* describes
    (:attr:`deepsim.store.ChangeState.text`: the change log's epoch and position).
    """

    model_id: str
    backend: str
    count: int
    max_id: int
    dim: int
    n_trees: int
    fingerprint: str
    built_at: float
    build_seconds: float
    file_size: int
    file_mtime_ns: int
    file_digest: str
    trees: int = 0
    pinned: bool = False
    delta_count: int = 0
    dropped_count: int = 0
    delta_digest: str = ""
    format: int = SIDECAR_FORMAT

    @classmethod
    def from_json(cls, text: str) -> Sidecar:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        fields: dict[str, Any] = {
            "model_id": str,
            "backend": str,
            "count": int,
            "max_id": int,
            "dim": int,
            "n_trees": int,
            "fingerprint": str,
            "built_at": (int, float),
            "build_seconds": (int, float),
            "file_size": int,
            "file_mtime_ns": int,
            "file_digest": str,
            "trees": int,
            "pinned": bool,
            "delta_count": int,
            "dropped_count": int,
            "delta_digest": str,
            "format": int,
        }
        for name, kind in fields.items():
            value = data.get(name)
            if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
                raise ValueError(f"field {name!r} missing or of the wrong type")
        return cls(**{name: data[name] for name in fields})

    @property
    def live_count(self) -> int:
        """Vectors the index answers for: built, less dropped, plus the delta."""
        return self.count - self.dropped_count + self.delta_count

    def salt(self) -> str:
        """The fields the file digest covers besides the file itself."""
        return "|".join(
            str(v)
            for v in (
                self.backend,
                self.model_id,
                self.dim,
                self.count,
                self.max_id,
                self.n_trees,
                self.trees,
            )
        )

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True) + "\n"


@dataclass(frozen=True)
class IndexCheck:
    """The outcome of :func:`load_index`.

    ``state`` is ``"fresh"`` (``index`` is usable), ``"missing"`` (no saved
    index), ``"stale"`` (built for another model id or an older state of the
    library) or ``"corrupt"`` (unreadable, truncated, replaced or
    inconsistent); ``reason`` says why in a few words.
    """

    state: State
    reason: str
    index: SearchIndex | None = None
    sidecar: Sidecar | None = None

    @property
    def fresh(self) -> bool:
        return self.state == "fresh"


class UpdatedIndex(SearchIndex):
    """A saved Annoy index plus the changes since it was built.

    Vectors written since the build are searched exactly (a small matrix)
    beside the Annoy index; built ids whose vector was rewritten or removed
    are filtered out of Annoy's answers.  The two answer lists are merged by
    similarity.  :func:`refresh_index` folds the changes into a rebuild once
    they pass :data:`REBUILD_SHARE` of the index.
    """

    backend: ClassVar[Backend] = "annoy"

    def __init__(self, base: AnnoyIndex, delta: ExactIndex, dropped: np.ndarray) -> None:
        self.base = base
        self.delta = delta
        self.dropped = np.unique(dropped.astype(np.int64, copy=False))

    @property
    def dim(self) -> int:
        return self.base.dim

    def __len__(self) -> int:
        return len(self.base) - int(self.dropped.size) + len(self.delta)

    def query(
        self, vector: Any, n: int, *, exclude: Iterable[int] | np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        n = _check_n(n)
        excluded = _exclude_array(exclude)
        extra = min(int(self.dropped.size), n)
        while True:
            want = min(n + extra, len(self.base))
            ids, sims = self.base.query(vector, want, exclude=excluded)
            if self.dropped.size:
                keep = ~np.isin(ids, self.dropped)
                if keep.sum() < n and ids.size == want and want < len(self.base):
                    extra = max(4 * extra, n)
                    continue
                ids, sims = ids[keep], sims[keep]
            break
        if len(self.delta):
            d_ids, d_sims = self.delta.query(vector, n, exclude=excluded)
            ids, sims = _order(np.concatenate([ids, d_ids]), np.concatenate([sims, d_sims]))
        return ids[:n], sims[:n]


def save_index(
    index: VectorIndex,
    directory: str | os.PathLike[str],
    *,
    model_id: str,
    fingerprint: str,
    max_id: int | None = None,
    build_seconds: float = 0.0,
    pinned: bool = False,
    base_ids: np.ndarray | None = None,
) -> Path:
    """Save ``index`` and its sidecar under ``directory`` (created if missing).

    ``base_ids`` (the indexed item ids) lets :func:`refresh_index` tell later
    which changed items the index holds.  Any delta of an earlier
    build is removed.  The index file is written first and the sidecar last,
    all atomically, so a reader sees either the old pair, or a new file with
    an old sidecar (reported ``corrupt`` by :func:`load_index`), never a
    half-written file.  Returns the index file's path.
    """
    if len(index) == 0:
        raise AnnIndexError("refusing to save an empty index")
    directory = Path(os.fspath(directory))
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AnnIndexError(f"{directory}: cannot create index directory ({exc})") from exc
    path, sidecar_path = index_paths(directory, model_id, backend=index.backend)
    ids_path = _aux_path(directory, model_id, "ids")
    try:
        index.save(path)
        if base_ids is not None:
            buffer = io.BytesIO()
            np.save(buffer, np.sort(np.asarray(base_ids, np.int64)), allow_pickle=False)
            _atomic_write_bytes(ids_path, buffer.getvalue())
        else:
            with contextlib.suppress(FileNotFoundError):
                ids_path.unlink()
        for kind in ("delta", "rows"):
            with contextlib.suppress(FileNotFoundError):
                _aux_path(directory, model_id, kind).unlink()
        stat = os.stat(path)
        annoy_index = index._annoy if isinstance(index, AnnoyIndex) else None
        if max_id is None:
            max_id = index.max_id
        sidecar = Sidecar(
            model_id=model_id,
            backend=index.backend,
            count=len(index),
            max_id=int(max_id),
            dim=index.dim,
            n_trees=index.n_trees if isinstance(index, AnnoyIndex) else 0,
            trees=int(annoy_index.get_n_trees()) if annoy_index is not None else 0,
            pinned=bool(pinned),
            fingerprint=fingerprint,
            built_at=time.time(),
            build_seconds=float(build_seconds),
            file_size=int(stat.st_size),
            file_mtime_ns=int(stat.st_mtime_ns),
            file_digest="",
        )
        digest = _sampled_digest(path, int(stat.st_size), sidecar.salt())
        sidecar = dataclasses.replace(sidecar, file_digest=digest)
        _atomic_write_bytes(sidecar_path, sidecar.to_json().encode("utf-8"))
    except OSError as exc:
        raise AnnIndexError(f"{path}: cannot write index ({exc.strerror or exc})") from exc
    return path


def _save_delta(
    directory: Path,
    sidecar: Sidecar,
    *,
    fingerprint: str,
    ids: np.ndarray,
    matrix: np.ndarray,
    dropped: np.ndarray,
) -> None:
    """Write the delta file, then the sidecar that names it (both atomically)."""
    _, sidecar_path = index_paths(directory, sidecar.model_id, backend=sidecar.backend)
    delta_path = _aux_path(directory, sidecar.model_id, "delta")
    buffer = io.BytesIO()
    np.savez(
        buffer,
        ids=ids.astype(np.int64),
        matrix=matrix.astype(np.float32).reshape(len(ids), sidecar.dim),
        dropped=dropped.astype(np.int64),
    )
    data = buffer.getvalue()
    try:
        _atomic_write_bytes(delta_path, data)
        new = dataclasses.replace(
            sidecar,
            fingerprint=fingerprint,
            delta_count=int(ids.size),
            dropped_count=int(dropped.size),
            delta_digest=hashlib.blake2b(data, digest_size=16).hexdigest(),
        )
        _atomic_write_bytes(sidecar_path, new.to_json().encode("utf-8"))
    except OSError as exc:
        raise AnnIndexError(f"{delta_path}: cannot write index ({exc.strerror or exc})") from exc


def _read_delta(directory: Path, sidecar: Sidecar) -> dict[str, np.ndarray]:
    """The delta file the sidecar names; AnnIndexError when absent or not that one."""
    delta_path = _aux_path(directory, sidecar.model_id, "delta")
    try:
        data = delta_path.read_bytes()
    except OSError as exc:
        raise AnnIndexError(f"{delta_path}: {exc.strerror or exc}") from exc
    if hashlib.blake2b(data, digest_size=16).hexdigest() != sidecar.delta_digest:
        raise AnnIndexError(f"{delta_path}: content does not match its sidecar")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            delta = {key: npz[key] for key in ("ids", "matrix", "dropped")}
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise AnnIndexError(f"{delta_path}: unreadable delta ({exc})") from exc
    if delta["ids"].shape != (sidecar.delta_count,) or delta["dropped"].shape != (
        sidecar.dropped_count,
    ):
        raise AnnIndexError(f"{delta_path}: does not hold what its sidecar says")
    return delta


def remove_index(directory: str | os.PathLike[str], model_id: str) -> bool:
    """Delete ``model_id``'s saved index, sidecar and delta (any backend); True if any existed."""
    removed = False
    paths = [p for backend in BACKENDS for p in index_paths(directory, model_id, backend=backend)]
    paths += [_aux_path(directory, model_id, kind) for kind in ("ids", "rows", "delta")]
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed = True
    return removed


def load_index(
    directory: str | os.PathLike[str],
    *,
    model_id: str,
    fingerprint: str | Callable[[], str] | None,
    search_fraction: float = SEARCH_FRACTION,
    search_k: int | None = None,
) -> IndexCheck:
    """Load ``model_id``'s saved index if it matches the library's current state.

    Parameters
    ----------
    directory
        Where :func:`save_index` wrote it.
    model_id
        The active model; an index built for another one is stale.
    fingerprint
        :func:`deepsim.store.fingerprint` of the library now, or a callable
        returning it (called only when a sidecar for ``model_id`` exists); an
        index built from another state is stale.  ``None`` skips this check
        (only for tools that inspect an index).
    search_fraction, search_k
        Passed to :meth:`AnnoyIndex.load`.

    Returns
    -------
    IndexCheck
        Never raises for a missing, stale or damaged index: the state says
        which, and ``index`` is set only when ``fresh`` (an
        :class:`UpdatedIndex` when changes since the build are kept beside
        it).  A file that does not match its sidecar is read once more, so a
        reader that raced a writer's replacement sees the new pair.
    """
    if callable(fingerprint):
        fingerprint = functools.cache(fingerprint)
    check = _load_once(directory, model_id, fingerprint, search_fraction, search_k)
    if check.state == "corrupt":
        check = _load_once(directory, model_id, fingerprint, search_fraction, search_k)
    return check


def _load_once(
    directory: str | os.PathLike[str],
    model_id: str,
    fingerprint: str | Callable[[], str] | None,
    search_fraction: float,
    search_k: int | None,
) -> IndexCheck:
    _, sidecar_path = index_paths(directory, model_id)
    try:
        text = sidecar_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return IndexCheck("missing", f"no index sidecar {sidecar_path}")
    except (OSError, UnicodeDecodeError) as exc:
        return IndexCheck("corrupt", f"{sidecar_path}: unreadable ({exc})")
    try:
        sidecar = Sidecar.from_json(text)
    except (ValueError, TypeError) as exc:
        return IndexCheck("corrupt", f"{sidecar_path}: invalid sidecar ({exc})")
    if sidecar.format != SIDECAR_FORMAT:
        return IndexCheck("stale", f"sidecar format {sidecar.format}", sidecar=sidecar)
    if sidecar.model_id != model_id:
        return IndexCheck(
            "stale", f"built for model {sidecar.model_id!r}, not {model_id!r}", sidecar=sidecar
        )
    if callable(fingerprint):
        fingerprint = fingerprint()
    if fingerprint is not None and sidecar.fingerprint != fingerprint:
        return IndexCheck("stale", "vectors changed since the index was built", sidecar=sidecar)
    if sidecar.backend not in BACKENDS:
        return IndexCheck("corrupt", f"unknown backend {sidecar.backend!r}", sidecar=sidecar)
    path, _ = index_paths(directory, model_id, backend=sidecar.backend)
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return IndexCheck("missing", f"no index file {path}", sidecar=sidecar)
    except OSError as exc:
        return IndexCheck("corrupt", f"{path}: {exc.strerror or exc}", sidecar=sidecar)
    if stat.st_size != sidecar.file_size:
        return IndexCheck(
            "corrupt",
            f"{path}: {stat.st_size} bytes, the sidecar says {sidecar.file_size}",
            sidecar=sidecar,
        )
    if stat.st_mtime_ns != sidecar.file_mtime_ns:
        return IndexCheck(
            "corrupt", f"{path}: modified after its sidecar was written", sidecar=sidecar
        )
    try:
        digest = _sampled_digest(path, stat.st_size, sidecar.salt())
    except OSError as exc:
        return IndexCheck("corrupt", f"{path}: {exc.strerror or exc}", sidecar=sidecar)
    if digest != sidecar.file_digest:
        return IndexCheck("corrupt", f"{path}: content does not match its sidecar", sidecar=sidecar)
    try:
        if sidecar.backend == "annoy":
            base = AnnoyIndex.load(
                path,
                dim=sidecar.dim,
                count=sidecar.count,
                max_id=sidecar.max_id if sidecar.max_id >= 0 else None,
                n_trees=sidecar.n_trees,
                trees=sidecar.trees or sidecar.n_trees,
                search_fraction=search_fraction,
                search_k=search_k,
            )
            index: SearchIndex = base
            if sidecar.delta_count or sidecar.dropped_count:
                delta = _read_delta(Path(os.fspath(directory)), sidecar)
                exact = ExactIndex()
                if delta["ids"].size:
                    exact.build(delta["ids"], delta["matrix"])
                index = UpdatedIndex(base, exact, delta["dropped"])
        else:
            index = ExactIndex.load(path, dim=sidecar.dim, count=sidecar.count)
    except (AnnIndexError, ValueError) as exc:
        return IndexCheck("corrupt", str(exc), sidecar=sidecar)
    return IndexCheck("fresh", "up to date", index=index, sidecar=sidecar)


# --------------------------------------------------------------------------- lifecycle


@dataclass(frozen=True)
class RefreshResult:
    """What :func:`refresh_index` did.

    ``action`` is ``"fresh"`` (the saved index was up to date), ``"built"``
    (rebuilt from every vector), ``"updated"`` (the changes since the build
    were recorded beside it, ``changed`` vectors), ``"small"`` (fewer vectors
    than ``exact_below``: exact search is used and any saved index was
    removed) or ``"empty"`` (no vectors of the model).
    """

    action: Literal["fresh", "built", "updated", "small", "empty"]
    count: int
    seconds: float
    reason: str
    path: str | None = None
    changed: int = 0


@contextlib.contextmanager
def index_lock(directory: str | os.PathLike[str], model_id: str) -> Iterator[None]:
    """Hold ``model_id``'s index lock (an advisory ``flock`` on ``index-<id>.lock``).

    Writers of the index take it, so one process at a time builds or updates
    it; a second one waits, then finds the index fresh.  Readers never need
    it: every file is replaced atomically.
    """
    path = _aux_path(directory, model_id, "lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+b")  # noqa: SIM115 - held for the block
    except OSError as exc:
        raise AnnIndexError(f"{path}: cannot take the index lock ({exc.strerror or exc})") from exc
    try:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            fcntl = None  # type: ignore[assignment]
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                _log.info("waiting for another process to finish the index (%s)", path)
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield
    finally:
        if fcntl is not None:  # released here, not at close: a forked child may share the file
            with contextlib.suppress(OSError):
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        handle.close()


def open_index(
    lib: Library,
    model_id: str,
    directory: str | os.PathLike[str],
    *,
    search_fraction: float = SEARCH_FRACTION,
    search_k: int | None = None,
) -> IndexCheck:
    """The saved index of ``model_id`` if it matches ``lib``'s stored vectors now.

    What ``beet similar`` calls: a fresh index (with the changes since its
    build, if any) or the reason there is none — the caller then searches
    exactly, and :func:`refresh_index` brings it up to date when the command
    ends.
    """
    return load_index(
        directory,
        model_id=model_id,
        fingerprint=lambda: store.fingerprint(lib, model_id),
        search_fraction=search_fraction,
        search_k=search_k,
    )


def _read_some_vectors(lib: Library, model_id: str, ids: np.ndarray, dim: int):
    """Vectors of ``ids`` in indexed queries of 500 (never a read of every vector)."""
    out_ids, parts = [], []
    for start in range(0, ids.size, 500):
        got_ids, matrix = store.read_vectors(lib, model_id, ids=ids[start : start + 500].tolist())
        if got_ids.size and matrix.shape[1] == dim:
            out_ids.append(got_ids)
            parts.append(matrix)
    if not out_ids:
        return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
    return np.concatenate(out_ids), np.concatenate(parts)


def refresh_index(
    lib: Library,
    model_id: str,
    index_dir: str | os.PathLike[str],
    *,
    force: bool = False,
    exact_below: int = EXACT_THRESHOLD,
    n_trees: int = DEFAULT_N_TREES,
    n_jobs: int = -1,
    rebuild_share: float = REBUILD_SHARE,
) -> RefreshResult:
    """Bring ``model_id``'s saved index under ``index_dir`` up to date, by one process.

    The decision, under :func:`index_lock`:

    * fresh (sidecar and file agree, the store's change log has not moved
      since, same ``n_trees``): nothing to do;
    * vectors added, rewritten or removed since, together at most
      ``rebuild_share`` of the index: the items the store's change log lists
      after the index's position (:func:`deepsim.store.changed_since`) are
      read, those whose vector is not the indexed one go to a small delta
      file searched exactly beside the index, and indexed ids rewritten or
      removed are filtered out of it — cost in proportion to the change, not
      the library (no full-table read);
    * missing, damaged, built for another ``n_trees``, a log that cannot
      say (another epoch, trimmed past the index, a read-only database) or
      more changes than that: rebuilt from every vector;
    * fewer than ``exact_below`` vectors: no index is kept (exact search is
      as fast) and an old one is removed — unless it was built on request
      (``force``), which is then kept up to date like any other.

    The log's position is taken before anything is read, so a vector written
    meanwhile is read again next time, never missed.  Every file is replaced
    atomically, the sidecar last; a rebuild trims the log up to its position.

    Parameters
    ----------
    lib
        The beets library.
    model_id
        The active model's id.
    index_dir
        ``<beets config dir>/deepsim``; created if missing.
    force
        Rebuild even when fresh, and build (and keep) even below ``exact_below``.
    exact_below
        No index below this many vectors.
    n_trees, n_jobs
        Annoy build parameters (see :class:`AnnoyIndex`).
    rebuild_share
        Rebuild once the changes kept beside the index exceed this share of it.

    Raises
    ------
    AnnIndexError
        The index cannot be written (the message names the path and reason).
    """
    started = time.perf_counter()
    with index_lock(index_dir, model_id):
        state = store.change_state(lib)
        check = load_index(index_dir, model_id=model_id, fingerprint=None)
        sidecar = check.sidecar if check.fresh else None
        if sidecar is not None and (force or sidecar.n_trees != n_trees):
            sidecar = None
        if sidecar is not None and sidecar.fingerprint == state.text:
            if sidecar.live_count < exact_below and not sidecar.pinned:
                remove_index(index_dir, model_id)
                return RefreshResult(
                    "small",
                    sidecar.live_count,
                    time.perf_counter() - started,
                    f"{sidecar.live_count} vectors, below {exact_below}: exact search",
                )
            return RefreshResult(
                "fresh", sidecar.live_count, time.perf_counter() - started, check.reason
            )
        base = check.index.base if isinstance(check.index, UpdatedIndex) else check.index
        if sidecar is not None and isinstance(base, AnnoyIndex):
            updated = _update(lib, Path(os.fspath(index_dir)), sidecar, base, state, rebuild_share)
            if (
                updated is not None
                and updated.count > 0
                and (updated.count >= exact_below or sidecar.pinned)
            ):
                return dataclasses.replace(updated, seconds=time.perf_counter() - started)
        pinned = force or (sidecar is not None and sidecar.pinned)
        return _rebuild(
            lib, index_dir, model_id, state, n_trees, n_jobs, pinned, exact_below, started
        )


def _member(values: np.ndarray, sorted_ref: np.ndarray) -> np.ndarray:
    """Mask of ``values`` found in the sorted array ``sorted_ref``."""
    if sorted_ref.size == 0 or values.size == 0:
        return np.zeros(values.shape, bool)
    pos = np.minimum(np.searchsorted(sorted_ref, values), sorted_ref.size - 1)
    return sorted_ref[pos] == values


def _update(
    lib: Library,
    directory: Path,
    sidecar: Sidecar,
    base: AnnoyIndex,
    state: store.ChangeState,
    rebuild_share: float,
) -> RefreshResult | None:
    """Record the changes since the build beside the index; None when a rebuild is due.

    Only the items the change log lists after the sidecar's position are
    read.  Each is then answered from the delta (its vector now is not the
    one in the Annoy index: new, rewritten, or changed back), from the index
    (the same vector, e.g. only another model's slot was written), or not at
    all (no vector of the model any more).
    """
    old = store.ChangeState.parse(sidecar.fingerprint)
    if (
        old is None
        or not state.logged
        or old.epoch != state.epoch
        or not state.floor <= old.seq <= state.seq
    ):
        return None
    try:
        base_ids = np.load(_aux_path(directory, sidecar.model_id, "ids"), allow_pickle=False)
        has_delta = bool(sidecar.delta_count or sidecar.dropped_count)
        delta = _read_delta(directory, sidecar) if has_delta else None
    except (OSError, ValueError, AnnIndexError):
        return None
    if base_ids.shape != (sidecar.count,):
        return None
    limit = int(rebuild_share * sidecar.count)
    changed = store.changed_since(lib, old.seq, limit=limit)
    if changed is None:
        return None
    if delta is None:
        delta = {
            "ids": np.zeros(0, np.int64),
            "matrix": np.zeros((0, sidecar.dim), np.float32),
            "dropped": np.zeros(0, np.int64),
        }
    # What the delta said of the items that did not change since still holds.
    keep = ~_member(delta["ids"], changed)
    d_ids, d_matrix = delta["ids"][keep], delta["matrix"][keep]
    dropped = delta["dropped"][~_member(delta["dropped"], changed)]
    cur_ids, cur = _read_some_vectors(lib, sidecar.model_id, changed, sidecar.dim)
    in_base = _member(cur_ids, base_ids)
    same = np.zeros(cur_ids.size, bool)
    if in_base.any():
        indexed = base.vectors(cur_ids[in_base])
        same[in_base] = np.abs(indexed - cur[in_base]).max(axis=1) <= 1e-5
    gone = changed[~_member(changed, cur_ids[same])]
    dropped = np.union1d(dropped, gone[_member(gone, base_ids)])
    d_ids = np.concatenate([d_ids, cur_ids[~same]])
    d_matrix = np.concatenate([d_matrix, cur[~same]])
    order = np.argsort(d_ids)
    d_ids, d_matrix = d_ids[order], d_matrix[order]
    if d_ids.size + dropped.size > limit:
        return None
    _save_delta(
        directory, sidecar, fingerprint=state.text, ids=d_ids, matrix=d_matrix, dropped=dropped
    )
    path, _ = index_paths(directory, sidecar.model_id)
    return RefreshResult(
        "updated",
        sidecar.count - int(dropped.size) + int(d_ids.size),
        0.0,
        f"{changed.size} changed item(s) read: {d_ids.size} new or rewritten and "
        f"{dropped.size} dropped vectors kept beside the index of {sidecar.count}",
        os.fspath(path),
        changed=int(d_ids.size + dropped.size),
    )


def _rebuild(
    lib: Library,
    index_dir: str | os.PathLike[str],
    model_id: str,
    state: store.ChangeState,
    n_trees: int,
    n_jobs: int,
    pinned: bool,
    exact_below: int,
    started: float,
) -> RefreshResult:
    vec_ids, matrix = store.read_vectors(lib, model_id)
    result: RefreshResult | None = None
    if vec_ids.size == 0:
        remove_index(index_dir, model_id)
        result = RefreshResult("empty", 0, time.perf_counter() - started, "no usable vectors")
    elif vec_ids.size < exact_below and not pinned:
        remove_index(index_dir, model_id)
        result = RefreshResult(
            "small",
            int(vec_ids.size),
            time.perf_counter() - started,
            f"{vec_ids.size} vectors, below {exact_below}: exact search",
        )
    else:
        build_started = time.perf_counter()
        index = AnnoyIndex(n_trees=n_trees, n_jobs=n_jobs).build(vec_ids, matrix)
        path = save_index(
            index,
            index_dir,
            model_id=model_id,
            fingerprint=state.text,
            max_id=int(vec_ids.max()),
            build_seconds=time.perf_counter() - build_started,
            pinned=pinned,
            base_ids=vec_ids,
        )
        result = RefreshResult(
            "built",
            int(vec_ids.size),
            time.perf_counter() - started,
            f"{vec_ids.size} vectors, {n_trees} trees",
            os.fspath(path),
        )
    if state.logged:
        store.trim_changes(lib, state.seq)  # the log before this state is no longer needed
    return result
