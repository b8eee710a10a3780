"""Tab- and comma-separated formats: Taste Profile, Last.fm (CSV, lastexport.py TSV,
Last.fm-1K, lastfm-backup-cli), Libre.fm, TIDAL and the Audioscrobbler ``.scrobbler.log``."""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from deepsim.errors import ListeningDataError
from deepsim.listening.base import Count, Head, ListenReader, Record, Skip, is_comment, register
from deepsim.listening.core import HOUR_MINUTE, Bad, DayCache, mbid_of, parse_time
from deepsim.listening.sources import Source
from deepsim.util import get_logger

log = get_logger(__name__)

_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_TIME_RE = re.compile(r"^\d{1,2}:\d{2}(:\d{2})?$")
NOW_PLAYING = Skip("now playing (no time yet)")


def _tab_fields(head: Head) -> list[str] | None:
    if head.json_start:
        return None
    lines = head.data_lines
    return lines[0].rstrip("\r\n").split("\t") if lines else None


@register
class TasteProfileReader(ListenReader):
    """MSD Echo Nest Taste Profile: ``user <TAB> song_id <TAB> count``."""

    name = "taste-profile"
    description = "MSD Echo Nest Taste Profile triplets (train_triplets.txt)"

    def sniff(self, head: Head) -> bool:
        if head.name.lower().startswith("train_triplets"):
            return True
        parts = _tab_fields(head)
        return parts is not None and len(parts) == 3 and parts[2].strip().isdigit()

    def read(self, source: Source) -> Iterator[Record]:
        with source.open_text() as f:
            for lineno, raw in enumerate(f, 1):
                line = raw.rstrip("\r\n")
                if not line.strip():
                    continue
                parts = line.split("\t")
                if len(parts) != 3:
                    yield Bad(
                        f"expected 3 tab-separated fields (user, song id, count), got {len(parts)}",
                        lineno,
                    )
                    continue
                user, song, count_s = (p.strip() for p in parts)
                try:
                    count = int(count_s)
                except ValueError:
                    yield Bad(f"play count {count_s!r} is not an integer", lineno)
                    continue
                if count <= 0 or not user or not song:
                    yield Bad(f"need a user, a song id and a positive count, got {line!r}", lineno)
                    continue
                yield Count(user, song, float(count), lineno)


@register
class Lastfm1kReader(ListenReader):
    """Last.fm-1K: ``userid, ISO time, artist MBID, artist, track MBID, track`` (tabs)."""

    name = "lastfm-1k"
    description = "Last.fm-1K data set (userid-timestamp-artid-artname-traid-traname.tsv)"

    def sniff(self, head: Head) -> bool:
        parts = _tab_fields(head)
        if parts is None or len(parts) != 6:
            return False
        try:
            parse_time(parts[1])
        except ValueError:
            return False
        return not parts[1].strip().isdigit()

    def read(self, source: Source) -> Iterator[Record]:
        with source.open_text() as f:
            for lineno, raw in enumerate(f, 1):
                line = raw.rstrip("\r\n")
                if not line.strip():
                    continue
                parts = line.split("\t")
                if len(parts) != 6:
                    yield Bad(f"expected 6 tab-separated fields, got {len(parts)}", lineno)
                    continue
                user, when, _artist_mbid, artist, track_mbid, title = parts
                if not user.strip():
                    yield Bad("no user id", lineno)
                    continue
                try:
                    t = parse_time(when)
                except ValueError as exc:
                    yield Bad(str(exc), lineno)
                    continue
                yield (user.strip(), t, artist, title, mbid_of(track_mbid), lineno)


@register
class LastexportReader(ListenReader):
    """lastexport.py (lastscrape): ``uts, track, artist, album, track/artist/album MBID``."""

    name = "lastfm-tsv"
    description = "Last.fm backup by lastexport.py / lastscrape (tab-separated, no header)"

    def sniff(self, head: Head) -> bool:
        parts = _tab_fields(head)
        return (
            parts is not None
            and 4 <= len(parts) <= 7
            and parts[0].strip().isdigit()
            and len(parts[0].strip()) >= 9
        )

    def read(self, source: Source) -> Iterator[Record]:
        with source.open_text() as f:
            for lineno, raw in enumerate(f, 1):
                line = raw.rstrip("\r\n")
                if not line.strip():
                    continue
                parts = line.split("\t")
                if len(parts) < 3:
                    yield Bad(
                        f"expected uts, track, artist[, album, MBIDs] separated by tabs, "
                        f"got {len(parts)} fields",
                        lineno,
                    )
                    continue
                uts = parts[0].strip()
                if not uts:
                    yield NOW_PLAYING
                    continue
                try:
                    t = float(uts) if uts.isdigit() else parse_time(uts)
                except ValueError as exc:
                    yield Bad(str(exc), lineno)
                    continue
                mbid = mbid_of(parts[4]) if len(parts) > 4 else None
                yield (None, t, parts[2], parts[1], mbid, lineno)


