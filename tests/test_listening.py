"""Tests of deepsim.listening: the readers, sessions, bad data and the beets library."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from deepsim import listening
from deepsim.errors import ListeningDataError
from deepsim.listening import (
    KEY_SEP,
    Head,
    ListenReader,
    Listens,
    Plays,
    Skip,
    TrackKey,
    jsonstream,
    parse_time,
    read_library,
    read_listens,
    read_playlist,
    sniff_format,
)
from deepsim.listening.core import Bad
from deepsim.listening.read import sniff
from deepsim.listening.sources import iter_sources

DATA = Path(__file__).resolve().parent / "data" / "listens"
KARMA = "8ec9a9c2-5c4b-4b1e-b7e5-0a1c4b7e6a01"


def by_session(listens: Listens) -> dict[tuple[str, str], float]:
    """{(session start, track key): count}, whoever the listener is called."""
    return {(u.split("@")[-1], k): v for (u, k), v in as_dict(listens).items()}


def as_dict(listens: Listens) -> dict[tuple[str, str], float]:
    """{(user, track key): count} for the non-zero cells."""
    coo = listens.counts.tocoo()
    return {
        (listens.users[i], listens.tracks[j].key): float(v)
        for i, j, v in zip(coo.row, coo.col, coo.data, strict=True)
    }


# --------------------------------------------------------------------------------------------
# Formats


def test_taste_profile_keeps_real_users_and_counts() -> None:
    listens = read_listens(DATA / "taste_profile.txt")
    assert listens.users == [
        "b80344d063b5ccb3212f76538f3d9e43d87dca9e",
        "85c1f87fea955d09b4bec2e36aee110927aedf9a",
        "bd4c6e843f00bd476847fb75c47b4fb430a06856",
    ]
    cells = as_dict(listens)
    assert cells[("85c1f87fea955d09b4bec2e36aee110927aedf9a", "SOAKIMP12A8C130995")] == 5.0
    assert cells[("bd4c6e843f00bd476847fb75c47b4fb430a06856", "SOBBMDR12A8C13253B")] == 3.0
    assert listens.n_plays == 16 and listens.nnz == 8
    assert listens.counts.dtype == np.float32 and sp.isspmatrix_csr(listens.counts)
    assert all(t.artist is None for t in listens.tracks)


def test_taste_profile_song_table_file() -> None:
    listens = read_listens(DATA / "taste_profile.txt", song_table=DATA / "unique_tracks.txt")
    by_key = {t.key: t for t in listens.tracks}
    assert by_key["SOAKIMP12A8C130995"] == TrackKey(
        "SOAKIMP12A8C130995", "Radiohead", "Karma Police"
    )
    assert by_key["SOBBMDR12A8C13253B"].artist == "Björk"
    assert by_key["SOBXHDL12A81C204C0"].title == "Get Lucky (Radio Edit)"
    assert "SOZZZZZ12A8C100000" not in by_key  # in the table, never played


def test_taste_profile_song_table_mapping_and_tsv_with_mbid(tmp_path: Path) -> None:
    mapped = read_listens(
        DATA / "taste_profile.txt",
        song_table={"SOAKIMP12A8C130995": ("Radiohead", "Karma Police", KARMA.upper())},
    )
    track = next(t for t in mapped.tracks if t.key == "SOAKIMP12A8C130995")
    assert (track.artist, track.title, track.mbid) == ("Radiohead", "Karma Police", KARMA)
    table = tmp_path / "songs.tsv"
    table.write_text(f"SOAPDEY12A81C210A9\tThe Beatles\tHey Jude\t{KARMA}\n")
    tsv = read_listens(DATA / "taste_profile.txt", song_table=table)
    track = next(t for t in tsv.tracks if t.key == "SOAPDEY12A81C210A9")
    assert (track.artist, track.title, track.mbid) == ("The Beatles", "Hey Jude", KARMA)


def test_song_table_needs_taste_profile() -> None:
    with pytest.raises(ValueError, match="taste-profile"):
        read_listens(DATA / "lastfm1k.tsv", song_table={"x": ("a", "b")})


def test_lastfm_csv_without_header_sessions_split_at_gaps() -> None:
    listens = read_listens(DATA / "lastfm_noheader.csv")
    # 20:15, 20:11, 20:07 | 18:00, 17:56 | (next day) 22:00 -- gaps of 2 h and 20 h.
    assert listens.users == [
        "lastfm_noheader@2021-01-31T20:07:00Z",
        "lastfm_noheader@2021-01-31T17:56:00Z",
        "lastfm_noheader@2021-01-30T22:00:00Z",
    ]
    karma = f"radiohead{KEY_SEP}karma police"
    csn = f"crosby, stills & nash{KEY_SEP}suite: judy blue eyes"
    cells = as_dict(listens)
    assert cells[("lastfm_noheader@2021-01-31T20:07:00Z", csn)] == 1.0
    assert cells[("lastfm_noheader@2021-01-31T17:56:00Z", karma)] == 1.0
    assert cells[("lastfm_noheader@2021-01-31T20:07:00Z", karma)] == 1.0
    assert listens.n_plays == 6
    track = next(t for t in listens.tracks if t.key == csn)
    assert track.artist == "Crosby, Stills & Nash"  # the quoted comma survived


def test_session_gap_controls_the_split() -> None:
    one = read_listens(DATA / "lastfm_noheader.csv", session_gap=2 * 86400)
    assert one.n_users == 1
    assert one.counts[0, [t.key for t in one.tracks].index(f"radiohead{KEY_SEP}karma police")] == 2
    every = read_listens(DATA / "lastfm_noheader.csv", session_gap=60)
    assert every.n_users == 6


def test_lastfm_csv_with_header_uses_named_columns_and_mbid() -> None:
    listens = read_listens(DATA / "lastfm_header.csv")
    assert listens.users == [
        "lastfm_header@2021-01-31T20:11:00Z",
        "lastfm_header@2021-01-31T18:00:00Z",
    ]
    karma = listens.tracks[0]
    assert karma.key == KARMA and karma.mbid == KARMA and karma.title == "Karma Police"
    assert listens.tracks[2].key == f"the beatles{KEY_SEP}come together"


def test_lastfm_csv_user_column_and_semicolons(tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    path.write_text(
        "user;artist;track;date\n"
        "ann;A;x;2021-01-01T10:00:00Z\n"
        "bob;A;x;2021-01-01T10:01:00Z\n"
        "ann;B;y;2021-01-01T10:02:00Z\n"
    )
    listens = read_listens(path)
    assert sorted(listens.users) == ["ann@2021-01-01T10:00:00Z", "bob@2021-01-01T10:01:00Z"]
    assert listens.counts[listens.users.index("ann@2021-01-01T10:00:00Z")].sum() == 2


def test_lastfm_1k_users_and_sessions() -> None:
    listens = read_listens(DATA / "lastfm1k.tsv")
    assert listens.users == [
        "user_000001@2009-05-04T23:04:30Z",
        "user_000001@2009-05-04T20:56:00Z",
        "user_000002@2009-05-05T09:57:00Z",
    ]
    # Karma Police (by MBID) was played in all three sessions.
    col = [t.key for t in listens.tracks].index(KARMA)
    assert listens.counts[:, col].toarray().ravel().tolist() == [1.0, 1.0, 1.0]
    assert listens.n_plays == 6


def test_listenbrainz_json_array_equals_jsonl() -> None:
    array = read_listens(DATA / "listenbrainz.json")
    lines = read_listens(DATA / "listenbrainz.jsonl")
    assert as_dict(array) == as_dict(lines)
    assert array.tracks == lines.tracks
    assert array.users == [
        "alice@2021-01-31T20:11:00Z",
        "alice@2021-01-31T18:00:00Z",
        "alice@2021-01-30T21:00:00Z",
    ]
    keys = [t.key for t in array.tracks]
    # additional_info's MBID (upper case in the file) first, then mbid_mapping's.
    assert keys[0] == KARMA
    assert keys[1] == "5a1f3b3e-4a7e-4f8e-9d7b-2f8c1c2b9e02"
    assert array.tracks[3] == TrackKey(f"björk{KEY_SEP}jóga", "Björk", "Jóga")


def test_json_array_parsed_across_chunk_boundaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    listens = [
        {
            "listened_at": 1_600_000_000 + int(t),
            "track_metadata": {"artist_name": f"A{a}", "track_name": f'T [{a}], "x" {a}'},
            "user_name": f"u{a % 3}",
        }
        for t, a in zip(
            np.cumsum(rng.integers(60, 4000, 400)), rng.integers(0, 30, 400), strict=True
        )
    ]
    arr = tmp_path / "big.json"
    arr.write_text(json.dumps(listens, indent=2))
    jsonl = tmp_path / "big.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in listens) + "\n")
    expected = as_dict(read_listens(jsonl))
    monkeypatch.setattr(jsonstream, "JSON_CHUNK", 97)
    got = read_listens(arr)
    assert as_dict(got) == expected
    assert got.n_plays == 400


def test_listenbrainz_zip_export(tmp_path: Path) -> None:
    path = tmp_path / "listenbrainz_alice.zip"
    lines = (DATA / "listenbrainz.jsonl").read_text().splitlines(keepends=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("user.json", '{"user_name": "alice"}')
        zf.writestr("listens/2021/1.jsonl", "".join(lines[:2]))
        zf.writestr("listens/2021/2.jsonl", "".join(lines[2:]))
        zf.writestr("feedback.jsonl", '{"score": 1}\n')
    assert sniff_format(path) == "listenbrainz"
    assert as_dict(read_listens(path)) == as_dict(read_listens(DATA / "listenbrainz.jsonl"))


def test_listens_out_of_order_only_shorten_sessions(tmp_path: Path) -> None:
    # Ascending order (ListenBrainz dumps), users interleaved.
    path = tmp_path / "dump.jsonl"
    rows = [("u", 0), ("v", 10), ("u", 600), ("v", 700), ("u", 5000), ("u", 5100)]
    path.write_text(
        "".join(
            json.dumps(
                {
                    "listened_at": 1_600_000_000 + t,
                    "user_name": u,
                    "track_metadata": {"artist_name": "A", "track_name": f"t{t}"},
                }
            )
            + "\n"
            for u, t in rows
        )
    )
    listens = read_listens(path)
    sizes = dict(zip(listens.users, np.asarray(listens.counts.sum(axis=1)).ravel(), strict=True))
    assert sorted(sizes.values()) == [2, 2, 2]
    assert {u.split("@")[0] for u in sizes} == {"u", "v"}


# --------------------------------------------------------------------------------------------
# Bad data


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_malformed_line_names_its_number(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "triplets.txt",
        ["u1\tS1\t1", "u1\tS2\t2", "u2\tS1", "u2\tS3\t1"],
    )
    with pytest.raises(ListeningDataError) as info:
        read_listens(path, format="taste-profile")
    assert info.value.line == 3
    assert info.value.path == str(path)
    assert f"{path}:3:" in str(info.value)
    assert "3 tab-separated fields" in str(info.value)


@pytest.mark.parametrize(
    ("fmt", "name", "lines", "bad_line", "reason"),
    [
        ("taste-profile", "t.txt", ["u\tS1\t1", "u\tS2\tmany"], 2, "not an integer"),
        ("taste-profile", "t.txt", ["u\tS1\t1", "u\tS2\t0"], 2, "positive count"),
        ("lastfm-csv", "s.csv", ["A,B,C,31 Jan 2021 20:15", "A,B,C,yesterday"], 2, "not a time"),
        ("lastfm-csv", "s.csv", ["A,B,C,31 Jan 2021 20:15", "A,B"], 2, "at least 4 columns"),
        (
            "lastfm-1k",
            "k.tsv",
            ["u\t2009-05-04T23:08:57Z\t\tA\t\tT", "u\tnow\t\tA\t\tT"],
            2,
            "time",
        ),
        ("lastfm-1k", "k.tsv", ["u\t2009-05-04T23:08:57Z\t\t\t\t", "x"], 1, "no track name"),
        ("listenbrainz", "l.jsonl", ['{"listened_at": 1, "track_metadata": {}}'], 1, "no track"),
        (
            "listenbrainz",
            "l.jsonl",
            [
                '{"listened_at": 1, "track_metadata": {"track_name": "x", "artist_name": "y"}}',
                "{oops",
            ],
            2,
            "invalid JSON",
        ),
        ("listenbrainz", "l.jsonl", ['{"track_metadata": {"track_name": "x"}}'], 1, "listened_at"),
    ],
)
def test_each_reader_reports_bad_records(
    tmp_path: Path, fmt: str, name: str, lines: list[str], bad_line: int, reason: str
) -> None:
    path = write_lines(tmp_path / name, lines)
    with pytest.raises(ListeningDataError, match=reason) as info:
        read_listens(path, format=fmt)
    assert info.value.line == bad_line


def test_few_bad_lines_are_skipped_and_counted(tmp_path: Path) -> None:
    lines = [f"u{i % 7}\tS{i % 13}\t{1 + i % 3}" for i in range(300)]
    lines[41] = "garbage"
    lines[250] = "u1\tS1\t-4"
    path = write_lines(tmp_path / "triplets.txt", lines)
    listens = read_listens(path)
    assert listens.skipped == 2
    good = read_listens(
        write_lines(tmp_path / "good.txt", [x for i, x in enumerate(lines) if i not in (41, 250)])
    )
    assert as_dict(listens) == as_dict(good)
    with pytest.raises(ListeningDataError) as info:
        read_listens(path, max_bad_fraction=0)
    assert info.value.line == 42


def test_mostly_garbage_is_fatal(tmp_path: Path) -> None:
    lines = ["u\tS1\t1"] + [f"this is not a listen {i}" for i in range(2000)] + ["u\tS2\t1"] * 5000
    path = write_lines(tmp_path / "junk.txt", lines)
    with pytest.raises(ListeningDataError, match="malformed") as info:
        read_listens(path, format="taste-profile")
    assert info.value.line == 2
    # 2 % bad is also beyond the default 1 %...
    lines = [f"u{i % 5}\tS{i % 11}\t1" for i in range(490)] + ["bad"] * 10
    with pytest.raises(ListeningDataError, match=r"at most 1\.0%"):
        read_listens(write_lines(tmp_path / "some.txt", lines), format="taste-profile")
    # ...but within a looser limit.
    got = read_listens(tmp_path / "some.txt", format="taste-profile", max_bad_fraction=0.05)
    assert got.skipped == 10


@pytest.mark.parametrize(
    ("name", "text", "fmt"),
    [
        ("empty.txt", "", "taste-profile"),
        ("blank.tsv", "\n\n  \n", "lastfm-1k"),
        ("empty.csv", "", "lastfm-csv"),
        ("header.csv", "artist,album,track,date\n", "lastfm-csv"),
        ("empty.json", "[]", "listenbrainz"),
        ("empty.jsonl", "", "listenbrainz"),
        ("empty.txt", "", "auto"),
    ],
)
def test_empty_file_has_no_listens(tmp_path: Path, name: str, text: str, fmt: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ListeningDataError) as info:
        read_listens(path, format=fmt)
    assert info.value.line is None
    assert info.value.reason == "no listens"


def test_broken_json_array(tmp_path: Path) -> None:
    text = (DATA / "listenbrainz.json").read_text()
    cut = tmp_path / "cut.json"
    cut.write_text(text[: len(text) // 2])
    with pytest.raises(ListeningDataError, match=r"invalid JSON|not closed"):
        read_listens(cut)
    broken = tmp_path / "broken.json"
    broken.write_text(
        text.replace('"user_name": "alice"\n  },\n  {', '"user_name": "alice"\n  }\n  {', 1)
    )
    with pytest.raises(ListeningDataError, match="expected ','") as info:
        read_listens(broken)
    assert info.value.line == 21  # the "{" that follows "}" without a comma
    notarray = tmp_path / "obj.json"
    notarray.write_text('{"a": 1}\n')
    with pytest.raises(ListeningDataError, match=r"JSON object|track_metadata"):
        read_listens(notarray)


def test_missing_file_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(ListeningDataError, match="no such file"):
        read_listens(tmp_path / "nope.tsv", format="lastfm-1k")
    odd = tmp_path / "odd.dat"
    odd.write_text("hello world\n")
    with pytest.raises(ListeningDataError, match="cannot tell the format"):
        read_listens(odd)
    with pytest.raises(ValueError, match="'spotify'"):
        read_listens(odd, format="spotify")
    with pytest.raises(ValueError, match="session_gap"):
        read_listens(odd, session_gap=0)
    with pytest.raises(ValueError, match="max_bad_fraction"):
        read_listens(odd, max_bad_fraction=1.5)


def test_header_without_needed_column_is_fatal(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "x.csv", ["artist,album,track", "A,B,C"])
    with pytest.raises(ListeningDataError, match="time") as info:
        read_listens(path)
    assert info.value.line == 1


# --------------------------------------------------------------------------------------------
# Detection, compression, directories, merging


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("taste_profile.txt", "taste-profile"),
        ("lastfm_noheader.csv", "lastfm-csv"),
        ("lastfm_header.csv", "lastfm-csv"),
        ("lastfm1k.tsv", "lastfm-1k"),
        ("listenbrainz.json", "listenbrainz"),
        ("listenbrainz.jsonl", "listenbrainz"),
    ],
)
def test_sniff_format_by_name_and_content(tmp_path: Path, name: str, fmt: str) -> None:
    assert sniff_format(DATA / name) == fmt
    anonymous = tmp_path / "data.txt"
    shutil.copy(DATA / name, anonymous)
    assert sniff_format(anonymous) == fmt


def test_gzip_and_directory(tmp_path: Path) -> None:
    gz = tmp_path / "dir" / "triplets.txt.gz"
    gz.parent.mkdir()
    gz.write_bytes(gzip.compress((DATA / "taste_profile.txt").read_bytes()))
    shutil.copy(DATA / "lastfm1k.tsv", tmp_path / "dir" / "lastfm1k.tsv")
    both = read_listens(tmp_path / "dir")
    separate = read_listens(DATA / "taste_profile.txt").merge(read_listens(DATA / "lastfm1k.tsv"))
    assert as_dict(both) == as_dict(separate)
    assert both.n_users == 6


def test_min_user_plays_drops_small_rows() -> None:
    listens = read_listens(DATA / "lastfm_noheader.csv", min_user_plays=2)
    assert listens.users == [
        "lastfm_noheader@2021-01-31T20:07:00Z",
        "lastfm_noheader@2021-01-31T17:56:00Z",
    ]
    assert f"björk{KEY_SEP}jóga" not in [t.key for t in listens.tracks]  # column left empty


def test_merge_sums_same_users_and_tracks() -> None:
    a = Listens(
        sp.csr_matrix(np.array([[1, 2], [0, 1]], np.float32)),
        ["u", "v"],
        [TrackKey("x"), TrackKey("y")],
    )
    b = Listens(
        sp.csr_matrix(np.array([[3, 0], [1, 1]], np.float32)),
        ["w", "u"],
        [TrackKey("z"), TrackKey("x")],
        skipped=2,
    )
    m = a.merge(b)
    assert m.users == ["u", "v", "w"]
    assert [t.key for t in m.tracks] == ["x", "y", "z"]
    assert m.counts.toarray().tolist() == [[2, 2, 1], [0, 1, 0], [0, 0, 3]]
    assert m.skipped == 2
    with pytest.raises(ValueError, match="shape"):
        Listens(sp.csr_matrix((2, 2), dtype=np.float32), ["u"], [TrackKey("x"), TrackKey("y")])


def test_parse_time_layouts() -> None:
    t = 1612124100.0
    for s in (
        "31 Jan 2021 20:15",
        "31 Jan 2021, 20:15",
        "1612124100",
        "1612124100000",
        "2021-01-31T20:15:00Z",
        "2021-01-31 20:15:00",
        "2021-01-31T21:15:00+01:00",
    ):
        assert parse_time(s) == t, s
    for s in ("", "soon", "31 Foo 2021 20:15", "2021-13-01"):
        with pytest.raises(ValueError):
            parse_time(s)


# --------------------------------------------------------------------------------------------
# The beets library


@pytest.fixture
def lib(tmp_path: Path):
    from beets.library import Item, Library

    music = tmp_path / "music"
    music.mkdir()
    library = Library(str(tmp_path / "library.db"), str(music))
    specs = [
        # title, artist, flexible attributes
        (
            "Karma Police",
            "Radiohead",
            {"play_count": 3, "lastfm_play_count": 7, "last_played": 1000.0},
        ),
        ("Paranoid Android", "Radiohead", {"listenbrainz_play_count": 2, "last_played": 1500.0}),
        ("Come Together", "The Beatles", {"play_count": 1, "last_played": 90000.0}),
        ("Jóga", "Björk", {}),
    ]
    for n, (title, artist, flex) in enumerate(specs, start=1):
        item = Item(title=title, artist=artist, path=os.fsencode(music / f"{n:02d}.mp3"))
        library.add(item)
        for k, v in flex.items():
            item[k] = v
        item.store()
    return library


def count_selects(library):
    """Install an SQL trace on the library's connection; returns the list it fills."""
    statements: list[str] = []
    library._connection().set_trace_callback(statements.append)
    return statements


