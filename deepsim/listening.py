"""Listening data: streaming readers that turn listening histories into counts.

Every reader produces a :class:`Listens`: a sparse ``users × tracks`` matrix of
play counts plus the row names (users or pseudo-users) and the column keys
(:class:`TrackKey`).  Files are read line by line (a JSON array incrementally),
so a multi-gigabyte dump never sits in memory; the counts are gathered in
compact arrays and turned into one CSR matrix at the end.

Formats (``format=``):

``"taste-profile"``
    The MSD Echo Nest Taste Profile triplets, ``user <TAB> song_id <TAB> count``.
    Users are real users.  ``song_table`` names the songs (the MSD
    ``unique_tracks.txt`` layout ``track_id<SEP>song_id<SEP>artist<SEP>title``
    or ``song_id <TAB> artist <TAB> title [<TAB> recording MBID]``).
``"lastfm-csv"``
    A Last.fm scrobble export: ``artist,album,track,date`` without a header,
    or any header naming the columns (``artist``, ``track``/``title``,
    ``album``, ``uts``/``timestamp``/``date``/``utc_time``, optionally
    ``track_mbid`` and ``user``).  Dates like ``31 Jan 2021 20:15``, ISO 8601 or
    unix seconds.  The user is the file's stem unless a ``user`` column exists.
``"lastfm-1k"``
    Last.fm-1K: ``userid <TAB> ISO time <TAB> artist MBID <TAB> artist <TAB>
    track MBID <TAB> track``.
``"listenbrainz"``
    A ListenBrainz export: a JSON array of listens, JSON lines (one listen per
    line, as in the ListenBrainz dumps), or the ``.zip`` export whose
    ``listens/*.jsonl`` members are read in turn.

Histories (everything but the Taste Profile) are cut into listening sessions:
a gap longer than ``session_gap`` seconds between two listens of one user starts
a new session, and each session becomes a pseudo-user named
``"<user>@<session start, ISO UTC>"``.  A user's listens are expected in time
order, either direction, as every known export writes them (users may be
interleaved, as in the ListenBrainz dumps); listens out of order only cut
sessions shorter.

Malformed records are skipped and counted (:attr:`Listens.skipped`, and a
logged warning naming the first lines) as long as they are at most
``max_bad_fraction`` (default 1 %) of a file's records; beyond that, or when
more than half of the first 1000 records are bad, reading fails with a
:class:`~deepsim.errors.ListeningDataError` naming the first bad line.
``max_bad_fraction=0`` makes every bad record fatal.  A file without a single
listen raises ``ListeningDataError(path, None, "no listens")``.

Track keys: a MusicBrainz recording id when the data has one (lower-cased),
the MSD song id for the Taste Profile, otherwise ``"artist\\x1ftitle"`` with both
parts case-folded and whitespace-collapsed.  Keys from different schemes for
the same song stay separate columns here; :func:`deepsim.matching.collapse`
merges them once they are matched to library items.
"""

from __future__ import annotations

import bz2
import calendar
import csv
import gzip
import io
import json
import logging
import lzma
import math
import numbers
import os
import re
import zipfile
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes, urlparse

import numpy as np
import scipy.sparse as sp

from deepsim.errors import ListeningDataError

if TYPE_CHECKING:
    from beets.library import Library

log = logging.getLogger(__name__)

FORMATS = ("taste-profile", "lastfm-csv", "lastfm-1k", "listenbrainz")
"""Names accepted by ``read_listens(format=...)`` besides ``"auto"``."""

PLAY_COUNT_FIELDS = ("play_count", "lastfm_play_count", "listenbrainz_play_count")
"""Flexible attributes holding play counts: mpdstats, lastimport, listenbrainz."""

LAST_PLAYED_FIELD = "last_played"
"""Flexible attribute (mpdstats) holding the unix time of an item's last play."""

PLAYLIST_SUFFIXES = (".m3u", ".m3u8")

KEY_SEP = "\x1f"
_COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
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
_EARLY_RECORDS = 1000
_JSON_CHUNK = 1 << 20
_JSON_MAX_RECORD = 64 << 20


# --------------------------------------------------------------------------------------------
# Data types


