"""``read_listens``: every path through the right reader into one :class:`Listens`."""

from __future__ import annotations

import json
import lzma
import os
import re
import textwrap
import zipfile
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import repeat
from pathlib import Path

from deepsim.errors import ListeningDataError, ParameterError
from deepsim.listening import jsonformats, text  # noqa: F401  (registers the readers)
from deepsim.listening.base import READERS, Count, Head, ListenReader, Plays, Record, Skip
from deepsim.listening.core import Bad, Builder, Listens, TrackKey, mbid_of
from deepsim.listening.sources import Source, iter_sources
from deepsim.util import check_choice, check_float, get_logger, worker_context, worker_started

log = get_logger(__name__)

SNIFF_ORDER = (
    "scrobbler-log",
    "spotify-extended",
    "spotify-account",
    "lastfm-json",
    "listenbrainz-api",
    "maloja",
    "koito",
    "pano-scrobbler",
    "listenbrainz",
    "taste-profile",
    "lastfm-1k",
    "lastfm-tsv",
    "librefm",
    "tidal",
    "lastfm-backup",
    "lastfm-csv",
)
FORMATS = tuple(sorted(READERS))
"""Names accepted by ``read_listens(format=...)`` besides ``"auto"``."""
assert set(SNIFF_ORDER) == set(READERS)

EARLY_RECORDS = 1000


def _shorten(s: str, width: int = 100) -> str:
    """``s`` on one line, cut at a word boundary with an ellipsis."""
    return textwrap.shorten(" ".join(s.split()), width=width, placeholder=" …")


class BadRecords:
    """Counts malformed records of one source given by the user (a file, folder or zip)."""

    def __init__(self, name: str, max_bad_fraction: float) -> None:
        self.name = name
        self.max_bad_fraction = max_bad_fraction
        self.good = 0
        self.bad = 0
        self.first: tuple[str, int | None, str] | None = None

    def record(self, where: str, line: int | None, reason: str) -> None:
        self.bad += 1
        if self.first is None:
            self.first = (where, line, reason)
        if self.max_bad_fraction == 0:
            raise ListeningDataError(where, line, reason)
        if self.bad <= 3:
            at = f"line {line}" if line is not None else "a record"
            log.warning("%s: skipping %s: %s", where, at, reason)
        total = self.good + self.bad
        if total >= EARLY_RECORDS and self.bad > total / 2:
            self.fail()

    def finish(self) -> int:
        total = self.good + self.bad
        if self.bad and self.bad > self.max_bad_fraction * total:
            self.fail()
        if self.bad:
            log.warning("%s: skipped %d malformed records of %d", self.name, self.bad, total)
        return self.bad

    def fail(self) -> None:
        assert self.first is not None
        where, line, reason = self.first
        total = self.good + self.bad
        raise ListeningDataError(
            where,
            line,
            f"{reason} ({self.bad} of {total} records read are malformed; at most "
            f"{self.max_bad_fraction:.1%} are skipped)",
        )


def _describe(head: Head) -> str:
    """What an unrecognised file looks like, in a few words."""
    s = head.text.lstrip()
    if not s:
        return "it is empty"
    if s[0] in "[{":
        try:
            doc = json.loads(s)
        except json.JSONDecodeError:
            doc = None
        keys = None
        if isinstance(doc, dict):
            keys, what = list(doc), "a JSON object"
        elif isinstance(doc, list):
            first = doc[0] if doc else None
            if isinstance(first, dict):
                keys, what = list(first), "a JSON array of objects"
            else:
                return f"it is a JSON array of {type(first).__name__ if doc else 'nothing'}"
        else:  # too long to parse here: the first keys as text
            keys = re.findall(r'"([^"\\]{1,60})"\s*:', s[:4000])[:8]
            what = "a JSON array of objects" if s[0] == "[" else "a JSON object"
        shown = ", ".join(dict.fromkeys(keys))
        return _shorten(f"it is {what} with keys {shown}" if keys else f"it is {what}", 160)
    lines = head.lines
    return "its first line is " + repr(_shorten(lines[0], 80)) if lines else "it is blank"


