"""The beets library as listening data: play counts, last-played times, playlists."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes, urlparse

from deepsim import store
from deepsim.errors import ListeningDataError
from deepsim.listening.core import Builder, Listens, TrackKey, mbid_of
from deepsim.util import check_float, get_logger

if TYPE_CHECKING:
    from beets.library import Library

log = get_logger(__name__)

PLAY_COUNT_FIELDS = ("play_count", "lastfm_play_count", "listenbrainz_play_count")
"""Flexible attributes holding play counts: mpdstats, lastimport, listenbrainz."""

LAST_PLAYED_FIELD = "last_played"
"""Flexible attribute (mpdstats) holding the unix time of an item's last play."""

PLAYLIST_SUFFIXES = (".m3u", ".m3u8")


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
    session_gap = check_float("session_gap", session_gap, low=0, low_open=True)
    min_user_plays = check_float("min_user_plays", min_user_plays, low=0, low_open=True)
    rows = store.read_listening_fields(lib, (*PLAY_COUNT_FIELDS, LAST_PLAYED_FIELD))
    libdir = lib.directory if isinstance(lib.directory, bytes) else os.fsencode(lib.directory)
    meta: dict[int, TrackKey] = {}
    by_path: dict[bytes, int] = {}
    plays: dict[int, float] = {}
    last_played: list[tuple[float, int]] = []
    for item_id, artist, title, mb_trackid, path, key, value in rows:
        item_id = int(item_id)
        if item_id not in meta:
            meta[item_id] = TrackKey(
                f"item:{item_id}", artist or None, title or None, mbid_of(mb_trackid), item_id
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

    b = Builder()
    cols = {item_id: b.track(k.key, k.artist, k.title, k.mbid) for item_id, k in meta.items()}
    b.tracks = [meta[item_id] for item_id in cols]  # keep item_id on the keys
    for item_id, v in plays.items():
        b.add_count("library:plays", cols[item_id], v)
    lp_user = b.user("library:last_played")
    for t, item_id in sorted(last_played):
        b.play_user.append(lp_user)
        b.play_track.append(cols[item_id])
        b.play_time.append(t)
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
    return b.build(session_gap=session_gap, min_user_plays=min_user_plays)