def test_read_library_play_counts_last_played_and_playlists(lib, tmp_path: Path) -> None:
    music = tmp_path / "music"
    pl_dir = tmp_path / "playlists"
    pl_dir.mkdir()
    (pl_dir / "mix.m3u8").write_text(
        "#EXTM3U\n#EXTINF:264,Björk - Jóga\n../music/04.mp3\n"
        f"{music / '01.mp3'}\n../music/04.mp3\n/elsewhere/not-in-library.mp3\nhttp://radio/stream\n"
    )
    (pl_dir / "other.m3u").write_text(
        f"file://{music / '03.mp3'}\n02.mp3\n"
    )  # 02: library-relative
    (pl_dir / "notes.txt").write_text("not a playlist\n")
    statements = count_selects(lib)
    listens = read_library(lib, playlist_paths=[pl_dir])
    assert len([s for s in statements if s.lstrip().upper().startswith("SELECT")]) == 1
    assert all(t.item_id is not None and t.key == f"item:{t.item_id}" for t in listens.tracks)
    cells = as_dict(listens)
    assert cells[("library:plays", "item:1")] == 7.0  # the largest of the three counters
    assert cells[("library:plays", "item:2")] == 2.0
    assert cells[("library:plays", "item:3")] == 1.0
    assert ("library:plays", "item:4") not in cells
    # last_played: items 1 and 2 within 30 minutes of each other, item 3 a day later.
    assert cells[("library:last_played@1970-01-01T00:16:40Z", "item:1")] == 1.0
    assert cells[("library:last_played@1970-01-01T00:16:40Z", "item:2")] == 1.0
    assert cells[("library:last_played@1970-01-02T01:00:00Z", "item:3")] == 1.0
    assert cells[("playlist:mix", "item:4")] == 1.0  # listed twice, counts once
    assert cells[("playlist:mix", "item:1")] == 1.0
    assert cells[("playlist:other", "item:3")] == 1.0
    assert cells[("playlist:other", "item:2")] == 1.0
    assert listens.n_users == 5
    track = next(t for t in listens.tracks if t.item_id == 4)
    assert (track.artist, track.title) == ("Björk", "Jóga")


