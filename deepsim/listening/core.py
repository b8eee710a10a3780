"""The data types of listening data and the accumulator every reader feeds.

:class:`Listens` is a sparse ``users × tracks`` matrix of play counts with its
row names and column keys (:class:`TrackKey`).  :class:`Builder` gathers plays
in compact arrays (12 bytes a play: user, track, time), drops exact duplicates
and cuts histories into sessions once, vectorised, at the end — so the order
of the files and of the plays inside them does not matter.
"""

from __future__ import annotations

import calendar
import math
import re
from array import array
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import scipy.sparse as sp

from deepsim.util import check_float

KEY_SEP = "\x1f"
_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_WS_RE = re.compile(r"\s+")
_LASTFM_DATE_RE = re.compile(
    r"^(\d{1,2})\s+([A-Za-z]{3})[A-Za-z]*\.?\s+(\d{4}),?\s+(\d{1,2}):(\d{2})(?::(\d{2}))?$"
)
_MONTHS = {
    m: i
    for i, m in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"),
        start=1,
    )
}


@dataclass(frozen=True, slots=True)
class TrackKey:
    """One column of a :class:`Listens` matrix: a song as the source names it.

    Parameters
    ----------
    key
        Identity of the column within its source: an MSD song id, a recording
        MBID, ``"artist\\x1ftitle"`` (normalised for case and whitespace) or
        ``"item:<id>"`` for a beets item.
    artist, title
        Names as the source spells them, when known.
    mbid
        MusicBrainz recording id, when known.
    item_id
        beets item id, when the key already is a library item.
    """

    key: str
    artist: str | None = None
    title: str | None = None
    mbid: str | None = None
    item_id: int | None = None


@dataclass
class Listens:
    """Play counts of users (or pseudo-users) on tracks.

    Parameters
    ----------
    counts
        ``n_users × n_tracks`` CSR matrix of float32 play counts.
    users
        Row names.
    tracks
        Column keys.
    skipped
        Malformed records skipped while reading.
    duplicates
        Exact duplicate plays (same listener, track and time) counted once.
    """

    counts: sp.csr_matrix
    users: list[str]
    tracks: list[TrackKey]
    skipped: int = field(default=0)
    duplicates: int = field(default=0)

    def __post_init__(self) -> None:
        counts = self.counts
        if not sp.issparse(counts):
            raise TypeError(f"counts must be a scipy sparse matrix, got {type(counts).__name__}")
        counts = sp.csr_matrix(counts, dtype=np.float32)
        if counts.shape != (len(self.users), len(self.tracks)):
            raise ValueError(
                f"counts has shape {counts.shape} but there are {len(self.users)} users "
                f"and {len(self.tracks)} tracks"
            )
        counts.sum_duplicates()
        self.counts = counts

    @property
    def n_users(self) -> int:
        """Number of rows."""
        return len(self.users)

    @property
    def n_tracks(self) -> int:
        """Number of columns."""
        return len(self.tracks)

    @property
    def n_plays(self) -> int:
        """Total play count."""
        return round(float(self.counts.sum(dtype=np.float64)))

    @property
    def nnz(self) -> int:
        """Number of (user, track) pairs with at least one play."""
        return int(self.counts.nnz)

    @classmethod
    def empty(cls) -> Listens:
        """A listens object without users or tracks."""
        return cls(sp.csr_matrix((0, 0), dtype=np.float32), [], [])

    def merge(self, other: Listens) -> Listens:
        """Union of two listens objects.

        Rows with the same user name and columns with the same
        :attr:`TrackKey.key` are summed; the first key's metadata is kept.
        """
        users = list(self.users)
        user_index = {u: i for i, u in enumerate(users)}
        for u in other.users:
            if u not in user_index:
                user_index[u] = len(users)
                users.append(u)
        tracks = list(self.tracks)
        track_index = {t.key: i for i, t in enumerate(tracks)}
        for t in other.tracks:
            if t.key not in track_index:
                track_index[t.key] = len(tracks)
                tracks.append(t)
        shape = (len(users), len(tracks))
        a = self.counts.tocoo()
        b = other.counts.tocoo()
        row_map = np.fromiter((user_index[u] for u in other.users), np.int64, len(other.users))
        col_map = np.fromiter(
            (track_index[t.key] for t in other.tracks), np.int64, len(other.tracks)
        )
        rows = np.concatenate([a.row.astype(np.int64), row_map[b.row]])
        cols = np.concatenate([a.col.astype(np.int64), col_map[b.col]])
        vals = np.concatenate([a.data, b.data])
        counts = sp.coo_matrix((vals, (rows, cols)), shape=shape, dtype=np.float32).tocsr()
        return Listens(
            counts,
            users,
            tracks,
            self.skipped + other.skipped,
            self.duplicates + other.duplicates,
        )

    def prune(self, *, min_user_plays: float = 1, min_track_plays: float = 1) -> Listens:
        """Drop users and tracks with fewer plays than given (one pass, users first).

        Tracks left without plays and users left without plays are always
        dropped.
        """
        check_float("min_user_plays", min_user_plays, low=0, low_open=True)
        check_float("min_track_plays", min_track_plays, low=0, low_open=True)
        counts = self.counts
        # each step copies the matrix only when it drops something (memory at scale)
        keep_u = np.flatnonzero(np.asarray(counts.sum(axis=1)).ravel() >= min_user_plays)
        if len(keep_u) < counts.shape[0]:
            counts = counts[keep_u]
        track_sums = np.asarray(counts.sum(axis=0)).ravel()
        keep_t = np.flatnonzero(track_sums >= min_track_plays)
        if len(keep_t) < counts.shape[1]:
            counts = counts[:, keep_t]
        keep_u2 = np.flatnonzero(np.diff(counts.indptr) > 0)
        if len(keep_u2) < counts.shape[0]:
            counts = counts[keep_u2]
        users = [self.users[i] for i in keep_u[keep_u2]]
        tracks = [self.tracks[j] for j in keep_t]
        return Listens(counts.tocsr(), users, tracks, self.skipped, self.duplicates)


