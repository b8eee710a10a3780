"""Tests of deepsim.matching: normalisation, matching to library items, collapsing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from deepsim.listening import KEY_SEP, Listens, TrackKey, read_listens
from deepsim.matching import (
    LibraryKeys,
    collapse,
    library_keys,
    match_tracks,
    normalise_artist,
    normalise_title,
)

DATA = Path(__file__).resolve().parent / "data" / "listens"
KARMA = "8ec9a9c2-5c4b-4b1e-b7e5-0a1c4b7e6a01"
OTHER = "5a1f3b3e-4a7e-4f8e-9d7b-2f8c1c2b9e02"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("The Beatles", "beatles"),
        ("Beatles, The", "beatles"),
        ("THE BEATLES", "beatles"),
        ("Beyoncé feat. Jay-Z", "beyonce"),
        ("Beyonce ft. Jay Z", "beyonce"),
        ("Daft Punk featuring Pharrell Williams", "daft punk"),
        ("Daft Punk (feat. Pharrell Williams)", "daft punk"),
        ("Simon & Garfunkel", "simon and garfunkel"),
        ("Simon and Garfunkel", "simon and garfunkel"),
        ("Florence + the Machine", "florence and the machine"),
        ("Sigur Rós", "sigur ros"),
        ("Motörhead", "motorhead"),
        ("R.E.M.", "rem"),
        ("Guns N' Roses", "guns n roses"),
        ("Jay-Z", "jay z"),
        ("  Massive   Attack ", "massive attack"),
        ("!!!", "!!!"),
        ("坂本龍一", "坂本龍一"),
        ("", ""),
        (None, ""),
    ],
)
def test_normalise_artist(raw: str | None, expected: str) -> None:
    assert normalise_artist(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Hey Jude - Remastered 2015", "hey jude"),
        ("Hey Jude - 2009 Remaster", "hey jude"),
        ("Hey Jude (Remastered)", "hey jude"),
        ("Hey Jude (Remaster)", "hey jude"),
        ("Hey Jude [Remastered 2009]", "hey jude"),
        ("Get Lucky (Radio Edit)", "get lucky"),
        ("Get Lucky [Radio Edit]", "get lucky"),
        ("Get Lucky (feat. Pharrell Williams)", "get lucky"),
        ("Get Lucky feat. Pharrell Williams", "get lucky"),
        ("Get Lucky (Radio Edit) [feat. Pharrell]", "get lucky"),
        ("Yellow (Live)", "yellow"),
        ("Yellow - Live at Glastonbury", "yellow"),
        ("Song (Album Version)", "song"),
        ("Jóga", "joga"),
        ("Don't Stop Me Now", "dont stop me now"),
        ("Rock & Roll", "rock and roll"),
        ("The Wall", "the wall"),  # "the" only goes from artists
        # Notes naming another recording stay.
        ("Get Lucky (Daft Punk Remix)", "get lucky daft punk remix"),
        ("Creep (Acoustic Version)", "creep acoustic version"),
        ("Song - Part 2", "song part 2"),
        ("(Live)", "live"),
    ],
)
def test_normalise_title(raw: str, expected: str) -> None:
    assert normalise_title(raw) == expected


@pytest.fixture
def lib(tmp_path: Path):
    from beets.library import Item, Library

    library = Library(str(tmp_path / "library.db"), str(tmp_path))
    specs = [
        ("Karma Police", "Radiohead", KARMA),
        ("Paranoid Android", "Radiohead", ""),
        ("Hey Jude", "The Beatles", ""),
        ("Jóga", "Björk", ""),
        ("Get Lucky (feat. Pharrell Williams)", "Daft Punk", ""),
        ("Hey Jude (Remastered 2015)", "Beatles", ""),  # a duplicate of item 3 by name
        ("Something Else", "Radiohead", OTHER),
    ]
    for n, (title, artist, mbid) in enumerate(specs, start=1):
        library.add(
            Item(
                title=title, artist=artist, mb_trackid=mbid, path=os.fsencode(tmp_path / f"{n}.mp3")
            )
        )
    return library


def test_library_keys_is_one_query(lib) -> None:
    statements: list[str] = []
    lib._connection().set_trace_callback(statements.append)
    keys = library_keys(lib)
    assert len([s for s in statements if s.lstrip().upper().startswith("SELECT")]) == 1
    assert keys.item_ids.dtype == np.int64
    assert keys.item_ids.tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert keys.by_mbid == {KARMA: 1, OTHER: 7}
    assert keys.by_name[("beatles", "hey jude")] == 3  # lowest id of the duplicates
    assert keys.by_name[("daft punk", "get lucky")] == 5


def test_match_tracks_by_mbid_name_and_id(lib) -> None:
    tracks = [
        TrackKey(KARMA, "Radiohead", "Karma Police", KARMA),  # 0: MBID
        TrackKey(f"radiohead{KEY_SEP}paranoid android", "RADIOHEAD", "Paranoid Android"),  # 1
        TrackKey("x", "The Beatles", "Hey Jude - Remastered 2015"),  # 2: name -> 3
        TrackKey("y", "Bjork", "Joga"),  # 3: accents
        TrackKey("z", "Daft Punk feat. Pharrell Williams", "Get Lucky [Radio Edit]"),  # 4
        TrackKey("item:6", item_id=6),  # 5: direct
        TrackKey("item:99", item_id=99),  # 6: gone from the library
        TrackKey("SOAKIMP12A8C130995"),  # 7: no names, no MBID
        TrackKey("w", "Nobody", "Nothing"),  # 8
        # 9: the MBID wins over names that point to another item
        TrackKey(OTHER, "Radiohead", "Karma Police", OTHER),
        # 10: an unknown MBID falls back to the names
        TrackKey("00000000-0000-0000-0000-000000000000", "Radiohead", "Paranoid Android"),
        TrackKey(f"the beatles{KEY_SEP}hey jude"),  # 11: names from the key alone
    ]
    res = match_tracks(tracks, lib)
    assert res.item_ids.dtype == np.int64
    assert res.item_ids.tolist() == [1, 2, 3, 4, 5, 6, -1, -1, -1, 7, 2, 3]
    assert (res.by_id, res.by_mbid, res.by_name) == (1, 2, 6)
    assert res.n_matched == 9
    assert res.rate == pytest.approx(9 / 12)


def test_match_tracks_accepts_library_keys_and_empty(lib) -> None:
    keys = library_keys(lib)
    assert isinstance(keys, LibraryKeys)
    res = match_tracks([TrackKey("k", "radiohead", "karma police")], keys)
    assert res.item_ids.tolist() == [1]
    empty = match_tracks([], keys)
    assert empty.n_matched == 0 and empty.rate == 0.0 and len(empty.item_ids) == 0


def test_collapse_merges_keys_of_one_item(lib) -> None:
    counts = sp.csr_matrix(
        np.array(
            [
                [2, 1, 0, 4, 0],
                [0, 3, 1, 0, 0],
                [0, 0, 0, 5, 0],  # only an unmatched track: dropped
                [0, 0, 0, 0, 1],
            ],
            dtype=np.float32,
        )
    )
    tracks = [
        TrackKey(KARMA, "Radiohead", "Karma Police", KARMA),
        TrackKey(f"radiohead{KEY_SEP}karma police", "Radiohead", "Karma Police"),  # same item
        TrackKey("b", "Björk", "Jóga"),
        TrackKey("nope", "Nobody", "Nothing"),
        TrackKey("item:3", item_id=3),
    ]
    listens = Listens(counts, ["u", "v", "w", "x"], tracks)
    res = match_tracks(tracks, lib)
    assert res.item_ids.tolist() == [1, 1, 4, -1, 3]
    out = collapse(listens, res)
    assert out.users == ["u", "v", "x"]
    assert [t.key for t in out.tracks] == ["item:1", "item:3", "item:4"]
    assert [t.item_id for t in out.tracks] == [1, 3, 4]
    assert out.tracks[0].mbid == KARMA and out.tracks[2].title == "Jóga"
    assert out.counts.toarray().tolist() == [[3, 0, 0], [3, 0, 1], [0, 1, 0]]
    assert collapse(listens, res, min_user_plays=2).users == ["u", "v"]
    with pytest.raises(ValueError, match="tracks"):
        collapse(listens, match_tracks(tracks[:2], lib))


def test_end_to_end_from_files(lib) -> None:
    listens = read_listens([DATA / "lastfm_noheader.csv", DATA / "lastfm1k.tsv"])
    res = match_tracks(listens.tracks, lib)
    out = collapse(listens, res)
    # Karma Police by name (CSV) and by MBID (1K) end up in one column.
    karma = [t.key for t in out.tracks].index("item:1")
    assert out.counts[:, karma].sum() == 2 + 3
    assert 0 < res.rate < 1
    assert all(t.item_id is not None for t in out.tracks)
