"""m3u / extm3u playlists of beets items.

The file is UTF-8 (any extension: ``.m3u`` or ``.m3u8``).  Extended playlists
start with ``#EXTM3U`` and give each entry an ``#EXTINF:<seconds>,<artist> -
<title>`` line, as beets' smartplaylist plugin writes them.  Paths are
absolute, or relative to the playlist file's directory (smartplaylist's
``relative_to`` set to the playlist directory), so the playlist keeps working
when the music and the playlist move together.

The output directory is created if missing and the file is replaced
atomically; any failure is a :class:`~deepsim.errors.DeepsimError` naming the
path and the reason.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from deepsim.errors import DeepsimError, ParameterError

if TYPE_CHECKING:
    from beets.library import Item

PlaylistFormat = Literal["m3u", "extm3u"]


def _fspath(path: str | bytes | os.PathLike[str]) -> str:
    return os.fsdecode(os.fspath(path))


def entry_path(item_path: str | bytes, playlist_dir: str | None) -> str:
    """The path written for one item: absolute, or relative to ``playlist_dir``.

    A relative path that would start with ``#`` (a comment in m3u) gets a
    leading ``./``.  On Windows, an item on another drive stays absolute.
    """
    absolute = os.path.abspath(_fspath(item_path))
    if playlist_dir is None:
        return absolute
    try:
        relative = os.path.relpath(absolute, playlist_dir)
    except ValueError:  # different drives
        return absolute
    if relative.startswith("#"):
        relative = os.path.join(os.curdir, relative)
    return relative


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def extinf(item: Item) -> str:
    """The ``#EXTINF`` line of an item (length in whole seconds, -1 when unknown)."""
    length = item.get("length") or 0.0
    seconds = round(float(length)) if length and length > 0 else -1
    artist = _one_line(item.get("artist") or "")
    title = _one_line(item.get("title") or "")
    return f"#EXTINF:{seconds},{artist} - {title}"


def render(
    items: Iterable[Item],
    *,
    playlist_dir: str | None,
    extended: bool,
) -> bytes:
    """The playlist's bytes (see :func:`write_playlist`)."""
    lines: list[bytes] = [b"#EXTM3U"] if extended else []
    for item in items:
        raw = item.path
        if raw is None or raw in (b"", ""):
            raise DeepsimError(f"item {item.id}: has no path")
        path = entry_path(raw, playlist_dir)
        if "\n" in path or "\r" in path:
            raise DeepsimError(f"{path!r}: a path with a line break cannot go in a playlist")
        if extended:
            lines.append(extinf(item).encode("utf-8"))
        # surrogateescape keeps the original bytes of non-UTF-8 file names.
        lines.append(path.encode("utf-8", "surrogateescape"))
    return b"\n".join(lines) + b"\n"


def write_playlist(
    path: str | bytes | os.PathLike[str],
    items: Iterable[Item],
    *,
    format: PlaylistFormat = "m3u",
    relative: bool = False,
) -> Path:
    """Write ``items`` (in order) as a playlist at ``path``.

    Parameters
    ----------
    path
        The playlist file; its directory is created if missing.  An existing
        file is replaced atomically.
    items
        beets items with paths.
    format
        ``"m3u"`` (one path per line) or ``"extm3u"`` (``#EXTM3U`` header and
        ``#EXTINF`` lines).
    relative
        Write paths relative to the playlist's directory instead of absolute.

    Returns
    -------
    pathlib.Path
        The absolute path of the written playlist.

    Raises
    ------
    DeepsimError
        The file or its directory cannot be written (names the path and why),
        or an item has no usable path.
    ValueError
        An unknown ``format``.
    """
    if format not in ("m3u", "extm3u"):
        raise ParameterError(f"playlist format must be 'm3u' or 'extm3u', got {format!r}")
    target = Path(os.path.abspath(_fspath(path)))
    if target.name in ("", ".", ".."):
        raise DeepsimError(f"{target}: not a file name")
    directory = target.parent
    data = render(
        items,
        playlist_dir=os.fspath(directory) if relative else None,
        extended=format == "extm3u",
    )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DeepsimError(
            f"{directory}: cannot create playlist directory ({exc.strerror or exc})"
        ) from exc
    if target.is_dir():
        raise DeepsimError(f"{target}: is a directory")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise DeepsimError(f"{target}: cannot write playlist ({exc.strerror or exc})") from exc
    return target


def present(items: Iterable[Item]) -> tuple[list[Item], int]:
    """The items whose file is on disk, in order, and how many were left out.

    A playlist never names a file that is not there (deleted, or on an
    unmounted disk).
    """
    kept: list[Item] = []
    gone = 0
    for item in items:
        raw = item.path
        if raw and os.path.isfile(_fspath(raw)):
            kept.append(item)
        else:
            gone += 1
    return kept, gone
