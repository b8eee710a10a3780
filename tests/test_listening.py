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
    Listens,
    TrackKey,
    parse_time,
    read_library,
    read_listens,
    read_playlist,
    sniff_format,
)

DATA = Path(__file__).resolve().parent / "data" / "listens"
KARMA = "8ec9a9c2-5c4b-4b1e-b7e5-0a1c4b7e6a01"


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
    monkeypatch.setattr(listening, "_JSON_CHUNK", 97)
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
