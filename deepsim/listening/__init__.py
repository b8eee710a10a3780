"""Listening data: streaming readers that turn listening histories into counts.

Every format has one reader behind one interface
(:class:`~deepsim.listening.base.ListenReader`: ``sniff(head)`` and
``read(source)``), registered in :data:`READERS`; :func:`read_listens` finds
each file's reader (or takes the one named by ``format=``), streams its
records into a :class:`~deepsim.listening.core.Builder` (12 bytes a play) and
returns a :class:`Listens`: a sparse ``users × tracks`` matrix of play counts,
its row names (users, or listening sessions as pseudo-users
``"<user>@<session start>"``) and its column keys (:class:`TrackKey`).

Formats (``format=`` / ``beet deepsim-train --listens-format``):

=====================  ==========================================================
``spotify-extended``   Spotify Extended Streaming History (``Streaming_History_Audio_*.json``,
                       ``endsong_*.json``, the folder or ``my_spotify_data.zip``)
``spotify-account``    Spotify Account Data (``StreamingHistory_music_*.json``)
``lastfm-csv``         Last.fm CSV exports (lastfm-to-csv ``artist,album,track,date``, or a header)
``lastfm-tsv``         lastexport.py / lastscrape TSV (uts, track, artist, album, MBIDs)
``lastfm-json``        Last.fm ``user.getRecentTracks`` JSON pages (also ``.gz``, or a flat array)
``lastfm-backup``      lastfm-backup-cli CSV (``date,time,artist,title``)
``lastfm-1k``          the Last.fm-1K data set
``librefm``            Libre.fm CSV export (comment lines, then ``Artist,Track,Album,Time``)
``listenbrainz``       ListenBrainz export zip / JSON lines dumps / a JSON array
``listenbrainz-api``   a saved ListenBrainz API response (``payload.listens``)
``maloja``             Maloja export JSON
``koito``              Koito export JSON (``koito_export.json``)
``pano-scrobbler``     Pano Scrobbler's file scrobble log (JSONL or CSV)
``scrobbler-log``      Rockbox / Audioscrobbler ``.scrobbler.log``
``tidal``              TIDAL data export ``streaming.csv``
``taste-profile``      MSD Echo Nest Taste Profile triplets (with ``song_table=``)
=====================  ==========================================================

docs/training.md says, for each, where people get it, what is read and what
is left out.  Exact duplicate plays (same listener, track and second) are
counted once, across files too; sessions are cut after sorting, so files
need not be in time order.

Track keys: a MusicBrainz recording id when the data has one (lower-cased),
the MSD song id for the Taste Profile, otherwise ``"artist\\x1ftitle"`` with
both parts case-folded and whitespace-collapsed.
"""

from __future__ import annotations

from deepsim.listening.base import READERS, Count, Head, ListenReader, Plays, Skip, register
from deepsim.listening.core import KEY_SEP, Listens, TrackKey, parse_time
from deepsim.listening.library import (
    LAST_PLAYED_FIELD,
    PLAY_COUNT_FIELDS,
    PLAYLIST_SUFFIXES,
    read_library,
    read_playlist,
)
from deepsim.listening.read import FORMATS, read_listens, sniff_format

__all__ = [
    "FORMATS",
    "KEY_SEP",
    "LAST_PLAYED_FIELD",
    "PLAYLIST_SUFFIXES",
    "PLAY_COUNT_FIELDS",
    "READERS",
    "Count",
    "Head",
    "ListenReader",
    "Listens",
    "Plays",
    "Skip",
    "TrackKey",
    "parse_time",
    "read_library",
    "read_listens",
    "read_playlist",
    "register",
    "sniff_format",
]