def test_read_library_single_playlist_file_and_errors(lib, tmp_path: Path) -> None:
    pl = tmp_path / "one.m3u"
    pl.write_text(str(tmp_path / "music" / "04.mp3") + "\n")
    listens = read_library(lib, playlist_paths=pl)
    assert as_dict(listens)[("playlist:one", "item:4")] == 1.0
    with pytest.raises(ListeningDataError, match="no such playlist"):
        read_library(lib, playlist_paths=[tmp_path / "missing.m3u"])


def test_read_library_without_data_is_empty(tmp_path: Path) -> None:
    from beets.library import Item, Library

    library = Library(str(tmp_path / "empty.db"), str(tmp_path))
    library.add(Item(title="x", artist="y", path=b"/tmp/x.mp3"))
    listens = read_library(library)
    assert listens.n_users == 0 and listens.n_tracks == 0 and listens.n_plays == 0


def test_read_playlist_resolves_entries(tmp_path: Path) -> None:
    pl = tmp_path / "p" / "list.m3u8"
    pl.parent.mkdir()
    pl.write_bytes(b"\xef\xbb\xbf#EXTM3U\nsong%20a.mp3\nsub/../b.flac\nfile:///m/song%20a.mp3\n")
    got = read_playlist(pl, library_dir=b"/lib")
    base = os.fsencode(pl.parent.resolve())
    assert got == [
        os.path.join(base, b"song%20a.mp3"),
        b"/lib/song%20a.mp3",
        os.path.join(base, b"b.flac"),
        b"/lib/b.flac",
        b"/m/song a.mp3",
    ]


