"""deepsim.playlist: m3u / extm3u files that beets' own M3UFile reads back."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from beets.library import Item, Library
from beets.util.m3u import M3UFile

from deepsim.errors import DeepsimError
from deepsim.playlist import entry_path, extinf, write_playlist


@pytest.fixture
def items(tmp_path: Path) -> list[Item]:
    """Four library items whose files exist, one with a non-ASCII name and tags."""
    music = tmp_path / "music" / "Ärtist"
    music.mkdir(parents=True)
    lib = Library(":memory:", str(tmp_path / "music"))
    out = []
    for n, (artist, title, length) in enumerate(
        [
            ("Björk", "Jóga", 305.4),
            ("Artist, The", "Title - with dash", 61.6),
            ("Multi\nLine", "Tab\tTitle", 0.0),
            ("Z", "Last", 1.2),
        ]
    ):
        path = music / f"{n} – {title.split()[0]}.flac"
        path.write_bytes(b"fake audio")
        item = Item(artist=artist, title=title, length=length, path=os.fsencode(path))
        lib.add(item)
        out.append(item)
    return out


def read_lines(path: Path) -> list[str]:
    return path.read_bytes().decode("utf-8").splitlines()


def test_plain_m3u_with_absolute_paths(items: list[Item], tmp_path: Path) -> None:
    target = write_playlist(tmp_path / "lists" / "similar.m3u", items)
    assert target == tmp_path / "lists" / "similar.m3u"
    lines = read_lines(target)
    assert lines == [os.fsdecode(item.path) for item in items]
    assert all(Path(line).is_absolute() and Path(line).exists() for line in lines)


def test_extended_m3u_read_back_by_beets(items: list[Item], tmp_path: Path) -> None:
    target = write_playlist(tmp_path / "similar.m3u8", items, format="extm3u")
    m3u = M3UFile(os.fsencode(target))
    m3u.load()
    assert m3u.extm3u
    assert m3u.media_list == [item.path for item in items]
    assert all(os.path.exists(entry) for entry in m3u.media_list)
    lines = read_lines(target)
    assert lines[0] == "#EXTM3U"
    assert lines[1] == "#EXTINF:305,Björk - Jóga"
    assert lines[3] == "#EXTINF:62,Artist, The - Title - with dash"
    assert lines[5] == "#EXTINF:-1,Multi Line - Tab Title"  # unknown length, one line
    assert len(lines) == 1 + 2 * len(items)


def test_relative_paths_resolve_from_the_playlist_directory(
    items: list[Item], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = write_playlist(
        tmp_path / "playlists" / "deep" / "similar.m3u", items, format="extm3u", relative=True
    )
    entries = [line for line in read_lines(target) if not line.startswith("#")]
    assert all(not os.path.isabs(e) and e.startswith("../../music/") for e in entries)
    # beets resolves relative entries against the working directory: read from there
    monkeypatch.chdir(target.parent)
    m3u = M3UFile(os.fsencode(target))
    m3u.load()
    assert m3u.media_list == [item.path for item in items]
    assert all(os.path.exists(entry) for entry in m3u.media_list)


def test_relative_entry_that_looks_like_a_comment(tmp_path: Path) -> None:
    assert entry_path(str(tmp_path / "#1.mp3"), str(tmp_path)) == os.path.join(".", "#1.mp3")
    assert entry_path(str(tmp_path / "a.mp3"), None) == str(tmp_path / "a.mp3")


def test_replaces_an_existing_playlist_atomically(items: list[Item], tmp_path: Path) -> None:
    target = tmp_path / "similar.m3u"
    target.write_text("old content\n")
    write_playlist(target, items[:2])
    assert read_lines(target) == [os.fsdecode(item.path) for item in items[:2]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["music", "similar.m3u"]


def test_unwritable_paths_raise_deepsim_error_naming_them(
    items: list[Item], tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(DeepsimError, match=str(blocker)):
        write_playlist(blocker / "sub" / "similar.m3u", items)
    with pytest.raises(DeepsimError, match="is a directory"):
        write_playlist(tmp_path / "music", items)
    with pytest.raises(ValueError, match="pls"):
        write_playlist(tmp_path / "x.pls", items, format="pls")  # type: ignore[arg-type]


def test_paths_with_line_breaks_are_refused(tmp_path: Path) -> None:
    item = Item(artist="a", title="t", path=os.fsencode(tmp_path / "bad\nname.mp3"))
    with pytest.raises(DeepsimError, match="line break"):
        write_playlist(tmp_path / "x.m3u", [item])
    assert not (tmp_path / "x.m3u").exists()


def test_extinf_rounds_lengths() -> None:
    assert extinf(Item(artist="A", title="T", length=59.5)) == "#EXTINF:60,A - T"
    assert extinf(Item(artist="", title="", length=None)) == "#EXTINF:-1, - "
