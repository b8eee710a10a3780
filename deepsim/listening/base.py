"""The one reader interface and the registry of formats.

A :class:`ListenReader` knows one format: :meth:`~ListenReader.sniff` tells
from the first bytes of a file (its :class:`Head`) whether the file is in it,
and :meth:`~ListenReader.read` streams the file's records.  A record is one of

- a play: the plain tuple ``(user or None, unix time, artist, title, MBID,
  line)`` — the fast path, no object per play;
- :class:`Plays` — many plays at once, as columns (a reader's faster path: the
  builder takes them without a Python step per play);
- :class:`Count` — ``n`` plays of a song by a user, without times (Taste
  Profile);
- :class:`Skip` — a record the format's rules leave out (a podcast, a play
  under 30 s, the now-playing entry...), counted by reason;
- :class:`~deepsim.listening.core.Bad` — a malformed record, with its line.

Readers register themselves with :func:`register`; :data:`READERS` keeps
sniffing order (specific formats before the generic CSV).
"""

from __future__ import annotations

import abc
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

from deepsim.listening.core import Bad
from deepsim.listening.sources import Source


class Count(NamedTuple):
    """``count`` plays of the song ``key`` by ``user`` (no times)."""

    user: str
    key: str
    count: float  # type: ignore[assignment]  # a field named as tuple.count, on purpose
    line: int


class Plays(NamedTuple):
    """Plays as columns (no MBIDs): ``users[k]`` (``None``: the source's listener) played
    ``titles[k]`` by ``artists[k]`` at unix time ``times[k]``; names already checked
    to be non-blank strings."""

    times: list[float]
    artists: list[str]
    titles: list[str]
    users: list[str | None] | None
    """``None`` when no play names a listener."""


class Skip:
    """A record left out by the format's rules (not an error); ``reason`` is reported."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


Play = tuple  # (user | None, time, artist, title, mbid, line)
Record = tuple | Plays | Count | Skip | Bad

_COMMENT_RE = re.compile(r"^(#|\+ACM-)")


@dataclass
class Head:
    """What sniffing sees of a file: its name and its first characters."""

    name: str
    text: str

    @property
    def lines(self) -> list[str]:
        """Non-blank lines of the head (the last, maybe cut, line dropped if there are more)."""
        lines = self.text.splitlines()
        if len(lines) > 1 and not self.text.endswith(("\n", "\r")):
            lines = lines[:-1]
        return [line for line in lines if line.strip()]

    @property
    def data_lines(self) -> list[str]:
        """Non-blank lines that are not ``#`` comments (nor UTF-7 ``+ACM-`` ones)."""
        return [line for line in self.lines if not _COMMENT_RE.match(line.lstrip())]

    @property
    def json_start(self) -> str:
        s = self.text.lstrip()
        return s[:1] if s[:1] in ("[", "{") else ""


class ListenReader(abc.ABC):
    """One listening-data format."""

    name: ClassVar[str]
    """The format's name, as given to ``format=`` / ``--listens-format``."""
    description: ClassVar[str]
    """A few words: which tool writes it."""
    whole_files: ClassVar[bool] = False
    """Whether a file costs enough (decoded whole, many rows) that
    :func:`~deepsim.listening.read_listens` reads several such files side by side in
    worker processes (Spotify's 12–15 MB files)."""

    @abc.abstractmethod
    def sniff(self, head: Head) -> bool:
        """Whether a file that starts like ``head`` is in this format."""

    @abc.abstractmethod
    def read(self, source: Source) -> Iterator[Record]:
        """Stream the records of ``source`` (raise ListeningDataError when unreadable)."""


READERS: dict[str, ListenReader] = {}


def register(cls: type[ListenReader]) -> type[ListenReader]:
    """Class decorator adding a reader to :data:`READERS` (import order = sniff order)."""
    READERS[cls.name] = cls()
    return cls


def is_comment(line: str) -> bool:
    return bool(_COMMENT_RE.match(line.lstrip()))
