"""JSON formats: Spotify (Extended Streaming History, Account Data), Last.fm
``user.getRecentTracks``, ListenBrainz (export and API), Maloja, Koito, Pano Scrobbler."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

from deepsim.errors import ListeningDataError
from deepsim.listening import jsonstream
from deepsim.listening.base import Head, ListenReader, Record, Skip, register
from deepsim.listening.core import Bad, mbid_of, parse_iso, parse_time
from deepsim.listening.sources import Source

MIN_PLAY_MS = 30_000
"""A stream counts as a listen from 30 s on (Spotify's and Last.fm's own rule)."""

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
        "master_metadata_track_name",
        "master_metadata_album_artist_name",
        "episode_name",
        "spotify_episode_uri",
        "audiobook_title",
        "audiobook_uri",
        "reason_end",
        "incognito_mode",
        "username",
    ),
)
"""The fields of a Spotify Extended Streaming History row the reader looks at."""

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
        rows = _SPOTIFY_ROWS.read(source)
        for i, r in rows:
            if r is None:
                yield Bad(NOT_OBJECT, rows.line(i))
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
                yield Bad("ms_played is not a number", rows.line(i))
                continue
            if ms < MIN_PLAY_MS and r.reason_end != "trackdone":
                yield SHORT
                continue
            if (
                title.__class__ is not str
                or artist.__class__ is not str
                or not title.strip()
                or not artist.strip()
            ):
                yield Bad("no track name and artist (and no recording MBID)", rows.line(i))
                continue
            ts = r.ts
            if ts.__class__ is datetime:  # decoded by msgspec
                t = (ts if ts.tzinfo is not None else ts.replace(tzinfo=timezone.utc)).timestamp()
            else:
                try:
                    t = parse_iso(ts) if ts.__class__ is str else parse_time(ts)
                except (ValueError, AttributeError):
                    yield Bad(f"ts {ts!r} is not a time", rows.line(i))
                    continue
            user = r.username
            # the names were checked above: no line is needed for a message about them
            yield (user if user.__class__ is str and user else None, t, artist, title, None, None)


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
            user = _text(payload.get("user_id"))
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
                track = obj.get("track") if isinstance(obj.get("track"), dict) else obj
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


@register
class KoitoReader(ListenReader):
    """Koito export: ``{"listens": [{"listened_at", "track": {...}, "artists": [...]}]}``.

    The track's ``title`` and ``mbid``, the primary (else first) artist's
    ``name``; ``listened_at`` as ISO 8601 or unix seconds.
    """

    name = "koito"
    description = "Koito export (Settings → Export)"

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
        with source.open_text() as f:
            for line, obj in jsonstream.iter_array_at(f, source.name, "listens"):
                if not isinstance(obj, dict):
                    yield Bad(NOT_OBJECT, line)
                    continue
                track = obj.get("track")
                track = track if isinstance(track, dict) else {}
                artists = obj.get("artists") or track.get("artists")
                artist = None
                if isinstance(artists, list):
                    primary = [a for a in artists if isinstance(a, dict) and a.get("is_primary")]
                    artist = _first_artist(primary or artists)
                try:
                    t = parse_time(obj.get("listened_at"))
                except ValueError as exc:
                    yield Bad(str(exc), line)
                    continue
                title = _text(track.get("title")) or _text(track.get("name"))
                yield (None, t, artist, title, mbid_of(track.get("mbid")), line)


@register
class PanoScrobblerReader(ListenReader):
    """Pano Scrobbler's scrobble log (``Scrobble to file``, JSON lines).

    One object a line with ``timeMs`` (unix milliseconds), ``artist``,
    ``track``, ``album``; lines whose ``event`` is not a scrobble (love,
    now playing...) are left out.
    """

    name = "pano-scrobbler"
    description = "Pano Scrobbler JSONL scrobble log"

    def sniff(self, head: Head) -> bool:
        t = head.text
        return head.json_start == "{" and '"timeMs"' in t and '"track"' in t

    def read(self, source: Source) -> Iterator[Record]:
        other = Skip("not a scrobble (love, now playing...)")
        with source.open_text() as f:
            for line, obj in jsonstream.iter_lines(f):
                if isinstance(obj, Bad):
                    yield obj
                    continue
                if not isinstance(obj, dict):
                    yield Bad(NOT_OBJECT, line)
                    continue
                event = obj.get("event")
                if event is not None and str(event).lower() not in ("scrobble", "scrobbled"):
                    yield other
                    continue
                try:
                    t = parse_time(obj.get("timeMs", obj.get("timestamp")))
                except ValueError as exc:
                    yield Bad(str(exc), line)
                    continue
                yield (None, t, _text(obj.get("artist")), _text(obj.get("track")), None, line)
