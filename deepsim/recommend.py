"""Tracks for a listener: the use the seed was built for (``beet recommend``; no torch).

Given one listener's history (any format :func:`deepsim.listening.read_listens`
reads, or the library's own play counts), :func:`recommend` ranks every
library track, those nobody has played included:

taste profile (a model trained by ``beet deepsim-train`` is active)
    The listener's plays are folded into the trained WMF space with the item
    factors fixed (implicit's ``recalculate_user``, the factors stored in the
    model file), giving a taste vector ``x_u``; every track is scored by the
    cosine of ``x_u`` and its *predicted* taste vector (the taste part of its
    stored vector, predicted from audio), so a never-played track ranks where
    its sound says listeners like it would.
sound profile (no trained model, or none of the plays is of a trained track)
    The play-weighted mean of the sound vectors of the listener's most-played
    tracks (:data:`SOUND_PROFILE_TRACKS`); tracks are scored by cosine.

Recency
    A listening session that started ``d`` days before the listener's newest
    one weighs ``0.5 ** (d / half_life)`` (default :data:`HALF_LIFE_DAYS`
    days).  In the fold-in the weight scales each play's confidence *excess*
    ``c - 1`` (``c`` is the WMF confidence of :mod:`deepsim.wmf`), so a track
    last played long ago counts less but still counts; in the sound profile it
    multiplies the play count.  Timestamps come from the session rows
    (``name@2024-05-01T20:00:00Z``) :mod:`deepsim.listening` makes of timed
    histories; counts without time (Taste Profile, playlists, the library's
    play counts) weigh 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from deepsim import store
from deepsim.errors import DeepsimError, ParameterError
from deepsim.util import check_float, check_int, get_logger

if TYPE_CHECKING:
    from beets.library import Item, Library

    from deepsim.dupes import VersionFolder
    from deepsim.listening import Listens
    from deepsim.taste import VectorLayout

__all__ = ["HALF_LIFE_DAYS", "History", "Recommendations", "listener_history", "recommend"]

log = get_logger(__name__)

#: Default half-life of a play's weight, in days.
HALF_LIFE_DAYS = 90.0
#: Most-played tracks that make the sound profile.
SOUND_PROFILE_TRACKS = 50
_SESSION_TIME = "%Y-%m-%dT%H:%M:%SZ"


def _split_row(name: str) -> tuple[str, float | None]:
    """``"alice@2024-05-01T20:00:00Z"`` → ``("alice", unix time)``; else ``(name, None)``."""
    if name.startswith("library:"):  # the library's play counts and plays are one listener
        stamp = name.partition("@")[2]
        name = "library" + (f"@{stamp}" if stamp else "")
    user, sep, stamp = name.rpartition("@")
    if sep:
        try:
            when = datetime.strptime(stamp, _SESSION_TIME).replace(tzinfo=timezone.utc)
        except ValueError:
            return name, None
        return user, when.timestamp()
    return name, None


@dataclass
class History:
    """One listener's plays of library items.

    Attributes
    ----------
    user
        The listener's name in the data.
    item_ids
        Library items played (ascending).
    plays
        Play counts of those items.
    weights
        Mean recency weight of each item's plays, in ``(0, 1]``.
    n_listened, n_matched
        Tracks in the listener's data, and how many matched the library.
    half_life
        The half-life used, in days.
    """

    user: str
    item_ids: np.ndarray
    plays: np.ndarray
    weights: np.ndarray
    n_listened: int
    n_matched: int
    half_life: float

    @property
    def weighted(self) -> np.ndarray:
        return self.plays * self.weights


def listener_history(
    lib: Library,
    listens: Listens,
    *,
    user: str | None = None,
    half_life: float = HALF_LIFE_DAYS,
) -> History:
    """Pick one listener out of ``listens``, match their tracks to ``lib``, weigh by recency.

    Parameters
    ----------
    lib
        The beets library.
    listens
        Listening data as read (sessions of timed histories are rows named
        ``user@time``).
    user
        The listener; required when the data holds several.
    half_life
        Days after which a play weighs half.

    Raises
    ------
    ParameterError
        Several listeners and no ``user``, an unknown ``user``, a bad half-life.
    DeepsimError
        None of the listener's tracks is in the library.
    """
    from deepsim.matching import collapse, match_tracks

    half_life = check_float("half_life", half_life, low=0.0, low_open=True)
    rows = [_split_row(name) for name in listens.users]
    names = sorted({name for name, _ in rows})
    if not names:
        raise DeepsimError("the listening data holds no plays")
    if user is None:
        if len(names) > 1:
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            raise ParameterError(
                f"the listening data holds {len(names)} listeners ({shown}); choose one with --user"
            )
        user = names[0]
    elif user not in names:
        raise ParameterError(f"no listener {user!r} in the listening data")
    from deepsim.listening import Listens

    mine = np.asarray([i for i, (name, _) in enumerate(rows) if name == user], np.int64)
    times = np.asarray([rows[i][1] if rows[i][1] is not None else np.nan for i in mine])
    newest = np.nanmax(times) if np.any(np.isfinite(times)) else np.nan
    age_days = np.where(np.isfinite(times), (newest - times) / 86400.0, 0.0)
    names_mine = [listens.users[i] for i in mine]
    weights_mine = np.power(0.5, age_days / half_life)
    weight_of = dict(zip(names_mine, weights_mine.tolist(), strict=True))
    own = Listens(listens.counts[mine], names_mine, listens.tracks)
    n_listened = int(np.count_nonzero(np.asarray(own.counts.sum(axis=0)).ravel()))
    items = collapse(own, match_tracks(own.tracks, lib))
    sub = sp.csr_matrix(items.counts)
    row_weight = np.asarray([weight_of[name] for name in items.users], np.float64)
    plays = np.asarray(sub.sum(axis=0)).ravel()
    weighted = np.asarray((sp.diags(row_weight) @ sub).sum(axis=0)).ravel()
    played = np.flatnonzero(plays > 0)
    if len(played) == 0:
        raise DeepsimError(
            f"none of the {n_listened} tracks {user!r} played is in the library (matched by "
            "MusicBrainz id, else artist and title)"
        )
    item_ids = np.asarray([items.tracks[j].item_id for j in played], np.int64)
    order = np.argsort(item_ids)
    return History(
        user=user,
        item_ids=item_ids[order],
        plays=plays[played][order].astype(np.float64),
        weights=(weighted[played] / plays[played])[order],
        n_listened=n_listened,
        n_matched=len(played),
        half_life=half_life,
    )


@dataclass
class Recommendations:
    """What :func:`recommend` found.

    Attributes
    ----------
    matches
        ``(item, score)`` best first; ``item.deepsim_similarity`` is set to the score.
    profile
        ``"taste"`` or ``"sound"``.
    reason
        One line saying which profile was used and why.
    """

    matches: list[tuple[Item, float]] = field(default_factory=list)
    profile: str = "sound"
    reason: str = ""

    @property
    def items(self) -> list[Item]:
        return [item for item, _ in self.matches]


def _read_cf(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Item ids, WMF item factors and WMF parameters stored in a trained model (no torch)."""
    from safetensors.numpy import load_file

    from deepsim.models.checkpoint import read_metadata

    meta = read_metadata(path)
    params = meta["config"].get("cf")
    try:
        tensors = load_file(os.fspath(path))
    except Exception as exc:  # safetensors raises its own error types
        raise DeepsimError(f"{path}: cannot read the model's factors ({exc})") from exc
    if params is None or "extra.cf_item_ids" not in tensors:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32), {}
    return tensors["extra.cf_item_ids"], tensors["extra.cf_item_factors"], dict(params)