# --------------------------------------------------------------------------------------------
# Every reader: one shared behaviour test over realistic samples of each format
#
# Each sample in tests/fixtures/listening/ holds the same four listens (plus rows
# that its format's rules leave out), as the tool that writes it would.

FIX = Path(__file__).resolve().parent / "fixtures" / "listening"
T0 = 1612124100  # 2021-01-31T20:15:00Z
EXPECTED_PLAYS = {
    ("radiohead", "karma police", T0),
    ("radiohead", "paranoid android", T0 + 300),
    ("björk", "jóga", T0 + 660),
    ("crosby, stills & nash", "suite: judy blue eyes", T0 + 9900),
}
SAMPLES = [
    (
        "Spotify Extended Streaming History",
        "spotify-extended",
        {
            "podcast episode",
            "played under 30 s",
            "private session (incognito_mode)",
            "no track (video or unavailable)",
        },
    ),
    ("endsong_0.json", "spotify-extended", {"played under 30 s"}),
    ("MyData", "spotify-account", {"played under 30 s"}),
    ("exported_tracks.txt", "lastfm-tsv", set()),
    ("recenttracks-rj-page1.json", "lastfm-json", {"now playing (no time yet)"}),
    ("recenttracks_flat.json", "lastfm-json", set()),
    ("lastfm-backup-2021-01.csv", "lastfm-backup", set()),
    ("lastfm_to_csv-rj.csv", "lastfm-csv", {"now playing (no time yet)"}),
    ("librefm-export-rj.csv", "librefm", set()),
    ("lastfm1k-userid-timestamp-artid-artname-traid-traname.tsv", "lastfm-1k", set()),
    ("maloja_export_2021_02_01_10_00_00.json", "maloja", set()),
    ("koito_export_2021-02-01.json", "koito", set()),
    ("pano-scrobbler-scrobbles.jsonl", "pano-scrobbler", {"not a scrobble (love, unlove)"}),
    ("pano-scrobbler-scrobbles.csv", "pano-scrobbler", {"not a scrobble (love, unlove)"}),
    (".scrobbler.log", "scrobbler-log", {"skipped on the player (rating S)"}),
    ("streaming.csv", "tidal", set()),
    ("listenbrainz_api_rj_listens.json", "listenbrainz-api", set()),
    ("listenbrainz_rj_2021_1.jsonl", "listenbrainz", set()),
]