def sniff(source: Source) -> ListenReader | None:
    """The reader of a file; a ``.csv`` file given by itself falls back to ``lastfm-csv``
    (whose messages then say what its columns lack)."""
    head = Head(source.basename, source.head_text())
    for name in SNIFF_ORDER:
        if READERS[name].sniff(head):
            return READERS[name]
    if not source.in_container and source.basename.lower().endswith(".csv") and head.lines:
        return READERS["lastfm-csv"]
    return None


def _unknown(source: Source) -> ListeningDataError:
    head = Head(source.basename, source.head_text())
    json_like = head.json_start != ""
    tried = [n for n in SNIFF_ORDER if json_like == (n in _JSON_FORMATS)]
    return ListeningDataError(
        source.name,
        None,
        f"cannot tell the format of this file ({_describe(head)}); tried "
        f"{', '.join(tried)}; give one with format= / --listens-format",
    )


_JSON_FORMATS = frozenset(
    {
        "spotify-extended",
        "spotify-account",
        "lastfm-json",
        "listenbrainz-api",
        "maloja",
        "koito",
        "pano-scrobbler",
        "listenbrainz",
    }
)


def sniff_format(path: str | os.PathLike[str]) -> str:
    """The format of a listening file, zip or folder (its first listening file).

    Raises
    ------
    ListeningDataError
        When the file cannot be read or its format cannot be told.
    """
    first: Source | None = None
    for source in iter_sources(path):
        first = first or source
        try:
            reader = sniff(source)
        except (OSError, EOFError, lzma.LZMAError, zipfile.BadZipFile) as exc:
            raise ListeningDataError(source.name, None, f"cannot read: {exc}") from exc
        if reader is not None:
            return reader.name
        if not source.in_container:
            if not source.head_text().strip():
                raise ListeningDataError(source.name, None, "no listens")
            raise _unknown(source)
    raise ListeningDataError(path, None, "no listening files in it")


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
        Files, folders (read recursively) and zip exports, one or several.
        ``.gz``, ``.bz2`` and ``.xz`` files are decompressed on the fly.
        Inside folders and zips, hidden files, ``__MACOSX``, companion files
        (read-me, PDF, ``user.json``, ``feedback.jsonl``...) and files in no
        known format are ignored (logged); a file given by itself must be
        in a known format.
    format
        ``"auto"`` (each file by its content and name) or one of :data:`FORMATS`:
        files given by themselves are then read in that format, files inside
        a folder or zip only when they look like it (others are ignored).
    song_table
        Taste Profile only: a file naming the MSD songs (``unique_tracks.txt``
        layout, or ``song_id <TAB> artist <TAB> title [<TAB> MBID]``), or a
        mapping ``song_id -> (artist, title[, mbid])``.
    session_gap
        Seconds of silence that end a listening session.
    min_user_plays
        Rows (users or sessions) with fewer plays are dropped.
    max_bad_fraction
        Fraction of malformed records per given path that is skipped (and
        counted) rather than fatal; ``0`` makes any malformed record fatal.

    Raises
    ------
    ListeningDataError
        Unreadable, empty or malformed data (naming the file and line where it can).
    ParameterError
        Bad parameter.
    """
    if format != "auto":
        check_choice("format", format, ("auto", *FORMATS))
    session_gap = check_float("session_gap", session_gap, low=0, low_open=True)
    min_user_plays = check_float("min_user_plays", min_user_plays, low=0, low_open=True)
    max_bad_fraction = check_float(
        "max_bad_fraction", max_bad_fraction, low=0, high=1, high_open=True
    )
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise ParameterError(f"no listening files given (paths={paths!r})")
    b = Builder()
    taste = False
    for path in paths:
        taste = _read_path(b, path, format, max_bad_fraction) or taste
    if song_table is not None:
        if not taste:
            raise ParameterError("song_table only applies to the taste-profile format")
        _apply_song_table(b, song_table, max_bad_fraction)
    listens = b.build(session_gap=session_gap, min_user_plays=min_user_plays)
    if listens.duplicates:
        log.info("counted %d exact duplicate plays once", listens.duplicates)
    return listens


def _read_path(
    b: Builder, path: str | os.PathLike[str], format: str, max_bad_fraction: float
) -> bool:
    """Read one given path; returns whether it held Taste Profile counts."""
    bad = BadRecords(os.fspath(path), max_bad_fraction)
    skips: Counter[str] = Counter()
    ignored: list[str] = []
    taste = False
    forced = READERS[format] if format != "auto" else None
    n_before = b.n_plays + len(b.rows)
    try:
        for source, reader, records in _with_records(_sniffed(path, forced)):
            if reader is None:
                if source.in_container:
                    ignored.append(source.name)
                    log.info(
                        "%s: ignored (%s)",
                        source.name,
                        _describe(Head(source.basename, source.head_text())),
                    )
                    continue
                if not source.head_text().strip():
                    raise ListeningDataError(source.name, None, "no listens")
                raise _unknown(source)
            taste = taste or reader.name == "taste-profile"
            _read_source(b, source, reader, bad, skips, records)
    except FileNotFoundError as exc:
        raise ListeningDataError(path, None, "no such file") from exc
    except (OSError, EOFError, lzma.LZMAError, zipfile.BadZipFile) as exc:
        raise ListeningDataError(path, None, f"cannot read: {exc}") from exc
    b.skipped += bad.finish()
    if skips:
        log.info(
            "%s: left out %s",
            os.fspath(path),
            ", ".join(f"{n} {reason}" for reason, n in skips.most_common()),
        )
    if b.n_plays + len(b.rows) == n_before:
        why = (
            f" (ignored: {', '.join(os.path.basename(i) for i in ignored[:5])})" if ignored else ""
        )
        raise ListeningDataError(path, None, f"no listens{why}")
    return taste


def _sniffed(
    path: str | os.PathLike[str], forced: ListenReader | None
) -> Iterator[tuple[Source, ListenReader | None]]:
    """The files of ``path`` with the reader of each (``None``: in no format read here)."""
    for source in iter_sources(path):
        if forced is None:
            reader = sniff(source)
        elif source.in_container and not forced.sniff(Head(source.basename, source.head_text())):
            reader = None  # inside a folder or zip, a forced format reads only its own files
        else:
            reader = forced
        yield source, reader


#: Files read whole (:attr:`ListenReader.whole_files`) that make worker processes worth
#: starting (about 0.3 s each): fewer are read here.
PARALLEL_MIN_FILES = 4


def _with_records(
    sniffed: Iterable[tuple[Source, ListenReader | None]],
) -> Iterator[tuple[Source, ListenReader | None, list[Record] | None]]:
    """Each file with its reader and, for files read whole by worker processes, their
    records (``None``: read here, as they stream).

    With several :attr:`~ListenReader.whole_files` files and two usable cores or more,
    worker processes read up to one file more than there are workers ahead of the
    caller, in order; the caller adds one file's records to the builder while the
    workers read the next ones.  Everything that logs (sniffing, encodings) happens
    here, before a file is handed on.
    """
    import multiprocessing

    from deepsim.threads import usable_cores

    planned = list(sniffed)
    whole = [k for k, (_, r) in enumerate(planned) if r is not None and r.whole_files]
    workers = min(usable_cores(), len(whole))
    daemon = multiprocessing.current_process().daemon  # (a pool's worker) may start no process
    if len(whole) < PARALLEL_MIN_FILES or workers < 2 or daemon:
        for source, reader in planned:
            yield source, reader, None
        return
    for k in whole:
        planned[k][0].encoding  # noqa: B018  (detected, and warned about, here)
    from concurrent.futures import Future, ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    pool = ProcessPoolExecutor(
        max_workers=workers, mp_context=worker_context(__name__), initializer=worker_started
    )
    futures: dict[int, Future[list[Record]]] = {}
    queue = iter(whole)

    def submit_next() -> None:
        k = next(queue, None)
        if k is not None:
            source, reader = planned[k]
            assert reader is not None
            futures[k] = pool.submit(_records_of, source, reader.name)

    try:
        for _ in range(workers + 1):
            submit_next()
        for k, (source, reader) in enumerate(planned):
            if k not in futures:
                yield source, reader, None
                continue
            try:
                records: list[Record] | None = futures.pop(k).result()
            except BrokenProcessPool:  # a worker died (killed): this file is read here
                log.warning("%s: the reading process stopped; reading it here", source.name)
                records = None
            submit_next()
            yield source, reader, records
    finally:
        for future in futures.values():
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _records_of(source: Source, name: str) -> list[Record]:
    """A worker process's job: every record of one file."""
    return list(READERS[name].read(source))