def _taste_profile(history: History, model_path: str) -> tuple[np.ndarray | None, str]:
    from deepsim.wmf import WMFResult

    cf_ids, factors, params = _read_cf(model_path)
    if len(cf_ids) == 0:
        return None, "the active model stores no listening factors"
    column = {int(i): j for j, i in enumerate(cf_ids.tolist())}
    cols = [column.get(int(i), -1) for i in history.item_ids.tolist()]
    known = np.asarray([c >= 0 for c in cols])
    if not known.any():
        return None, (
            f"none of the {history.n_matched} tracks played is among the {len(cf_ids)} tracks the "
            "model was trained on"
        )
    idx = np.asarray(cols)[known]
    shape = (1, len(cf_ids))
    counts = sp.csr_matrix((history.plays[known], (np.zeros(len(idx), int), idx)), shape=shape)
    weights = sp.csr_matrix((history.weights[known], (np.zeros(len(idx), int), idx)), shape=shape)
    wmf = WMFResult.from_item_factors(factors, params)
    x = wmf.fold_in_users(counts, weights=weights)[0]
    norm = float(np.linalg.norm(x))
    if not np.isfinite(norm) or norm == 0:
        return None, "the listener's fold-in gave no taste vector"
    return x / norm, (
        f"taste profile: {int(known.sum())} of the {history.n_matched} tracks played folded into "
        f"the model's listening space (half-life {history.half_life:g} days)"
    )


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def _sound_profile(history: History, ids: np.ndarray, sound: np.ndarray) -> np.ndarray | None:
    row_of = {int(i): r for r, i in enumerate(ids.tolist())}
    top = np.argsort(-history.weighted, kind="stable")[:SOUND_PROFILE_TRACKS]
    rows = [
        (row_of[int(history.item_ids[j])], history.weighted[j])
        for j in top
        if int(history.item_ids[j]) in row_of
    ]
    if not rows:
        return None
    profile = np.sum([w * sound[r] for r, w in rows], axis=0)
    norm = float(np.linalg.norm(profile))
    return profile / norm if norm > 0 else None