# --------------------------------------------------------------------------------------------
# Names, ids and times


class Bad(Exception):
    """A malformed record: a reader yields (or raises) it with the line it was on."""

    def __init__(self, reason: str, line: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.line = line


def name_key(artist: str, title: str) -> str:
    """The column key of a song known by name: both parts case-folded, spaces collapsed."""
    a = _WS_RE.sub(" ", artist).strip().casefold()
    t = _WS_RE.sub(" ", title).strip().casefold()
    return f"{a}{KEY_SEP}{t}"


def mbid_of(value: Any) -> str | None:
    """A MusicBrainz id, lower-cased, or ``None`` when ``value`` is not one."""
    if not isinstance(value, str) or len(value) < 36:
        return None
    value = value.strip().lower()
    return value if _UUID_RE.match(value) else None


def parse_time(value: Any) -> float:
    """Parse a listen time: unix seconds (or milliseconds), ISO 8601 or ``31 Jan 2021 20:15``.

    Times without a zone are UTC.  Raises ``ValueError`` naming the value.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a time: {value!r}")
    if isinstance(value, (int, float)):
        t = float(value)
    elif isinstance(value, str):
        s = value.strip()
        if not s:
            raise ValueError("empty time")
        if s[4:5] == "-" and s[:4].isdigit():
            return parse_iso(s)
        m = _LASTFM_DATE_RE.match(s)
        if m:
            return _parse_lastfm_date(m, value)
        try:
            t = float(s)
        except ValueError:
            raise ValueError(f"not a time: {value!r}") from None
    else:
        raise ValueError(f"not a time: {value!r}")
    if not math.isfinite(t):
        raise ValueError(f"not a time: {value!r}")
    if abs(t) > 1e11:  # milliseconds
        t /= 1000.0
    return t


def parse_iso(s: str) -> float:
    """ISO 8601 (``Z``, an offset or none = UTC; ``T`` or a space) to unix seconds."""
    iso = s[:-1] + "+00:00" if s.endswith(("Z", "z")) else s
    try:
        dt = datetime.fromisoformat(iso)
    except ValueError:
        raise ValueError(f"not a time: {s!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def _parse_lastfm_date(m: re.Match[str], value: Any) -> float:
    day, mon, year, hh, mm, ss = m.groups()
    month = _MONTHS.get(mon.lower())
    if month is None:
        raise ValueError(f"unknown month in time {value!r}")
    try:
        dt = datetime(int(year), month, int(day), int(hh), int(mm), int(ss or 0))
    except ValueError:
        raise ValueError(f"not a time: {value!r}") from None
    return float(calendar.timegm(dt.timetuple()))


HOUR_MINUTE: dict[str, float] = {
    f" {h:02d}:{m:02d}": float(h * 3600 + m * 60) for h in range(24) for m in range(60)
}
"""Seconds into the day of a time of day written `` HH:MM`` (with its leading space)."""
DAY_CACHE_MAX = 100_000
"""Days a :class:`DayCache` keeps (it starts afresh beyond: memory stays bounded)."""


class DayCache:
    """Unix time of ``day, month, year`` strings, cached (histories repeat days)."""

    def __init__(self) -> None:
        self._days: dict[tuple[str, str, str], int] = {}
        self.prefix: dict[str, float] = {}
        """Unix time of the day of ``31 Jan 2021`` (the part before `` HH:MM``)."""

    def lastfm(self, s: str) -> float:
        """``31 Jan 2021 20:15`` (also ``31 Jan 2021, 20:15`` and seconds) to unix seconds."""
        hm = HOUR_MINUTE.get(s[-6:])
        if hm is not None:
            base = self.prefix.get(s[:-6])
            if base is not None:
                return base + hm
            t = self._lastfm(s)
            if len(self.prefix) >= DAY_CACHE_MAX:
                self.prefix.clear()
            self.prefix[s[:-6]] = t - hm
            return t
        return self._lastfm(s)

    def _lastfm(self, s: str) -> float:
        parts = s.split()
        if (len(parts) == 4 and parts[3][2:3] == ":") or (len(parts) == 4 and parts[3][1:2] == ":"):
            day, mon, year, hm = parts
            base = self._days.get((day, mon, year))
            if base is None:
                month = _MONTHS.get(mon[:3].lower())
                try:
                    if month is None:
                        raise ValueError
                    base = int(
                        datetime(
                            int(year.rstrip(",")), month, int(day), tzinfo=timezone.utc
                        ).timestamp()
                    )
                except ValueError:
                    return parse_time(s)
                if len(self._days) >= DAY_CACHE_MAX:
                    self._days.clear()
                self._days[(day, mon, year)] = base
            hms = hm.split(":")
            try:
                h, m = int(hms[0]), int(hms[1])
                sec = int(hms[2]) if len(hms) > 2 else 0
            except (ValueError, IndexError):
                return parse_time(s)
            if not (0 <= h < 24 and 0 <= m < 60 and 0 <= sec < 62):
                raise ValueError(f"not a time: {s!r}")
            return float(base + h * 3600 + m * 60 + sec)
        return parse_time(s)

    def date_time(self, date: str, time: str) -> float:
        """``2021-04-01`` and ``10:42:53`` (UTC) to unix seconds."""
        key = (date, "", "")
        base = self._days.get(key)
        if base is None:
            try:
                y, mo, d = (int(x) for x in date.strip().split("-"))
                datetime(y, mo, d)
            except ValueError:
                raise ValueError(f"not a date: {date!r}") from None
            if len(self._days) >= DAY_CACHE_MAX:
                self._days.clear()
            base = self._days[key] = calendar.timegm((y, mo, d, 0, 0, 0))
        try:
            hms = [int(x) for x in time.strip().split(":")]
            h, m, sec = [*hms, 0, 0][:3]
        except ValueError:
            raise ValueError(f"not a time of day: {time!r}") from None
        if not (0 <= h < 24 and 0 <= m < 60 and 0 <= sec < 62):
            raise ValueError(f"not a time of day: {time!r}")
        return float(base + h * 3600 + m * 60 + sec)


# --------------------------------------------------------------------------------------------
# Accumulation


_CHUNK = 1 << 20


def _play_order(user: np.ndarray, time: np.ndarray, track: np.ndarray) -> np.ndarray:
    """The order of plays by (user, time, track), as ``np.lexsort((track, time, user))``.

    A personal export has one listener: then one stable sort by time (3x faster than
    the three-key sort on 10 million plays, and quick on files already in runs of
    time order), and only the plays sharing a time are sorted by track, so exact
    duplicates end up neighbours all the same.
    """
    if user[0] != user.min() or user[0] != user.max():
        return np.lexsort((track, time, user))
    order = np.argsort(time, kind="stable")
    t = time[order]
    tie = np.flatnonzero(t[1:] == t[:-1])
    del t
    if len(tie):
        members = np.union1d(tie, tie + 1)  # whole runs of one time, in sorted order
        sub = order[members]
        order[members] = sub[np.lexsort((track[sub], time[sub]))]
    return order


class Builder:
    """Gathers plays (user, track, time) and counts (user, track, n) into a :class:`Listens`."""

    def __init__(self) -> None:
        self.user_index: dict[str, int] = {}
        self.users: list[str] = []
        self.track_index: dict[str, int] = {}
        self.tracks: list[TrackKey] = []
        # counts (Taste Profile, library): rows are real users
        self.rows = array("i")
        self.cols = array("i")
        self.vals = array("f")
        # plays: 4 + 4 + 8 bytes each
        self.play_user = array("i")
        self.play_track = array("i")
        self.play_time = array("d")
        self.skipped = 0
        self.duplicates = 0
        self.raw_tracks: dict[tuple[object, object, object], int] = {}
        """Column of ``(artist, title, MBID)`` as a reader spelled them (shared by all files)."""

    def track(
        self, key: str, artist: str | None = None, title: str | None = None, mbid: str | None = None
    ) -> int:
        j = self.track_index.get(key)
        if j is None:
            j = len(self.tracks)
            self.track_index[key] = j
            self.tracks.append(TrackKey(key, artist or None, title or None, mbid))
        return j

    def track_of(self, artist: str | None, title: str | None, mbid: str | None) -> int:
        """The column of a song; raises :class:`Bad` without a name or an MBID."""
        artist = artist.strip() if isinstance(artist, str) else ""
        title = title.strip() if isinstance(title, str) else ""
        if mbid is not None:
            return self.track(mbid, artist, title, mbid)
        if not artist or not title:
            raise Bad("no track name and artist (and no recording MBID)")
        return self.track(name_key(artist, title), artist, title, None)

    def user(self, name: str) -> int:
        i = self.user_index.get(name)
        if i is None:
            i = len(self.users)
            self.user_index[name] = i
            self.users.append(name)
        return i

    def add_count(self, user: str, track: int, count: float) -> None:
        self.rows.append(self.user(user))
        self.cols.append(track)
        self.vals.append(count)

    @property
    def n_plays(self) -> int:
        return len(self.play_time)

    def build(self, *, session_gap: float, min_user_plays: float) -> Listens:
        """Drop exact duplicate plays, cut sessions, and make the matrix.

        Plays are sorted by (user, time, track) — a sort of three compact
        arrays, no per-play Python object — so duplicates are neighbours and a
        session is a run of one user's plays with gaps of at most
        ``session_gap`` seconds.  Sessions become pseudo-users
        ``"<user>@<start, ISO UTC>"`` ordered by where their first play was read.
        """
        rows_raw = np.frombuffer(self.rows, dtype=np.int32) if self.rows else np.zeros(0, np.int32)
        count_users = np.unique(rows_raw).tolist()
        n = len(self.play_time)
        names: list[str] = []
        rows_s = cols_s = np.zeros(0, np.int32)
        if n:
            # sort; each sorted copy replaces its array at once (a builder builds once),
            # so the plays are held at most twice, 16 bytes each, plus the order
            order = _play_order(
                np.frombuffer(self.play_user, dtype=np.int32),
                np.frombuffer(self.play_time, dtype=np.float64),
                np.frombuffer(self.play_track, dtype=np.int32),
            )
            u = np.frombuffer(self.play_user, dtype=np.int32)[order]
            self.play_user = array("i")
            tr = np.frombuffer(self.play_track, dtype=np.int32)[order]
            self.play_track = array("i")
            ts = np.frombuffer(self.play_time, dtype=np.float64)[order]
            self.play_time = array("d")
            # exact duplicates are neighbours: keep the first of each run
            same_user = u[1:] == u[:-1]
            keep = np.ones(n, dtype=bool)
            keep[1:] = ~(same_user & (ts[1:] == ts[:-1]) & (tr[1:] == tr[:-1]))
            self.duplicates += n - int(np.count_nonzero(keep))
            # a session starts at a new user or after a silence longer than session_gap
            new = np.ones(n, dtype=bool)
            new[1:] = ~same_user
            del same_user
            for lo in range(0, n - 1, _CHUNK):  # gaps in chunks: no float array of n
                hi = min(n - 1, lo + _CHUNK)
                new[lo + 1 : hi + 1] |= (ts[lo + 1 : hi + 1] - ts[lo:hi]) > session_gap
            starts = np.flatnonzero(new)
            first_read = np.minimum.reduceat(order, starts)
            del order
            sid = np.cumsum(new, dtype=np.int32)
            sid -= 1
            del new
            sizes = np.add.reduceat(keep.view(np.uint8), starts, dtype=np.int64)
            kept = np.flatnonzero(sizes >= min_user_plays)
            kept = kept[np.argsort(first_read[kept], kind="stable")]
            base = len(count_users)
            row_of = np.full(len(starts), -1, dtype=np.int32)
            row_of[kept] = np.arange(base, base + len(kept), dtype=np.int32)
            first = starts[kept]
            stamps = np.datetime_as_string(np.floor(ts[first]).astype("datetime64[s]"), unit="s")
            del ts
            users = self.users
            names = [
                f"{users[i]}@{stamp}Z"
                for i, stamp in zip(u[first].tolist(), stamps.tolist(), strict=True)
            ]
            del u, stamps
            rows_s = row_of[sid]
            del sid
            keep &= rows_s >= 0
            rows_s = rows_s[keep]
            cols_s = tr[keep]
            del tr, keep
        # count rows keep their users' names; rows of plays are sessions
        rows_c = np.searchsorted(np.asarray(count_users, dtype=np.int32), rows_raw).astype(np.int32)
        cols_c = np.frombuffer(self.cols, dtype=np.int32) if self.cols else np.zeros(0, np.int32)
        vals_c = (
            np.frombuffer(self.vals, dtype=np.float32) if self.vals else np.zeros(0, np.float32)
        )
        users = [self.users[i] for i in count_users] + names
        rows = np.concatenate([rows_c, rows_s])
        del rows_s
        cols = np.concatenate([cols_c, cols_s])
        del cols_s
        vals = np.concatenate([vals_c, np.ones(len(rows) - len(rows_c), np.float32)])
        shape = (len(users), len(self.tracks))
        counts = sp.coo_matrix((vals, (rows, cols)), shape=shape, dtype=np.float32)
        del rows, cols, vals
        listens = Listens(counts.tocsr(), users, self.tracks, self.skipped, self.duplicates)
        del counts
        return listens.prune(min_user_plays=min_user_plays)
