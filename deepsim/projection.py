"""2-D projection of the stored vectors for ``beet deepsim-map``, cached and kept up to date.

:func:`project` runs openTSNE (the default: see docs/performance.md for the
measurement at 100k vectors against UMAP) or UMAP, both optional
dependencies (``pip install beets-deepsim[map]``).

:func:`cached_projection` keeps the last projection of a model under the
state directory (``map-<model id>.npz``: ids, 2-D points and a CRC of each
vector).  On the next call, points of removed items are dropped, and new or
re-embedded vectors are placed at the similarity-weighted mean of their
nearest unchanged neighbours' points (what openTSNE's own ``transform`` does
in spirit, without keeping its large affinity matrix around); when more than
``refresh_fraction`` of the vectors changed the whole projection is
recomputed.  No torch here.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from deepsim.errors import DeepsimError
from deepsim.util import atomic_write, check_choice, check_float, check_int, get_logger

log = get_logger(__name__)

Method = Literal["opentsne", "umap"]
METHODS: tuple[str, ...] = ("opentsne", "umap")

#: Neighbours used to place a new point in a cached projection.
PLACE_NEIGHBOURS = 10


def _missing(package: str, method: str) -> DeepsimError:
    return DeepsimError(
        f"map projection {method!r} needs the {package!r} package "
        "(pip install 'beets-deepsim[map]')"
    )


def project(
    matrix: np.ndarray, *, method: Method = "opentsne", n_jobs: int = 1, seed: int = 0
) -> np.ndarray:
    """Project unit vectors (rows of ``matrix``) to 2-D; returns float32 ``(n, 2)``.

    Cosine neighbourhoods are kept (t-SNE with cosine affinities, or UMAP with
    the cosine metric).  Libraries too small for the method's neighbourhood
    size get a smaller one; up to three points are laid out on a line.
    """
    check_choice("method", method, METHODS)
    n_jobs = check_int("n_jobs", n_jobs, minimum=1)
    x = np.ascontiguousarray(matrix, dtype=np.float32)
    if x.ndim != 2:
        raise DeepsimError(f"expected a 2-D matrix of vectors, got shape {x.shape!r}")
    n = x.shape[0]
    if n <= 3:
        return np.column_stack([np.arange(n, dtype=np.float32), np.zeros(n, np.float32)])
    if method == "opentsne":
        try:
            from openTSNE import TSNE
        except ImportError:
            raise _missing("openTSNE", method) from None
        tsne = TSNE(
            n_components=2,
            perplexity=float(min(30.0, (n - 1) / 3.0)),
            metric="cosine",
            initialization="pca",
            negative_gradient_method="fft" if n > 2000 else "bh",
            n_jobs=n_jobs,
            random_state=seed,
            verbose=False,
        )
        points = np.asarray(tsne.fit(x), dtype=np.float32)
    else:
        try:
            import umap
        except ImportError:
            raise _missing("umap-learn", method) from None
        reducer = umap.UMAP(
            n_components=2,
            n_neighbors=min(15, n - 1),
            min_dist=0.1,
            metric="cosine",
            n_jobs=n_jobs,
            low_memory=True,
            # a fixed random_state makes UMAP single-threaded: seed only small runs
            random_state=seed if n_jobs == 1 else None,
            init="spectral" if n > 16 else "random",
        )
        points = np.asarray(reducer.fit_transform(x), dtype=np.float32)
    return points


# --------------------------------------------------------------------------- cache


def vector_crcs(matrix: np.ndarray) -> np.ndarray:
    """CRC-32 of each row (of its float16 form, as stored): tells a changed vector."""
    rows = np.ascontiguousarray(matrix, dtype=np.float16)
    return np.fromiter((zlib.crc32(row.tobytes()) for row in rows), np.uint32, count=len(rows))


@dataclass
class Projection:
    """2-D points of a model's vectors.

    ``action`` says what :func:`cached_projection` did: ``"cached"`` (nothing
    changed), ``"updated"`` (``placed`` new points placed, ``dropped``
    removed), or ``"computed"``.
    """

    ids: np.ndarray
    points: np.ndarray
    action: str = "computed"
    placed: int = 0
    dropped: int = 0


def cache_path(state_dir: str | os.PathLike[str], model_id: str, method: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_id)
    return Path(state_dir) / f"map-{safe}-{method}.npz"


def _load(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    try:
        with np.load(path) as data:
            ids, points, crcs = data["ids"], data["points"], data["crcs"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError) as exc:
        log.warning("ignoring the damaged map cache %s (%s)", path, exc)
        return None
    if not (len(ids) == len(points) == len(crcs)) or points.ndim != 2:
        log.warning("ignoring the damaged map cache %s (inconsistent arrays)", path)
        return None
    return ids.astype(np.int64), points.astype(np.float32), crcs.astype(np.uint32)


def _place(matrix: np.ndarray, known: np.ndarray, known_points: np.ndarray) -> np.ndarray:
    """Points for ``matrix`` rows: weighted mean of the nearest known rows' points."""
    k = min(PLACE_NEIGHBOURS, len(known))
    out = np.empty((len(matrix), 2), np.float32)
    for start in range(0, len(matrix), 2048):
        sims = matrix[start : start + 2048] @ known.T
        nn = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        weights = np.maximum(np.take_along_axis(sims, nn, axis=1), 0.0) + 1e-6
        weights /= weights.sum(axis=1, keepdims=True)
        out[start : start + 2048] = np.einsum("ij,ijk->ik", weights, known_points[nn])
    return out


