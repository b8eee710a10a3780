"""Tests of deepsim.cf: filtering, the held-out split, factorising with fold-in."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from deepsim.cf import factorise_split, filter_counts, split_tracks
from deepsim.wmf import fit_wmf


def planted(
    n_users: int = 150, n_tracks: int = 120, groups: int = 3, seed: int = 0
) -> sp.csr_matrix:
    """Users in taste groups, each playing mostly its own cluster of tracks."""
    rng = np.random.default_rng(seed)
    user_group = rng.integers(0, groups, n_users)
    track_group = np.arange(n_tracks) % groups
    dense = np.zeros((n_users, n_tracks), np.float32)
    for u in range(n_users):
        own = np.flatnonzero(track_group == user_group[u])
        dense[u, rng.choice(own, 15, replace=False)] = rng.integers(1, 5, 15)
        dense[u, rng.integers(0, n_tracks)] += 1
    return sp.csr_matrix(dense)


def test_folded_in_items_agree_with_the_fit() -> None:
    """Folding the fitted tracks back in against the fitted users reproduces them."""
    counts = planted()
    result = fit_wmf(counts, factors=8, iterations=30, regularization=0.1)
    solved = result.fold_in_items(counts)
    a, b = solved, result.item_factors
    cos = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert np.median(cos) > 0.99
    empty = result.fold_in_items(sp.csr_matrix((counts.shape[0], 2), dtype=np.float32))
    assert np.all(empty == 0)


def test_folded_in_users_agree_with_the_fit_and_recency_weights_count() -> None:
    counts = planted()
    result = fit_wmf(counts, factors=8, iterations=30, regularization=0.1)
    users = result.fold_in_users(counts[:20])
    cos = np.sum(users * result.user_factors[:20], axis=1) / (
        np.linalg.norm(users, axis=1) * np.linalg.norm(result.user_factors[:20], axis=1)
    )
    assert np.median(cos) > 0.99
    # a listener who played tracks of two clusters, the first long ago: the recent one wins
    both = sp.csr_matrix(counts[0] + counts[1])
    first = np.asarray(counts[0].todense()).ravel() > 0
    weights = sp.csr_matrix(np.where(first, 0.05, 1.0)[None, :] * (both.toarray() > 0))
    plain = result.fold_in_users(both)[0]
    recent = result.fold_in_users(both, weights=weights)[0]

    def cosine(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    toward_second = cosine(recent, result.user_factors[1]) - cosine(plain, result.user_factors[1])
    assert toward_second > 0.05
    assert np.all(result.fold_in_users(sp.csr_matrix((1, counts.shape[1]))) == 0)
    with pytest.raises(ValueError, match="columns"):
        result.fold_in_users(counts[:, :5])


def test_heldout_tracks_are_cold_start() -> None:
    counts = planted(n_users=80, n_tracks=100)
    train, held = split_tracks(100, heldout_fraction=0.3, seed=1)
    assert len(held) == 30 and len(np.intersect1d(train, held)) == 0
    assert np.array_equal(np.union1d(train, held), np.arange(100))
    split = factorise_split(counts, train, held, factors=8, seed=0)
    assert split.train_factors.shape == (70, 8) and split.heldout_factors.shape == (30, 8)
    np.testing.assert_allclose(np.linalg.norm(split.train_factors, axis=1), 1.0, atol=1e-5)
    # the held-out plays take no part: removing them changes neither users nor targets
    masked = counts.tolil()
    masked[:, held] = 0
    again = factorise_split(masked.tocsr(), train, held, factors=8, seed=0)
    np.testing.assert_allclose(again.user_factors, split.user_factors, atol=1e-5)
    np.testing.assert_allclose(again.train_factors, split.train_factors, atol=1e-5)
    assert split.wmf.model is not None  # kept, for folding in


def test_filter_counts_applies_rules_until_stable() -> None:
    dense = np.array(
        [
            [1, 1, 0, 0],
            [1, 1, 0, 1],
            [0, 0, 5, 0],  # one track only, and that track has one listener
            [1, 0, 0, 1],
        ],
        np.float32,
    )
    users, tracks = filter_counts(sp.csr_matrix(dense), min_plays=2, min_listeners=2)
    assert tracks.tolist() == [0, 1, 3] and users.tolist() == [0, 1, 3]
    # with min_user_tracks=3 user 1 alone is left, then every track loses its listeners
    users, tracks = filter_counts(sp.csr_matrix(dense), min_user_tracks=3)
    assert len(tracks) == 0


def test_split_is_seeded() -> None:
    a = split_tracks(50, heldout_fraction=0.2, seed=3)
    b = split_tracks(50, heldout_fraction=0.2, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert len(split_tracks(50, heldout_fraction=0.0)[1]) == 0
    assert [len(x) for x in split_tracks(3, heldout_fraction=0.9)] == [1, 2]
    assert [len(x) for x in split_tracks(10, heldout_fraction=0.01)] == [9, 1]
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_tracks(50, heldout_fraction=1.0)
