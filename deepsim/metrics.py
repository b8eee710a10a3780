"""Held-out metrics for a track-vector regressor (van den Oord et al., NIPS 2013).

The protocol (what :func:`evaluate_heldout` computes)
-----------------------------------------------------
A set of *held-out* tracks is kept out of the collaborative-filtering fit, so
for the factorisation they are cold-start tracks.  Users (listeners, or
session/playlist pseudo-users) keep the factors ``x_u`` learned from the
*training* tracks.  For each held-out track ``j`` a vector ``y_j`` is produced
by one of three methods:

``predicted``
    the regression head's output from the track's audio features;
``wmf``
    the track's true (unit-normalised) WMF factor: the upper bound a perfect
    regressor would reach;
``random``
    an isotropic Gaussian vector, unit-normalised: the chance level.

For every evaluated user the held-out tracks are ranked by ``x_u · y_j``
(highest first).  A track is *relevant* to a user when the user played it at
least once.  Only users with at least one play among the held-out tracks are
evaluated; the AUC additionally needs one unplayed held-out track, so users
who played every held-out track are left out of the AUC (not of mAP).

AUC
    the probability that a random relevant track is ranked above a random
    irrelevant one, ties counting one half (the Mann-Whitney statistic,
    computed from average ranks); 0.5 is chance, 1 a perfect ranking.
mAP@k (k = 500)
    the mean over users of the average precision truncated at ``k``:
    ``AP@k = (1 / min(n_u, k)) Σ_{i ≤ k} P@i · rel_i`` where ``n_u`` is the
    number of relevant tracks, ``P@i`` the precision among the first ``i``
    ranked tracks and ``rel_i`` whether the ``i``-th is relevant.  Ties in the
    score are broken by track order.
mean cosine
    the mean over held-out tracks of the cosine between the predicted vector
    and the true factor.

Everything is vectorised numpy; users are processed in chunks so thousands of
users times thousands of tracks fit in modest memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from deepsim.errors import ParameterError
from deepsim.util import check_int

#: Truncation of the average precision, as in the seed paper.
MAP_K = 500


@dataclass(frozen=True)
class RankingScores:
    """Ranking quality of one set of track vectors for a set of users.

    Attributes
    ----------
    auc
        Mean per-user AUC (``nan`` when no user qualifies).
    map_at_k
        Mean per-user average precision truncated at ``k`` (``nan`` when no
        user qualifies).
    k
        The truncation.
    n_users_auc, n_users_map
        Users the two means were taken over.
    n_items
        Tracks ranked.
    auc_per_user, ap_per_user
        One value per row of the users given (``nan`` where the user does
        not qualify), for paired comparisons (:func:`compare`).
    """

    auc: float
    map_at_k: float
    k: int
    n_users_auc: int
    n_users_map: int
    n_items: int
    auc_per_user: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    ap_per_user: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)


@dataclass(frozen=True)
class MetricRow:
    """One row of the held-out table: a way of scoring the held-out tracks.

    Attributes
    ----------
    name
        What scored them (``"untrained: sound profile"``, ``"popularity"``...).
    scores
        Its per-user AUC and mAP@k.
    cosine
        Mean cosine of its track vectors to the true factors, where that
        means something (``None`` otherwise).
    """

    name: str
    scores: RankingScores
    cosine: float | None = None


@dataclass(frozen=True)
class HeldoutMetrics:
    """The held-out comparison: the trained model against honest baselines.

    Attributes
    ----------
    rows
        :class:`MetricRow` s in table order (:data:`WMF_ROW`,
        :data:`PREDICTED_ROW`, :data:`POPULARITY_ROW`, :data:`RANDOM_ROW`, and
        whatever :meth:`with_row` added).
    n_tracks
        Held-out tracks.
    n_users
        Users with at least one play among them (and a user factor).
    n_plays
        Non-zero user-track pairs among the held-out tracks of those users.
    """

    rows: tuple[MetricRow, ...]
    n_tracks: int
    n_users: int
    n_plays: int

    def row(self, name: str) -> MetricRow:
        """The row called ``name`` (``KeyError`` if absent)."""
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(name)

    def with_row(self, row: MetricRow, *, after: str | None = None) -> HeldoutMetrics:
        """A copy with ``row`` added (after the row ``after``, else at the end)."""
        rows = list(self.rows)
        at = len(rows) if after is None else [r.name for r in rows].index(after) + 1
        rows.insert(at, row)
        return HeldoutMetrics(tuple(rows), self.n_tracks, self.n_users, self.n_plays)

    @property
    def predicted(self) -> RankingScores:
        return self.row(PREDICTED_ROW).scores

    @property
    def wmf(self) -> RankingScores:
        return self.row(WMF_ROW).scores

    @property
    def random(self) -> RankingScores:
        return self.row(RANDOM_ROW).scores

    @property
    def cosine(self) -> float:
        value = self.row(PREDICTED_ROW).cosine
        return float("nan") if value is None else value

    def format_table(self, *, indent: str = "  ") -> str:
        """The table as plain text (:func:`format_metrics_table`)."""
        return format_metrics_table(self.rows, indent=indent)


#: Row names of :func:`evaluate_heldout`.
WMF_ROW = "wmf (upper bound)"
PREDICTED_ROW = "trained: taste (x_u · predicted)"
POPULARITY_ROW = "popularity (others' plays)"
RANDOM_ROW = "random"


def format_metrics_table(
    rows: tuple[MetricRow, ...] | list[MetricRow], *, indent: str = "  "
) -> str:
    """The one formatter of held-out tables (``deepsim-train`` and ``pretrain``).

    ``method  cosine  AUC  mAP@k  users``; a cosine that does not apply is
    shown as ``-``.
    """
    if not rows:
        return ""
    k = rows[0].scores.k
    width = max(30, *(len(r.name) for r in rows))
    lines = [f"{indent}{'method':<{width}} {'cosine':>7} {'AUC':>7} {f'mAP@{k}':>8} {'users':>6}"]
    for r in rows:
        cosine = "-" if r.cosine is None else f"{r.cosine:.3f}"
        lines.append(
            f"{indent}{r.name:<{width}} {cosine:>7} {r.scores.auc:>7.3f} "
            f"{r.scores.map_at_k:>8.3f} {r.scores.n_users_map:>6}"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class Comparison:
    """Paired per-user difference ``a - b`` of AUC and AP (over users both rank).

    ``z = mean / standard error``; :attr:`beats` asks for both means to be
    positive with ``z`` above ``z_min`` (one-sided, 1.645 = 95 %).  ``auc``
    and ``map_at_k`` are the two means ``(a, b)`` over the compared users.
    """

    d_auc: float
    se_auc: float
    d_map: float
    se_map: float
    n_users: int
    z_min: float = 1.645
    auc: tuple[float, float] = (float("nan"), float("nan"))
    map_at_k: tuple[float, float] = (float("nan"), float("nan"))

    @property
    def z_auc(self) -> float:
        return self.d_auc / self.se_auc if self.se_auc > 0 else (np.inf if self.d_auc > 0 else 0.0)

    @property
    def z_map(self) -> float:
        return self.d_map / self.se_map if self.se_map > 0 else (np.inf if self.d_map > 0 else 0.0)

    @property
    def beats(self) -> bool:
        return bool(
            self.n_users > 1
            and self.d_auc > 0
            and self.d_map > 0
            and self.z_auc >= self.z_min
            and self.z_map >= self.z_min
        )


def compare(
    a: RankingScores,
    b: RankingScores,
    *,
    users: np.ndarray | None = None,
    z_min: float = 1.645,
) -> Comparison:
    """Paired comparison of two score sets computed for the same users.

    ``users`` (a boolean mask or indices) restricts it to some of them.
    """
    if a.auc_per_user.shape != b.auc_per_user.shape:
        raise ParameterError("compare needs scores computed over the same users")
    pick = (
        np.ones(len(a.auc_per_user), bool) if users is None else np.zeros(len(a.auc_per_user), bool)
    )
    if users is not None:
        pick[np.asarray(users)] = True

    def paired(x: np.ndarray, y: np.ndarray) -> tuple[float, float, int, float, float]:
        ok = np.isfinite(x) & np.isfinite(y) & pick
        d = x[ok] - y[ok]
        if len(d) == 0:
            return float("nan"), float("nan"), 0, float("nan"), float("nan")
        se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("inf")
        return float(d.mean()), se, len(d), float(x[ok].mean()), float(y[ok].mean())

    d_auc, se_auc, _, a_auc, b_auc = paired(a.auc_per_user, b.auc_per_user)
    d_map, se_map, n, a_map, b_map = paired(a.ap_per_user, b.ap_per_user)
    return Comparison(d_auc, se_auc, d_map, se_map, n, z_min, (a_auc, b_auc), (a_map, b_map))


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms > 0, norms, 1.0)


def mean_cosine(predicted: np.ndarray, true: np.ndarray) -> float:
    """Mean row-wise cosine similarity of two ``(n, d)`` arrays.

    Rows of zero norm count as cosine 0.  Returns ``nan`` for ``n = 0``.
    """
    predicted = np.asarray(predicted, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if predicted.shape != true.shape or predicted.ndim != 2:
        raise ParameterError(
            f"predicted and true must be 2-D arrays of one shape, got {predicted.shape} "
            f"and {true.shape}"
        )
    if len(predicted) == 0:
        return float("nan")
    return float(np.mean(np.sum(_unit_rows(predicted) * _unit_rows(true), axis=1)))


def _as_relevance(plays: sp.spmatrix | np.ndarray) -> sp.csr_matrix:
    matrix = sp.csr_matrix(plays, dtype=np.float32)
    matrix = sp.csr_matrix(
        ((matrix.data > 0).astype(np.float32), matrix.indices, matrix.indptr),
        shape=matrix.shape,
    )
    matrix.eliminate_zeros()
    return matrix


def _chunk_by_sort(scores: np.ndarray, rel: sp.csr_matrix, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-user rank sums of the relevant tracks and AP@k, from one sort per user.

    Cost ``O(n_users · n_items · log n_items)``; best when users have many
    relevant tracks.
    """
    n_items = scores.shape[1]
    index = np.arange(n_items)
    order = np.argsort(-scores, axis=1, kind="stable")  # ties keep track order
    ranked = np.take_along_axis(scores, order, axis=1)
    hits = np.take_along_axis(rel.toarray() > 0, order, axis=1)
    # Within a run of equal scores every track gets the run's mean position.
    new_run = np.ones(ranked.shape, dtype=bool)
    new_run[:, 1:] = ranked[:, 1:] != ranked[:, :-1]
    last_of_run = np.ones(ranked.shape, dtype=bool)
    last_of_run[:, :-1] = new_run[:, 1:]
    run_start = np.maximum.accumulate(np.where(new_run, index, 0), axis=1)
    run_end = np.minimum.accumulate(np.where(last_of_run, index, n_items - 1)[:, ::-1], axis=1)
    ascending_rank = n_items - (run_start + run_end[:, ::-1]) / 2.0  # 1 = lowest score
    rank_sum = np.sum(np.where(hits, ascending_rank, 0.0), axis=1)
    return rank_sum, _average_precision(hits, np.diff(rel.indptr), k)