_CSV_COLUMNS = {
    "artist": ("artist", "artist_name", "artist name", "artistname"),
    "track": ("track", "title", "track_name", "track name", "trackname", "song", "name"),
    "album": ("album", "album_name", "album name"),
    "time": ("uts", "timestamp", "listened_at", "date", "utc_time", "time", "played_at"),
    "mbid": ("track_mbid", "recording_mbid", "mbid", "track mbid"),
    "user": ("user", "username", "user_name"),
}


_HEADERLESS = {"artist": 0, "album": 1, "track": 2, "time": 3}


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


def _csv_rows(source: Source) -> Iterator[tuple[int, list[str] | Bad]]:
    """``(line, row)`` of a CSV file, delimiter guessed, leading comment lines skipped."""
    with source.open_text() as f:
        sample = source.head_text()
        delimiter = ";" if sample.count(";") > sample.count(",") else ","
        reader = csv.reader(f, delimiter=delimiter)
        in_preamble = True
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield reader.line_num, Bad(f"bad CSV: {exc}", reader.line_num)
                continue
            if not row or not any(c.strip() for c in row):
                continue
            if in_preamble and is_comment(row[0]):
                continue
            in_preamble = False
            yield reader.line_num, row


@register
class LastfmBackupReader(ListenReader):
    """lastfm-backup-cli: ``date, time (UTC), artist, title`` without a header."""

    name = "lastfm-backup"
    description = "Last.fm backup by lastfm-backup-cli (date,time,artist,title)"

    def sniff(self, head: Head) -> bool:
        lines = head.data_lines
        if not lines:
            return False
        row = next(csv.reader([lines[0]]), [])
        return (
            len(row) == 4
            and bool(_DATE_RE.match(row[0].strip()))
            and bool(_TIME_RE.match(row[1].strip()))
        )

    def read(self, source: Source) -> Iterator[Record]:
        days = DayCache()
        for lineno, row in _csv_rows(source):
            if isinstance(row, Bad):
                yield row
                continue
            if len(row) != 4:
                yield Bad(f"expected 4 columns (date, time, artist, title), got {len(row)}", lineno)
                continue
            if not row[0].strip():
                yield NOW_PLAYING
                continue
            try:
                t = days.date_time(row[0], row[1])
            except ValueError as exc:
                yield Bad(str(exc), lineno)
                continue
            yield (None, t, row[2], row[3], None, lineno)