def reader_records(path: Path, fmt: str) -> tuple[set[tuple[str, str, int]], set[str]]:
    """The plays and the reasons of left-out records one reader streams from a sample."""
    plays: set[tuple[str, str, int]] = set()
    reasons: set[str] = set()
    for source in iter_sources(path):
        reader = sniff(source)
        if reader is None:  # a companion file of the export
            continue
        assert reader.name == fmt, source.name
        for rec in reader.read(source):
            assert not isinstance(rec, Bad), (source.name, rec.line, rec.reason)
            if isinstance(rec, Skip):
                reasons.add(rec.reason)
            elif isinstance(rec, Plays):
                for t, artist, title in zip(rec.times, rec.artists, rec.titles, strict=True):
                    plays.add((artist.casefold(), title.casefold(), round(t)))
            elif rec.__class__ is tuple:
                _user, t, artist, title, _mbid, _line = rec
                plays.add((artist.casefold(), title.casefold(), round(t)))
    return plays, reasons


def test_every_format_has_a_sample() -> None:
    assert {fmt for _, fmt, _ in SAMPLES} | {"taste-profile"} == set(listening.FORMATS)


@pytest.mark.parametrize(("name", "fmt", "left_out"), SAMPLES, ids=[s[0] for s in SAMPLES])
def test_each_reader_reads_its_sample(name: str, fmt: str, left_out: set[str]) -> None:
    path = FIX / name
    assert isinstance(listening.READERS[fmt], ListenReader)
    assert sniff_format(path) == fmt
    plays, reasons = reader_records(path, fmt)
    assert plays == EXPECTED_PLAYS
    assert reasons == left_out
    for format in ("auto", fmt):
        listens = read_listens(path, format=format)
        assert listens.n_plays == 4 and listens.skipped == 0
        # 20:15-20:26 then 23:00: two sessions
        assert sorted(np.asarray(listens.counts.sum(axis=1)).ravel().tolist()) == [1.0, 3.0]
        titles = {t.title for t in listens.tracks}
        assert titles == {"Karma Police", "Paranoid Android", "Jóga", "Suite: Judy Blue Eyes"}


def test_reader_interface_and_registry() -> None:
    for name, reader in listening.READERS.items():
        assert reader.name == name and reader.description
    head = Head("x.csv", "Radiohead,OK Computer,Karma Police,31 Jan 2021 20:15\n")
    assert [n for n, r in listening.READERS.items() if r.sniff(head)] == ["lastfm-csv"]


def test_spotify_zip_as_downloaded(tmp_path: Path) -> None:
    """my_spotify_data.zip: the folder inside, Mac resource forks and a read-me beside it."""
    zpath = tmp_path / "my_spotify_data.zip"
    folder = FIX / "Spotify Extended Streaming History"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f"Spotify Extended Streaming History/{f.name}")
            zf.writestr(f"__MACOSX/Spotify Extended Streaming History/._{f.name}", b"\0\5\26\7junk")
    assert sniff_format(zpath) == "spotify-extended"
    from_zip = read_listens(zpath)
    assert by_session(from_zip) == by_session(read_listens(folder)) and from_zip.n_plays == 4
    # one listener: the zip's name, whatever file each play came from
    assert {u.split("@")[0] for u in from_zip.users} == {"my_spotify_data"}


def test_spotify_files_out_of_time_order_make_the_same_sessions(tmp_path: Path) -> None:
    rows = json.loads((FIX / "endsong_0.json").read_text(encoding="utf-8"))
    (tmp_path / "endsong_0.json").write_text(json.dumps(rows[::-1]), encoding="utf-8")
    assert as_dict(read_listens(tmp_path / "endsong_0.json")) == as_dict(
        read_listens(FIX / "endsong_0.json")
    )
    users = read_listens(FIX / "endsong_0.json").users  # username from the rows
    assert {u.split("@")[0] for u in users} == {"jdoe_spotify"}


def test_lastfm_recent_tracks_gz_and_page_user(tmp_path: Path) -> None:
    gz = tmp_path / "page2.json.gz"
    gz.write_bytes(gzip.compress((FIX / "recenttracks-rj-page1.json").read_bytes()))
    assert sniff_format(gz) == "lastfm-json"
    listens = read_listens(gz)
    assert listens.n_plays == 4 and {u.split("@")[0] for u in listens.users} == {"rj"}
    # the track MBID is the key where Last.fm gives one
    assert KARMA in {t.key for t in listens.tracks}


def test_koito_names_are_primary_aliases_and_the_listener_is_the_user() -> None:
    listens = read_listens(FIX / "koito_export_2021-02-01.json")
    by_title = {t.title: t for t in listens.tracks}
    # two artists on Paranoid Android: the one marked is_primary; Björk has three aliases
    assert by_title["Paranoid Android"].artist == "Radiohead"
    assert by_title["Jóga"].artist == "Björk"
    assert by_title["Karma Police"].key == KARMA  # track.mbid
    assert {u.split("@")[0] for u in listens.users} == {"rj"}


def test_pano_scrobbler_csv_and_jsonl_agree() -> None:
    jsonl = read_listens(FIX / "pano-scrobbler-scrobbles.jsonl")
    csv_ = read_listens(FIX / "pano-scrobbler-scrobbles.csv")
    assert by_session(jsonl) == by_session(csv_) and jsonl.n_plays == 4