def _read_source(
    b: Builder,
    source: Source,
    reader: ListenReader,
    bad: BadRecords,
    skips: Counter[str],
    records: list[Record] | None = None,
) -> None:
    """The hot loop: one reader's records (read here, or ``records``) into the builder."""
    name = source.name
    default = b.user(source.default_user)
    user_of = b.user_index.get
    add_user = b.user
    cache = b.raw_tracks
    get_track = cache.get
    track_of = b.track_of
    p_user = b.play_user.append
    p_track = b.play_track.append
    p_time = b.play_time.append
    good = 0
    u: int | None  # the user's index (a new user is added)
    for rec in reader.read(source) if records is None else records:
        if rec.__class__ is tuple:
            user, t, artist, title, mbid, line = rec
            key = (artist, title, mbid)
            j = get_track(key)
            if j is None:
                try:
                    j = track_of(artist, title, mbid)
                except Bad as exc:
                    bad.good += good
                    good = 0
                    bad.record(name, line, exc.reason)
                    continue
                cache[key] = j
            if user is None:
                u = default
            else:
                u = user_of(user)
                if u is None:
                    u = add_user(user)
            p_user(u)
            p_track(j)
            p_time(t)
            good += 1
        elif rec.__class__ is Plays:
            good += _add_plays(b, rec, default)
        elif rec.__class__ is Skip:
            skips[rec.reason] += 1
        elif isinstance(rec, Bad):
            bad.good += good
            good = 0
            bad.record(name, rec.line, rec.reason)
        elif isinstance(rec, Count):
            b.add_count(rec.user, b.track(rec.key), rec.count)
            good += 1
    bad.good += good