@dataclass(frozen=True)
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
    """

    counts: sp.csr_matrix
    users: list[str]
    tracks: list[TrackKey]
    skipped: int = field(default=0)

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
        return Listens(counts, users, tracks, self.skipped + other.skipped)

    def prune(self, *, min_user_plays: float = 1, min_track_plays: float = 1) -> Listens:
        """Drop users and tracks with fewer plays than given (one pass, users first).

        Tracks left without plays and users left without plays are always
        dropped.
        """
        _check_positive("min_user_plays", min_user_plays)
        _check_positive("min_track_plays", min_track_plays)
        counts = self.counts
        keep_u = np.flatnonzero(np.asarray(counts.sum(axis=1)).ravel() >= min_user_plays)
        counts = counts[keep_u]
        track_sums = np.asarray(counts.sum(axis=0)).ravel()
        keep_t = np.flatnonzero(track_sums >= min_track_plays)
        counts = counts[:, keep_t]
        keep_u2 = np.flatnonzero(np.diff(counts.indptr) > 0)
        counts = counts[keep_u2]
        users = [self.users[i] for i in keep_u[keep_u2]]
        tracks = [self.tracks[j] for j in keep_t]
        return Listens(counts.tocsr(), users, tracks, self.skipped)


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


# --------------------------------------------------------------------------------------------
# Accumulation


class _Session:
    __slots__ = ("counts", "end", "start")

    def __init__(self, t: float) -> None:
        self.start = t
        self.end = t
        self.counts: dict[int, float] = {}


class _Builder:
    """Gathers (row, column, count) triplets; sessions histories into pseudo-users."""

    def __init__(self, *, session_gap: float, min_session_plays: float) -> None:
        self.session_gap = session_gap
        self.min_session_plays = min_session_plays
        self.user_index: dict[str, int] = {}
        self.users: list[str] = []
        self.track_index: dict[str, int] = {}
        self.tracks: list[TrackKey] = []
        self.rows = array("i")
        self.cols = array("i")
        self.vals = array("f")
        self.open: dict[str, _Session] = {}
        self.skipped = 0

    def track(
        self, key: str, artist: str | None = None, title: str | None = None, mbid: str | None = None
    ) -> int:
        j = self.track_index.get(key)
        if j is None:
            j = len(self.tracks)
            self.track_index[key] = j
            self.tracks.append(TrackKey(key, artist or None, title or None, mbid))
        return j

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

    def add_listen(self, user: str, t: float, track: int) -> None:
        s = self.open.get(user)
        if s is not None and not (s.start - self.session_gap <= t <= s.end + self.session_gap):
            self._flush(user, s)
            s = None
        if s is None:
            s = self.open[user] = _Session(t)
        elif t < s.start:
            s.start = t
        elif t > s.end:
            s.end = t
        s.counts[track] = s.counts.get(track, 0.0) + 1.0

    def _flush(self, user: str, s: _Session) -> None:
        if sum(s.counts.values()) < self.min_session_plays:
            return
        start = datetime.fromtimestamp(s.start, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        row = self.user(f"{user}@{start}")
        for j, c in s.counts.items():
            self.rows.append(row)
            self.cols.append(j)
            self.vals.append(c)

    def close_sessions(self) -> None:
        for user, s in self.open.items():
            self._flush(user, s)
        self.open.clear()

    def build(self, *, min_user_plays: float) -> Listens:
        self.close_sessions()
        rows = np.frombuffer(self.rows, dtype=np.int32) if len(self.rows) else np.zeros(0, np.int32)
        cols = np.frombuffer(self.cols, dtype=np.int32) if len(self.cols) else np.zeros(0, np.int32)
        vals = np.frombuffer(self.vals, dtype=np.float32) if len(self.vals) else np.zeros(0)
        shape = (len(self.users), len(self.tracks))
        counts = sp.coo_matrix((vals, (rows, cols)), shape=shape, dtype=np.float32).tocsr()
        listens = Listens(counts, self.users, self.tracks, self.skipped)
        return listens.prune(min_user_plays=min_user_plays)


class _BadRecords:
    """Counts malformed records of one file and decides when they become fatal."""

    def __init__(self, path: str, max_bad_fraction: float) -> None:
        self.path = path
        self.max_bad_fraction = max_bad_fraction
        self.good = 0
        self.bad = 0
        self.first: tuple[int | None, str] | None = None

    def ok(self) -> None:
        self.good += 1

    def record(self, line: int | None, reason: str) -> None:
        self.bad += 1
        if self.first is None:
            self.first = (line, reason)
        if self.max_bad_fraction == 0:
            raise ListeningDataError(self.path, line, reason)
        if self.bad <= 3:
            where = f"line {line}" if line is not None else "a record"
            log.warning("%s: skipping %s: %s", self.path, where, reason)
        total = self.good + self.bad
        if total >= _EARLY_RECORDS and self.bad > total / 2:
            self._fail()

    def finish(self) -> int:
        total = self.good + self.bad
        if self.bad and self.bad > self.max_bad_fraction * total:
            self._fail()
        if self.good == 0:
            raise ListeningDataError(self.path, None, "no listens")
        if self.bad:
            log.warning("%s: skipped %d malformed records of %d", self.path, self.bad, total)
        return self.bad

    def _fail(self) -> None:
        assert self.first is not None
        line, reason = self.first
        total = self.good + self.bad
        raise ListeningDataError(
            self.path,
            line,
            f"{reason} ({self.bad} of {total} records read are malformed; at most "
            f"{self.max_bad_fraction:.1%} are skipped)",
        )


class _Bad(Exception):
    """A malformed record (internal; becomes a skip or a ListeningDataError)."""


# --------------------------------------------------------------------------------------------
# Small parsers


def _name_key(artist: str, title: str) -> str:
    a = _WS_RE.sub(" ", artist).strip().casefold()
    t = _WS_RE.sub(" ", title).strip().casefold()
    return f"{a}{KEY_SEP}{t}"


def _mbid(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    value = value.strip().lower()
    return value if _UUID_RE.match(value) else None


def _track_of(b: _Builder, artist: str | None, title: str | None, mbid: str | None) -> int:
    artist = (artist or "").strip()
    title = (title or "").strip()
    if mbid is not None:
        return b.track(mbid, artist, title, mbid)
    if not artist or not title:
        raise _Bad("no track name and artist (and no recording MBID)")
    return b.track(_name_key(artist, title), artist, title, None)


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
            return _parse_iso(s, value)
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


def _parse_iso(s: str, value: Any) -> float:
    iso = s[:-1] + "+00:00" if s.endswith(("Z", "z")) else s
    try:
        dt = datetime.fromisoformat(iso)
    except ValueError:
        raise ValueError(f"not a time: {value!r}") from None
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


def _open_text(path: Path) -> IO[str]:
    opener = _COMPRESSED.get(path.suffix.lower())
    if opener is not None:
        return opener(path, "rt", encoding="utf-8-sig", errors="replace", newline="")
    return open(path, encoding="utf-8-sig", errors="replace", newline="")


def _inner_suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def _stem(path: Path) -> str:
    name = path.name
    for s in reversed(path.suffixes):
        if name.endswith(s):
            name = name[: -len(s)]
        if s.lower() not in _COMPRESSED:
            break
    return name or path.name


# --------------------------------------------------------------------------------------------
# Format detection


def sniff_format(path: str | os.PathLike[str]) -> str:
    """Tell a listening file's format from its name, else from its first line.

    Raises
    ------
    ListeningDataError
        When the file cannot be read or its format cannot be told.
    """
    p = Path(path)
    suffix = _inner_suffix(p)
    if suffix == ".zip":
        return "listenbrainz"
    if suffix in (".json", ".jsonl", ".ndjson"):
        return "listenbrainz"
    if suffix == ".csv":
        return "lastfm-csv"
    try:
        with _open_text(p) as f:
            first = ""
            for _ in range(100):
                line = f.readline(1 << 16)
                if not line:
                    break
                if line.strip():
                    first = line.strip()
                    break
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise ListeningDataError(p, None, f"cannot read: {exc}") from exc
    if not first:
        raise ListeningDataError(p, None, "no listens")
    if first[0] in "[{":
        return "listenbrainz"
    parts = first.split("\t")
    if len(parts) == 3 and parts[2].strip().isdigit():
        return "taste-profile"
    if len(parts) == 6:
        try:
            parse_time(parts[1])
        except ValueError:
            pass
        else:
            return "lastfm-1k"
    if "," in first:
        return "lastfm-csv"
    raise ListeningDataError(
        p, 1, f"cannot tell the format of this file; pass format= one of {', '.join(FORMATS)}"
    )


# --------------------------------------------------------------------------------------------
# Readers


def _read_taste_profile(path: Path, b: _Builder, bad: _BadRecords) -> None:
    with _open_text(path) as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 3:
                bad.record(
                    lineno,
                    f"expected 3 tab-separated fields (user, song id, count), got {len(parts)}",
                )
                continue
            user, song, count_s = (p.strip() for p in parts)
            try:
                count = int(count_s)
            except ValueError:
                bad.record(lineno, f"play count {count_s!r} is not an integer")
                continue
            if count <= 0 or not user or not song:
                bad.record(lineno, f"need a user, a song id and a positive count, got {line!r}")
                continue
            b.add_count(user, b.track(song), float(count))
            bad.ok()


_CSV_COLUMNS = {
    "artist": ("artist", "artist_name", "artist name", "artistname"),
    "track": ("track", "title", "track_name", "track name", "trackname", "song", "name"),
    "album": ("album", "album_name", "album name"),
    "time": ("uts", "timestamp", "listened_at", "date", "utc_time", "time", "played_at"),
    "mbid": ("track_mbid", "recording_mbid", "mbid", "track mbid"),
    "user": ("user", "username", "user_name"),
}


def _csv_header(row: list[str]) -> dict[str, int] | None:
    names = [c.strip().strip("#").strip().lower() for c in row]
    if not ({"artist", "artist_name", "track", "title", "uts", "utc_time"} & set(names)):
        return None
    cols: dict[str, int] = {}
    for role, aliases in _CSV_COLUMNS.items():
        for alias in aliases:  # the first alias found wins (uts before utc_time...)
            if alias in names:
                cols[role] = names.index(alias)
                break
    return cols


def _read_lastfm_csv(path: Path, b: _Builder, bad: _BadRecords) -> None:
    default_user = _stem(path)
    with _open_text(path) as f:
        sample = f.read(1 << 14)
        delimiter = ";" if sample.count(";") > sample.count(",") else ","
        reader = csv.reader(_ChainedReader(io.StringIO(sample), f), delimiter=delimiter)
        cols: dict[str, int] | None = None
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                bad.record(reader.line_num, f"bad CSV: {exc}")
                continue
            lineno = reader.line_num
            if not row or not any(c.strip() for c in row):
                continue
            if cols is None:
                cols = _csv_header(row)
                if cols is not None:
                    missing = [r for r in ("artist", "track", "time") if r not in cols]
                    if missing:
                        raise ListeningDataError(
                            path, lineno, f"header has no column for {', '.join(missing)}"
                        )
                    continue
                if len(row) != 4:
                    raise ListeningDataError(
                        path,
                        lineno,
                        f"no header and {len(row)} columns; a header-less export must have "
                        "4 columns: artist, album, track, date",
                    )
                cols = {"artist": 0, "album": 1, "track": 2, "time": 3}
            width = max(cols.values()) + 1
            if len(row) < width:
                bad.record(lineno, f"expected at least {width} columns, got {len(row)}")
                continue
            try:
                t = parse_time(row[cols["time"]])
                mbid = _mbid(row[cols["mbid"]]) if "mbid" in cols else None
                j = _track_of(b, row[cols["artist"]], row[cols["track"]], mbid)
            except (ValueError, _Bad) as exc:
                bad.record(lineno, str(exc))
                continue
            user = row[cols["user"]].strip() if "user" in cols else ""
            b.add_listen(user or default_user, t, j)
            bad.ok()


def _read_lastfm_1k(path: Path, b: _Builder, bad: _BadRecords) -> None:
    with _open_text(path) as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 6:
                bad.record(lineno, f"expected 6 tab-separated fields, got {len(parts)}")
                continue
            user, when, _artist_mbid, artist, track_mbid, title = parts
            try:
                if not user.strip():
                    raise _Bad("no user id")
                t = parse_time(when)
                j = _track_of(b, artist, title, _mbid(track_mbid))
            except (ValueError, _Bad) as exc:
                bad.record(lineno, str(exc))
                continue
            b.add_listen(user.strip(), t, j)
            bad.ok()


def _iter_json_array(f: IO[str], path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (line, object) for each element of a JSON array, reading in chunks."""
    decoder = json.JSONDecoder()
    buf = ""
    pos = 0
    line = 1  # line number at buf[pos]
    eof = False
    started = False

    def fill() -> bool:
        nonlocal buf, pos, eof
        chunk = f.read(_JSON_CHUNK)
        if not chunk:
            eof = True
            return False
        buf = buf[pos:] + chunk
        pos = 0
        return True

    def skip_ws() -> None:
        nonlocal pos, line
        while True:
            n = len(buf)
            while pos < n and buf[pos] in " \t\r\n":
                if buf[pos] == "\n":
                    line += 1
                pos += 1
            if pos < n or eof or not fill():
                return

    skip_ws()
    if pos >= len(buf) or buf[pos] != "[":
        raise ListeningDataError(path, line, "expected a JSON array of listens")
    pos += 1
    while True:
        skip_ws()
        if pos >= len(buf):
            raise ListeningDataError(path, line, "JSON array is not closed (file truncated?)")
        ch = buf[pos]
        if ch == "]":
            return
        if started:
            if ch != ",":
                raise ListeningDataError(
                    path, line, f"expected ',' or ']' in JSON array, got {ch!r}"
                )
            pos += 1
            skip_ws()
        while True:
            try:
                obj, end = decoder.raw_decode(buf, pos)
                break
            except json.JSONDecodeError as exc:
                near_end = exc.pos >= len(buf) - (1 << 16)
                if eof or not near_end or len(buf) - pos > _JSON_MAX_RECORD or not fill():
                    err_line = line + buf.count("\n", pos, exc.pos)
                    raise ListeningDataError(path, err_line, f"invalid JSON: {exc.msg}") from exc
        yield line, obj
        line += buf.count("\n", pos, end)
        pos = end
        started = True