@register
class LastfmCsvReader(ListenReader):
    """Last.fm CSV exports: ``artist,album,track,date`` (lastfm-to-csv) or any named header."""

    name = "lastfm-csv"
    description = "Last.fm CSV export (lastfm-to-csv, mainstream.ghan.nl, ...)"

    def sniff(self, head: Head) -> bool:
        lines = head.data_lines
        if head.json_start or not lines:
            return False
        delimiter = ";" if lines[0].count(";") > lines[0].count(",") else ","
        rows = list(csv.reader(lines[:2], delimiter=delimiter))
        if _csv_header(rows[0]) is not None:
            return True
        for row in rows:  # artist,album,track,date (the first may be undated: now playing)
            if len(row) != 4:
                return False
            if row[3].strip():
                try:
                    DayCache().lastfm(row[3].strip())
                except ValueError:
                    return False
                return True
        return False

    def read(self, source: Source) -> Iterator[Record]:
        days = DayCache()
        lastfm = days.lastfm
        prefix = days.prefix.get
        hour_minute = HOUR_MINUTE.get
        cols: dict[str, int] | None = None
        first = True
        c_artist, c_track, c_time = 0, 2, 3
        c_mbid = c_user = None
        width = 4
        with source.open_text() as f:
            sample = source.head_text()
            delimiter = ";" if sample.count(";") > sample.count(",") else ","
            reader = csv.reader(f, delimiter=delimiter)
            while True:
                try:
                    for row in reader:
                        if cols is None:  # the preamble: comments, then a header or data
                            if not row or not any(c.strip() for c in row) or is_comment(row[0]):
                                continue
                            lineno = reader.line_num
                            cols = _csv_header(row)
                            if cols is not None:
                                missing = [r for r in ("artist", "track", "time") if r not in cols]
                                if missing:
                                    raise ListeningDataError(
                                        source.name,
                                        lineno,
                                        f"header has no column for {', '.join(missing)}",
                                    )
                                c_artist, c_track, c_time = (
                                    cols["artist"],
                                    cols["track"],
                                    cols["time"],
                                )
                                c_mbid, c_user = cols.get("mbid"), cols.get("user")
                                width = max(cols.values()) + 1
                                continue
                            if len(row) != 4:
                                raise ListeningDataError(
                                    source.name,
                                    lineno,
                                    f"no header and {len(row)} columns; a header-less export "
                                    "must have 4 columns: artist, album, track, date",
                                )
                            cols = _HEADERLESS
                        if cols is _HEADERLESS and len(row) == 4:
                            # lastfm-to-csv's "31 Jan 2021 20:15": the day from a cache
                            when = row[3]
                            hm = hour_minute(when[-6:])
                            if hm is not None:
                                base = prefix(when[:-6])
                                if base is not None:
                                    first = False
                                    yield (None, base + hm, row[0], row[2], None, reader.line_num)
                                    continue
                        if len(row) < width:
                            if row and any(c.strip() for c in row):
                                yield Bad(
                                    f"expected at least {width} columns, got {len(row)}",
                                    reader.line_num,
                                )
                            continue
                        when = row[c_time]
                        if not when:
                            if first:  # lastfm-to-csv writes the track playing now first, undated
                                first = False
                                yield NOW_PLAYING
                                continue
                            yield Bad("empty time", reader.line_num)
                            continue
                        first = False
                        try:
                            t = float(when) if when.isdigit() else lastfm(when)
                        except ValueError as exc:
                            yield Bad(str(exc), reader.line_num)
                            continue
                        user = (row[c_user].strip() or None) if c_user is not None else None
                        mbid = mbid_of(row[c_mbid]) if c_mbid is not None else None
                        yield (user, t, row[c_artist], row[c_track], mbid, reader.line_num)
                    return
                except csv.Error as exc:
                    yield Bad(f"bad CSV: {exc}", reader.line_num)


@register
class LibrefmReader(LastfmCsvReader):
    """Libre.fm export: ``#`` (or UTF-7 ``+ACM-``) comment lines, then a header
    ``Artist,Track,Album,Time`` (read by name, not by position)."""

    name = "librefm"
    description = "Libre.fm CSV export"

    def sniff(self, head: Head) -> bool:
        lines = head.lines
        if head.json_start or not lines or not is_comment(lines[0]):
            return False
        data = head.data_lines
        return bool(data) and _csv_header(next(csv.reader([data[0]]), [])) is not None


_TIDAL_COLUMNS = {
    "artist": ("artist_name", "artist", "artists"),
    "track": ("track_title", "track_name", "title", "track"),
    "time": ("entry_date", "stream_start", "timestamp", "played_at", "date"),
    "ms": ("stream_duration_ms", "duration_ms", "ms_played", "stream_duration"),
    "zone": ("timezone", "time_zone", "tz"),
}
_TIDAL_NAMES = frozenset({"artist_name", "track_title", "entry_date"})
_DMY_RE = re.compile(r"^(\d{1,2})/(\d{1,2})/(\d{4})[ T](\d{1,2}):(\d{2})(?::(\d{2}))?$")
_OFFSET_RE = re.compile(r"^(?:UTC|GMT)?\s*([+-])(\d{1,2})(?::?(\d{2}))?$", re.I)


def _tidal_header(row: list[str]) -> dict[str, int] | None:
    names = [c.strip().strip('"').lower() for c in row]
    cols: dict[str, int] = {}
    for role, aliases in _TIDAL_COLUMNS.items():
        for alias in aliases:
            if alias in names:
                cols[role] = names.index(alias)
                break
    return cols if {"artist", "track", "time"} <= set(cols) else None


def _zone(value: str) -> tzinfo | None:
    """A time zone column's value: an IANA name or a UTC offset; ``None`` if neither."""
    value = value.strip()
    if not value:
        return None
    m = _OFFSET_RE.match(value)
    if m:
        sign = -1 if m.group(1) == "-" else 1
        return timezone(sign * timedelta(hours=int(m.group(2)), minutes=int(m.group(3) or 0)))
    if value.upper() in ("UTC", "GMT", "Z"):
        return timezone.utc
    try:
        return ZoneInfo(value)
    except (ValueError, ZoneInfoNotFoundError):
        return None