def _average_precision(hits: np.ndarray, n_pos: np.ndarray, k: int) -> np.ndarray:
    """AP@k per row of relevance flags in rank order (``n_pos`` relevant in the row)."""
    kk = min(k, hits.shape[1])
    top = hits[:, :kk].astype(np.float64)
    precision = np.cumsum(top, axis=1) / np.arange(1, kk + 1)
    return np.sum(precision * top, axis=1) / np.maximum(1, np.minimum(n_pos, kk))


def _mean_of_finite(values: np.ndarray) -> float:
    """The mean of the finite values; ``nan`` (without a warning) when there are none."""
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def _chunk_by_comparison(
    scores: np.ndarray, rel: sp.csr_matrix, k: int, *, budget: int = 1 << 22
) -> tuple[np.ndarray, np.ndarray]:
    """The same as :func:`_chunk_by_sort` from comparisons of each relevant track's score.

    Cost ``O(n_relevant · n_items)``; best when users have few relevant tracks.
    """
    n_users, n_items = scores.shape
    index = np.arange(n_items)
    n_pos = np.diff(rel.indptr)
    user = np.repeat(np.arange(n_users), n_pos)
    track = rel.indices
    own = scores[user, track]
    less = np.empty(len(user))
    equal = np.empty(len(user))
    equal_before = np.empty(len(user))
    step = max(1, budget // max(1, n_items))
    for a in range(0, len(user), step):
        rows = scores[user[a : a + step]]
        mine = own[a : a + step, None]
        ties = rows == mine
        less[a : a + step] = np.sum(rows < mine, axis=1)
        equal[a : a + step] = np.sum(ties, axis=1)
        equal_before[a : a + step] = np.sum(ties & (index < track[a : a + step, None]), axis=1)
    # Ascending average rank (ties share their mean rank), summed per user.
    rank_sum = np.bincount(user, less + (equal + 1) / 2, minlength=n_users)
    # Position in the stable descending order (ties by track order), 1-based.
    position = (n_items - less - equal) + equal_before + 1
    order = np.lexsort((position, user))
    user_sorted, position_sorted = user[order], position[order]
    nth_hit = np.arange(len(order)) - np.searchsorted(user_sorted, user_sorted) + 1
    kk = min(k, n_items)
    gain = np.where(position_sorted <= kk, nth_hit / position_sorted, 0.0)
    ap = np.bincount(user_sorted, gain, minlength=n_users) / np.minimum(n_pos, kk)
    return rank_sum, ap


def ranking_scores(
    user_factors: np.ndarray,
    item_vectors: np.ndarray,
    plays: sp.spmatrix | np.ndarray,
    *,
    k: int = MAP_K,
    chunk_size: int = 1024,
    method: str = "auto",
) -> RankingScores:
    """Per-user AUC and mAP@k of ranking tracks by ``user_factors @ item_vectors.T``.

    Parameters
    ----------
    user_factors
        ``(n_users, f)`` user factors (or listener profiles).
    item_vectors
        ``(n_items, f)`` track vectors to rank (any norm).
    plays
        ``(n_users, n_items)`` play counts (sparse or dense); a positive entry
        marks a relevant track.  Users without any are skipped.
    k
        Truncation of the average precision.
    chunk_size
        Users scored at a time (memory is ``chunk_size × n_items`` floats).
    method
        ``"sort"`` (sort every user's scores), ``"compare"`` (compare each
        relevant track's score with all others) or ``"auto"``: per chunk,
        comparisons when users average fewer than 8 relevant tracks.  All
        give the same numbers.

    Returns
    -------
    RankingScores
    """
    user_factors = np.asarray(user_factors, dtype=np.float32)
    item_vectors = np.asarray(item_vectors, dtype=np.float32)
    if user_factors.ndim != 2 or item_vectors.ndim != 2:
        raise ParameterError("user_factors and item_vectors must be 2-D arrays")
    if user_factors.shape[1] != item_vectors.shape[1]:
        raise ParameterError(
            f"factor dimensions differ: users {user_factors.shape[1]}, "
            f"items {item_vectors.shape[1]}"
        )
    return rank_scores(
        lambda rows, _rel: user_factors[rows] @ item_vectors.T,
        plays,
        shape=(len(user_factors), len(item_vectors)),
        k=k,
        chunk_size=chunk_size,
        method=method,
    )


ScoreFunction = Callable[[np.ndarray, sp.csr_matrix], np.ndarray]
"""``scores(user_rows, relevance_of_those_rows) -> (len(user_rows), n_items)``."""


def rank_scores(
    scores: ScoreFunction,
    plays: sp.spmatrix | np.ndarray,
    *,
    shape: tuple[int, int] | None = None,
    k: int = MAP_K,
    chunk_size: int = 1024,
    method: str = "auto",
) -> RankingScores:
    """:func:`ranking_scores` for any scoring rule (e.g. popularity), chunk by chunk."""
    if shape is not None and plays.shape != shape:
        raise ParameterError(f"plays must be (n_users, n_items) = {shape}, got {plays.shape}")
    k = check_int("k", k, minimum=1)
    check_int("chunk_size", chunk_size, minimum=1)
    if method not in ("auto", "sort", "compare"):
        raise ParameterError(f"method must be 'auto', 'sort' or 'compare', got {method!r}")

    relevance = _as_relevance(plays)
    n_users, n_items = relevance.shape
    n_pos_all = np.diff(relevance.indptr)
    users = np.flatnonzero(n_pos_all > 0)
    auc_per_user = np.full(n_users, np.nan)
    ap_per_user = np.full(n_users, np.nan)
    for start in range(0, len(users), chunk_size):
        rows = users[start : start + chunk_size]
        rel = relevance[rows]
        chunk = np.asarray(scores(rows, rel), dtype=np.float32)
        sparse = rel.nnz < 8 * len(rows)
        if method == "compare" or (method == "auto" and sparse):
            rank_sum, ap = _chunk_by_comparison(chunk, rel, k)
        else:
            rank_sum, ap = _chunk_by_sort(chunk, rel, k)
        # AUC = Mann-Whitney U / (P · N), U = rank sum of the relevant tracks − P(P+1)/2.
        n_pos = n_pos_all[rows].astype(np.float64)
        n_neg = n_items - n_pos
        has_neg = n_neg > 0
        p, q = n_pos[has_neg], n_neg[has_neg]
        auc_per_user[rows[has_neg]] = (rank_sum[has_neg] - p * (p + 1) / 2) / (p * q)
        ap_per_user[rows] = ap
    n_auc = int(np.sum(np.isfinite(auc_per_user)))
    n_map = len(users)
    return RankingScores(
        auc=_mean_of_finite(auc_per_user),
        map_at_k=_mean_of_finite(ap_per_user),
        k=k,
        n_users_auc=n_auc,
        n_users_map=n_map,
        n_items=n_items,
        auc_per_user=auc_per_user,
        ap_per_user=ap_per_user,
    )


def random_vectors(n: int, dim: int, *, seed: int = 0) -> np.ndarray:
    """``n`` unit vectors drawn uniformly on the sphere (the chance baseline)."""
    rng = np.random.default_rng(seed)
    return _unit_rows(rng.standard_normal((n, dim))).astype(np.float32)


def popularity_scores(plays: sp.spmatrix | np.ndarray, *, k: int = MAP_K) -> RankingScores:
    """Rank the tracks by how many *other* users played them (leave-one-user-out).

    A reference, not a cold-start method: it uses the held-out plays of
    everyone but the user being ranked for, which a never-played track does
    not have.
    """
    relevance = _as_relevance(plays)
    listeners = np.asarray(relevance.sum(axis=0), dtype=np.float64).ravel()
    return rank_scores(lambda _rows, rel: listeners[None, :] - rel.toarray(), relevance, k=k)


def listener_profiles(
    plays: sp.spmatrix | np.ndarray, vectors: np.ndarray, *, weights: np.ndarray | None = None
) -> np.ndarray:
    """Each user's play-weighted mean of the (unit) vectors of the tracks they played.

    The content-based recommender's profile: ``(n_users, dim)`` unit rows
    (zero for a user without plays).  ``weights`` optionally multiplies each
    play (recency).
    """
    csr = sp.csr_matrix(plays, dtype=np.float64)
    if weights is not None:
        csr = csr.multiply(np.asarray(weights, np.float64)).tocsr()
    profile = np.asarray(csr @ _unit_rows(np.asarray(vectors, dtype=np.float64)))
    return _unit_rows(profile).astype(np.float32)


def profile_scores(
    train_plays: sp.spmatrix | np.ndarray,
    train_vectors: np.ndarray,
    heldout_plays: sp.spmatrix | np.ndarray,
    heldout_vectors: np.ndarray,
    *,
    k: int = MAP_K,
) -> RankingScores:
    """Content-based recommendation of held-out tracks from a listener profile.

    Profile = play-weighted mean of the vectors of the user's training tracks
    (:func:`listener_profiles`); held-out tracks ranked by cosine to it.
    """
    profiles = listener_profiles(train_plays, train_vectors)
    return ranking_scores(
        profiles, _unit_rows(np.asarray(heldout_vectors, np.float32)), heldout_plays, k=k
    )


#: Co-listening rule of :func:`co_listening`: played together by at least this many
#: users, and at least this many times as often as chance.
CO_MIN_USERS = 2
CO_MIN_LIFT = 2.0
#: Cut-off of the item-to-item precision (what ``beet similar -c 5`` shows).
NEIGHBOUR_K = 5


def co_listening(
    query_plays: sp.spmatrix | np.ndarray,
    candidate_plays: sp.spmatrix | np.ndarray,
    *,
    min_users: int = CO_MIN_USERS,
    min_lift: float = CO_MIN_LIFT,
) -> sp.csr_matrix:
    """Which candidate tracks each query track's listeners also played: ``(n_query, n_cand)``.

    Both arguments are ``users × tracks`` play counts over the same users.
    Candidate ``j`` is relevant to query ``q`` when at least ``min_users``
    users played both, and at least ``min_lift`` times as many as chance
    would give (``n_q · n_j / n_users``, ``n`` the tracks' listener counts),
    so that tracks everybody plays are not relevant to everything.
    """
    check_int("min_users", min_users, minimum=1)
    q = _as_relevance(query_plays)
    c = _as_relevance(candidate_plays)
    if q.shape[0] != c.shape[0]:
        raise ParameterError(
            f"query and candidate plays must have the same users, got {q.shape} and {c.shape}"
        )
    together = sp.csr_matrix(q.T @ c)
    n_q = np.asarray(q.sum(axis=0)).ravel()
    n_c = np.asarray(c.sum(axis=0)).ravel()
    rows = np.repeat(np.arange(together.shape[0]), np.diff(together.indptr))
    expected = n_q[rows] * n_c[together.indices] / max(1, q.shape[0])
    keep = (together.data >= min_users) & (together.data >= min_lift * expected)
    return sp.csr_matrix(
        (np.ones(int(keep.sum()), np.float32), (rows[keep], together.indices[keep])),
        shape=together.shape,
    )


@dataclass(frozen=True)
class NeighbourScores:
    """Item-to-item ranking quality: what ``beet similar`` would return for query tracks.

    Attributes
    ----------
    p_at_k
        Mean precision of the first ``k`` candidates over the queries that
        have a relevant candidate (``nan`` when none has).
    map_at_k
        Mean average precision truncated at :data:`MAP_K` over the same queries.
    k
        The precision cut-off.
    n_queries
        Queries the means are over.
    p_per_query, ap_per_query
        One value per query (``nan`` for queries without a relevant candidate).
    """

    p_at_k: float
    map_at_k: float
    k: int
    n_queries: int
    p_per_query: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    ap_per_query: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)


