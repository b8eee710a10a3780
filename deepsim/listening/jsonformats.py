"""JSON formats: Spotify (Extended Streaming History, Account Data), Last.fm
``user.getRecentTracks``, ListenBrainz (export and API), Maloja, Koito, Pano Scrobbler
(whose file log may also be CSV)."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from datetime import datetime, timezone
from itertools import islice
from typing import Any, cast

from deepsim.errors import ListeningDataError
from deepsim.listening import jsonstream
from deepsim.listening.base import Head, ListenReader, Plays, Record, Skip, register
from deepsim.listening.core import Bad, mbid_of, parse_iso, parse_time
from deepsim.listening.sources import Source

MIN_PLAY_MS = 30_000
"""A stream counts as a listen from 30 s on (Spotify's and Last.fm's own rule)."""

BATCH = 65_536
"""Plays handed to the builder at once (bounds the columns a streamed file holds)."""

SHORT = Skip("played under 30 s")
NOT_OBJECT = "a listen must be a JSON object"


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


# --------------------------------------------------------------------------------------------
# Spotify


_SPOTIFY_ROWS = jsonstream.Rows(
    "SpotifyRow",
    (
        ("ts", datetime),
        "ms_played",
        ("master_metadata_track_name", str),
        ("master_metadata_album_artist_name", str),
        ("episode_name", str),
        ("spotify_episode_uri", str),
        ("audiobook_title", str),
        ("audiobook_uri", str),
        ("reason_end", str),
        ("incognito_mode", bool),
        ("username", str),
    ),
)
"""The fields of a Spotify Extended Streaming History row the reader looks at (typed where
Spotify's own types are plain: msgspec then builds them faster, about 10 % of decoding; a
file with another type there is read by the stdlib path)."""

_SPOTIFY_EXTENDED_NAME = re.compile(
    r"^(streaming_history_(audio|video)_.*|endsong_?\d*)\.json$", re.I
)


@register
class SpotifyExtendedReader(ListenReader):
    """Spotify Extended Streaming History (``Streaming_History_Audio_*.json``, ``endsong_*.json``).

    A listen is a row with a track (``master_metadata_track_name`` and
    ``..._album_artist_name``) played for at least 30 s (``ms_played``), or to
    its end (``reason_end: trackdone``) when shorter; podcast episodes,
    audiobooks, videos, rows without a track and private-session
    (``incognito_mode``) rows are left out.  ``ts`` is when the stream ended.
    """

    name = "spotify-extended"
    description = "Spotify Extended Streaming History (privacy page, 'Extended streaming history')"
    whole_files = True

    def sniff(self, head: Head) -> bool:
        t = head.text
        return head.json_start == "[" and (
            '"master_metadata_track_name"' in t
            or ('"ms_played"' in t and '"ts"' in t)
            or (bool(_SPOTIFY_EXTENDED_NAME.match(head.name)) and len(t.strip()) <= 2)
        )

    def read(self, source: Source) -> Iterator[Record]:
        episode = Skip("podcast episode")
        audiobook = Skip("audiobook")
        no_track = Skip("no track (video or unavailable)")
        private = Skip("private session (incognito_mode)")
        of = _SPOTIFY_ROWS.read(source)
        rows = iter(of)
        min_ms, date_time, utc = MIN_PLAY_MS, datetime, timezone.utc  # locals in the hot loop
        while chunk := list(islice(rows, BATCH)):
            # the plays of a chunk go to the builder as columns (one Plays), the rest one by one
            times: list[float] = []
            artists: list[str] = []
            titles: list[str] = []
            users: list[str | None] = []
            add_time, add_artist, add_title, add_user = (
                times.append,
                artists.append,
                titles.append,
                users.append,
            )
            named = False
            for i, r in chunk:
                if r is None:
                    yield Bad(NOT_OBJECT, of.line(i))
                    continue
                title = r.master_metadata_track_name
                artist = r.master_metadata_album_artist_name
                if not title or not artist:
                    if r.episode_name or r.spotify_episode_uri:
                        yield episode
                    elif r.audiobook_title or r.audiobook_uri:
                        yield audiobook
                    else:
                        yield no_track
                    continue
                if r.incognito_mode is True:
                    yield private
                    continue
                ms = r.ms_played
                if ms.__class__ is not int and not isinstance(ms, float):
                    yield Bad("ms_played is not a number", of.line(i))
                    continue
                if ms < min_ms and r.reason_end != "trackdone":
                    yield SHORT
                    continue
                if (
                    title.__class__ is not str
                    or artist.__class__ is not str
                    or title.isspace()  # as `not title.strip()` (not empty here), copying nothing
                    or artist.isspace()
                ):
                    yield Bad("no track name and artist (and no recording MBID)", of.line(i))
                    continue
                ts = r.ts
                if ts.__class__ is date_time:  # decoded by msgspec
                    t = (ts if ts.tzinfo is not None else ts.replace(tzinfo=utc)).timestamp()
                else:
                    try:
                        t = parse_iso(ts) if ts.__class__ is str else parse_time(ts)
                    except (ValueError, AttributeError):
                        yield Bad(f"ts {ts!r} is not a time", of.line(i))
                        continue
                user = r.username
                if user is not None:
                    named = True
                add_time(t)
                add_artist(artist)
                add_title(title)
                add_user(user if user.__class__ is str and user else None)
            if times:
                yield Plays(times, artists, titles, users if named else None)


@register
class SpotifyAccountReader(ListenReader):
    """Spotify Account Data ``StreamingHistory_music_*.json`` / ``StreamingHistory*.json``.

    ``endTime`` (UTC, to the minute), ``artistName``, ``trackName``,
    ``msPlayed``; plays under 30 s are left out.  The podcast files
    (``StreamingHistory_podcast_*``) hold no music and are not this format.
    """

    name = "spotify-account"
    description = "Spotify Account Data (privacy page, 'Account data')"

    def sniff(self, head: Head) -> bool:
        t = head.text
        return head.json_start == "[" and '"endTime"' in t and '"trackName"' in t

    def read(self, source: Source) -> Iterator[Record]:
        with source.open_text() as f:
            for line, obj in jsonstream.iter_array(f, source.name):
                if obj.__class__ is not dict:
                    yield Bad(NOT_OBJECT, line)
                    continue
                ms = obj.get("msPlayed")
                if not isinstance(ms, (int, float)):
                    yield Bad("msPlayed is not a number", line)
                    continue
                if ms < MIN_PLAY_MS:
                    yield SHORT
                    continue
                try:
                    t = parse_iso(str(obj.get("endTime", "")).strip())
                except ValueError as exc:
                    yield Bad(str(exc), line)
                    continue
                yield (None, t, obj.get("artistName"), obj.get("trackName"), None, line)


# --------------------------------------------------------------------------------------------
# Last.fm API pages


def _named(value: Any) -> tuple[str | None, str | None]:
    """``{"#text": ..., "mbid": ...}`` (or ``{"name": ...}`` with extended=1, or a string)."""
    if isinstance(value, dict):
        return _text(value.get("#text")) or _text(value.get("name")), _text(value.get("mbid"))
    return _text(value), None


@register
class LastfmJsonReader(ListenReader):
    """Last.fm ``user.getRecentTracks`` JSON: saved pages, ``.gz`` pages, or a flat track array.

    ``artist`` / ``album`` are ``{"#text": ..., "mbid": ...}`` objects (``name``
    with ``extended=1``), the time is ``date.uts``; the now-playing entry
    (``@attr.nowplaying``, no ``date``) is left out.  The listener is the
    page's ``@attr.user``.
    """

    name = "lastfm-json"
    description = "Last.fm API user.getRecentTracks JSON pages"
    now_playing = Skip("now playing (no time yet)")

    def sniff(self, head: Head) -> bool:
        t = head.text
        return bool(head.json_start) and (
            '"recenttracks"' in t or ('"#text"' in t and '"uts"' in t)
        )

    def _tracks(self, obj: Any, line: int, user: str | None) -> Iterator[Record]:
        if isinstance(obj, dict) and "recenttracks" in obj:
            page = obj["recenttracks"]
            if not isinstance(page, dict):
                yield Bad("recenttracks is not an object", line)
                return
            attr = page.get("@attr")
            page_user = _text(attr.get("user")) if isinstance(attr, dict) else None
            tracks = page.get("track", [])
            if isinstance(tracks, dict):  # a page of one track
                tracks = [tracks]
            for t in tracks if isinstance(tracks, list) else []:
                yield self._track(t, line, page_user or user)
            return
        yield self._track(obj, line, user)

    def _track(self, t: Any, line: int, user: str | None) -> Record:
        if not isinstance(t, dict):
            return Bad("a track must be a JSON object", line)
        attr = t.get("@attr")
        date = t.get("date")
        if (isinstance(attr, dict) and attr.get("nowplaying")) or date is None:
            return self.now_playing
        uts = date.get("uts") if isinstance(date, dict) else date
        try:
            when = parse_time(uts)
        except ValueError as exc:
            return Bad(str(exc), line)
        artist, _ = _named(t.get("artist"))
        return (user, when, artist, _text(t.get("name")), mbid_of(t.get("mbid")), line)

    def read(self, source: Source) -> Iterator[Record]:
        with source.open_text() as f:
            if source.head_text().lstrip().startswith("["):
                for line, obj in jsonstream.iter_array(f, source.name):
                    yield from self._tracks(obj, line, None)
            else:
                yield from self._tracks(jsonstream.load_document(f, source.name), 1, None)


# --------------------------------------------------------------------------------------------
# ListenBrainz


def listenbrainz_listen(obj: Any, line: int, user: str | None = None) -> Record:
    """A ListenBrainz listen object (export, dump or API) as a play."""
    if isinstance(obj, Bad):
        return obj
    if not isinstance(obj, dict):
        return Bad(f"a listen must be a JSON object, got {type(obj).__name__}", line)
    tm = obj.get("track_metadata")
    if not isinstance(tm, dict):
        return Bad("listen has no track_metadata object", line)
    if "listened_at" not in obj:
        return Bad("listen has no listened_at", line)
    try:
        t = parse_time(obj["listened_at"])
    except ValueError as exc:
        return Bad(str(exc), line)
    ai = tm.get("additional_info")
    mm = tm.get("mbid_mapping")
    mbid = (mbid_of(ai.get("recording_mbid")) if isinstance(ai, dict) else None) or (
        mbid_of(mm.get("recording_mbid")) if isinstance(mm, dict) else None
    )
    name = obj.get("user_name")
    name = name.strip() if isinstance(name, str) and name.strip() else user
    return (name, t, _text(tm.get("artist_name")), _text(tm.get("track_name")), mbid, line)


@register
class ListenBrainzApiReader(ListenReader):
    """A saved ListenBrainz API response (``/1/user/<name>/listens``): ``payload.listens``."""

    name = "listenbrainz-api"
    description = "ListenBrainz API response (payload.listens)"

    def sniff(self, head: Head) -> bool:
        return head.json_start == "{" and '"payload"' in head.text and '"listens"' in head.text

    def read(self, source: Source) -> Iterator[Record]:
        with source.open_text() as f:
            doc = jsonstream.load_document(f, source.name)
        pages = doc if isinstance(doc, list) else [doc]
        for page in pages:
            payload = page.get("payload") if isinstance(page, dict) else None
            listens = payload.get("listens") if isinstance(payload, dict) else None
            if not isinstance(listens, list):
                raise ListeningDataError(source.name, None, "no payload.listens array")
            user = _text(cast("dict[str, Any]", payload).get("user_id"))
            for obj in listens:
                yield listenbrainz_listen(obj, 1, user)


@register
class ListenBrainzReader(ListenReader):
    """ListenBrainz export (zip of ``listens/YYYY/M.jsonl``), dumps (JSON lines) or an array."""

    name = "listenbrainz"
    description = "ListenBrainz export zip, JSON lines dump or JSON array"

    def sniff(self, head: Head) -> bool:
        return '"track_metadata"' in head.text and '"payload"' not in head.text

    def read(self, source: Source) -> Iterator[Record]:
        with source.open_text() as f:
            for line, obj in jsonstream.iter_records(f, source.name):
                yield listenbrainz_listen(obj, line)


# --------------------------------------------------------------------------------------------
# Self-hosted scrobblers


def _first_artist(artists: Any) -> str | None:
    if isinstance(artists, list) and artists:
        a = artists[0]
        return _text(a.get("name")) if isinstance(a, dict) else _text(a)
    return _text(artists)


@register
class MalojaReader(ListenReader):
    """Maloja export (``maloja_export_*.json``): ``{"scrobbles": [...]}``.

    Each scrobble has ``time`` (unix) and ``track`` with ``artists`` (a list;
    the first is used) and ``title``; Maloja 2's flat scrobbles (``artists``,
    ``title``, ``time``) are read too.
    """

    name = "maloja"
    description = "Maloja export (maloja export / the web UI's backup)"

    def sniff(self, head: Head) -> bool:
        t = head.text
        return head.json_start == "{" and '"scrobbles"' in t and '"artists"' in t

    def read(self, source: Source) -> Iterator[Record]:
        with source.open_text() as f:
            for line, obj in jsonstream.iter_array_at(f, source.name, "scrobbles"):
                if not isinstance(obj, dict):
                    yield Bad(NOT_OBJECT, line)
                    continue
                track = cast(
                    "dict[str, Any]",
                    obj.get("track") if isinstance(obj.get("track"), dict) else obj,
                )
                try:
                    t = parse_time(obj.get("time"))
                except ValueError as exc:
                    yield Bad(str(exc), line)
                    continue
                yield (
                    None,
                    t,
                    _first_artist(track.get("artists")),
                    _text(track.get("title")),
                    None,
                    line,
                )


def _alias(named: Any) -> str | None:
    """Koito's name of a track, album or artist: its primary alias (else the first)."""
    aliases = named.get("aliases") if isinstance(named, dict) else None
    if not isinstance(aliases, list):
        return None
    names = [a for a in aliases if isinstance(a, dict) and _text(a.get("alias"))]
    primary = [a for a in names if a.get("is_primary") is True]
    return (primary or names)[0]["alias"] if names else None