@register
class TidalReader(ListenReader):
    """TIDAL's data export ``streaming.csv`` (one row per stream).

    Read by column name: ``artist_name``, ``track_title``, ``entry_date``
    (``31/01/2021 20:15``, day first, as ListenBrainz's TIDAL importer reads
    it; ISO 8601 too), in the zone a ``timezone`` column names (an IANA name
    or an offset; UTC without one); lines before the header are skipped.  A
    duration column (``stream_duration_ms``...), where there is one, leaves
    out streams under 30 s.
    """

    name = "tidal"
    description = "TIDAL data export (streaming.csv)"
    min_ms = 30_000

    def sniff(self, head: Head) -> bool:
        if head.json_start:
            return False
        for line in head.data_lines[:20]:
            row = next(csv.reader([line]), [])
            names = {c.strip().strip('"').lower() for c in row}
            if _tidal_header(row) is not None and (
                head.name.lower() == "streaming.csv" or names >= _TIDAL_NAMES
            ):
                return True
        return False

    def read(self, source: Source) -> Iterator[Record]:
        cols: dict[str, int] | None = None
        scale = 1.0
        short = Skip("played under 30 s")
        zones: dict[str, tzinfo | None] = {}
        warned = False
        for lineno, row in _csv_rows(source):
            if isinstance(row, Bad):
                yield row
                continue
            if cols is None:  # lines before the header are skipped
                cols = _tidal_header(row)
                if cols is not None and "ms" in cols and "ms" not in row[cols["ms"]].lower():
                    scale = 1000.0  # a duration in seconds
                continue
            if len(row) <= max(cols.values()):
                yield Bad(f"expected {max(cols.values()) + 1} columns, got {len(row)}", lineno)
                continue
            if "ms" in cols:
                try:
                    ms = float(row[cols["ms"]] or 0) * scale
                except ValueError:
                    yield Bad(f"duration {row[cols['ms']]!r} is not a number", lineno)
                    continue
                if ms < self.min_ms:
                    yield short
                    continue
            zone: tzinfo | None = None
            if "zone" in cols:
                name = row[cols["zone"]]
                if name not in zones:
                    zones[name] = _zone(name)
                    if zones[name] is None and name.strip() and not warned:
                        warned = True
                        log.warning(
                            "%s: time zone %r not understood; reading its times as UTC",
                            source.name,
                            name,
                        )
                zone = zones[name]
            when = row[cols["time"]].strip()
            try:
                m = _DMY_RE.match(when)
                if m:
                    d, mo, y, h, mi, sec = (int(x or 0) for x in m.groups())
                    t = datetime(y, mo, d, h, mi, sec, tzinfo=zone or timezone.utc).timestamp()
                elif zone is not None and when[4:5] == "-" and "T" not in when and "+" not in when:
                    t = datetime.fromisoformat(when).replace(tzinfo=zone).timestamp()
                else:
                    t = parse_time(when)
            except ValueError:
                yield Bad(f"not a time: {when!r}", lineno)
                continue
            yield (None, t, row[cols["artist"]], row[cols["track"]], None, lineno)
        if cols is None:
            raise ListeningDataError(
                source.name, None, "no header naming artist_name, track_title, entry_date"
            )


@register
class ScrobblerLogReader(ListenReader):
    """Audioscrobbler portable-player log (Rockbox, iPod scrobblers): ``.scrobbler.log``.

    ``#AUDIOSCROBBLER/1.1`` header lines, then tab-separated ``artist, album,
    title, track number, duration, rating (L listened / S skipped), unix time
    [, MusicBrainz track id]``.  ``S`` rows are left out.  ``#TZ/UNKNOWN``
    logs hold the player's local time, read as if UTC (sessions need only the
    gaps).
    """

    name = "scrobbler-log"
    description = "Audioscrobbler .scrobbler.log (Rockbox and other portable players)"

    def sniff(self, head: Head) -> bool:
        return head.text.lstrip().startswith("#AUDIOSCROBBLER/")

    def read(self, source: Source) -> Iterator[Record]:
        skipped = Skip("skipped on the player (rating S)")
        with source.open_text() as f:
            for lineno, raw in enumerate(f, 1):
                line = raw.rstrip("\r\n")
                if not line.strip() or line.startswith("#"):
                    continue
                parts = line.split("\t")
                if len(parts) < 7:
                    yield Bad(f"expected 7 or 8 tab-separated fields, got {len(parts)}", lineno)
                    continue
                if parts[5].strip().upper() == "S":
                    yield skipped
                    continue
                try:
                    t = parse_time(parts[6])
                except ValueError as exc:
                    yield Bad(str(exc), lineno)
                    continue
                mbid = mbid_of(parts[7]) if len(parts) > 7 else None
                yield (None, t, parts[0], parts[2], mbid, lineno)
