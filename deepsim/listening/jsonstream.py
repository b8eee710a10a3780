"""Incremental JSON: the elements of a (possibly huge) array, JSON lines, small documents.

Arrays are read in chunks of :data:`JSON_CHUNK` characters and each element
is decoded by the C scanner of :mod:`json`, so a multi-gigabyte export never
sits in memory; a single element may be at most :data:`JSON_MAX_RECORD`.

:class:`Rows` is the fast path for arrays of records (Spotify's files): with
`msgspec <https://jcristharif.com/msgspec/>`_ installed (a dependency of
deepsim), a file of up to :data:`WHOLE_FILE_MAX` bytes is decoded at once into
small structs holding only the fields a reader asks for — the other fields
are skipped without creating Python objects, about 4x faster than
:func:`json.load`.  Without msgspec, for larger files, and for any file
msgspec refuses (invalid JSON or UTF-8, an element that is not an object,
``NaN``...), the same rows come from the streaming stdlib path instead, so
what is read and every message stay the same.
"""

from __future__ import annotations

import json
import mmap
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Any

from deepsim.errors import ListeningDataError
from deepsim.listening.core import Bad

try:
    import msgspec
except ImportError:  # pragma: no cover - msgspec is a dependency; the stdlib path reads all
    msgspec = None  # type: ignore[assignment]

JSON_CHUNK = 1 << 20
JSON_MAX_RECORD = 64 << 20
SMALL_DOCUMENT = 256 << 20
WHOLE_FILE_MAX = 64 << 20
"""Largest file (decompressed bytes) :class:`Rows` decodes at once; larger ones are streamed."""
_WS = re.compile(r"[ \t\r\n]*")


class _Reader:
    """A chunked text buffer with line counting."""

    def __init__(self, f: IO[str], name: str, prefix: str = "") -> None:
        self.f = f
        self.name = name
        self.buf = prefix
        self.pos = 0
        self.line = 1
        self.eof = False

    def fill(self) -> bool:
        chunk = self.f.read(JSON_CHUNK)
        if not chunk:
            self.eof = True
            return False
        self.buf = self.buf[self.pos :] + chunk
        self.pos = 0
        return True

    def skip_ws(self) -> None:
        while True:
            end = _WS.match(self.buf, self.pos).end()  # type: ignore[union-attr]
            self.line += self.buf.count("\n", self.pos, end)
            self.pos = end
            if end < len(self.buf) or self.eof or not self.fill():
                return

    def peek(self) -> str:
        self.skip_ws()
        return self.buf[self.pos] if self.pos < len(self.buf) else ""

    def array(self, decoder: json.JSONDecoder) -> Iterator[tuple[int, Any]]:
        """Elements of the array whose ``[`` is at the current position."""
        self.pos += 1
        started = False
        while True:
            ch = self.peek()
            if not ch:
                raise ListeningDataError(
                    self.name, self.line, "JSON array is not closed (file truncated?)"
                )
            if ch == "]":
                self.pos += 1
                return
            if started:
                if ch != ",":
                    raise ListeningDataError(
                        self.name, self.line, f"expected ',' or ']' in JSON array, got {ch!r}"
                    )
                self.pos += 1
                self.skip_ws()
            while True:
                try:
                    obj, end = decoder.raw_decode(self.buf, self.pos)
                    break
                except json.JSONDecodeError as exc:
                    near_end = exc.pos >= len(self.buf) - (1 << 16)
                    too_big = len(self.buf) - self.pos > JSON_MAX_RECORD
                    if self.eof or not near_end or too_big or not self.fill():
                        line = self.line + self.buf.count("\n", self.pos, exc.pos)
                        raise ListeningDataError(
                            self.name, line, f"invalid JSON: {exc.msg}"
                        ) from exc
            yield self.line, obj
            self.line += self.buf.count("\n", self.pos, end)
            self.pos = end
            started = True


def iter_array(f: IO[str], name: str) -> Iterator[tuple[int, Any]]:
    """Yield ``(line, element)`` of the JSON array that is the whole file."""
    r = _Reader(f, name)
    if r.peek() != "[":
        raise ListeningDataError(name, r.line, "expected a JSON array")
    yield from r.array(json.JSONDecoder())


def iter_array_at(f: IO[str], name: str, key: str) -> Iterator[tuple[int, Any]]:
    """Yield the elements of the array under ``"key":`` in a JSON object (any depth).

    The object is scanned as text for ``"key": [``; everything before it is
    skipped, so a huge export needs no more memory than one element.
    """
    pattern = re.compile(r'"' + re.escape(key) + r'"\s*:\s*\[')
    r = _Reader(f, name)
    while True:
        m = pattern.search(r.buf, max(r.pos - len(key) - 64, 0))
        if m:
            r.line += r.buf.count("\n", r.pos, m.end() - 1)
            r.pos = m.end() - 1
            break
        keep = max(len(r.buf) - len(key) - 64, 0)
        r.line += r.buf.count("\n", r.pos, keep)
        r.pos = keep
        if not r.fill():
            raise ListeningDataError(name, None, f'no "{key}" array in this JSON object')
    yield from r.array(json.JSONDecoder())


def iter_lines(f: Iterable[str]) -> Iterator[tuple[int, Any]]:
    """Yield ``(line, object or Bad)`` for each non-blank line of JSON lines."""
    loads = json.loads
    for lineno, raw in enumerate(f, 1):
        if not raw.strip():
            continue
        try:
            yield lineno, loads(raw)
        except json.JSONDecodeError as exc:
            yield lineno, Bad(f"invalid JSON: {exc.msg}", lineno)