def test_tidal_day_first_dates_zones_preamble_and_short_streams(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "streaming.csv"
    path.write_text(
        "TIDAL streaming history\n"
        "\n"
        "artist_name,track_title,entry_date,timezone,stream_duration_ms\n"
        "Radiohead,Karma Police,31/01/2021 21:15,+01:00,254000\n"
        "Radiohead,Paranoid Android,31/01/2021 20:20,UTC,254000\n"
        "Radiohead,Airbag,31/01/2021 20:18,UTC,4200\n"
        "Björk,Jóga,31/01/2021 20:26,Mars/Olympus_Mons,254000\n"
        "Radiohead,Let Down,1612124820,+01:00,254000\n",  # unix seconds need no zone
        encoding="utf-8",
    )
    assert sniff_format(path) == "tidal"
    with caplog.at_level("WARNING", logger="deepsim"):
        listens = read_listens(path)
    assert set(by_session(listens)) == {
        ("2021-01-31T20:15:00Z", f"radiohead{KEY_SEP}karma police"),
        ("2021-01-31T20:15:00Z", f"radiohead{KEY_SEP}paranoid android"),
        ("2021-01-31T20:15:00Z", f"björk{KEY_SEP}jóga"),
        ("2021-01-31T20:15:00Z", f"radiohead{KEY_SEP}let down"),
    }  # Airbag played 4 s
    assert any("Mars/Olympus_Mons" in r.getMessage() for r in caplog.records)
    oslo = tmp_path / "oslo" / "streaming.csv"
    oslo.parent.mkdir()
    oslo.write_text(
        "artist_name,track_title,entry_date,timezone\n"
        "Radiohead,Karma Police,31/01/2021 21:15,Europe/Oslo\n",
        encoding="utf-8",
    )
    try:
        from zoneinfo import ZoneInfo

        ZoneInfo("Europe/Oslo")
    except Exception:  # no time-zone database on this machine
        pytest.skip("no IANA time-zone database")
    assert by_session(read_listens(oslo)) == {
        ("2021-01-31T20:15:00Z", f"radiohead{KEY_SEP}karma police"): 1.0
    }


def test_play_order_is_the_three_key_sort() -> None:
    """One listener: a stable sort by time, ties by track — the same sequence of
    (user, time, track) as np.lexsort, so duplicates are neighbours and sessions the same."""
    from deepsim.listening.core import _play_order

    rng = np.random.default_rng(1)
    for trial in range(100):
        n = int(rng.integers(1, 300))
        t = rng.integers(0, 20, n).astype(np.float64)
        tr = rng.integers(0, 5, n).astype(np.int32)
        u = np.zeros(n, np.int32) if trial % 2 else rng.integers(0, 3, n).astype(np.int32)
        order, ref = _play_order(u, t, tr), np.lexsort((tr, t, u))
        assert sorted(order.tolist()) == list(range(n))
        for a in (u, t, tr):
            assert (a[order] == a[ref]).all()


def write_spotify_rows(path: Path, rows: list[object]) -> None:
    """Rows as Spotify writes them: a JSON array, 4-space indented."""
    path.write_text(json.dumps(rows, indent=4, ensure_ascii=False), encoding="utf-8")


def test_spotify_fast_path_and_stdlib_path_read_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """msgspec (whole file, only the fields read) and the stdlib stream, in one batch of
    plays or many: same plays, same skips, the same messages with the same line numbers."""
    from deepsim.listening import jsonformats

    pytest.importorskip("msgspec")
    base = json.loads(
        (
            FIX / "Spotify Extended Streaming History" / "Streaming_History_Audio_2021_1.json"
        ).read_text(encoding="utf-8")
    )
    good = next(r for r in base if r["master_metadata_track_name"] and r["ms_played"] > 30_000)
    rows = [dict(good, ts=f"2021-02-0{d}T1{h}:00:00Z") for d in range(1, 8) for h in range(10)]
    rows[3] = dict(good, ms_played="lots")  # line of row 3 named in the message
    rows[5] = dict(good, master_metadata_track_name="   ")
    rows[7] = dict(good, ts="2021-02-01T10:00:00")  # no zone: UTC
    rows[9] = dict(good, ts="2021-02-01T11:00:00+01:00")  # an offset
    rows[11] = dict(good, username="someone_else")
    folder = tmp_path / "Spotify Extended Streaming History"
    folder.mkdir()
    write_spotify_rows(folder / "Streaming_History_Audio_2021_0.json", rows)
    write_spotify_rows(folder / "Streaming_History_Audio_2021_1.json", base)

    def read() -> tuple[dict, int, list[str]]:
        caplog.clear()
        with caplog.at_level("INFO", logger="deepsim"):
            listens = read_listens(folder, max_bad_fraction=0.5)
        return as_dict(listens), listens.skipped, [r.getMessage() for r in caplog.records]

    whole_calls: list[object] = []
    real_whole = jsonstream.Rows.whole

    def spy(self: jsonstream.Rows, source: object) -> object:
        out = real_whole(self, source)
        whole_calls.append(out is not None)
        return out

    monkeypatch.setattr(jsonstream.Rows, "whole", spy)
    fast = read()
    assert whole_calls == [True, True]  # both files decoded at once
    assert fast[1] == 2
    text = (folder / "Streaming_History_Audio_2021_0.json").read_text(encoding="utf-8")
    starts = [n for n, line in enumerate(text.splitlines(), 1) if line == "    {"]
    assert any(f"line {starts[3]}: ms_played is not a number" in m for m in fast[2]), fast[2]
    assert any(f"line {starts[5]}: no track name" in m for m in fast[2])
    assert any("2 exact duplicate" in m for m in fast[2])  # 10:00 without a zone, 11:00+01:00
    assert any("someone_else@" in u for u, _ in fast[0])
    monkeypatch.setattr(jsonformats._SPOTIFY_ROWS, "_decoder", None)  # as without msgspec
    assert read() == fast
    monkeypatch.undo()
    monkeypatch.setattr(jsonstream, "WHOLE_FILE_MAX", 1000)  # larger files are streamed
    assert read() == fast
    monkeypatch.setattr(jsonformats, "BATCH", 4)  # plays handed over in many small batches
    assert read() == fast
    monkeypatch.undo()
    monkeypatch.setattr(jsonformats, "BATCH", 3)
    assert read() == fast


def test_spotify_files_read_by_worker_processes_as_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Several Spotify files (a folder, and the zip as downloaded) are read by worker
    processes: the same listens, skips and messages as reading them here, the cp1252
    warning given once, and the workers gone afterwards."""
    import multiprocessing
    import zipfile

    from deepsim import threads
    from deepsim.listening import read

    base = json.loads((FIX / "endsong_0.json").read_text(encoding="utf-8"))
    folder = tmp_path / "Spotify Extended Streaming History"
    folder.mkdir()
    for k in range(6):
        rows = [dict(r, ts=f"2021-0{k + 1}-01T1{j}:00:00Z") for j, r in enumerate(base)]
        if k == 2:
            rows.append(dict(base[0], ms_played="lots"))  # a bad row, with its line
        text = json.dumps(rows, indent=4, ensure_ascii=False)
        if k == 4:  # not UTF-8: decoded as cp1252, with a warning
            (folder / f"Streaming_History_Audio_2021_{k}.json").write_bytes(
                text.replace("Radiohead", "Radiohead Ö").encode("cp1252")
            )
        else:
            (folder / f"Streaming_History_Audio_2021_{k}.json").write_text(text, encoding="utf-8")
    (folder / "ReadMeFirst_ExtendedStreamingHistory.pdf").write_bytes(b"%PDF-1.4\n%%EOF\n")
    zpath = tmp_path / "my_spotify_data.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f"Spotify Extended Streaming History/{f.name}")

    def read_both(path: Path) -> list[tuple[dict, int, int, list[str]]]:
        out = []
        for at_least in (10**9, 2):  # here; by worker processes
            monkeypatch.setattr(read, "PARALLEL_MIN_FILES", at_least)
            caplog.clear()
            with caplog.at_level("INFO", logger="deepsim"):
                listens = read_listens(path, max_bad_fraction=0.5)
            messages = sorted(r.getMessage() for r in caplog.records)
            out.append((as_dict(listens), listens.skipped, len(listens.tracks), messages))
        return out

    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(read, "PARALLEL_MIN_FILES", 2)
    handed = [
        (s.basename, r is not None) for s, _, r in read._with_records(read._sniffed(zpath, None))
    ]
    assert handed == [(f.name, True) for f in sorted(folder.glob("*.json"))]  # the PDF: ignored
    for path in (folder, zpath):
        here, workers = read_both(path)
        assert workers == here
        listens, skipped, _, messages = here
        assert skipped == 1 and listens
        assert sum("ms_played is not a number" in m for m in messages) == 1
        assert sum("cp1252" in m for m in messages) == 1
        assert any("radiohead ö" in key for _, key in listens)
    assert multiprocessing.active_children() == []
    # in a pool's (daemonic) worker, which may start no process: read there
    with multiprocessing.get_context("forkserver").Pool(1) as pool:
        plays = pool.apply(_n_plays, (str(folder),))
    assert plays == read_listens(folder, max_bad_fraction=0.5).n_plays


def _n_plays(path: str) -> int:
    return read_listens(path, max_bad_fraction=0.5).n_plays


def test_spotify_odd_files_fall_back_to_the_stdlib_reader(tmp_path: Path) -> None:
    """What msgspec refuses (an element that is not an object, NaN) is read by the stdlib
    path, with its messages; a cp1252 file is decoded as such first."""
    rows = json.loads((FIX / "endsong_0.json").read_text(encoding="utf-8"))
    odd = tmp_path / "endsong_1.json"
    text = json.dumps(rows, indent=4)
    odd.write_text(text[:-1] + ', 17, {"ts": NaN, "ms_played": 1}\n]', encoding="utf-8")
    listens = read_listens(odd, max_bad_fraction=0.5)
    assert as_dict(listens) == as_dict(read_listens(FIX / "endsong_0.json"))
    assert listens.skipped == 1  # the 17; the NaN row has no track
    latin = tmp_path / "endsong_2.json"
    latin.write_bytes(
        json.dumps(rows, indent=4, ensure_ascii=False)
        .replace("Jóga", "J\\u00f3ga")
        .encode()
        .replace(b"Radiohead", "Radiohead Ö".encode("cp1252"))
    )
    artists = {t.artist for t in read_listens(latin).tracks}
    assert "Radiohead Ö" in artists


# --------------------------------------------------------------------------------------------
# Bugs of the old readers


def test_librefm_comment_lines_do_not_hide_the_header(tmp_path: Path) -> None:
    listens = read_listens(FIX / "librefm-export-rj.csv")
    karma = next(t for t in listens.tracks if t.title == "Karma Police")
    assert karma.artist == "Radiohead"  # not "OK Computer" as a title, "Karma Police" as album
    # the same file with its '#' written in UTF-7 (+ACM-), as some exports do
    utf7 = tmp_path / "librefm.csv"
    text = (FIX / "librefm-export-rj.csv").read_text(encoding="utf-8")
    utf7.write_text(text.replace("#", "+ACM-"), encoding="utf-8")
    assert sniff_format(utf7) == "librefm"
    assert by_session(read_listens(utf7)) == by_session(read_listens(FIX / "librefm-export-rj.csv"))


def test_lastfm_csv_now_playing_row_is_not_a_bad_record(tmp_path: Path) -> None:
    small = write_lines(
        tmp_path / "scrobbles.csv",
        [
            "Radiohead,OK Computer,No Surprises,",
            "Radiohead,OK Computer,Karma Police,31 Jan 2021 20:15",
        ],
    )
    listens = read_listens(small, max_bad_fraction=0)
    assert listens.n_plays == 1 and listens.skipped == 0


def listenbrainz_line(i: int) -> str:
    return json.dumps(
        {
            "listened_at": 1_600_000_000 + 200 * i,
            "user_name": "alice",
            "track_metadata": {"artist_name": f"A{i % 7}", "track_name": f"T{i % 11}"},
        }
    )


def test_bad_record_limit_is_per_source_not_per_zip_member(tmp_path: Path) -> None:
    path = tmp_path / "listenbrainz_alice.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for month in range(1, 13):
            lines = [listenbrainz_line(month * 100 + k) for k in range(40)]
            if month == 12:  # one month of 5 listens, the last line truncated by the download
                lines = [*lines[:4], lines[4][:37]]
            zf.writestr(f"listens/2021/{month}.jsonl", "\n".join(lines) + "\n")
    listens = read_listens(path)  # 1 bad record in 445: within the 1 % of the export
    assert listens.skipped == 1 and listens.n_plays == 444
    with pytest.raises(ListeningDataError) as info:
        read_listens(path, max_bad_fraction=0)
    assert info.value.path == f"{path}!listens/2021/12.jsonl" and info.value.line == 5


def test_unknown_json_says_what_was_tried_and_what_it_looks_like(tmp_path: Path) -> None:
    odd = tmp_path / "history.json"
    odd.write_text(
        json.dumps(
            [{"played": 1, "song": "x", "performer": "y", "extraordinarily_long_key_name": 2}]
        )
    )
    with pytest.raises(ListeningDataError) as info:
        read_listens(odd)
    msg = info.value.reason
    assert "cannot tell the format" in msg
    assert "a JSON array of objects with keys played, song, performer" in msg
    for fmt in ("spotify-extended", "lastfm-json", "listenbrainz", "maloja", "koito"):
        assert fmt in msg
    assert "track_metadata" not in msg and "invalid JSON" not in msg
    # a long description is cut between words, never inside one
    many = tmp_path / "wide.json"
    many.write_text(json.dumps({f"field_number_{i}": i for i in range(40)}))
    with pytest.raises(ListeningDataError) as info:
        read_listens(many)
    described = info.value.reason.split("(", 1)[1].split(")", 1)[0]
    assert described.endswith(" …")
    assert all(
        w.rstrip(",") in {f"field_number_{i}" for i in range(40)} for w in described.split()[7:-1]
    )


def test_companion_files_are_ignored_and_folders_read_recursively(tmp_path: Path) -> None:
    export = tmp_path / "export"
    (export / "listens" / "2021").mkdir(parents=True)
    (export / "listens" / "2021" / "1.jsonl").write_text(
        (FIX / "listenbrainz_rj_2021_1.jsonl").read_text(encoding="utf-8"), encoding="utf-8"
    )
    (export / "user.json").write_text('{"user_id": 1, "username": "rj"}')
    (export / "feedback.jsonl").write_text('{"recording_msid": "x", "score": 1}\n')
    (export / "pinned_recording.jsonl").write_text('{"blurb_content": "hi"}\n')
    (export / "README.txt").write_text("This is your ListenBrainz export.\n")
    (export / "notes.txt").write_text("my own notes, not listens\n")
    (export / "__MACOSX").mkdir()
    (export / "__MACOSX" / "._user.json").write_bytes(b"\0\5\26\7")
    (export / "._1.jsonl").write_bytes(b"\0\5\26\7")
    listens = read_listens(export)
    assert listens.n_plays == 4
    zpath = tmp_path / "export.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in sorted(export.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(export).as_posix())
    assert as_dict(read_listens(zpath)) == as_dict(listens)
    # a folder with nothing to read says so
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "README.txt").write_text("nothing\n")
    with pytest.raises(ListeningDataError, match="no listens"):
        read_listens(tmp_path / "empty")


def test_msd_train_triplets_zip_is_the_taste_profile(tmp_path: Path) -> None:
    zpath = tmp_path / "train_triplets.txt.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.write(DATA / "taste_profile.txt", "train_triplets.txt")
    assert sniff_format(zpath) == "taste-profile"
    listens = read_listens(zpath, song_table=DATA / "unique_tracks.txt")
    assert as_dict(listens) == as_dict(read_listens(DATA / "taste_profile.txt"))
    assert any(t.artist for t in listens.tracks)


def test_exact_duplicate_plays_count_once_also_across_files(tmp_path: Path) -> None:
    lines = (FIX / "lastfm_to_csv-rj.csv").read_text(encoding="utf-8").splitlines()
    # lastfm-to-csv fetched page 1 twice: its rows appear twice in the file
    doubled = write_lines(tmp_path / "rj.csv", [lines[0], *lines[1:3], *lines[1:]])
    once = read_listens(FIX / "lastfm_to_csv-rj.csv")
    got = read_listens(doubled)
    assert got.n_plays == 4 and got.duplicates == 2
    assert by_session(got) == by_session(once)
    # the same export given twice (a file and its copy in a folder of the same name)
    (tmp_path / "rj").mkdir()
    shutil.copy(doubled, tmp_path / "rj" / "scrobbles.csv")
    twice = read_listens([doubled, tmp_path / "rj"])
    assert twice.n_plays == 4 and twice.duplicates == 2 + 6
    # different listeners' identical plays are not duplicates
    both = read_listens([FIX / "lastfm_to_csv-rj.csv", FIX / "exported_tracks.txt"])
    assert both.n_plays == 8


@pytest.mark.parametrize(
    ("encoding", "bom"),
    [
        ("utf-8", b""),
        ("utf-8", b"\xef\xbb\xbf"),
        ("utf-16-le", b"\xff\xfe"),
        ("utf-16-be", b"\xfe\xff"),
        ("utf-16-le", b""),
    ],
)
def test_utf8_and_utf16_are_detected(tmp_path: Path, encoding: str, bom: bytes) -> None:
    text = (FIX / "lastfm_to_csv-rj.csv").read_text(encoding="utf-8")
    path = tmp_path / "rj.csv"
    path.write_bytes(bom + text.encode(encoding))
    listens = read_listens(path)
    assert {t.title for t in listens.tracks} >= {"Jóga"} and listens.n_plays == 4


def test_other_bytes_are_cp1252_with_a_warning_naming_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = (FIX / "lastfm_to_csv-rj.csv").read_text(encoding="utf-8")
    path = tmp_path / "rj.csv"
    path.write_bytes(text.replace("Suite", "Suite – live").encode("cp1252"))
    with caplog.at_level("WARNING", logger="deepsim"):
        listens = read_listens(path)
    titles = {t.title for t in listens.tracks}
    assert {"Jóga", "Suite – live: Judy Blue Eyes"} <= titles
    assert not any("\ufffd" in (t.title or "") + (t.artist or "") for t in listens.tracks)
    assert any(str(path) in r.getMessage() and "cp1252" in r.getMessage() for r in caplog.records)
    # UTF-8 with a stray cp1252 byte far from the start: that line alone, also reported
    caplog.clear()
    mixed = tmp_path / "mixed.csv"
    rows = [
        f"Band {i},Album,Song {i},31 Jan 2021 {i // 60 % 24:02d}:{i % 60:02d}" for i in range(3000)
    ]
    rows[2500] = "Björk,Homogenic,Jóga,01 Feb 2021 10:00"
    mixed.write_bytes("\n".join(rows[:2500]).encode() + b"\n" + rows[2500].encode("cp1252") + b"\n")
    with caplog.at_level("WARNING", logger="deepsim"):
        got = read_listens(mixed)
    assert "Jóga" in {t.title for t in got.tracks}
    assert any(str(mixed) in r.getMessage() and "cp1252" in r.getMessage() for r in caplog.records)