_KOITO_USER = re.compile(r'"user"\s*:\s*"((?:[^"\\]|\\.)*)"')


@register
class KoitoReader(ListenReader):
    """Koito export (``koito_export.json``), as Koito's ``internal/export`` writes it.

    ``{"version": "1", "exported_at", "user", "listens": [...]}``; each listen
    has ``listened_at`` (RFC 3339, UTC), ``client``, ``track`` (``mbid``,
    ``duration``, ``aliases``), ``album`` and ``artists`` (``mbid``,
    ``is_primary``, ``aliases``).  Names are not fields of their own: a
    track's or artist's name is its primary alias (``aliases[].alias`` with
    ``is_primary``), as Koito's own importer reads it.  The artist is the
    primary artist (``is_primary``), else the first; the listener is ``user``.
    """

    name = "koito"
    description = "Koito export (Settings → Export, koito_export.json)"

    def sniff(self, head: Head) -> bool:
        t = head.text
        return (
            head.json_start == "{"
            and '"listens"' in t
            and '"listened_at"' in t
            and '"track_metadata"' not in t
            and '"payload"' not in t
        )

    def read(self, source: Source) -> Iterator[Record]:
        m = _KOITO_USER.search(source.head_text().split('"listens"', 1)[0])
        user = None
        if m:
            try:
                user = json.loads(f'"{m.group(1)}"').strip() or None
            except json.JSONDecodeError:
                user = None
        with source.open_text() as f:
            for line, obj in jsonstream.iter_array_at(f, source.name, "listens"):
                if not isinstance(obj, dict):
                    yield Bad(NOT_OBJECT, line)
                    continue
                track = obj.get("track")
                track = track if isinstance(track, dict) else {}
                artists = obj.get("artists")
                artist = None
                if isinstance(artists, list):
                    named = [a for a in artists if isinstance(a, dict) and _alias(a)]
                    primary = [a for a in named if a.get("is_primary") is True]
                    artist = _alias((primary or named)[0]) if named else None
                try:
                    t = parse_time(obj.get("listened_at"))
                except ValueError as exc:
                    yield Bad(str(exc), line)
                    continue
                yield (user, t, artist, _alias(track), mbid_of(track.get("mbid")), line)


