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
index was built from.  :func:`load_index` returns the saved index only when
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
import hashlib
import io
import json
import math
import os
import re
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from deepsim.errors import AnnIndexError

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

#: Version of the sidecar layout; a sidecar of another version is stale.
SIDECAR_FORMAT = 1

#: Annoy ids are signed 32-bit integers.
MAX_ANNOY_ID = 2**31 - 1

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


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and :func:`os.replace`."""
    tmp = _temp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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


class VectorIndex(ABC):
    """Nearest neighbours of L2-normalised vectors by cosine similarity.

    Build with :meth:`build` (or load a saved one with :meth:`load`), then
    :meth:`query`.  Ids are non-negative integers (beets item ids).
    """

    #: Backend name, as used by :func:`make_index` and in the sidecar.
    backend: ClassVar[Backend]
    #: File name suffix of a saved index.
    suffix: ClassVar[str]

    @property
    @abstractmethod
    def dim(self) -> int:
        """Vector dimension (0 before :meth:`build`)."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of indexed vectors."""

    @abstractmethod
    def build(self, ids: Any, matrix: Any) -> VectorIndex:
        """Index ``matrix`` (``(n, dim)``, rows need not be normalised) under ``ids``.

        Returns ``self``.  Raises :class:`ValueError` for unusable input
        (shape mismatch, duplicate or negative ids, zero or non-finite rows).
        """

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
        A query inspects ``max(n * n_trees, search_fraction * len(self))``
        nodes (Annoy's ``search_k``).
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
        #: The largest indexed id (-1: none or unknown).
        self.max_id = -1

    @property
    def dim(self) -> int:
        return self._dim

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
        self.max_id = int(ids_arr.max()) if ids_arr.size else -1
        return self

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
            search_k = max(want * self.n_trees, int(self.search_fraction * self._count))
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
        tmp = _temp_path(path)
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
        search_fraction: float = SEARCH_FRACTION,
        search_k: int | None = None,
    ) -> AnnoyIndex:
        """Memory-map a saved index.

        ``max_id`` (the largest id, when known) is checked against Annoy's item
        count (Annoy allocates every id up to the largest).
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
        elif index.get_n_trees() != n_trees:
            problem = f"has {index.get_n_trees()} trees, expected {n_trees}"
        if problem is not None:
            index.unload()
            raise AnnIndexError(f"{os.fspath(path)}: {problem}")
        loaded = cls(n_trees=n_trees, search_fraction=search_fraction, search_k=search_k)
        loaded._annoy, loaded._dim, loaded._count = index, int(dim), int(count)
        loaded.max_id = -1 if max_id is None else int(max_id)
        return loaded


#: Backends by name.
BACKENDS: dict[str, type[VectorIndex]] = {"annoy": AnnoyIndex, "exact": ExactIndex}


def make_index(backend: str, **options: Any) -> VectorIndex:
    """A new, empty index of the named backend (``"annoy"`` or ``"exact"``)."""
    cls = BACKENDS.get(backend)
    if cls is None:
        raise ValueError(f"unknown index backend {backend!r}; choose one of {sorted(BACKENDS)}")
    return cls(**options)


def choose_backend(count: int, *, threshold: int = EXACT_THRESHOLD) -> Backend:
    """``"exact"`` below ``threshold`` vectors, ``"annoy"`` from there on."""
    if threshold < 0:
        raise ValueError(f"threshold must be non-negative, got {threshold!r}")
    return "exact" if count < threshold else "annoy"


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


@dataclass(frozen=True)
class Sidecar:
    """What a saved index was built from (the JSON next to the index file)."""

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
    format: int = SIDECAR_FORMAT

    @classmethod
    def from_json(cls, text: str) -> Sidecar:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        fields = {
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
            "format": int,
        }
        for name, kind in fields.items():
            if not isinstance(data.get(name), kind) or isinstance(data.get(name), bool):
                raise ValueError(f"field {name!r} missing or of the wrong type")
        return cls(**{name: data[name] for name in fields})

    def salt(self) -> str:
        """The fields the file digest covers besides the file itself."""
        return "|".join(
            str(v)
            for v in (self.backend, self.model_id, self.dim, self.count, self.max_id, self.n_trees)
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
    index: VectorIndex | None = None
    sidecar: Sidecar | None = None

    @property
    def fresh(self) -> bool:
        return self.state == "fresh"


def save_index(
    index: VectorIndex,
    directory: str | os.PathLike[str],
    *,
    model_id: str,
    fingerprint: str,
    max_id: int | None = None,
    build_seconds: float = 0.0,
) -> Path:
    """Save ``index`` and its sidecar under ``directory`` (created if missing).

    The index file is written first and the sidecar last, both atomically, so
    a reader sees either the old pair, or a new file with an old sidecar
    (reported ``corrupt`` by :func:`load_index`), never a half-written file.
    Returns the index file's path.
    """
    if len(index) == 0:
        raise AnnIndexError("refusing to save an empty index")
    directory = Path(os.fspath(directory))
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AnnIndexError(f"{directory}: cannot create index directory ({exc})") from exc
    path, sidecar_path = index_paths(directory, model_id, backend=index.backend)
    try:
        index.save(path)
        stat = os.stat(path)
        sidecar = Sidecar(
            model_id=model_id,
            backend=index.backend,
            count=len(index),
            max_id=int(max_id if max_id is not None else getattr(index, "max_id", -1)),
            dim=index.dim,
            n_trees=int(getattr(index, "n_trees", 0)),
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


def remove_index(directory: str | os.PathLike[str], model_id: str) -> bool:
    """Delete ``model_id``'s saved index and sidecar (any backend); True if any existed."""
    removed = False
    for backend in BACKENDS:
        for path in index_paths(directory, model_id, backend=backend):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed = True
    return removed


def read_sidecar(directory: str | os.PathLike[str], model_id: str) -> Sidecar | None:
    """The sidecar of ``model_id``'s index, or None when absent or unreadable."""
    _, sidecar_path = index_paths(directory, model_id)
    try:
        return Sidecar.from_json(sidecar_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return None


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
        which, and ``index`` is set only when ``fresh``.
    """
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
            index: VectorIndex = AnnoyIndex.load(
                path,
                dim=sidecar.dim,
                count=sidecar.count,
                max_id=sidecar.max_id if sidecar.max_id >= 0 else None,
                n_trees=sidecar.n_trees,
                search_fraction=search_fraction,
                search_k=search_k,
            )
        else:
            index = ExactIndex.load(path, dim=sidecar.dim, count=sidecar.count)
    except AnnIndexError as exc:
        return IndexCheck("corrupt", str(exc), sidecar=sidecar)
    return IndexCheck("fresh", "up to date", index=index, sidecar=sidecar)