def neighbour_scores(
    queries: np.ndarray,
    candidates: np.ndarray,
    relevance: sp.spmatrix | np.ndarray,
    *,
    exclude: np.ndarray | None = None,
    k: int = NEIGHBOUR_K,
    chunk_size: int = 1024,
) -> NeighbourScores:
    """Rank ``candidates`` for each query vector by cosine; P@k and mAP against ``relevance``.

    Parameters
    ----------
    queries, candidates
        ``(n_query, d)`` and ``(n_cand, d)`` track vectors (any norm).
    relevance
        ``(n_query, n_cand)``; positive entries are relevant (e.g.
        :func:`co_listening`).
    exclude
        Per query, the index of a candidate to leave out (the query itself),
        or ``-1``; it is neither ranked nor relevant.
    k
        Precision cut-off.
    chunk_size
        Queries ranked at a time.
    """
    k = check_int("k", k, minimum=1)
    q = _unit_rows(np.asarray(queries, np.float64))
    c = _unit_rows(np.asarray(candidates, np.float64))
    rel = _as_relevance(relevance)
    if q.ndim != 2 or c.ndim != 2 or q.shape[1] != c.shape[1] or rel.shape != (len(q), len(c)):
        raise ParameterError(
            f"queries {q.shape}, candidates {c.shape} and relevance {rel.shape} do not agree"
        )
    skip = np.full(len(q), -1, np.int64) if exclude is None else np.asarray(exclude, np.int64)
    p_per = np.full(len(q), np.nan)
    ap_per = np.full(len(q), np.nan)
    for start in range(0, len(q), chunk_size):
        rows = np.arange(start, min(start + chunk_size, len(q)))
        scores = q[rows] @ c.T
        mine = skip[rows] >= 0
        scores[rows[mine] - start, skip[rows[mine]]] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")
        relevant = rel[rows].toarray() > 0
        relevant[rows[mine] - start, skip[rows[mine]]] = False
        hits = np.take_along_axis(relevant, order, axis=1)
        n_pos = hits.sum(axis=1)
        ok = n_pos > 0
        ap = _average_precision(hits, n_pos, MAP_K)
        p_per[rows[ok]] = hits[ok, :k].sum(axis=1) / k
        ap_per[rows[ok]] = ap[ok]
    n = int(np.sum(np.isfinite(ap_per)))
    return NeighbourScores(
        p_at_k=_mean_of_finite(p_per),
        map_at_k=_mean_of_finite(ap_per),
        k=k,
        n_queries=n,
        p_per_query=p_per,
        ap_per_query=ap_per,
    )


