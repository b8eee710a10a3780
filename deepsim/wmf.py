"""Weighted matrix factorisation (implicit-feedback ALS) of play counts.

The model is Hu, Koren & Volinsky (2008), "Collaborative filtering for implicit
feedback datasets": every (user, track) cell has a preference
``p = 1 if r > 0 else 0`` and a confidence, and ALS minimises

    sum_ui c_ui (p_ui - x_u . y_i)^2 + regularization (|x_u|^2 + |y_i|^2)

with the log-scaled confidence of the paper,

    c_ui = 1 + alpha * log(1 + r_ui / epsilon)      (c = 1 where r = 0).

The defaults ``alpha=2.0, epsilon=1e-6`` are those van den Oord, Dieleman &
Schrauwen (2013, "Deep content-based music recommendation") used on the Taste
Profile: with them a single play already weighs ``c ≈ 28.6`` and ten plays
``≈ 33.2``, so the targets mostly say *whether* someone listened, with a mild
bonus for repeats; that is robust to the heavy-tailed counts of play data.

Implicit 0.7 (``implicit.als.AlternatingLeastSquares``) takes the matrix of
confidences ``C`` for the observed cells directly (its solver uses ``c`` as the
weight and ``c - 1`` as the excess over unobserved cells, with ``p = 1`` for
positive entries); its own ``alpha`` only multiplies that matrix.  We therefore
compute ``c`` ourselves and pass ``alpha=1.0`` to implicit, so its scaling does
not act twice (``alpha * c`` would also scale the ``1 +`` of the formula).

The fit holds BLAS to one thread (``threadpoolctl.threadpool_limits(1,
"blas")``): implicit runs its own thread pool and warns that a multithreaded
BLAS underneath it can be ten times slower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from deepsim.errors import TrainingError

SMALL_NNZ = 50_000
"""Below this many stored counts, ``num_threads=0`` fits on one thread."""


@dataclass(frozen=True)
class WMFResult:
    """Factors of a fitted WMF model.

    Parameters
    ----------
    user_factors
        ``n_users × factors`` float32.
    item_factors
        ``n_tracks × factors`` float32; rows of tracks without plays are zero.
    params
        The hyper-parameters used (for provenance).
    """

    user_factors: np.ndarray
    item_factors: np.ndarray
    params: dict[str, Any]


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _positive_float(name: str, value: Any, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    ok = v >= 0 if allow_zero else v > 0
    if not (math.isfinite(v) and ok):
        bound = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a finite {bound} number, got {value!r}")
    return v


def confidence(
    counts: sp.spmatrix | sp.sparray, *, alpha: float = 2.0, epsilon: float = 1e-6
) -> sp.csr_matrix:
    """Hu et al.'s log confidence ``1 + alpha * log(1 + r / epsilon)`` of the stored counts.

    Returns a float32 CSR matrix with the same sparsity pattern (explicit
    zeros removed).
    """
    alpha = _positive_float("alpha", alpha)
    epsilon = _positive_float("epsilon", epsilon)
    c = sp.csr_matrix(counts, dtype=np.float32, copy=True)
    c.eliminate_zeros()
    data = c.data.astype(np.float64)
    c.data = (1.0 + alpha * np.log1p(data / epsilon)).astype(np.float32)
    return c


def _gpu_available() -> bool:
    try:
        import implicit.gpu
    except ImportError:  # pragma: no cover - implicit is a dependency
        return False
    if not implicit.gpu.HAS_CUDA:
        return False
    try:
        return int(implicit.gpu.get_device_count()) > 0  # type: ignore[attr-defined]
    except Exception:  # pragma: no cover - depends on the CUDA build
        return False


def fit_wmf(
    counts: sp.spmatrix | sp.sparray,
    *,
    factors: int = 40,
    alpha: float = 2.0,
    epsilon: float = 1e-6,
    regularization: float = 0.01,
    iterations: int = 15,
    use_gpu: bool | None = None,
    random_state: int | None = 0,
    num_threads: int = 0,
    show_progress: bool = False,
) -> WMFResult:
    """Factorise a ``users × tracks`` play-count matrix with implicit ALS.

    Parameters
    ----------
    counts
        Sparse play counts (non-negative; converted to float32 CSR).
    factors
        Dimension of the factors.
    alpha, epsilon
        Confidence ``c = 1 + alpha * log(1 + r / epsilon)`` (see the module).
    regularization
        L2 weight on the factors.
    iterations
        ALS sweeps (users then tracks).
    use_gpu
        ``None``: the GPU when implicit was built with CUDA and a device is
        present; ``True`` requires it.
    random_state
        Seed of the initial factors.
    num_threads
        implicit's CPU threads; 0 = all cores, except for matrices with fewer
        than ``SMALL_NNZ`` stored counts, which use one thread (there the
        threads' synchronisation costs more than it saves: a few thousand
        counts took seconds with two busy cores instead of milliseconds).
    show_progress
        implicit's progress bar.

    Returns
    -------
    WMFResult
        Factors of users and tracks; rows without any plays are exactly zero.

    Raises
    ------
    ValueError
        Bad parameter or matrix (negative, NaN).
    TrainingError
        No plays to factorise.
    """
    factors = _positive_int("factors", factors)
    iterations = _positive_int("iterations", iterations)
    alpha = _positive_float("alpha", alpha)
    epsilon = _positive_float("epsilon", epsilon)
    regularization = _positive_float("regularization", regularization, allow_zero=True)
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 0:
        raise ValueError(f"num_threads must be a non-negative integer, got {num_threads!r}")
    if use_gpu not in (None, True, False):
        raise ValueError(f"use_gpu must be None, True or False, got {use_gpu!r}")
    if random_state is not None and (
        isinstance(random_state, bool) or not isinstance(random_state, (int, np.integer))
    ):
        raise ValueError(f"random_state must be an integer or None, got {random_state!r}")
    if not sp.issparse(counts):
        raise ValueError(f"counts must be a scipy sparse matrix, got {type(counts).__name__}")
    if counts.ndim != 2:
        raise ValueError(f"counts must be 2-D, got shape {counts.shape}")
    csr = sp.csr_matrix(counts, dtype=np.float32)
    if csr.nnz and not np.all(np.isfinite(csr.data)):
        raise ValueError("counts contain NaN or infinite values")
    if csr.nnz and csr.data.min() < 0:
        raise ValueError(f"counts must be non-negative, found {float(csr.data.min())!r}")
    conf = confidence(csr, alpha=alpha, epsilon=epsilon)
    if conf.nnz == 0:
        raise TrainingError(f"no plays to factorise (counts of shape {csr.shape} are all zero)")

    gpu = _gpu_available() if use_gpu is None else use_gpu
    if gpu and not _gpu_available():
        raise ValueError("use_gpu=True but implicit has no CUDA support or no GPU is present")

    import threadpoolctl
    from implicit.als import AlternatingLeastSquares

    threads = 1 if num_threads == 0 and conf.nnz < SMALL_NNZ and not gpu else num_threads

    with threadpoolctl.threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(
            factors=factors,
            regularization=regularization,
            alpha=1.0,  # the confidence is already in `conf`
            dtype=np.float32,
            iterations=iterations,
            use_gpu=gpu,
            num_threads=threads,
            random_state=random_state,
        )
        model.fit(conf, show_progress=show_progress)
    if gpu:
        model = model.to_cpu()
    user_factors = np.ascontiguousarray(model.user_factors, dtype=np.float32)
    item_factors = np.ascontiguousarray(model.item_factors, dtype=np.float32)
    # Rows without data only shrink towards zero under CG; make them exactly zero so that
    # unit_normalise cannot blow noise up into unit vectors.
    user_factors[np.diff(conf.indptr) == 0] = 0.0
    item_factors[np.bincount(conf.indices, minlength=conf.shape[1]) == 0] = 0.0
    params = {
        "factors": factors,
        "alpha": alpha,
        "epsilon": epsilon,
        "regularization": regularization,
        "iterations": iterations,
        "use_gpu": bool(gpu),
        "random_state": random_state,
    }
    return WMFResult(user_factors, item_factors, params)


def unit_normalise(factors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); all-zero rows stay zero."""
    x = np.asarray(factors, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"factors must be a 2-D array, got shape {x.shape}")
    norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    out = np.zeros_like(x)
    nz = norms[:, 0] > 0
    out[nz] = (x[nz] / norms[nz]).astype(np.float32)
    return out
