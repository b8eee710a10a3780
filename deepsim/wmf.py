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

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from deepsim.errors import ParameterError, TrainingError
from deepsim.util import check_float, check_int

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
    model
        The fitted ``implicit`` model (its factors are the arrays above), used
        by :meth:`fold_in_users` and :meth:`fold_in_items`.
    """

    user_factors: np.ndarray
    item_factors: np.ndarray
    params: dict[str, Any]
    model: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_item_factors(cls, item_factors: np.ndarray, params: dict[str, Any]) -> WMFResult:
        """A fit reduced to its item factors (as a trained model stores them), for fold-in.

        ``params`` needs ``alpha``, ``epsilon`` and ``regularization``.
        """
        import threadpoolctl
        from implicit.cpu.als import AlternatingLeastSquares

        y = np.ascontiguousarray(item_factors, dtype=np.float32)
        if y.ndim != 2 or len(y) == 0:
            raise ParameterError(f"item_factors must be a non-empty 2-D array, got {y.shape}")
        with threadpoolctl.threadpool_limits(1, "blas"):  # as in fit_wmf (implicit's advice)
            model = AlternatingLeastSquares(
                factors=y.shape[1],
                regularization=float(params["regularization"]),
                alpha=1.0,
                dtype=np.float32,
                num_threads=1,
            )
        model.item_factors = y
        model.user_factors = np.zeros((0, y.shape[1]), np.float32)
        full = {"alpha": float(params["alpha"]), "epsilon": float(params["epsilon"]), **params}
        return cls(model.user_factors, y, full, model)

    def fold_in_users(
        self, counts: sp.spmatrix | sp.sparray, *, weights: sp.spmatrix | None = None
    ) -> np.ndarray:
        """Factors of new users from their play counts, the item factors fixed.

        One exact ALS half-step (implicit's ``recalculate_user``) with the
        confidences of the fit.  ``counts`` is ``(n_new_users, n_tracks)`` over
        the fitted tracks.  ``weights`` (same pattern, values in ``(0, 1]``)
        scales each play's confidence excess ``c - 1``: an old play counts less
        (see :mod:`deepsim.recommend`).  Users without plays get zero rows.
        """
        import threadpoolctl

        conf = self._confidence(counts, self.item_factors.shape[0], weights)
        with threadpoolctl.threadpool_limits(1, "blas"):
            users = self.model.recalculate_user(np.arange(conf.shape[0]), conf)
        return _zero_empty(users, conf)

    def fold_in_items(self, counts: sp.spmatrix | sp.sparray) -> np.ndarray:
        """Factors of new tracks from their ``(n_users, n_new_tracks)`` play counts.

        The user factors stay fixed (implicit's ``recalculate_item``): the
        tracks land in the same space as the fitted ones.  Tracks without plays
        get zero rows.
        """
        csr = sp.csr_matrix(counts, dtype=np.float32)
        if csr.shape[0] != self.user_factors.shape[0]:
            raise ParameterError(
                f"counts must have one row per fitted user ({self.user_factors.shape[0]}), "
                f"got {csr.shape[0]}"
            )
        import threadpoolctl

        conf = self._confidence(csr.T.tocsr(), csr.shape[0], None)
        with threadpoolctl.threadpool_limits(1, "blas"):
            items = self.model.recalculate_item(np.arange(conf.shape[0]), conf)
        return _zero_empty(items, conf)

    def _confidence(
        self, counts: sp.spmatrix | sp.sparray, width: int, weights: sp.spmatrix | None
    ) -> sp.csr_matrix:
        if self.model is None:
            raise ParameterError("this WMFResult has no fitted model to fold in with")
        csr = sp.csr_matrix(counts, dtype=np.float32)
        if csr.ndim != 2 or csr.shape[1] != width:
            raise ParameterError(f"counts must have {width} columns, got shape {csr.shape}")
        conf = confidence(csr, alpha=self.params["alpha"], epsilon=self.params["epsilon"])
        if weights is not None:
            w = sp.csr_matrix(weights, dtype=np.float32)
            if w.shape != conf.shape:
                raise ParameterError(f"weights must have shape {conf.shape}, got {w.shape}")
            conf.sort_indices()
            rows = np.repeat(np.arange(conf.shape[0]), np.diff(conf.indptr))
            scale = np.asarray(w[rows, conf.indices]).ravel()
            conf.data = (1.0 + scale * (conf.data - 1.0)).astype(np.float32)
        return conf


def _zero_empty(factors: np.ndarray, conf: sp.csr_matrix) -> np.ndarray:
    out = np.ascontiguousarray(np.atleast_2d(factors), dtype=np.float32)
    out[np.diff(conf.indptr) == 0] = 0.0
    return out


def _positive_int(name: str, value: Any) -> int:
    return check_int(name, value, minimum=1)


def _positive_float(name: str, value: Any, *, allow_zero: bool = False) -> float:
    return check_float(name, value, low=0.0, low_open=not allow_zero)


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
        return int(implicit.gpu.get_device_count()) > 0
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
    ParameterError
        Bad parameter or matrix (negative, NaN).
    TrainingError
        No plays to factorise.
    """
    factors = _positive_int("factors", factors)
    iterations = _positive_int("iterations", iterations)
    alpha = _positive_float("alpha", alpha)
    epsilon = _positive_float("epsilon", epsilon)
    regularization = _positive_float("regularization", regularization, allow_zero=True)
    num_threads = check_int("num_threads", num_threads, minimum=0)
    if use_gpu not in (None, True, False):
        raise ParameterError(f"use_gpu must be None, True or False, got {use_gpu!r}")
    if random_state is not None:
        check_int("random_state", random_state)
    if not sp.issparse(counts):
        raise ParameterError(f"counts must be a scipy sparse matrix, got {type(counts).__name__}")
    if counts.ndim != 2:
        raise ParameterError(f"counts must be 2-D, got shape {counts.shape}")
    csr = sp.csr_matrix(counts, dtype=np.float32)
    if csr.nnz and not np.all(np.isfinite(csr.data)):
        raise ParameterError("counts contain NaN or infinite values")
    if csr.nnz and csr.data.min() < 0:
        raise ParameterError(f"counts must be non-negative, found {float(csr.data.min())!r}")
    conf = confidence(csr, alpha=alpha, epsilon=epsilon)
    if conf.nnz == 0:
        raise TrainingError(f"no plays to factorise (counts of shape {csr.shape} are all zero)")

    gpu = _gpu_available() if use_gpu is None else use_gpu
    if gpu and not _gpu_available():
        raise ParameterError("use_gpu=True but implicit has no CUDA support or no GPU is present")

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
    # The model keeps the zeroed factors too, so that fold-in sees what the caller sees.
    model.user_factors, model.item_factors = user_factors, item_factors
    model._XtX = model._YtY = None
    params = {
        "factors": factors,
        "alpha": alpha,
        "epsilon": epsilon,
        "regularization": regularization,
        "iterations": iterations,
        "use_gpu": bool(gpu),
        "random_state": random_state,
    }
    return WMFResult(user_factors, item_factors, params, model)


def unit_normalise(factors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); all-zero rows stay zero."""
    x = np.asarray(factors, dtype=np.float32)
    if x.ndim != 2:
        raise ParameterError(f"factors must be a 2-D array, got shape {x.shape}")
    norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    out = np.zeros_like(x)
    nz = norms[:, 0] > 0
    out[nz] = (x[nz] / norms[nz]).astype(np.float32)
    return out