def recommend(
    lib: Library,
    history: History,
    *,
    model_name: str,
    model_id: str,
    count: int = 20,
    unplayed: bool = False,
    where: Any = None,
    max_per_artist: int = 0,
    max_per_album: int = 0,
    fold: VersionFolder | None = None,
) -> Recommendations:
    """Rank the library's tracks for the listener of ``history`` (see the module).

    Parameters
    ----------
    lib
        The beets library.
    history
        :func:`listener_history`.
    model_name, model_id
        The active model (a built-in name or checkpoint path) and its id; only
        its stored vectors are read.
    count
        Most tracks to return.
    unplayed
        Leave out every track the listener played.
    where
        A beets query (string or parsed) results must match.
    max_per_artist, max_per_album
        At most this many results per artist / album (0: no limit).
    fold
        Fold versions of one recording (:class:`deepsim.dupes.VersionFolder`);
        None: keep all.

    Raises
    ------
    DeepsimError
        No vectors of the active model, or no profile could be made.
    """
    from deepsim.similar import DISTANCE_FIELD, SIMILARITY_FIELD, load_items, parse_where, where_ids
    from deepsim.taste import layout_of, split_parts

    count = check_int("count", count, minimum=1)
    check_int("max_per_artist", max_per_artist, minimum=0)
    check_int("max_per_album", max_per_album, minimum=0)
    ids, matrix = store.read_vectors(lib, model_id)
    if len(ids) == 0:
        raise DeepsimError(f"no track has a {model_id} vector yet; run `beet deepsim-embed`")
    layout: VectorLayout | None = layout_of(model_name)
    if layout is not None:
        sound, taste = split_parts(matrix, layout)
    else:
        sound, taste = matrix, None
    result = Recommendations()
    vector: np.ndarray | None = None
    why = "the active model was not trained on listening data (beet deepsim-train)"
    if layout is not None and taste is not None:
        vector, why = _taste_profile(history, model_name)
        if vector is not None:
            scores = taste @ vector
            result.profile, result.reason = "taste", why
    if vector is None:
        profile = _sound_profile(history, ids, sound)
        if profile is None:
            raise DeepsimError(
                f"none of the {history.n_matched} tracks played has a {model_id} vector yet; "
                "run `beet deepsim-embed`"
            )
        scores = sound @ profile
        n = min(SOUND_PROFILE_TRACKS, history.n_matched)
        result.profile = "sound"
        result.reason = (
            f"sound profile: the recency-weighted mean sound of the {n} most-played tracks ({why})"
        )
    keep = np.ones(len(ids), bool)
    if unplayed:
        keep &= ~np.isin(ids, history.item_ids)
    parsed = parse_where(lib, where)
    slow = None
    if parsed is not None:
        allowed = where_ids(lib, parsed)
        if allowed is None:
            slow = parsed
        else:
            keep &= np.isin(ids, allowed)
    order = np.flatnonzero(keep)
    order = order[np.argsort(-scores[order], kind="stable")]
    per_artist: dict[str, int] = {}
    per_album: dict[Any, int] = {}
    step = max(4 * count, 100)
    folding = None if fold is None else fold.start()
    for start in range(0, len(order), step):
        chunk = order[start : start + step]
        items = load_items(lib, ids[chunk].tolist())
        if fold is not None:
            fold.fetch(ids[chunk].tolist())
        for r in chunk.tolist():
            item = items.get(int(ids[r]))
            if item is None or (slow is not None and not slow.match(item)):
                continue
            if folding is not None and folding.is_version(int(ids[r])):
                continue  # another version of a better match
            artist = (item.albumartist or item.artist or "").casefold()
            album = (item.album_id or (artist, item.album.casefold())) if item.album else None
            if max_per_artist and artist:
                if per_artist.get(artist, 0) >= max_per_artist:
                    continue
                per_artist[artist] = per_artist.get(artist, 0) + 1
            if max_per_album and album:
                if per_album.get(album, 0) >= max_per_album:
                    continue
                per_album[album] = per_album.get(album, 0) + 1
            score = float(scores[r])
            item[SIMILARITY_FIELD] = round(score, 4)
            item[DISTANCE_FIELD] = round(1.0 - score, 4)
            result.matches.append((item, score))
            if folding is not None:
                folding.keep(int(ids[r]))
            if len(result.matches) == count:
                return result
    return result