@register
class PanoScrobblerReader(ListenReader):
    """Pano Scrobbler's scrobble log (Settings → *Scrobble to a file*: JSONL or CSV).

    Each entry, as Pano Scrobbler's ``FileScrobblable`` writes it:
    ``timeHuman`` (a local, human date: not read), ``timeMs`` (unix
    milliseconds), ``artist``, ``track``, ``album``, ``albumArtist``,
    ``durationMs``, ``mediaPlayerPackage``/``Name``/``Version`` and
    ``event`` — ``scrobble``, ``love`` or ``unlove``; only scrobbles are
    plays.  The CSV file has the same columns, under a header.
    """

    name = "pano-scrobbler"
    description = "Pano Scrobbler scrobble log (JSONL or CSV file)"

    def sniff(self, head: Head) -> bool:
        t = head.text
        if head.json_start == "{":
            return '"timeMs"' in t and '"track"' in t
        lines = head.data_lines
        return bool(lines) and lines[0].startswith(_PANO_CSV_START)

    def read(self, source: Source) -> Iterator[Record]:
        if source.head_text().lstrip().startswith("{"):
            yield from self._read_jsonl(source)
        else:
            yield from self._read_csv(source)

    def _read_jsonl(self, source: Source) -> Iterator[Record]:
        with source.open_text() as f:
            for line, obj in jsonstream.iter_lines(f):
                if isinstance(obj, Bad):
                    yield obj
                    continue
                if not isinstance(obj, dict):
                    yield Bad(NOT_OBJECT, line)
                    continue
                yield self._entry(
                    obj.get("event"), obj.get("timeMs"), obj.get("artist"), obj.get("track"), line
                )

    def _read_csv(self, source: Source) -> Iterator[Record]:
        with source.open_text() as f:
            reader = csv.reader(f)
            cols: dict[str, int] | None = None
            width, c_event = 3, None
            try:
                for row in reader:
                    if not row or not any(c.strip() for c in row):
                        continue
                    if cols is None:
                        cols = {c.strip(): i for i, c in enumerate(row)}
                        missing = [c for c in ("timeMs", "artist", "track") if c not in cols]
                        if missing:
                            raise ListeningDataError(
                                source.name,
                                reader.line_num,
                                f"header has no column for {', '.join(missing)}",
                            )
                        width = max(cols["timeMs"], cols["artist"], cols["track"]) + 1
                        c_event = cols.get("event")
                        continue
                    if len(row) < width:
                        yield Bad(
                            f"expected at least {width} columns, got {len(row)}", reader.line_num
                        )
                        continue
                    event = row[c_event] if c_event is not None and c_event < len(row) else None
                    ms = row[cols["timeMs"]].strip()
                    yield self._entry(
                        event or None,
                        int(ms) if ms.isdigit() else ms,
                        row[cols["artist"]],
                        row[cols["track"]],
                        reader.line_num,
                    )
            except csv.Error as exc:
                yield Bad(f"bad CSV: {exc}", reader.line_num)

    _other = Skip("not a scrobble (love, unlove)")

    def _entry(self, event: Any, ms: Any, artist: Any, track: Any, line: int) -> Record:
        if event is not None and str(event).lower() != "scrobble":
            return self._other
        if ms.__class__ is not int:
            return Bad(f"timeMs {ms!r} is not unix milliseconds", line)
        return (None, ms / 1000.0, _text(artist), _text(track), None, line)


_PANO_CSV_START = "timeHuman,timeMs,artist,track"
