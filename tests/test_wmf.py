"""Tests of deepsim.wmf: planted structure, the confidence model, validation."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from deepsim.errors import TrainingError
from deepsim.wmf import confidence, fit_wmf, unit_normalise


def planted(seed: int = 0, *, groups: int = 3, users_per: int = 60, tracks_per: int = 40):
    """Users in `groups` taste groups, each playing (mostly) its own cluster of tracks."""
    rng = np.random.default_rng(seed)
    n_users, n_tracks = groups * users_per, groups * tracks_per
    user_group = np.repeat(np.arange(groups), users_per)
    track_cluster = np.repeat(np.arange(groups), tracks_per)
    dense = np.zeros((n_users, n_tracks), dtype=np.float32)
    for u in range(n_users):
        own = np.flatnonzero(track_cluster == user_group[u])
        k = min(12, len(own) - 2)
        picks = rng.choice(own, size=k, replace=False)
        dense[u, picks] = rng.integers(1, 6, size=k)
        stray = rng.integers(0, n_tracks)  # a little noise
        dense[u, stray] += 1
    return dense, user_group, track_cluster


def test_planted_clusters_and_held_out_plays() -> None:
    dense, _, track_cluster = planted()
    rng = np.random.default_rng(1)
    # Hold out one played track per user.
    held = np.array([rng.choice(np.flatnonzero(row)) for row in dense])
    train = dense.copy()
    train[np.arange(len(dense)), held] = 0
    res = fit_wmf(sp.csr_matrix(train), factors=8, iterations=15)
    assert res.user_factors.shape == (180, 8) and res.item_factors.shape == (120, 8)
    assert res.user_factors.dtype == np.float32 and res.item_factors.dtype == np.float32

    items = unit_normalise(res.item_factors)
    cos = items @ items.T
    same = track_cluster[:, None] == track_cluster[None, :]
    off_diag = ~np.eye(len(items), dtype=bool)
    within = cos[same & off_diag].mean()
    across = cos[~same].mean()
    assert within > across + 0.3, (within, across)
    # Nearest neighbour of every track is in its own cluster.
    np.fill_diagonal(cos, -np.inf)
    assert np.mean(track_cluster[cos.argmax(axis=1)] == track_cluster) > 0.95

    # Held-out plays rank above random unplayed tracks (AUC).
    scores = res.user_factors @ res.item_factors.T
    wins = []
    for u in range(len(dense)):
        unplayed = np.flatnonzero(dense[u] == 0)
        wins.append(np.mean(scores[u, held[u]] > scores[u, unplayed]))
    # Near 0.85 at best: a held-out track competes with 27 unplayed tracks of its own cluster.
    assert np.mean(wins) > 0.75


def test_user_factors_solve_hu_et_al_least_squares() -> None:
    """Given the item factors, x_u = (YᵀCᵤY + λI)⁻¹ YᵀCᵤpᵤ with c = 1 + α log(1 + r/ε)."""
    dense, _, _ = planted(2, users_per=20, tracks_per=15)
    counts = sp.csr_matrix(dense)
    alpha, eps, lam = 1.5, 0.5, 0.3
    res = fit_wmf(
        counts,
        factors=6,
        alpha=alpha,
        epsilon=eps,
        regularization=lam,
        iterations=60,
        num_threads=1,
    )
    y = res.item_factors.astype(np.float64)
    for u in range(0, counts.shape[0], 7):
        r = dense[u].astype(np.float64)
        c = np.where(r > 0, 1 + alpha * np.log1p(r / eps), 1.0)
        p = (r > 0).astype(np.float64)
        a = y.T @ (c[:, None] * y) + lam * np.eye(y.shape[1])
        x = np.linalg.solve(a, y.T @ (c * p))
        got = res.user_factors[u].astype(np.float64)
        assert np.linalg.norm(got - x) < 0.02 * np.linalg.norm(x), u


def test_confidence_formula() -> None:
    counts = sp.csr_matrix(np.array([[0, 1, 10], [3, 0, 0]], dtype=np.float32))
    c = confidence(counts, alpha=2.0, epsilon=1e-6)
    expected = np.array(
        [[0, 1 + 2 * np.log1p(1e6), 1 + 2 * np.log1p(1e7)], [1 + 2 * np.log1p(3e6), 0, 0]]
    )
    np.testing.assert_allclose(c.toarray(), expected, rtol=1e-6)
    assert c.dtype == np.float32 and c.nnz == 3
    assert counts[0, 1] == 1  # input untouched


def test_rows_and_columns_without_plays_get_zero_factors() -> None:
    dense, _, _ = planted(3, users_per=10, tracks_per=10)
    dense = np.pad(dense, ((0, 2), (0, 3)))  # 2 silent users, 3 unplayed tracks
    res = fit_wmf(sp.csr_matrix(dense), factors=4, iterations=3, num_threads=1)
    assert not res.user_factors[-2:].any() and not res.item_factors[-3:].any()
    assert np.all(np.linalg.norm(res.item_factors[:-3], axis=1) > 0)
    normed = unit_normalise(res.item_factors)
    assert not normed[-3:].any()


def test_deterministic_for_a_seed_and_no_blas_warning() -> None:
    dense, _, _ = planted(4, users_per=10, tracks_per=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        a = fit_wmf(sp.csr_matrix(dense), factors=5, iterations=4, random_state=7, num_threads=1)
    b = fit_wmf(sp.csr_matrix(dense), factors=5, iterations=4, random_state=7, num_threads=1)
    c = fit_wmf(sp.csr_matrix(dense), factors=5, iterations=4, random_state=8, num_threads=1)
    np.testing.assert_array_equal(a.item_factors, b.item_factors)
    assert not np.array_equal(a.item_factors, c.item_factors)
    assert a.params["alpha"] == 2.0 and a.params["use_gpu"] is False


def test_unit_normalise() -> None:
    x = np.array([[3, 4], [0, 0], [0, -2]], dtype=np.float32)
    out = unit_normalise(x)
    np.testing.assert_allclose(out, [[0.6, 0.8], [0, 0], [0, -1]])
    assert out.dtype == np.float32
    with pytest.raises(ValueError, match=r"\(3,\)"):
        unit_normalise(np.ones(3))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"factors": 0}, "factors.*0"),
        ({"factors": 2.5}, "factors.*2.5"),
        ({"factors": True}, "factors.*True"),
        ({"iterations": -1}, "iterations.*-1"),
        ({"alpha": 0}, "alpha.*0"),
        ({"alpha": float("nan")}, "alpha.*nan"),
        ({"epsilon": -1e-6}, "epsilon.*-1e-06"),
        ({"regularization": -0.1}, "regularization.*-0.1"),
        ({"regularization": "a lot"}, "regularization.*'a lot'"),
        ({"use_gpu": "yes"}, "use_gpu.*'yes'"),
        ({"random_state": 1.5}, "random_state.*1.5"),
        ({"num_threads": -2}, "num_threads.*-2"),
    ],
)
def test_argument_validation(kwargs: dict, message: str) -> None:
    counts = sp.csr_matrix(np.eye(3, dtype=np.float32))
    with pytest.raises(ValueError, match=message):
        fit_wmf(counts, **{"num_threads": 1, **kwargs})


def test_bad_matrices() -> None:
    with pytest.raises(ValueError, match="sparse"):
        fit_wmf(np.eye(3))
    with pytest.raises(ValueError, match="non-negative"):
        fit_wmf(sp.csr_matrix(np.array([[1, -1]], dtype=np.float32)))
    with pytest.raises(ValueError, match="NaN"):
        fit_wmf(sp.csr_matrix(np.array([[1, np.nan]], dtype=np.float32)))
    with pytest.raises(TrainingError, match="no plays"):
        fit_wmf(sp.csr_matrix((4, 5), dtype=np.float32))


def test_use_gpu_true_without_cuda() -> None:
    import implicit.gpu

    if implicit.gpu.HAS_CUDA:
        pytest.skip("implicit has CUDA here")
    with pytest.raises(ValueError, match="use_gpu=True"):
        fit_wmf(sp.csr_matrix(np.eye(3, dtype=np.float32)), use_gpu=True)