def load_document(f: IO[str], name: str) -> Any:
    """A whole (small: an API page) JSON document."""
    text = f.read(SMALL_DOCUMENT + 1)
    if len(text) > SMALL_DOCUMENT:
        raise ListeningDataError(
            name, None, f"JSON document larger than {SMALL_DOCUMENT >> 20} MiB for this format"
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ListeningDataError(name, exc.lineno, f"invalid JSON: {exc.msg}") from exc


def iter_records(f: IO[str], name: str) -> Iterator[tuple[int, Any]]:
    """Elements of a JSON array, or JSON lines — whichever the file is."""
    r = _Reader(f, name)
    if r.peek() == "[":
        yield from r.array(json.JSONDecoder())
        return
    rest = _Rest(r)
    yield from iter_lines(rest)


class _Rest:
    """The unread part of a :class:`_Reader` as an iterator of lines."""

    def __init__(self, r: _Reader) -> None:
        self.r = r

    def __iter__(self) -> Iterator[str]:
        head = self.r.buf[self.r.pos :]
        lines = head.splitlines(keepends=True)
        carry = ""
        if lines and not lines[-1].endswith("\n"):
            carry = lines.pop()
        # blank lines skipped before the first record: keep line numbers right
        for _ in range(self.r.line - 1):
            yield "\n"
        yield from lines
        first = True
        for line in self.r.f:
            if first and carry:
                line = carry + line
                carry = ""
            first = False
            yield line
        if carry:
            yield carry


class Rows:
    """The elements of a JSON array of objects as rows with only ``fields`` (absent: ``None``).

    Parameters
    ----------
    name
        Name of the row type (for messages and reprs).
    fields
        The keys to keep, read as attributes of each row: a name (any JSON
        value), or ``(name, type)`` for a value msgspec should decode as
        ``type`` or ``None`` (e.g. :class:`datetime.datetime` from an RFC 3339
        string) — a file where it cannot is read by the stdlib path, whose
        rows hold the raw JSON values.

    Iterating :meth:`read` gives ``(index, row)`` (``row`` is ``None`` for an
    element that is not an object); :meth:`line` gives the line the element
    at ``index`` starts on, for messages.
    """

    def __init__(self, name: str, fields: Sequence[str | tuple[str, type]]) -> None:
        typed = [(f, object) if isinstance(f, str) else f for f in fields]
        self.fields = tuple(f for f, _ in typed)
        self._plain = type(name, (), {"__slots__": self.fields})
        self._decoder = None
        if msgspec is not None:
            struct = msgspec.defstruct(
                name,
                [(f, t if t is object else t | None, None) for f, t in typed],
                gc=False,
            )
            self._decoder = msgspec.json.Decoder(list[struct])  # type: ignore[valid-type]

    def read(self, source: Any) -> RowsOf:
        """The rows of ``source`` (a :class:`~deepsim.listening.sources.Source`)."""
        return RowsOf(self, source)

    def whole(self, source: Any) -> list[Any] | None:
        """All rows of ``source`` decoded at once, or ``None`` where the stdlib must read it.

        A plain UTF-8 file is decoded from a memory map of it (no copy of its bytes)."""
        if self._decoder is None:
            return None
        enc = source.encoding
        with source.open_binary() as f:
            mapped = _map(f) if source.compression is None and enc.startswith("utf-8") else None
            if mapped is not None:
                with mapped:
                    if len(mapped) > WHOLE_FILE_MAX:
                        return None
                    with memoryview(mapped) as view:
                        return self._decode(view[3:] if enc == "utf-8-sig" else view)
            data = f.read(WHOLE_FILE_MAX + 1)
        if len(data) > WHOLE_FILE_MAX:
            return None
        text: bytes | str = data
        if enc == "utf-8-sig":
            text = data[3:]
        elif enc != "utf-8":
            try:
                text = data.decode(enc)
            except UnicodeDecodeError:
                return None
        del data
        return self._decode(text)

    def _decode(self, text: bytes | str | memoryview) -> list[Any] | None:
        try:
            return self._decoder.decode(text)  # type: ignore[union-attr]
        except msgspec.DecodeError:  # also ValidationError: not an array of objects
            return None

    def from_dict(self, obj: dict[str, Any]) -> Any:
        """A row of the stdlib path (the same attributes as msgspec's)."""
        row = self._plain()
        for f in self.fields:
            setattr(row, f, obj.get(f))
        return row


def _map(f: IO[bytes]) -> mmap.mmap | None:
    """A read-only memory map of the open file ``f``, or ``None`` (no file descriptor, empty)."""
    try:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is an OSError
        return None


class RowsOf:
    """The rows of one source (see :class:`Rows`)."""

    def __init__(self, rows: Rows, source: Any) -> None:
        self._rows = rows
        self._source = source
        self._lines: list[int] | None = None

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        whole = self._rows.whole(self._source)
        if whole is not None:
            return enumerate(whole)  # no generator between the rows and the reader's loop
        return self._stream()

    def _stream(self) -> Iterator[tuple[int, Any]]:
        from_dict = self._rows.from_dict
        with self._source.open_text() as f:
            for i, (_line, obj) in enumerate(iter_array(f, self._source.name)):
                yield i, (from_dict(obj) if obj.__class__ is dict else None)

    def line(self, index: int) -> int:
        """The line element ``index`` starts on (for messages: the file is read again to
        find the lines, once, at the first message about it)."""
        if self._lines is None:
            with self._source.open_text() as f:
                self._lines = [line for line, _ in iter_array(f, self._source.name)]
        return self._lines[index]
