"""Album outliers: the tracks that sound least like the rest of their album.

For an album of ``n`` tracks with vectors ``v_1 … v_n`` (unit), track ``i``'s
*fit* is the cosine between ``v_i`` and the normalised mean of the other
``n - 1`` vectors (leave-one-out).  Its *score* is a robust z-score against
the album's own spread (Iglewicz and Hoaglin's modified z-score):
``(fit_i - median(fit_j)) / (1.4826 · MAD(fit_j))`` over the album's other
tracks ``j ≠ i``, the spread floored at :data:`MIN_SPREAD` so that a very
uniform album does not turn a hair's difference into an outlier.  Median and
MAD rather than mean and standard deviation, because a second odd track
would otherwise widen the spread and hide the first (measured on the corpus:
a foreign track moved into an album that already had an unusual one scored
-2.3 with mean/std, -5.7 with median/MAD).  A track scoring at most
``-threshold`` (3.5, the usual cut-off for this score) is an outlier: an
intro, an interlude, a skit, a bonus remix — or a track filed under the
wrong album.

Albums are the tagged ones (album artist + album, as ``--max-per-album``
counts them); albums with fewer than ``min_tracks`` vectors are not scored.
No torch here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from deepsim import store
from deepsim.util import check_float, check_int

if TYPE_CHECKING:
    from beets.library import Library

#: Default score at or below ``-threshold`` that makes an outlier.
DEFAULT_THRESHOLD = 3.5
#: Fewest tracks with vectors for an album to be scored.
DEFAULT_MIN_TRACKS = 5
#: Floor of an album's fit spread (cosine units).
MIN_SPREAD = 0.05

_FIELDS = ("album", "albumartist", "album_id")


@dataclass(frozen=True)
class TrackFit:
    """One scored track: its fit to the rest of its album and the z-score of that fit."""

    item_id: int
    album: str
    fit: float
    score: float
    album_size: int

    def is_outlier(self, threshold: float = DEFAULT_THRESHOLD) -> bool:
        return self.score <= -threshold


def _album_key(album: Any, albumartist: Any, album_id: Any) -> tuple[Any, ...] | None:
    name = " ".join(str(album or "").split())
    if name:
        return ("name", " ".join(str(albumartist or "").split()).casefold(), name.casefold())
    if album_id:
        return ("id", int(album_id))
    return None


def album_fits(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out fits and their z-scores for one album's unit vectors (``n >= 3``)."""
    n = len(matrix)
    total = matrix.sum(axis=0, dtype=np.float64)
    rest = total[None, :] - matrix
    norms = np.linalg.norm(rest, axis=1)
    fits = np.einsum("ij,ij->i", matrix, rest) / np.maximum(norms, 1e-12)
    scores = np.empty(n)
    for i in range(n):
        others = np.delete(fits, i)
        centre = float(np.median(others))
        spread = max(1.4826 * float(np.median(np.abs(others - centre))), MIN_SPREAD)
        scores[i] = (fits[i] - centre) / spread
    return fits, scores


def score_albums(
    lib: Library,
    model_id: str,
    *,
    ids: Iterable[int] | None = None,
    min_tracks: int = DEFAULT_MIN_TRACKS,
) -> list[TrackFit]:
    """Score every track of the albums that ``ids`` belong to (all albums when None).

    Each album is scored over all its tracks with a vector, whichever of them
    ``ids`` names; the result lists only the tracks in ``ids`` (all when
    None), lowest score (worst fit) first.
    """
    min_tracks = check_int("min_tracks", min_tracks, minimum=3)
    fields = store.read_all_item_fields(lib, _FIELDS)
    vec_ids, matrix = store.read_vectors(lib, model_id)
    wanted = None if ids is None else {int(i) for i in ids}
    albums: dict[tuple[Any, ...], list[int]] = {}
    names: dict[tuple[Any, ...], str] = {}
    for row, item_id in enumerate(vec_ids.tolist()):
        facts = fields.get(item_id)
        key = None if facts is None else _album_key(*facts)
        if facts is None or key is None:
            continue
        albums.setdefault(key, []).append(row)
        names.setdefault(key, str(facts[0] or f"album {facts[2]}"))
    if wanted is not None:
        touched = {
            key for key, rows in albums.items() if any(int(vec_ids[r]) in wanted for r in rows)
        }
        albums = {key: rows for key, rows in albums.items() if key in touched}
    out: list[TrackFit] = []
    for key, rows in albums.items():
        if len(rows) < min_tracks:
            continue
        fits, scores = album_fits(matrix[rows])
        for row, fit, score in zip(rows, fits.tolist(), scores.tolist(), strict=True):
            item_id = int(vec_ids[row])
            if wanted is None or item_id in wanted:
                out.append(TrackFit(item_id, names[key], fit, score, len(rows)))
    out.sort(key=lambda t: (t.score, t.item_id))
    return out


def outlier_ids(
    lib: Library,
    model_id: str,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    min_tracks: int = DEFAULT_MIN_TRACKS,
) -> set[int]:
    """Ids of every album outlier of the library (``beet similar --no-outliers``)."""
    threshold = check_float("threshold", threshold, low=0.0)
    return {
        fit.item_id
        for fit in score_albums(lib, model_id, min_tracks=min_tracks)
        if fit.is_outlier(threshold)
    }
