"""Tests of deepsim.metrics: hand-computable rankings and a brute-force reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from deepsim.metrics import (
    POPULARITY_ROW,
    PREDICTED_ROW,
    RANDOM_ROW,
    WMF_ROW,
    co_listening,
    compare,
    evaluate_heldout,
    listener_profiles,
    mean_cosine,
    neighbour_scores,
    popularity_scores,
    profile_scores,
    random_vectors,
    ranking_scores,
)


@pytest.fixture(params=["sort", "compare"])
def method(request: pytest.FixtureRequest) -> str:
    """Both ranking strategies must give the same numbers."""
    return str(request.param)


def _one_dim(scores: list[float]) -> np.ndarray:
    """Track vectors in 1-D so that a user factor of [1] scores them as given."""
    return np.asarray(scores, np.float32)[:, None]


def test_perfect_ranking_gives_auc_and_map_one(method: str) -> None:
    items = _one_dim([5, 4, 3, 2, 1])
    plays = sp.csr_matrix(np.array([[3, 1, 0, 0, 0]], np.float32))
    r = ranking_scores(np.ones((1, 1)), items, plays, method=method)
    assert r.auc == 1.0
    assert r.map_at_k == 1.0
    assert (r.n_users_auc, r.n_users_map, r.n_items) == (1, 1, 5)


def test_reversed_ranking_gives_auc_zero_and_hand_computed_map(method: str) -> None:
    items = _one_dim([5, 4, 3, 2, 1])
    plays = np.array([[0, 0, 0, 1, 1]], np.float32)  # the two lowest-scored tracks
    r = ranking_scores(np.ones((1, 1)), items, plays, method=method)
    assert r.auc == 0.0
    # hits at ranks 4 and 5: AP = (1/4 + 2/5) / 2
    assert r.map_at_k == pytest.approx((1 / 4 + 2 / 5) / 2)


def test_ties_count_one_half(method: str) -> None:
    items = _one_dim([1, 1, 1, 1])  # every track scores the same
    plays = np.array([[1, 0, 1, 0]], np.float32)
    r = ranking_scores(np.ones((1, 1)), items, plays, method=method)
    assert r.auc == pytest.approx(0.5)


def test_map_truncation_at_k(method: str) -> None:
    items = _one_dim([4, 3, 2, 1])
    plays = np.array([[1, 0, 0, 1]], np.float32)
    full = ranking_scores(np.ones((1, 1)), items, plays, k=4, method=method)
    cut = ranking_scores(np.ones((1, 1)), items, plays, k=2, method=method)
    assert full.map_at_k == pytest.approx((1 + 2 / 4) / 2)
    # only the first two ranks count, normalised by min(n_relevant, k) = 2
    assert cut.map_at_k == pytest.approx(1 / 2)


def test_users_without_plays_or_negatives_are_handled(method: str) -> None:
    items = _one_dim([3, 2, 1])
    plays = np.array([[0, 0, 0], [1, 1, 1], [0, 1, 0]], np.float32)
    r = ranking_scores(np.ones((3, 1)), items, plays, method=method)
    assert r.n_users_map == 2  # user 0 played nothing
    assert r.n_users_auc == 1  # user 1 played everything: AUC undefined
    assert r.auc == 0.5  # user 2: one above, one below
    assert r.map_at_k == pytest.approx((1.0 + 0.5) / 2)


def test_no_users_gives_nan() -> None:
    r = ranking_scores(np.ones((2, 1)), _one_dim([1, 2]), np.zeros((2, 2)))
    assert math.isnan(r.auc) and math.isnan(r.map_at_k)


def test_matches_brute_force_reference_with_chunks(method: str) -> None:
    rng = np.random.default_rng(3)
    users = rng.standard_normal((37, 6))
    items = np.round(rng.standard_normal((60, 6)), 1)  # some ties in the scores
    plays = (rng.random((37, 60)) < 0.1) * rng.integers(1, 5, (37, 60))
    plays[5] = 0
    r = ranking_scores(users, items, sp.csr_matrix(plays), k=10, chunk_size=8, method=method)
    aucs, aps = [], []
    for u in range(37):
        s = (users[u].astype(np.float32) @ items.astype(np.float32).T).astype(np.float32)
        rel = plays[u] > 0
        if not rel.any():
            continue
        order = np.argsort(-s, kind="stable")[:10]
        hits = rel[order]
        prec = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        aps.append(np.sum(prec * hits) / min(rel.sum(), 10))
        pos, neg = s[rel], s[~rel]
        if len(neg):
            aucs.append(
                np.mean(pos[:, None] > neg[None]) + 0.5 * np.mean(pos[:, None] == neg[None])
            )
    assert r.auc == pytest.approx(np.mean(aucs), abs=1e-9)
    assert r.map_at_k == pytest.approx(np.mean(aps), abs=1e-9)
    assert r.n_users_map == len(aps) and r.n_users_auc == len(aucs)


def test_auto_method_agrees_on_sparse_and_dense_users() -> None:
    rng = np.random.default_rng(8)
    users = rng.standard_normal((50, 5))
    items = rng.standard_normal((80, 5))
    for density in (0.02, 0.5):  # auto compares for the first, sorts for the second
        plays = sp.random(50, 80, density=density, random_state=2, format="csr")
        a = ranking_scores(users, items, plays, method="auto", k=20)
        b = ranking_scores(users, items, plays, method="sort", k=20)
        c = ranking_scores(users, items, plays, method="compare", k=20)
        assert a.auc == pytest.approx(b.auc) == pytest.approx(c.auc)
        assert a.map_at_k == pytest.approx(b.map_at_k) == pytest.approx(c.map_at_k)


def test_random_vectors_are_near_chance() -> None:
    rng = np.random.default_rng(0)
    users = rng.standard_normal((400, 8))
    plays = sp.random(400, 300, density=0.05, random_state=1, format="csr")
    r = ranking_scores(users, random_vectors(300, 8, seed=2), plays)
    assert abs(r.auc - 0.5) < 0.03


def test_mean_cosine() -> None:
    a = np.array([[1, 0], [0, 2], [1, 1]], np.float32)
    b = np.array([[2, 0], [0, -1], [1, 0]], np.float32)
    assert mean_cosine(a, b) == pytest.approx((1 - 1 + 1 / math.sqrt(2)) / 3)
    assert mean_cosine(a, a * 3) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one shape"):
        mean_cosine(a, b[:2])


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="plays must be"):
        ranking_scores(np.ones((2, 1)), _one_dim([1, 2, 3]), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="factor dimensions"):
        ranking_scores(np.ones((2, 2)), _one_dim([1, 2]), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="method must be"):
        ranking_scores(np.ones((1, 1)), _one_dim([1, 2]), np.ones((1, 2)), method="magic")
    with pytest.raises(ValueError, match="k must be"):
        ranking_scores(np.ones((1, 1)), _one_dim([1, 2]), np.ones((1, 2)), k=0)


def test_evaluate_heldout_orders_true_above_random() -> None:
    rng = np.random.default_rng(5)
    users = rng.standard_normal((300, 10)).astype(np.float32)
    true = rng.standard_normal((200, 10)).astype(np.float32)
    # plays follow the (unit) true factors: each user plays their 10 best tracks
    scores = users @ (true / np.linalg.norm(true, axis=1, keepdims=True)).T
    top = np.argsort(-scores, axis=1)[:, :10]
    plays = np.zeros((300, 200), np.float32)
    np.put_along_axis(plays, top, 1.0, axis=1)
    plays[7] = 0  # a user without held-out plays
    users[9] = 0  # a user without a factor is not evaluated
    noisy = true + 0.5 * rng.standard_normal(true.shape).astype(np.float32)
    m = evaluate_heldout(users, sp.csr_matrix(plays), noisy, true, seed=1)
    assert m.wmf.auc == pytest.approx(1.0)
    assert m.wmf.map_at_k == pytest.approx(1.0)
    assert m.wmf.auc > m.predicted.auc > 0.8 > 0.6 > m.random.auc > 0.4
    assert m.predicted.map_at_k > m.random.map_at_k
    assert 0.5 < m.cosine < 1.0 and abs(m.row(RANDOM_ROW).cosine) < 0.2
    assert (m.n_tracks, m.n_users, m.n_plays) == (200, 298, 2980)
    assert [row.name for row in m.rows] == [WMF_ROW, PREDICTED_ROW, POPULARITY_ROW, RANDOM_ROW]
    # every row ranks for the same users, so rows compare user by user
    assert {len(r.scores.ap_per_user) for r in m.rows} == {299}
    table = m.format_table()
    assert "popularity" in table and "mAP@500" in table and len(table.splitlines()) == 5


def test_popularity_leaves_the_ranked_user_out() -> None:
    # track 0 is played by everyone, track 1 by one user, track 2 by nobody
    plays = np.zeros((5, 3), np.float32)
    plays[:, 0] = 1
    plays[0, 1] = 1
    s = popularity_scores(sp.csr_matrix(plays))
    # user 0: track 0 scores 4 (others' plays), track 1 scores 0, track 2 scores 0
    assert s.ap_per_user[0] == pytest.approx(1.0)
    assert s.auc_per_user[0] == pytest.approx((1.0 + 0.5) / 2)
    assert s.map_at_k == pytest.approx(1.0)


def test_profile_scores_follow_the_content() -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 16))
    group_of_track = np.repeat(np.arange(3), 20)
    vectors = centres[group_of_track] + 0.3 * rng.standard_normal((60, 16))
    group_of_user = rng.integers(0, 3, 100)
    plays = (group_of_user[:, None] == group_of_track[None, :]).astype(np.float32)
    train, held = np.arange(0, 60, 2), np.arange(1, 60, 2)
    good = profile_scores(plays[:, train], vectors[train], plays[:, held], vectors[held])
    shuffled = rng.permutation(len(held))
    bad = profile_scores(plays[:, train], vectors[train], plays[:, held], vectors[held][shuffled])
    assert good.auc > 0.95 and good.map_at_k > 0.9
    assert bad.auc < 0.7
    c = compare(good, bad)
    assert c.beats and c.d_auc > 0 and c.z_auc > 3
    assert not compare(bad, good).beats
    assert not compare(good, good).beats  # no difference is no evidence
    profiles = listener_profiles(plays[:, train], vectors[train])
    assert np.allclose(np.linalg.norm(profiles, axis=1), 1.0, atol=1e-5)


def test_co_listening_needs_two_listeners_and_more_than_chance() -> None:
    # 6 users; query track q0 is played by users 0-2, q1 by everyone
    q = np.zeros((6, 2), np.float32)
    q[:3, 0] = 1
    q[:, 1] = 5
    # candidates: c0 by users 0-2 (with q0), c1 by user 0 only, c2 by everyone, c3 by 3-5
    c = np.zeros((6, 4), np.float32)
    c[:3, 0] = 2
    c[0, 1] = 1
    c[:, 2] = 1
    c[3:, 3] = 1
    rel = co_listening(q, c).toarray()
    # q0-c0: 3 together, chance 3*3/6 = 1.5, lift 2: relevant; q0-c1: 1 listener; q0-c2: 3
    # together but chance 3 (everybody plays it); q0-c3: nobody in common
    assert rel[0].tolist() == [1, 0, 0, 0]
    # q1 is played by everyone: nothing is played with it more than by chance
    assert rel[1].tolist() == [0, 0, 0, 0]
    assert co_listening(q, c, min_users=1, min_lift=1.0).toarray()[0].tolist() == [1, 1, 1, 0]
    with pytest.raises(ValueError, match="same users"):
        co_listening(q, c[:5])


def test_neighbour_scores_by_hand_and_the_query_itself_left_out() -> None:
    # four tracks on a line; the query is track 0 and is among the candidates
    vectors = np.asarray([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.5, 0.5]], np.float32)
    rel = sp.csr_matrix(np.asarray([[1, 0, 1, 0]], np.float32))  # itself and track 2
    s = neighbour_scores(vectors[:1], vectors, rel, exclude=np.asarray([0]), k=2)
    # ranking without the query: 1, 3, 2 -> the only relevant one (2) comes third
    assert s.n_queries == 1
    assert s.p_at_k == pytest.approx(0.0)
    assert s.map_at_k == pytest.approx(1 / 3)
    s1 = neighbour_scores(vectors[:1], vectors, rel, exclude=np.asarray([0]), k=3)
    assert s1.p_at_k == pytest.approx(1 / 3)
    # without excluding it, the query ranks itself first
    s2 = neighbour_scores(vectors[:1], vectors, rel, k=1)
    assert s2.p_at_k == pytest.approx(1.0)
    # a query without relevant candidates is left out of the means
    none = neighbour_scores(vectors[:2], vectors, sp.csr_matrix((2, 4)), k=2)
    assert none.n_queries == 0 and math.isnan(none.p_at_k)
    assert np.isnan(none.ap_per_query).all()
    with pytest.raises(ValueError, match="do not agree"):
        neighbour_scores(vectors[:1], vectors, sp.csr_matrix((1, 3)))
