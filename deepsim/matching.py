"""Matching listening-data tracks to beets library items.

A :class:`~deepsim.listening.TrackKey` is matched, in this order:

1. directly, when it already carries a library ``item_id`` (that still exists);
2. by MusicBrainz recording id, against the items' ``mb_trackid``;
3. by normalised artist and title (:func:`normalise_artist`,
   :func:`normalise_title`).

When several items share an MBID or a normalised artist + title (the same
recording on an album and a compilation), the lowest item id wins, so a song's
plays are never split.  The library is read with one SQL query
(:func:`library_keys`).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from deepsim import store
from deepsim.errors import ParameterError
from deepsim.listening import KEY_SEP, Listens, TrackKey

if TYPE_CHECKING:
    from beets.library import Library

_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

# "feat. X", "ft. X", "featuring X" up to the end (or a closing bracket).
_FEAT_RE = re.compile(
    r"\s*[\(\[]\s*(?:feat\.?|ft\.?|featuring|with)\s[^\)\]]*[\)\]]"
    r"|\s+(?:feat\.?|ft\.?|featuring)\s.*$",
    re.IGNORECASE,
)
# Words that mark a bracketed or dashed suffix as a version note, not part of the title.
_VERSION_RE = re.compile(
    r"\b(?:remaster(?:ed)?|live|radio edit|single edit|edit|version|mono|stereo|explicit|clean"
    r"|bonus track|deluxe(?: edition)?|anniversary edition|feat\.?|ft\.?|featuring)\b",
    re.IGNORECASE,
)
# ...unless they also name a different recording.
_KEEP_RE = re.compile(
    r"\b(?:remix|mix|acoustic|instrumental|demo|a ?cappella|karaoke|cover|dub|reprise|unplugged)\b",
    re.IGNORECASE,
)
_BRACKET_RE = re.compile(r"\s*[\(\[]([^\(\)\[\]]*)[\)\]]\s*$")
_DASH_RE = re.compile(r"\s+[-\u2013\u2014]\s+([^-\u2013\u2014]+)$")
_AMP_RE = re.compile(r"\s*(?:&|\s\+\s)\s*")
_APOS_RE = re.compile(r"['\u2019\u2018`\.]")
_NONWORD_RE = re.compile(r"[\W_]+")
_THE_RE = re.compile(r"^the\s+|,\s*the$")


# A title of plain words the rules below leave as they are, only case-folded.
_PLAIN_RE = re.compile(r"[A-Za-z0-9]+(?: [A-Za-z0-9]+)*")
_FEAT_WORD_RE = re.compile(r"\b(?:feat|ft|featuring)\b", re.IGNORECASE)


def _fold(s: str) -> str:
    """NFKD, drop combining marks, case-fold."""
    if s.isascii():  # NFKD leaves ASCII as it is and it has no combining marks
        return s.casefold()
    s = unicodedata.normalize("NFKD", s)
    s = "".join(c for c in s if not unicodedata.combining(c))
    return s.casefold()


def _words(s: str) -> str:
    s = _AMP_RE.sub(" and ", s)
    s = _APOS_RE.sub("", s)
    s = _NONWORD_RE.sub(" ", s)
    return " ".join(s.split())


def _strip_version(s: str) -> str:
    """Remove trailing "(Live)", "[Radio Edit]", " - Remastered 2011"... repeatedly."""
    while True:
        m = _BRACKET_RE.search(s) or _DASH_RE.search(s)
        if not m:
            return s
        note = m.group(1)
        if not _VERSION_RE.search(note) or _KEEP_RE.search(note):
            return s
        s = s[: m.start()].rstrip()


def normalise_artist(s: str | None) -> str:
    """Artist name reduced for matching.

    Case-folded, accents removed (NFKD), "feat./ft./featuring …" dropped,
    "&" and " + " read as "and", a leading "The " (or trailing ", The")
    dropped, apostrophes and dots removed, other punctuation turned into
    spaces.  ``"The Beatles"`` → ``"beatles"``, ``"Beyoncé feat. Jay-Z"`` →
    ``"beyonce"``, ``"Simon & Garfunkel"`` → ``"simon and garfunkel"``.
    """
    if not s:
        return ""
    raw = _fold(s).strip()
    s = _FEAT_RE.sub("", raw)
    s = _THE_RE.sub("", s.strip())
    # A name made only of punctuation ("!!!") is kept as it is.
    return _words(s) or _words(raw) or raw


def normalise_title(s: str | None) -> str:
    """Track title reduced for matching.

    Like :func:`normalise_artist` (without the "The" rule), and version notes
    at the end are dropped: ``"(Live)"``, ``"(Remaster)"``, ``"[Radio Edit]"``,
    ``" - Remastered 2011"``, ``" - 2009 Remaster"``, ``"(Album Version)"``,
    ``"(feat. X)"``.  Notes naming a different recording (remix, acoustic,
    instrumental, demo…) are kept.
    """
    if not s:
        return ""
    if _PLAIN_RE.fullmatch(s) and not _FEAT_WORD_RE.search(s):
        return s.casefold()  # the common case, without the rules' eight regular expressions
    raw = _fold(s).strip()
    s = _FEAT_RE.sub("", raw)
    s = _strip_version(s)
    return _words(s) or _words(raw) or raw


@dataclass(frozen=True)
class LibraryKeys:
    """What matching needs of the library, from one SQL query.

    Parameters
    ----------
    item_ids
        All item ids, ascending (int64).
    artists, titles, mbids
        Per item, as stored (``mbids`` lower-cased; ``""`` when missing).
    by_mbid
        Recording MBID → lowest item id carrying it.
    by_name
        (normalised artist, normalised title) → lowest item id.
    """

    item_ids: np.ndarray
    artists: list[str]
    titles: list[str]
    mbids: list[str]
    by_mbid: dict[str, int]
    by_name: dict[tuple[str, str], int]


def library_keys(lib: Library) -> LibraryKeys:
    """Read (id, artist, title, mb_trackid) of every item (one query, through the store)."""
    fields = store.read_all_item_fields(lib, ("artist", "title", "mb_trackid"))
    rows = [(item_id, *fields[item_id]) for item_id in sorted(fields)]
    ids = np.fromiter((int(r[0]) for r in rows), dtype=np.int64, count=len(rows))
    artists = [r[1] or "" for r in rows]
    titles = [r[2] or "" for r in rows]
    mbids = [(r[3] or "").strip().lower() for r in rows]
    by_mbid: dict[str, int] = {}
    by_name: dict[tuple[str, str], int] = {}
    artist_names: dict[str, str] = {}  # an artist has many tracks: normalised once
    for item_id, artist, title, mbid in zip(ids.tolist(), artists, titles, mbids, strict=True):
        if mbid and _UUID_RE.match(mbid):
            by_mbid.setdefault(mbid, item_id)
        artist_name = artist_names.get(artist)
        if artist_name is None:
            artist_name = artist_names[artist] = normalise_artist(artist)
        if artist_name:
            title_name = normalise_title(title)
            if title_name:
                by_name.setdefault((artist_name, title_name), item_id)
    return LibraryKeys(ids, artists, titles, mbids, by_mbid, by_name)


@dataclass(frozen=True)
class MatchResult:
    """Outcome of :func:`match_tracks`.

    Parameters
    ----------
    item_ids
        Per track, the matched item id, or -1 (int64).
    n_matched
        Tracks matched.
    rate
        ``n_matched / len(tracks)`` (0 for no tracks).
    by_mbid, by_name
        Tracks matched by recording MBID and by normalised artist + title.
    by_id
        Tracks that already named an existing item.
    """

    item_ids: np.ndarray
    n_matched: int
    rate: float
    by_mbid: int
    by_name: int
    by_id: int = 0


def _key_mbid(t: TrackKey) -> str | None:
    for v in (t.mbid, t.key):
        if v:
            v = v.strip().lower()
            if _UUID_RE.match(v):
                return v
    return None


def _key_names(t: TrackKey) -> tuple[str | None, str | None]:
    if t.artist or t.title:
        return t.artist, t.title
    if KEY_SEP in t.key:
        a, _, b = t.key.partition(KEY_SEP)
        return a, b
    return None, None


def match_tracks(tracks: Sequence[TrackKey], lib: Library | LibraryKeys) -> MatchResult:
    """Match track keys to library items (item id, then MBID, then names).

    Parameters
    ----------
    tracks
        Keys to match, e.g. ``listens.tracks``.
    lib
        A beets library, or :class:`LibraryKeys` already read from one.
    """
    keys = lib if isinstance(lib, LibraryKeys) else library_keys(lib)
    existing = set(keys.item_ids.tolist())
    out = np.full(len(tracks), -1, dtype=np.int64)
    by_id = by_mbid = by_name = 0
    name_cache: dict[tuple[str | None, str | None], int] = {}
    for n, t in enumerate(tracks):
        if t.item_id is not None:
            if t.item_id in existing:
                out[n] = t.item_id
                by_id += 1
            continue
        mbid = _key_mbid(t)
        if mbid is not None:
            hit = keys.by_mbid.get(mbid)
            if hit is not None:
                out[n] = hit
                by_mbid += 1
                continue
        pair = _key_names(t)
        if pair[0] is None and pair[1] is None:
            continue
        hit_name = name_cache.get(pair)
        if hit_name is None:
            name = (normalise_artist(pair[0]), normalise_title(pair[1]))
            hit_name = keys.by_name.get(name, -1) if name[0] and name[1] else -1
            name_cache[pair] = hit_name
        if hit_name >= 0:
            out[n] = hit_name
            by_name += 1
    n_matched = by_id + by_mbid + by_name
    rate = n_matched / len(tracks) if len(tracks) else 0.0
    return MatchResult(out, n_matched, rate, by_mbid, by_name, by_id)


def collapse(listens: Listens, match: MatchResult, *, min_user_plays: float = 1) -> Listens:
    """Restrict ``listens`` to matched tracks, one column per item id.

    Columns of keys matched to the same item are summed; columns are ordered
    by item id and keyed ``"item:<id>"`` (with :attr:`TrackKey.item_id` set
    and the first matching key's names and MBID).  Users left with fewer than
    ``min_user_plays`` plays (at least those left with none) are dropped.
    """
    ids = np.asarray(match.item_ids, dtype=np.int64)
    if ids.shape != (listens.n_tracks,):
        raise ParameterError(
            f"match has {ids.shape[0] if ids.ndim else 0} tracks, listens has {listens.n_tracks}"
        )
    matched = np.flatnonzero(ids >= 0)
    items, col_of = np.unique(ids[matched], return_inverse=True)
    proj = sp.csr_matrix(
        (np.ones(len(matched), dtype=np.float32), (matched, col_of)),
        shape=(listens.n_tracks, len(items)),
    )
    counts = (listens.counts @ proj).tocsr()
    first: dict[int, TrackKey] = {}
    for j in matched.tolist():
        first.setdefault(int(ids[j]), listens.tracks[j])
    tracks = []
    for item_id in items.tolist():
        src = first[item_id]
        tracks.append(TrackKey(f"item:{item_id}", src.artist, src.title, src.mbid, item_id))
    out = Listens(counts, list(listens.users), tracks, listens.skipped)
    return out.prune(min_user_plays=min_user_plays)
