"""Incremental JSON: the elements of a (possibly huge) array, JSON lines, small documents.

Arrays are read in chunks of :data:`JSON_CHUNK` characters and each element
is decoded by the C scanner of :mod:`json`, so a multi-gigabyte export never
sits in memory; a single element may be at most :data:`JSON_MAX_RECORD`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import IO, Any

from deepsim.errors import ListeningDataError
from deepsim.listening.core import Bad

JSON_CHUNK = 1 << 20
JSON_MAX_RECORD = 64 << 20
SMALL_DOCUMENT = 256 << 20
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


def iter_lines(f: IO[str]) -> Iterator[tuple[int, Any]]:
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
