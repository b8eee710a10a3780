"""Where listening data comes from: files, folders (recursively) and zip exports.

A :class:`Source` is one file to read — a plain file or a member of a zip — with
its display name (``export.zip!listens/2021/1.jsonl``), the listener it belongs
to unless the data names one, and its text encoding:

- UTF-8, with or without a byte-order mark;
- UTF-16 (byte-order mark, or NULs in every other byte of the head);
- anything else is decoded as Windows-1252 (the usual 8-bit export), with a
  warning naming the file — never replacement characters that quietly stop
  titles from matching.  Stray non-UTF-8 bytes later in a UTF-8 file are
  decoded the same way and reported once.
"""

from __future__ import annotations

import bz2
import codecs
import functools
import gzip
import io
import lzma
import os
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, cast

from deepsim.errors import ListeningDataError
from deepsim.util import get_logger

log = get_logger(__name__)

HEAD_BYTES = 1 << 16


def _gunzip(raw: IO[bytes]) -> IO[bytes]:
    f = gzip.GzipFile(fileobj=raw)
    f.myfileobj = cast(io.FileIO, raw)  # closed with it
    return cast(IO[bytes], f)


def _bunzip(raw: IO[bytes]) -> IO[bytes]:
    f = bz2.BZ2File(raw)
    # Closes raw with it (a private attribute of CPython's BZ2File and LZMAFile).
    f._closefp = True  # type: ignore[attr-defined]
    return f


def _unxz(raw: IO[bytes]) -> IO[bytes]:
    f = lzma.LZMAFile(raw)  # noqa: SIM115 (returned open)
    f._closefp = True  # type: ignore[attr-defined]
    return f


_COMPRESSED: dict[str, Callable[[IO[bytes]], IO[bytes]]] = {
    ".gz": _gunzip,
    ".bz2": _bunzip,
    ".xz": _unxz,
}

# Files that travel with exports and never hold listens: ignored inside a folder or zip.
COMPANION_SUFFIXES = (".pdf", ".html", ".htm", ".png", ".jpg", ".jpeg", ".md", ".css", ".js")
COMPANION_NAMES = frozenset(
    {
        "readme.txt",
        "readme",
        "user.json",
        "feedback.jsonl",
        "pinned_recording.jsonl",
        "ds_store",
    }
)

# Hidden files that are listening data (Rockbox writes its log as a dot-file).
KEPT_HIDDEN = frozenset({".scrobbler.log"})

_fallback_bytes = 0


def _cp1252_fallback(exc: UnicodeError) -> tuple[str, int]:
    """Codec error handler: decode bytes that are not UTF-8 as Windows-1252."""
    global _fallback_bytes
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    bad = exc.object[exc.start : exc.end]
    _fallback_bytes += len(bad)
    return "".join(_cp1252_char(b) for b in bad), exc.end


def _cp1252_char(byte: int) -> str:
    try:
        return bytes([byte]).decode("cp1252")
    except UnicodeDecodeError:
        return bytes([byte]).decode("latin-1")


codecs.register_error("deepsim-cp1252", _cp1252_fallback)


def detect_encoding(head: bytes) -> str:
    """The encoding of a file from its first bytes (see the module docstring)."""
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    sample = head[:4096]
    if len(sample) >= 4:
        even_nuls = sample[0::2].count(0)
        odd_nuls = sample[1::2].count(0)
        half = len(sample) // 2
        if odd_nuls > half * 0.4 and even_nuls < half * 0.1:
            return "utf-16-le"
        if even_nuls > half * 0.4 and odd_nuls < half * 0.1:
            return "utf-16-be"
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return "cp1252"
    return "utf-8"


def _compression(name: str) -> str | None:
    suffix = os.path.splitext(name)[1].lower()
    return suffix if suffix in _COMPRESSED else None


def stem(name: str) -> str:
    """A file name without its compression and format suffixes (``a.json.gz`` → ``a``)."""
    base = os.path.basename(name.rstrip("/"))
    if _compression(base):
        base = os.path.splitext(base)[0]
    root, ext = os.path.splitext(base)
    return root if ext and root else base


