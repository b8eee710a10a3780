"""Collaborative-filtering data preparation shared by ``deepsim-train`` and ``pretrain``.

The three steps between a ``users × tracks`` play-count matrix and the
regression targets, written once:

1. :func:`filter_counts` — keep tracks and users with enough data;
2. :func:`split_tracks` — hold out a seeded share of the tracks;
3. :func:`factorise_split` — fit WMF (:func:`deepsim.wmf.fit_wmf`) on the
   training tracks only, then *fold in* the held-out tracks against the fixed
   user factors (implicit's ``recalculate_item``), so that for the
   factorisation they are truly cold-start yet their "true" factors live in
   the same space as the users' and the predictions'.

Listeners who were not part of the fit (``beet recommend``) are folded in the
same way with the item factors fixed
(:meth:`deepsim.wmf.WMFResult.fold_in_users`).  No torch here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from deepsim.util import check_float, check_int
from deepsim.wmf import WMFResult, fit_wmf, unit_normalise

__all__ = ["FactorSplit", "factorise_split", "filter_counts", "random_split", "split_tracks"]


def filter_counts(
    counts: sp.spmatrix | sp.sparray,
    *,
    min_plays: float = 2,
    min_listeners: int = 2,
    min_user_tracks: int = 2,
    max_passes: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Rows (users) and columns (tracks) with enough data, applied until stable.

    A track needs a total play count of at least ``min_plays`` from at least
    ``min_listeners`` distinct users; a user needs at least
    ``min_user_tracks`` distinct kept tracks.  Dropping one side can push the
    other under its threshold, so the rules are re-applied (at most
    ``max_passes`` times).

    Returns
    -------
    users, tracks
        Indices (ascending) of the kept rows and columns.
    """
    check_float("min_plays", min_plays, low=0.0)
    check_int("min_listeners", min_listeners, minimum=1)
    check_int("min_user_tracks", min_user_tracks, minimum=1)
    csr = sp.csr_matrix(counts, dtype=np.float32)
    csr.eliminate_zeros()
    users = np.arange(csr.shape[0])
    tracks = np.arange(csr.shape[1])
    for _ in range(max_passes):
        sub = csr[users][:, tracks]
        plays = np.asarray(sub.sum(axis=0)).ravel()
        listeners = np.diff(sub.tocsc().indptr)
        keep_t = (plays >= min_plays) & (listeners >= min_listeners)
        sub = sub[:, np.flatnonzero(keep_t)]
        keep_u = np.diff(sub.indptr) >= min_user_tracks
        if keep_t.all() and keep_u.all():
            break
        tracks = tracks[keep_t]
        users = users[keep_u]
        if len(users) == 0 or len(tracks) == 0:
            break
    return users, tracks


def split_tracks(
    n_tracks: int, *, heldout_fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of ``range(n_tracks)`` into (training, held-out) indices.

    With ``heldout_fraction > 0`` and at least two tracks both sides are
    non-empty.
    """
    heldout_fraction = check_float(
        "heldout_fraction", heldout_fraction, low=0.0, high=1.0, high_open=True
    )
    return random_split(n_tracks, heldout_fraction, np.random.default_rng(seed))


def random_split(
    n: int, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``range(n)`` split at random into (kept, held) sorted indices, ``fraction`` held.

    With ``fraction > 0`` and at least two indices both sides are non-empty;
    otherwise nothing is held and ``rng`` is not drawn from.  Unvalidated:
    :func:`split_tracks` and the validation splits of :mod:`deepsim.train`.
    """
    if fraction <= 0 or n < 2:
        return np.arange(n), np.zeros(0, np.int64)
    n_held = min(n - 1, max(1, round(fraction * n)))
    perm = rng.permutation(n)
    return np.sort(perm[n_held:]), np.sort(perm[:n_held])


@dataclass
class FactorSplit:
    """WMF factors for a training/held-out split of the tracks.

    Attributes
    ----------
    wmf
        The fit on the training tracks (with its implicit model, for fold-in).
    user_factors
        ``(n_users, f)`` from that fit (zero rows for users without training
        plays).
    train_factors
        ``(n_train, f)`` unit-normalised factors of the training tracks: the
        regression targets.
    heldout_factors
        ``(n_heldout, f)`` factors of the held-out tracks folded in against the
        fixed user factors (not normalised).
    params
        The WMF hyper-parameters.
    seconds
        Time of the fit and the fold-in.
    """

    wmf: WMFResult
    user_factors: np.ndarray
    train_factors: np.ndarray
    heldout_factors: np.ndarray
    params: dict[str, Any]
    seconds: float


def factorise_split(
    counts: sp.spmatrix | sp.sparray,
    train: np.ndarray,
    heldout: np.ndarray,
    *,
    factors: int = 40,
    seed: int = 0,
    **wmf_options: Any,
) -> FactorSplit:
    """Fit WMF on the training columns; fold the held-out columns in against its users.

    ``wmf_options`` go to :func:`deepsim.wmf.fit_wmf` (``alpha``,
    ``epsilon``, ``regularization``, ``iterations``, ``use_gpu``...).
    """
    started = time.perf_counter()
    csr = sp.csr_matrix(counts, dtype=np.float32)
    result = fit_wmf(csr[:, train], factors=factors, random_state=seed, **wmf_options)
    held = np.zeros((len(heldout), factors), np.float32)
    if len(heldout):
        held = result.fold_in_items(csr[:, heldout])
    return FactorSplit(
        wmf=result,
        user_factors=result.user_factors,
        train_factors=unit_normalise(result.item_factors),
        heldout_factors=held,
        params=dict(result.params),
        seconds=time.perf_counter() - started,
    )