def evaluate_heldout(
    user_factors: np.ndarray,
    plays: sp.spmatrix | np.ndarray,
    predicted: np.ndarray,
    true_factors: np.ndarray,
    *,
    k: int = MAP_K,
    seed: int = 0,
) -> HeldoutMetrics:
    """Compare predicted track vectors with the true factors, popularity and chance.

    Parameters
    ----------
    user_factors
        ``(n_users, f)`` factors of the users learned on the training tracks.
        Rows that are all zero (users without a factor) are left out, as are
        users without a held-out play.
    plays
        ``(n_users, n_heldout)`` play counts of those users on the held-out
        tracks.
    predicted
        ``(n_heldout, f)`` vectors predicted from audio.
    true_factors
        ``(n_heldout, f)`` the tracks' WMF factors in the same space as
        ``user_factors``; they are unit-normalised here, so the upper bound is
        what a perfect regressor of unit targets would reach.
    k
        Truncation of mAP.
    seed
        Seed of the random baseline.

    Returns
    -------
    HeldoutMetrics
        Rows :data:`WMF_ROW`, :data:`PREDICTED_ROW`, :data:`POPULARITY_ROW`,
        :data:`RANDOM_ROW`; add content-based rows with :meth:`~HeldoutMetrics.with_row`
        and :func:`profile_scores`.
    """
    predicted = np.asarray(predicted, dtype=np.float32)
    true_factors = np.asarray(true_factors, dtype=np.float32)
    if predicted.shape != true_factors.shape:
        raise ParameterError(
            f"predicted {predicted.shape} and true_factors {true_factors.shape} differ in shape"
        )
    user_factors = np.asarray(user_factors, dtype=np.float32)
    relevance = _as_relevance(plays)
    has_factor = np.any(user_factors != 0, axis=1)
    if not np.all(has_factor):
        keep = np.flatnonzero(has_factor)
        user_factors, relevance = user_factors[keep], relevance[keep]
    active = np.diff(relevance.indptr) > 0
    unit_true = _unit_rows(true_factors)
    rand = random_vectors(len(predicted), predicted.shape[1], seed=seed)
    rows = (
        MetricRow(WMF_ROW, ranking_scores(user_factors, unit_true, relevance, k=k), 1.0),
        MetricRow(
            PREDICTED_ROW,
            ranking_scores(user_factors, predicted, relevance, k=k),
            mean_cosine(predicted, true_factors),
        ),
        MetricRow(POPULARITY_ROW, popularity_scores(relevance, k=k)),
        MetricRow(
            RANDOM_ROW,
            ranking_scores(user_factors, rand, relevance, k=k),
            mean_cosine(rand, true_factors),
        ),
    )
    return HeldoutMetrics(
        rows=rows,
        n_tracks=len(predicted),
        n_users=int(np.sum(active)),
        n_plays=int(relevance.nnz),
    )