@dataclass
class Source:
    """One file of listening data.

    Parameters
    ----------
    name
        Display name for messages (a path, or ``archive.zip!member``).
    basename
        The file's own name (without folders), compression suffix removed.
    opener
        Opens the raw (compressed) bytes.
    default_user
        The listener of plays that do not name one.
    in_container
        Read as part of a folder or zip (unrecognised files are then ignored).
    """

    name: str
    basename: str
    opener: Callable[[], IO[bytes]]
    default_user: str
    in_container: bool = False
    compression: str | None = None
    _head: bytes | None = field(default=None, repr=False)
    _encoding: str | None = field(default=None, repr=False)

    def open_binary(self) -> IO[bytes]:
        raw = self.opener()
        if self.compression:
            return _COMPRESSED[self.compression](raw)
        return raw

    @property
    def head_bytes(self) -> bytes:
        if self._head is None:
            with self.open_binary() as f:
                self._head = f.read(HEAD_BYTES)
        return self._head

    @property
    def encoding(self) -> str:
        if self._encoding is None:
            self._encoding = detect_encoding(self.head_bytes)
            if self._encoding == "cp1252":
                log.warning(
                    "%s: not UTF-8 or UTF-16; decoding it as Windows-1252 (cp1252)", self.name
                )
        return self._encoding

    def head_text(self) -> str:
        """The first bytes decoded (for sniffing), any cut character at the end dropped."""
        enc = self.encoding
        data = self.head_bytes
        if enc.startswith("utf-16") and len(data) % 2:
            data = data[:-1]
        text = data.decode(enc, errors="replace")
        return text[1:] if text.startswith("\ufeff") else text

    def open_text(self) -> IO[str]:
        """The whole file as text in its encoding (newlines kept as in the file)."""
        enc = self.encoding
        errors = "deepsim-cp1252" if enc in ("utf-8", "utf-8-sig") else "replace"
        inner = io.TextIOWrapper(self.open_binary(), encoding=enc, errors=errors, newline="")
        return cast(IO[str], _CountingText(self, inner))


class _CountingText(io.TextIOBase):
    """A text stream that reports, once closed, how many bytes fell back to cp1252."""

    def __init__(self, source: Source, inner: io.TextIOWrapper) -> None:
        self._source = source
        self._inner = inner
        self._start = _fallback_bytes

    def read(self, n: int | None = -1) -> str:
        return self._inner.read(-1 if n is None else n)

    def readline(self, n: int | None = -1) -> str:  # type: ignore[override]
        return self._inner.readline(-1 if n is None else n)

    def __iter__(self) -> Iterator[str]:  # type: ignore[override]
        return iter(self._inner)

    def __next__(self) -> str:  # type: ignore[override]
        return next(self._inner)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            n = _fallback_bytes - self._start
            if n:
                log.warning(
                    "%s: %d bytes are not UTF-8; decoded them as Windows-1252 (cp1252)",
                    self._source.name,
                    n,
                )
            self._inner.close()
        super().close()


def _is_ignored_name(rel: str) -> bool:
    parts = rel.replace("\\", "/").split("/")
    if any(p == "__MACOSX" or p.startswith(".") for p in parts[:-1] if p):
        return True
    if parts[-1].startswith(".") and parts[-1].lower() not in KEPT_HIDDEN:
        return True
    base = parts[-1].lower()
    return base in COMPANION_NAMES or base.endswith(COMPANION_SUFFIXES)


def is_zip(path: Path) -> bool:
    if path.suffix.lower() == ".zip":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def _file_source(path: Path, default_user: str, in_container: bool) -> Source:
    comp = _compression(path.name)
    basename = path.name[: -len(comp)] if comp else path.name
    # picklable (read_listens may hand a source to a reading process)
    opener = cast("Callable[[], IO[bytes]]", functools.partial(open, path, "rb"))
    return Source(str(path), basename, opener, default_user, in_container, comp)


@dataclass(frozen=True)
class _ZipMember:
    """Opens one member of a zip file (picklable, so a reading process can open it too)."""

    zip_path: str
    member: zipfile.ZipInfo

    def __call__(self) -> IO[bytes]:
        # the member's file keeps the archive's file open until it is closed itself
        return zipfile.ZipFile(self.zip_path).open(self.member)


def _zip_sources(path: Path, display: str, default_user: str) -> Iterator[Source]:
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise ListeningDataError(path, None, f"not a zip file ({exc})") from exc
    with zf:
        infos = sorted(zf.infolist(), key=lambda i: i.filename)
    for info in infos:
        if info.is_dir() or _is_ignored_name(info.filename):
            continue
        comp = _compression(info.filename)
        base = os.path.basename(info.filename)
        yield Source(
            f"{display}!{info.filename}",
            base[: -len(comp)] if comp else base,
            _ZipMember(str(path), info),
            default_user,
            True,
            comp,
        )


def iter_sources(path: str | os.PathLike[str]) -> Iterator[Source]:
    """The files of one path given by the user: a file, a zip, or a folder (recursively).

    Hidden files, ``__MACOSX`` and companion files (read-me, PDF, images,
    ``user.json``, ``feedback.jsonl``, ``pinned_recording.jsonl``) are left out.
    The listener of plays that do not name one is the path's stem (a
    ``my_spotify_data.zip`` or a folder is one listener).
    """
    p = Path(path)
    user = stem(p.name) or p.name
    if p.is_dir():
        for root, dirs, files in os.walk(p):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__MACOSX")
            for name in sorted(files):
                child = Path(root) / name
                rel = os.path.relpath(child, p)
                if _is_ignored_name(rel):
                    continue
                if is_zip(child):
                    yield from _zip_sources(child, str(child), user)
                else:
                    yield _file_source(child, user, True)
        return
    if not p.exists():
        raise ListeningDataError(p, None, "no such file")
    if is_zip(p):
        yield from _zip_sources(p, str(p), user)
    else:
        yield _file_source(p, user, False)