def cached_projection(
    ids: np.ndarray,
    matrix: np.ndarray,
    *,
    state_dir: str | os.PathLike[str],
    model_id: str,
    method: Method = "opentsne",
    n_jobs: int = 1,
    refresh_fraction: float = 0.2,
    force: bool = False,
) -> Projection:
    """The projection of these vectors, from the cache when it still fits.

    Parameters
    ----------
    ids, matrix
        Item ids and their unit vectors (as :func:`deepsim.store.read_vectors` returns).
    state_dir
        ``<beets config dir>/deepsim``; the cache is written there atomically.
    model_id
        The vectors' model (one cache per model and method).
    method, n_jobs
        As in :func:`project`.
    refresh_fraction
        Recompute from scratch when more than this share of the vectors is new
        or changed since the cached projection.
    force
        Recompute even when the cache fits.
    """
    check_choice("method", method, METHODS)
    refresh_fraction = check_float("refresh_fraction", refresh_fraction, low=0.0, high=1.0)
    ids = np.asarray(ids, np.int64)
    crcs = vector_crcs(matrix)
    path = cache_path(state_dir, model_id, method)
    cached = None if force else _load(path)
    result: Projection
    if cached is not None and len(ids):
        old_ids, old_points, old_crcs = cached
        position = {int(i): k for k, i in enumerate(old_ids.tolist())}
        rows = np.array([position.get(int(i), -1) for i in ids.tolist()], np.int64)
        same = (rows >= 0) & (old_crcs[np.maximum(rows, 0)] == crcs)
        changed = int((~same).sum())
        dropped = len(old_ids) - int(same.sum())
        if changed == 0 and dropped == 0:
            return Projection(ids, old_points[rows], "cached")
        if same.any() and changed <= refresh_fraction * len(ids):
            points = np.empty((len(ids), 2), np.float32)
            points[same] = old_points[rows[same]]
            if changed:
                points[~same] = _place(matrix[~same], matrix[same], points[same])
            result = Projection(ids, points, "updated", placed=changed, dropped=dropped)
            _save(path, result, crcs)
            return result
    log.info("projecting %d vectors to 2-D with %s", len(ids), method)
    result = Projection(ids, project(matrix, method=method, n_jobs=n_jobs))
    _save(path, result, crcs)
    return result


def _save(path: Path, projection: Projection, crcs: np.ndarray) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "wb") as fh:
            np.savez(fh, ids=projection.ids, points=projection.points, crcs=crcs)
    except OSError as exc:
        log.warning("map cache %s not written (%s)", path, exc)