def _iter_json_records(f: IO[str], path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (line, listen or _Bad) from a JSON array or JSON lines."""
    head = f.read(1 << 12)
    stripped = head.lstrip()
    if stripped.startswith("["):
        rest = io.StringIO(head)
        chained = _ChainedReader(rest, f)
        yield from _iter_json_array(chained, path)
        return
    lines = _ChainedReader(io.StringIO(head), f)
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            yield lineno, json.loads(raw)
        except json.JSONDecodeError as exc:
            yield lineno, _Bad(f"invalid JSON: {exc.msg}")


class _ChainedReader:
    """A text reader that continues with ``second`` after ``first`` is exhausted."""

    def __init__(self, first: IO[str], second: IO[str]) -> None:
        self.first = first
        self.second = second
        self.on_second = False

    def read(self, n: int = -1) -> str:
        if not self.on_second:
            s = self.first.read(n)
            if s:
                return s
            self.on_second = True
        return self.second.read(n)

    def __iter__(self) -> Iterator[str]:
        rest = ""
        for line in self.first:
            if line.endswith("\n"):
                yield line
            else:
                rest = line
        first_line = True
        for line in self.second:
            if first_line and rest:
                line = rest + line
            first_line = False
            yield line
        if first_line and rest:
            yield rest


def _listen_fields(
    obj: Any, default_user: str
) -> tuple[str, float, str | None, str | None, str | None]:
    if isinstance(obj, _Bad):
        raise obj
    if not isinstance(obj, dict):
        raise _Bad(f"a listen must be a JSON object, got {type(obj).__name__}")
    tm = obj.get("track_metadata")
    if not isinstance(tm, dict):
        raise _Bad("listen has no track_metadata object")
    if "listened_at" not in obj:
        raise _Bad("listen has no listened_at")
    t = parse_time(obj["listened_at"])
    ai = tm.get("additional_info")
    mm = tm.get("mbid_mapping")
    mbid = (_mbid(ai.get("recording_mbid")) if isinstance(ai, dict) else None) or (
        _mbid(mm.get("recording_mbid")) if isinstance(mm, dict) else None
    )
    artist = tm.get("artist_name")
    title = tm.get("track_name")
    artist = artist if isinstance(artist, str) else None
    title = title if isinstance(title, str) else None
    user = obj.get("user_name")
    user = user.strip() if isinstance(user, str) and user.strip() else default_user
    return user, t, artist, title, mbid


def _read_listenbrainz_stream(
    f: IO[str], path: Path, b: _Builder, bad: _BadRecords, default_user: str
) -> None:
    for lineno, obj in _iter_json_records(f, path):
        try:
            user, t, artist, title, mbid = _listen_fields(obj, default_user)
            j = _track_of(b, artist, title, mbid)
        except (ValueError, _Bad) as exc:
            bad.record(lineno, str(exc))
            continue
        b.add_listen(user, t, j)
        bad.ok()


def _read_listenbrainz(path: Path, b: _Builder, bad: _BadRecords) -> None:
    default_user = _stem(path)
    if _inner_suffix(path) == ".zip":
        try:
            zf = zipfile.ZipFile(path)
        except zipfile.BadZipFile as exc:
            raise ListeningDataError(path, None, f"not a zip file ({exc})") from exc
        with zf:
            names = sorted(
                n
                for n in zf.namelist()
                if n.lower().endswith((".jsonl", ".json", ".ndjson"))
                and "listen" in n.lower()
                and not n.endswith("/")
            )
            for name in names:
                member = Path(f"{path}!{name}")
                member_bad = _BadRecords(str(member), bad.max_bad_fraction)
                with zf.open(name) as raw:
                    text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace")
                    _read_listenbrainz_stream(text, member, b, member_bad, default_user)
                if member_bad.good == 0 and member_bad.bad == 0:
                    continue
                b.skipped += member_bad.finish()
                bad.good += member_bad.good
            if bad.good == 0:
                raise ListeningDataError(path, None, "no listens")
        return
    with _open_text(path) as f:
        _read_listenbrainz_stream(f, path, b, bad, default_user)


_READERS = {
    "taste-profile": _read_taste_profile,
    "lastfm-csv": _read_lastfm_csv,
    "lastfm-1k": _read_lastfm_1k,
    "listenbrainz": _read_listenbrainz,
}


def _expand_paths(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out.extend(c for c in sorted(p.iterdir()) if c.is_file() and not c.name.startswith("."))
        else:
            out.append(p)
    return out


def read_listens(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    *,
    format: str = "auto",
    song_table: str | os.PathLike[str] | Mapping[str, Sequence[str | None]] | None = None,
    session_gap: float = 1800.0,
    min_user_plays: float = 1,
    max_bad_fraction: float = 0.01,
) -> Listens:
    """Read listening files into one :class:`Listens`.

    Parameters
    ----------
    paths
        A file, a directory (its files, in name order) or several of them.
        ``.gz``, ``.bz2`` and ``.xz`` files are decompressed on the fly.
    format
        ``"auto"`` (by name, else by the first line) or one of :data:`FORMATS`.
    song_table
        Taste Profile only: a file naming the MSD songs (``unique_tracks.txt``
        layout, or ``song_id <TAB> artist <TAB> title [<TAB> MBID]``), or a
        mapping ``song_id -> (artist, title[, mbid])``.  Only the songs present
        in the listens are kept.
    session_gap
        Seconds of silence that end a listening session.
    min_user_plays
        Rows (users or sessions) with fewer plays are dropped.
    max_bad_fraction
        Fraction of malformed records per file that is skipped (and counted)
        rather than fatal; ``0`` makes any malformed record fatal.

    Returns
    -------
    Listens

    Raises
    ------
    ListeningDataError
        Unreadable, empty or malformed file (naming the line where it can).
    ValueError
        Bad parameter.
    """
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"format must be 'auto' or one of {', '.join(FORMATS)}; got {format!r}")
    _check_positive("session_gap", session_gap)
    _check_positive("min_user_plays", min_user_plays)
    if isinstance(max_bad_fraction, bool) or not 0 <= max_bad_fraction < 1:
        raise ValueError(f"max_bad_fraction must be in [0, 1), got {max_bad_fraction!r}")
    files = _expand_paths(paths)
    if not files:
        raise ValueError(f"no listening files given (paths={paths!r})")
    b = _Builder(session_gap=float(session_gap), min_session_plays=min_user_plays)
    taste = False
    for path in files:
        fmt = sniff_format(path) if format == "auto" else format
        taste = taste or fmt == "taste-profile"
        bad = _BadRecords(str(path), max_bad_fraction)
        try:
            _READERS[fmt](path, b, bad)
        except FileNotFoundError as exc:
            raise ListeningDataError(path, None, "no such file") from exc
        except (OSError, EOFError, lzma.LZMAError, zipfile.BadZipFile) as exc:
            raise ListeningDataError(path, None, f"cannot read: {exc}") from exc
        if fmt == "listenbrainz" and _inner_suffix(path) == ".zip":
            continue  # members were checked one by one
        b.skipped += bad.finish()
    if song_table is not None:
        if not taste:
            raise ValueError("song_table only applies to the taste-profile format")
        _apply_song_table(b, song_table, max_bad_fraction)
    return b.build(min_user_plays=min_user_plays)


def _apply_song_table(
    b: _Builder,
    table: str | os.PathLike[str] | Mapping[str, Sequence[str | None]],
    max_bad_fraction: float,
) -> None:
    def update(song: str, artist: str | None, title: str | None, mbid: str | None) -> None:
        j = b.track_index.get(song)
        if j is None:
            return
        old = b.tracks[j]
        if old.artist is None and old.title is None:
            b.tracks[j] = TrackKey(song, artist or None, title or None, _mbid(mbid), None)

    if isinstance(table, Mapping):
        for song, fields in table.items():
            fields = [*fields, None, None, None]
            update(song, fields[0], fields[1], fields[2])
        return
    path = Path(table)
    bad = _BadRecords(str(path), max_bad_fraction)
    try:
        with _open_text(path) as f:
            for lineno, raw in enumerate(f, 1):
                line = raw.rstrip("\r\n")
                if not line.strip():
                    continue
                if "<SEP>" in line:
                    parts = line.split("<SEP>")
                    if len(parts) != 4:
                        bad.record(
                            lineno,
                            f"expected track_id<SEP>song_id<SEP>artist<SEP>title, "
                            f"got {len(parts)} fields",
                        )
                        continue
                    update(parts[1].strip(), parts[2].strip(), parts[3].strip(), None)
                else:
                    parts = line.split("\t")
                    if len(parts) not in (3, 4):
                        bad.record(
                            lineno,
                            "expected song_id, artist, title[, MBID] separated "
                            f"by tabs, got {len(parts)} fields",
                        )
                        continue
                    mbid = parts[3] if len(parts) == 4 else None
                    update(parts[0].strip(), parts[1].strip(), parts[2].strip(), mbid)
                bad.ok()
    except FileNotFoundError as exc:
        raise ListeningDataError(path, None, "no such file") from exc
    except OSError as exc:
        raise ListeningDataError(path, None, f"cannot read: {exc}") from exc
    if bad.good == 0 and bad.bad == 0:
        raise ListeningDataError(path, None, "song table is empty")
    b.skipped += bad.finish()


# --------------------------------------------------------------------------------------------
# The beets library as listening data


def _item_path(raw: Any, libdir: bytes) -> bytes | None:
    if raw is None:
        return None
    p = bytes(raw) if isinstance(raw, (bytes, memoryview)) else os.fsencode(str(raw))
    if not p:
        return None
    if not os.path.isabs(p):
        p = os.path.join(libdir, p.replace(b"/", os.fsencode(os.sep)))
    return os.path.normpath(p)


def _playlist_files(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out.extend(
                c
                for c in sorted(p.iterdir())
                if c.is_file() and c.suffix.lower() in PLAYLIST_SUFFIXES
            )
        else:
            out.append(p)
    return out


def read_playlist(path: str | os.PathLike[str], *, library_dir: bytes | None = None) -> list[bytes]:
    """Entries of an m3u/m3u8 playlist as normalised absolute paths (bytes).

    Relative entries are resolved against the playlist's folder, and also
    against ``library_dir`` (beets' ``playlist.relative_to: library``) when
    given, the caller trying both.  ``file://`` URLs are decoded; other URLs
    and comment lines (``#EXTM3U``, ``#EXTINF``...) are skipped.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError as exc:
        raise ListeningDataError(p, None, "no such playlist") from exc
    except OSError as exc:
        raise ListeningDataError(p, None, f"cannot read playlist: {exc.strerror}") from exc
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    base = os.fsencode(p.resolve().parent)
    out: list[bytes] = []
    for raw in data.splitlines():
        entry = raw.strip()
        if not entry or entry.startswith(b"#"):
            continue
        if b"://" in entry:
            if not entry.lower().startswith(b"file://"):
                continue
            entry = unquote_to_bytes(urlparse(entry.decode("latin-1")).path)
        if os.path.isabs(entry):
            out.append(os.path.normpath(entry))
        else:
            out.append(os.path.normpath(os.path.join(base, entry)))
            if library_dir:
                out.append(os.path.normpath(os.path.join(library_dir, entry)))
    return out


def read_library(
    lib: Library,
    *,
    playlist_paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] = (),
    session_gap: float = 1800.0,
    min_user_plays: float = 1,
) -> Listens:
    """Listening data kept in the beets library itself.

    Rows:

    ``"library:plays"``
        The play count of each item: the largest of its ``play_count``
        (mpdstats), ``lastfm_play_count`` (lastimport) and
        ``listenbrainz_play_count`` flexible attributes (they count the same
        listener's plays, often the same plays twice).  One listener is one row:
        useful only together with other rows (a single row cannot be
        factorised).
    ``"library:last_played@<time>"``
        Items grouped by their ``last_played`` time (mpdstats) into sessions
        (``session_gap``), each item counting 1.
    ``"playlist:<name>"``
        One row per m3u/m3u8 playlist (a file, or every playlist in a folder
        such as beets' ``playlist.playlist_dir``), each library item in it
        counting 1.  Entries that are not library items are ignored.

    All of it comes from one SQL query.  Columns are keyed ``"item:<id>"``
    with :attr:`TrackKey.item_id` set.
    """
    _check_positive("session_gap", session_gap)
    _check_positive("min_user_plays", min_user_plays)
    keys = (*PLAY_COUNT_FIELDS, LAST_PLAYED_FIELD)
    marks = ", ".join("?" for _ in keys)
    sql = (
        "SELECT i.id, i.artist, i.title, i.mb_trackid, i.path, a.key, a.value "
        "FROM items AS i LEFT JOIN item_attributes AS a "
        f"ON a.entity_id = i.id AND a.key IN ({marks}) ORDER BY i.id"
    )
    with lib.transaction() as tx:
        rows = tx.query(sql, keys)
    libdir = lib.directory if isinstance(lib.directory, bytes) else os.fsencode(lib.directory)
    meta: dict[int, TrackKey] = {}
    by_path: dict[bytes, int] = {}
    plays: dict[int, float] = {}
    last_played: list[tuple[float, int]] = []
    for item_id, artist, title, mb_trackid, path, key, value in rows:
        item_id = int(item_id)
        if item_id not in meta:
            meta[item_id] = TrackKey(
                f"item:{item_id}", artist or None, title or None, _mbid(mb_trackid), item_id
            )
            ip = _item_path(path, libdir)
            if ip is not None:
                by_path.setdefault(ip, item_id)
        if key is None:
            continue
        try:
            v = float(value)
        except (TypeError, ValueError):
            log.warning("item %d: ignoring %s=%r (not a number)", item_id, key, value)
            continue
        if not v > 0 or v == float("inf"):
            continue
        if key == LAST_PLAYED_FIELD:
            last_played.append((v, item_id))
        else:
            plays[item_id] = max(plays.get(item_id, 0.0), v)

    b = _Builder(session_gap=float(session_gap), min_session_plays=min_user_plays)
    cols = {item_id: b.track(k.key, k.artist, k.title, k.mbid) for item_id, k in meta.items()}
    b.tracks = [meta[item_id] for item_id in cols]  # keep item_id on the keys
    for item_id, v in plays.items():
        b.add_count("library:plays", cols[item_id], v)
    for t, item_id in sorted(last_played):
        b.add_listen("library:last_played", t, cols[item_id])
    b.close_sessions()
    for pl in _playlist_files(playlist_paths):
        entries = read_playlist(pl, library_dir=libdir)
        found: dict[int, None] = {}
        for e in entries:
            item_id = by_path.get(e)
            if item_id is not None:
                found[item_id] = None
        if not found:
            log.warning("%s: no library items in this playlist", pl)
            continue
        for item_id in found:
            b.add_count(f"playlist:{pl.stem}", cols[item_id], 1.0)
    return b.build(min_user_plays=min_user_plays)