def _add_plays(b: Builder, plays: Plays, default: int) -> int:
    """A reader's batch of plays into the builder, column by column: no Python step per
    play but for songs seen for the first time and plays naming their listener.  Returns
    how many plays."""
    n = len(plays.times)
    cache = b.raw_tracks
    keys = list(zip(plays.artists, plays.titles, repeat(None, n), strict=True))
    js = list(map(cache.get, keys))
    if None in js:  # songs new to the builder
        track_of = b.track_of
        new = set(keys).difference(cache)
        for key in filter(new.__contains__, keys):  # in order of first play, as one by one
            if key not in cache:  # names are non-blank strings: a track, never Bad
                cache[key] = track_of(key[0], key[1], None)
        js = list(map(cache.get, keys))
    if plays.users is None:
        b.play_user.extend(array("i", (default,)) * n)
    else:
        user = b.user
        b.play_user.extend(default if u is None else user(u) for u in plays.users)
    b.play_track.extend(js)  # type: ignore[arg-type]  # every key is in the cache now
    b.play_time.extend(plays.times)
    return n


def _apply_song_table(
    b: Builder,
    table: str | os.PathLike[str] | Mapping[str, Sequence[str | None]],
    max_bad_fraction: float,
) -> None:
    def update(song: str, artist: str | None, title: str | None, mbid: str | None) -> None:
        j = b.track_index.get(song)
        if j is None:
            return
        old = b.tracks[j]
        if old.artist is None and old.title is None:
            b.tracks[j] = TrackKey(song, artist or None, title or None, mbid_of(mbid), None)

    if isinstance(table, Mapping):
        for song, fields in table.items():
            fields = [*fields, None, None, None]
            update(song, fields[0], fields[1], fields[2])
        return
    path = Path(table)
    bad = BadRecords(str(path), max_bad_fraction)
    try:
        sources = list(iter_sources(path))
        for source in sources:
            with source.open_text() as f:
                for lineno, raw in enumerate(f, 1):
                    line = raw.rstrip("\r\n")
                    if not line.strip():
                        continue
                    if "<SEP>" in line:
                        parts = line.split("<SEP>")
                        if len(parts) != 4:
                            bad.record(
                                source.name,
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
                                source.name,
                                lineno,
                                "expected song_id, artist, title[, MBID] separated "
                                f"by tabs, got {len(parts)} fields",
                            )
                            continue
                        mbid = parts[3] if len(parts) == 4 else None
                        update(parts[0].strip(), parts[1].strip(), parts[2].strip(), mbid)
                    bad.good += 1
    except OSError as exc:
        raise ListeningDataError(path, None, f"cannot read: {exc}") from exc
    if bad.good == 0 and bad.bad == 0:
        raise ListeningDataError(path, None, "song table is empty")
    b.skipped += bad.finish()
