"""`beet similar` and `beet deepsim-index` end to end, on vectors written straight to the store.

No network runs here: every item gets a planted 8-d vector of the active
(default) model id, so the expected neighbours are known exactly.

Seed ``seed-a`` points along axis 0; ``a1`` … ``a6`` lie 10°, 15° … 35° from it
(their similarities are the cosines), ``bridge`` lies halfway between
``seed-a`` and ``seed-b`` (axis 2), whose own neighbours ``b1`` … ``b4`` lie
10° … 25° from it; ``far-*`` are orthogonal to everything else.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from beets.exceptions import UserError
from beets.library import Item, Library
from beets.test.helper import PluginTestHelper
from beets.util.m3u import M3UFile

from deepsim import store
from deepsim.index import index_paths, refresh_index

MODEL_ID = "musicnn-msd-mtt-1"  # the default model's id
OTHER_ID = "musicnn-msd-1"
DIM = 8

#: title -> (artist, album, format, genre, length, vector direction)
#: directions: ("toward", from_axis, to_axis, degrees) or ("mix", axes...)
SPECS: dict[str, tuple[str, str, str, str, float, tuple[Any, ...]]] = {
    "seed-a": ("Seeder", "Seeds", "FLAC", "Rock", 181.0, ("toward", 0, 1, 0)),
    "a1": ("Ann", "A1", "FLAC", "Christmas", 200.4, ("toward", 0, 1, 10)),
    "a2": ("Ann", "A1", "MP3", "Rock", 120.6, ("toward", 0, 1, 15)),
    "a3": ("Ann", "A2", "FLAC", "Rock", 95.0, ("toward", 0, 1, 20)),
    "a4": ("Bob", "B1", "MP3", "Jazz", 300.0, ("toward", 0, 1, 25)),
    "a5": ("Bob", "B1", "FLAC", "Jazz", 61.2, ("toward", 0, 1, 30)),
    "a6": ("Cat", "C1", "MP3", "Jazz", 42.0, ("toward", 0, 1, 35)),
    "bridge": ("Eve", "E1", "MP3", "Pop", 150.0, ("mix", 0, 2)),
    "seed-b": ("Seeder", "Seeds", "FLAC", "Pop", 170.0, ("toward", 2, 3, 0)),
    "b1": ("Dan", "D1", "MP3", "Pop", 100.0, ("toward", 2, 3, 10)),
    "b2": ("Dan", "D1", "FLAC", "Pop", 100.0, ("toward", 2, 3, 15)),
    "b3": ("Dan", "D2", "MP3", "Pop", 100.0, ("toward", 2, 3, 20)),
    "b4": ("Fay", "F1", "MP3", "Pop", 100.0, ("toward", 2, 3, 25)),
    "far-1": ("Gus", "G1", "MP3", "Noise", 10.0, ("toward", 4, 5, 0)),
    "far-2": ("Gus", "G1", "MP3", "Noise", 10.0, ("toward", 5, 6, 0)),
    "far-3": ("Gus", "G1", "MP3", "Noise", 10.0, ("toward", 6, 7, 0)),
    "far-4": ("Gus", "G1", "MP3", "Noise", 10.0, ("toward", 7, 4, 0)),
}

#: seed-a's neighbours, best first (the cosines of their angles), then bridge.
A_ORDER = ["a1", "a2", "a3", "a4", "a5", "a6", "bridge"]
B_ORDER = ["b1", "b2", "b3", "b4", "bridge"]


def direction(spec: tuple[Any, ...]) -> np.ndarray:
    v = np.zeros(DIM)
    if spec[0] == "toward":
        _, a, b, degrees = spec
        v[a] = math.cos(math.radians(degrees))
        v[b] = math.sin(math.radians(degrees))
    else:
        for axis in spec[1:]:
            v[axis] = 1.0
    return v / np.linalg.norm(v)


def cosine(a: str, b: str) -> float:
    return float(direction(SPECS[a][5]) @ direction(SPECS[b][5]))


class SimilarHelper(PluginTestHelper):
    plugin: ClassVar[str] = "deepsim"

    @pytest.fixture(autouse=True)
    def _library(self, setup: None) -> None:
        self.items: dict[str, Item] = {}
        music = self.lib_path / "music"
        music.mkdir()
        for track, (title, (artist, album, fmt, genre, length, _)) in enumerate(
            SPECS.items(), start=1
        ):
            path = music / f"{title}.{fmt.lower()}"
            path.write_bytes(b"\0" * 64)  # playlists check that entries exist
            self.items[title] = self.add_item(
                title=title,
                artist=artist,
                album=album,
                format=fmt,
                genres=[genre],  # beets 2.14: `genre:` queries read the genres list
                length=length,
                track=track,
                path=str(path),
            )
        self.write(MODEL_ID)
        # The planted neighbours lie 5° apart (cosine 0.996), above the version threshold:
        # fold versions by tags only here (tests/plugin/test_features_commands.py covers it).
        self.config["deepsim"]["dupes"]["threshold"] = None

    @property
    def state_dir(self) -> Path:
        return self.temp_path / "deepsim"

    def write(self, model_id: str, *, perm: bool = False) -> None:
        """Store the planted vectors (with ``perm``, axes rotated: a different space)."""
        rows = []
        for title in SPECS:
            v = direction(SPECS[title][5])
            rows.append((self.items[title].id, np.roll(v, 3) if perm else v))
        store.write_vectors(self.lib, rows, model_id)

    def similar(self, capsys: pytest.CaptureFixture[str], *args: str) -> list[str]:
        capsys.readouterr()
        self.run_command("similar", *args)
        return capsys.readouterr().out.splitlines()

    def titles(self, capsys: pytest.CaptureFixture[str], *args: str) -> list[str]:
        return self.similar(capsys, "-f", "$title", *args)

    def index_message(self, capsys: pytest.CaptureFixture[str], *args: str) -> str:
        capsys.readouterr()
        self.run_command("deepsim-index", *args)
        return capsys.readouterr().out.strip()

    def sidecar(self, model_id: str = MODEL_ID) -> dict[str, Any]:
        _, sidecar = index_paths(self.state_dir, model_id)
        return json.loads(sidecar.read_text())


class TestSimilarOutput(SimilarHelper):
    def test_default_output_best_first_with_similarity(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        lines = self.similar(capsys, "title:seed-a")
        assert len(lines) == len(SPECS) - 1  # everything but the seed (count 20)
        parsed = [re.fullmatch(r"(-?\d\.\d{3})  (.+) - (.+) - (.+)", line) for line in lines]
        assert all(parsed), lines
        sims = [float(m.group(1)) for m in parsed]
        titles = [m.group(4) for m in parsed]
        assert titles[: len(A_ORDER)] == A_ORDER
        assert sims == sorted(sims, reverse=True)
        for title, sim, m in zip(titles, sims, parsed, strict=True):
            assert sim == pytest.approx(cosine("seed-a", title), abs=2e-3), title
            assert (m.group(2), m.group(3)) == SPECS[title][:2]
        assert "seed-a" not in titles

    def test_format_with_similarity_and_distance(self, capsys: pytest.CaptureFixture[str]) -> None:
        lines = self.similar(
            capsys, "-f", "$title $deepsim_similarity $deepsim_distance", "-c", "3", "title:seed-a"
        )
        assert [line.split()[0] for line in lines] == A_ORDER[:3]
        for line in lines:
            title, sim, dist = line.split()
            assert float(sim) == pytest.approx(cosine("seed-a", title), abs=2e-3)
            assert float(sim) + float(dist) == pytest.approx(1.0, abs=2e-3)

    def test_count(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert self.titles(capsys, "-c", "2", "title:seed-a") == A_ORDER[:2]
        assert self.titles(capsys, "--count", "5", "title:seed-a") == A_ORDER[:5]
        self.config["deepsim"]["count"] = 4
        assert self.titles(capsys, "title:seed-a") == A_ORDER[:4]
        with pytest.raises(UserError, match="count"):
            self.run_command("similar", "-c", "0", "title:seed-a")

    def test_seeds_excluded_unless_included(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert self.titles(capsys, "-c", "3", "title:seed-a") == A_ORDER[:3]
        lines = self.similar(
            capsys, "-f", "$title $deepsim_similarity", "-c", "3", "--include-seeds", "title:seed-a"
        )
        assert lines[0] == "seed-a 1.000"
        assert [line.split()[0] for line in lines] == ["seed-a", *A_ORDER[:2]]

    def test_several_matches_seed_with_their_mean(self, capsys: pytest.CaptureFixture[str]) -> None:
        # seed-a and seed-b share the album "Seeds": the mean points at the bridge.
        lines = self.similar(capsys, "-f", "$title $deepsim_similarity", "-c", "3", "album:Seeds")
        assert lines[0] == "bridge 1.000"
        # then the nearest of either side: a1 and b1 (cos 10° / sqrt 2 each)
        assert sorted(line.split()[0] for line in lines[1:]) == ["a1", "b1"]
        for line in lines[1:]:
            assert float(line.split()[1]) == pytest.approx(
                math.cos(math.radians(10)) / 2**0.5, abs=2e-3
            )
        # an OR query of two terms means the same two seeds
        assert self.titles(capsys, "-c", "1", "title:seed-a", ",", "title:seed-b") == ["bridge"]

    def test_each_gives_one_block_per_seed(self, capsys: pytest.CaptureFixture[str]) -> None:
        lines = self.similar(capsys, "--each", "-f", "$title", "-c", "2", "album:Seeds")
        assert lines == [
            "== Seeder - Seeds - seed-a",
            "a1",
            "a2",
            "== Seeder - Seeds - seed-b",
            "b1",
            "b2",
        ]
        # each block has its own similarities; the other seed is excluded too
        lines = self.similar(
            capsys, "--each", "-f", "$title $deepsim_similarity", "-c", "7", "album:Seeds"
        )
        blocks = [lines[1:8], lines[9:]]
        assert [line.split()[0] for line in blocks[0]] == A_ORDER
        assert [line.split()[0] for line in blocks[1]][:5] == B_ORDER
        assert not any("seed-" in line for block in blocks for line in block)
        assert blocks[0][-1] == f"bridge {cosine('seed-a', 'bridge'):.3f}"
        assert blocks[1][4] == f"bridge {cosine('seed-b', 'bridge'):.3f}"

    def test_max_per_artist_and_album(self, capsys: pytest.CaptureFixture[str]) -> None:
        # artists: a1-a3 Ann, a4-a5 Bob, a6 Cat, bridge Eve
        assert self.titles(capsys, "--max-per-artist", "1", "-c", "4", "title:seed-a") == [
            "a1",
            "a4",
            "a6",
            "bridge",
        ]
        assert self.titles(capsys, "--max-per-artist", "2", "-c", "5", "title:seed-a") == [
            "a1",
            "a2",
            "a4",
            "a5",
            "a6",
        ]
        # albums: a1-a2 A1, a3 A2, a4-a5 B1, a6 C1
        assert self.titles(capsys, "--max-per-album", "1", "-c", "4", "title:seed-a") == [
            "a1",
            "a3",
            "a4",
            "a6",
        ]
        # the config value applies when the option is absent
        self.config["deepsim"]["max_per_artist"] = 1
        assert self.titles(capsys, "-c", "3", "title:seed-a") == ["a1", "a4", "a6"]
        # and the option overrides it (0: no limit)
        assert (
            self.titles(capsys, "--max-per-artist", "0", "-c", "3", "title:seed-a") == A_ORDER[:3]
        )
        with pytest.raises(UserError, match="max-per-album"):
            self.run_command("similar", "--max-per-album", "-1", "title:seed-a")

    def test_where_queries(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert self.titles(capsys, "--where", "format:FLAC", "-c", "3", "title:seed-a") == [
            "a1",
            "a3",
            "a5",
        ]
        assert self.titles(capsys, "-w", "^genre:Christmas", "-c", "3", "title:seed-a") == [
            "a2",
            "a3",
            "a4",
        ]
        # a flexible attribute (evaluated in Python, not SQL)
        for title in ("a5", "b1"):
            item = self.lib.get_item(self.items[title].id)
            item["mood"] = "calm"
            item.store()
        assert self.titles(capsys, "--where", "mood:calm", "title:seed-a") == ["a5", "b1"]
        # fewer survivors than asked: all of them, no padding
        assert self.titles(capsys, "--where", "artist:Cat", "title:seed-a") == ["a6"]
        with pytest.raises(UserError, match="invalid query"):
            self.run_command("similar", "--where", "year:1..x..2", "title:seed-a")
        # nothing passes: an error, and no playlist is written
        playlist = self.temp_path / "empty.m3u"
        with pytest.raises(UserError, match="no track passes the filters"):
            self.run_command(
                "similar", "--where", "artist:Nobody", "-o", str(playlist), "title:seed-a"
            )
        assert not playlist.exists()

    def test_exact_gives_the_default_result(self, capsys: pytest.CaptureFixture[str]) -> None:
        queries = [
            ["title:seed-a"],
            ["album:Seeds"],
            ["--max-per-album", "1", "title:seed-b"],
            ["-w", "format:MP3", "title:seed-a"],
        ]
        fmt = ["-f", "$title $deepsim_similarity"]
        small = [self.similar(capsys, *fmt, *q) for q in queries]
        for q, expected in zip(queries, small, strict=True):
            assert self.similar(capsys, *fmt, "--exact", *q) == expected
        # with an Annoy index kept for this small library too
        self.config["deepsim"]["index"]["exact_below"] = 1
        assert "built" in self.index_message(capsys)
        for q, expected in zip(queries, small, strict=True):
            assert self.similar(capsys, *fmt, *q) == expected
            assert self.similar(capsys, *fmt, "--exact", *q) == expected


class TestSimilarErrors(SimilarHelper):
    def test_no_match_is_a_user_error_naming_the_query(self) -> None:
        with pytest.raises(UserError, match="title:nothing-like-this"):
            self.run_command("similar", "title:nothing-like-this")

    def test_quoted_multi_term_argument_is_a_query_string(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        # one argument, two terms: seed-a alone (track 1), not the whole album
        assert self.titles(capsys, "-c", "2", "album:Seeds track:1") == ["a1", "a2"]
        seed_b_track = str(self.items["seed-b"].track)
        assert self.titles(capsys, "-c", "2", f"album:Seeds track:{seed_b_track}") == ["b1", "b2"]
        with pytest.raises(UserError, match="album:Seeds track:99"):
            self.run_command("similar", "album:Seeds track:99")

    def test_some_seeds_without_vectors_warn(
        self, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
    ) -> None:
        self.add_item(title="novec", artist="Nobody", album="None", path="/nowhere/novec.mp3")
        with caplog.at_level(logging.WARNING, logger="beets"):
            titles = self.titles(capsys, "-c", "2", "title:seed-a", ",", "title:novec")
        assert titles == ["a1", "a2"]  # the seed that has a vector is used alone
        assert (
            f"1 of 2 seed tracks have no {MODEL_ID} vector yet; run `beet deepsim-embed`"
            in caplog.text
        )

    def test_no_seed_with_a_vector_is_a_user_error(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        novec = [
            self.add_item(title=t, artist="Nobody", album="None", path=f"/nowhere/{t}.mp3")
            for t in ("novec", "novec2")
        ]
        with pytest.raises(UserError, match=f"1 of 1 seed track has no {MODEL_ID} vector yet"):
            self.run_command("similar", "title:novec2")
        with pytest.raises(UserError, match=r"2 of 2 seed tracks have no .* deepsim-embed"):
            self.run_command("similar", "album:None")
        # vectors of another model do not count
        store.write_vectors(self.lib, [(item.id, np.ones(DIM)) for item in novec], OTHER_ID)
        with pytest.raises(UserError, match=f"2 of 2 seed tracks have no {MODEL_ID} vector"):
            self.run_command("similar", "album:None")
        assert capsys.readouterr().out == ""

    def test_no_query_is_a_usage_error(self) -> None:
        with pytest.raises(UserError, match="give a beets query for the seed track"):
            self.run_command("similar")

    def test_several_seeds_say_the_mean_is_used(
        self, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
    ) -> None:
        with caplog.at_level(logging.INFO, logger="beets"):
            self.titles(capsys, "-c", "2", "album:Seeds")
        assert "the mean of 2 seed tracks is the query (--each: one list per seed)" in caplog.text

    def test_repeated_where_combine_with_and(self, capsys: pytest.CaptureFixture[str]) -> None:
        flac = self.titles(capsys, "-c", "20", "-w", "format:FLAC", "title:seed-a")
        ann = self.titles(capsys, "-c", "20", "-w", "artist:Ann", "title:seed-a")
        both = self.titles(
            capsys, "-c", "20", "-w", "format:FLAC", "-w", "artist:Ann", "title:seed-a"
        )
        assert both == [t for t in flac if t in ann] == ["a1", "a3"]

    def test_similar_albums(self, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
        by_album: dict[str, list[Item]] = {}
        for title, item in self.items.items():
            by_album.setdefault(SPECS[title][1], []).append(item)
        for name, items in by_album.items():
            album = self.lib.add_album(items)
            album.album, album.albumartist = name, items[0].artist
            album.store()
        lines = self.similar(capsys, "-a", "-f", "$album $deepsim_similarity", "album:A1")
        names = [line.split()[0] for line in lines]
        # A1 (a1, a2) is nearest to A2 (a3), then B1 (a4, a5), C1 (a6)
        assert names[:3] == ["A2", "B1", "C1"] and "A1" not in names
        sims = [float(line.split()[1]) for line in lines]
        assert sims == sorted(sims, reverse=True)
        expected = direction(SPECS["a1"][5]) + direction(SPECS["a2"][5])
        expected /= np.linalg.norm(expected)
        assert sims[0] == pytest.approx(float(expected @ direction(SPECS["a3"][5])), abs=2e-3)
        # as a playlist: the tracks of the albums, album by album
        target = tmp_path / "albums.m3u"
        self.run_command("similar", "-a", "-c", "2", "-o", str(target), "album:A1")
        entries = [Path(p).stem for p in target.read_text().splitlines()]
        assert entries == ["a3", "a4", "a5"]

    def test_each_with_output_is_a_user_error(self, tmp_path: Path) -> None:
        target = tmp_path / "each.m3u"
        with pytest.raises(UserError, match="--each"):
            self.run_command("similar", "--each", "-o", str(target), "album:Seeds")
        assert not target.exists()


class TestIndex(SimilarHelper):
    def test_deepsim_index_messages(self, capsys: pytest.CaptureFixture[str]) -> None:
        n = len(SPECS)
        assert self.index_message(capsys) == (
            f"deepsim-index: {n} vectors: small enough for exact search, no index kept"
        )
        ann, sidecar = index_paths(self.state_dir, MODEL_ID)
        assert not ann.exists() and not sidecar.exists()
        self.config["deepsim"]["index"]["exact_below"] = 1
        built = self.index_message(capsys)
        assert re.fullmatch(
            rf"deepsim-index: built the {MODEL_ID} index of {n} vectors in \d+\.\d s", built
        ), built
        assert ann.is_file() and self.sidecar()["count"] == n
        assert self.index_message(capsys) == (
            f"deepsim-index: the {MODEL_ID} index of {n} vectors is up to date"
        )
        built_at = self.sidecar()["built_at"]
        assert "built" in self.index_message(capsys, "--force")
        assert self.sidecar()["built_at"] > built_at
        # a different n_trees makes it stale
        self.config["deepsim"]["index"]["n_trees"] = 5
        assert "built" in self.index_message(capsys)
        assert self.sidecar()["n_trees"] == 5
        # back above the threshold: the index is removed
        self.config["deepsim"]["index"]["exact_below"] = 1000
        assert "small enough" in self.index_message(capsys)
        assert not ann.exists()

    def test_empty_library_message(self, capsys: pytest.CaptureFixture[str]) -> None:
        for item in self.lib.items():
            item.remove()
        assert self.index_message(capsys) == (
            f"deepsim-index: no {MODEL_ID} vectors yet; run `beet deepsim-embed`"
        )

    def test_unwritable_index_is_a_user_error(
        self, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
    ) -> None:
        self.config["deepsim"]["index"]["exact_below"] = 1
        ann, _ = index_paths(self.state_dir, MODEL_ID)
        ann.mkdir(parents=True)  # a directory where the index file goes
        with (
            caplog.at_level(logging.WARNING, logger="beets"),
            pytest.raises(UserError, match="could not be written"),
        ):
            self.run_command("deepsim-index")
        assert str(self.state_dir) in caplog.text
        # searching still works (exactly)
        assert self.titles(capsys, "-c", "2", "title:seed-a") == ["a1", "a2"]

    def test_state_dir_that_is_a_file_is_a_user_error_naming_it(self) -> None:
        self.state_dir.write_text("not a directory")
        with pytest.raises(UserError, match=re.escape(str(self.state_dir))):
            self.run_command("deepsim-index")
        with pytest.raises(UserError, match=re.escape(str(self.state_dir))):
            self.run_command("similar", "title:seed-a")

    def test_removed_items_are_never_returned(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.config["deepsim"]["index"]["exact_below"] = 1
        assert "built" in self.index_message(capsys)
        # removed with `beet remove`: the index is rebuilt when the command exits
        self.run_command("remove", "-f", "title:a1")
        assert self.sidecar()["count"] == len(SPECS) - 1
        assert self.titles(capsys, "-c", "3", "title:seed-a") == ["a2", "a3", "a4"]
        # removed behind beets' back (the index is stale now): not returned either
        self.lib.get_item(self.items["a2"].id).remove()
        assert self.titles(capsys, "-c", "3", "title:seed-a") == ["a3", "a4", "a5"]
        assert self.sidecar()["count"] == len(SPECS) - 2  # rebuilt on exit

    def test_removed_item_left_in_a_fresh_index_is_not_returned(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        # The item row goes but its attributes stay (another tool, an old beets):
        # the store fingerprint is unchanged, so the Annoy index still looks fresh
        # and still holds the item.
        self.config["deepsim"]["index"]["exact_below"] = 1
        assert "built" in self.index_message(capsys)
        with self.lib.transaction() as tx:
            tx.mutate("DELETE FROM items WHERE id = ?", (self.items["a1"].id,))
        assert "up to date" in self.index_message(capsys)
        assert self.titles(capsys, "-c", "3", "title:seed-a") == ["a2", "a3", "a4"]
        assert "a1" not in self.titles(capsys, "title:seed-a")

    @pytest.mark.parametrize("damage", ["garbage", "truncated", "sidecar"])
    def test_damaged_index_still_gives_correct_results(
        self, capsys: pytest.CaptureFixture[str], damage: str
    ) -> None:
        expected = self.similar(capsys, "-f", "$title $deepsim_similarity", "title:seed-a")
        self.config["deepsim"]["index"]["exact_below"] = 1
        assert "built" in self.index_message(capsys)
        ann, sidecar = index_paths(self.state_dir, MODEL_ID)
        size = ann.stat().st_size
        if damage == "garbage":
            stat = ann.stat()
            ann.write_bytes(np.random.default_rng(0).bytes(size))
            os.utime(ann, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and time
        elif damage == "truncated":
            with open(ann, "r+b") as fh:
                fh.truncate(size // 2)
        else:
            sidecar.write_text("{not json")
        assert self.similar(capsys, "-f", "$title $deepsim_similarity", "title:seed-a") == expected
        # the damaged index was rebuilt when the command exited
        assert "up to date" in self.index_message(capsys)
        assert self.similar(capsys, "-f", "$title $deepsim_similarity", "title:seed-a") == expected

    def test_index_of_another_model_is_ignored(self, capsys: pytest.CaptureFixture[str]) -> None:
        # The library was embedded with OTHER_ID, whose space differs (axes rolled,
        # and far-1 moved next to seed-a), and an index was built for it.
        self.write(OTHER_ID, perm=True)
        rolled = np.roll(direction(SPECS["seed-a"][5]), 3)
        store.write_vectors(self.lib, [(self.items["far-1"].id, rolled)], OTHER_ID)
        assert refresh_index(self.lib, OTHER_ID, self.state_dir, exact_below=1).action == "built"
        # Then re-embedded with the active model.
        self.write(MODEL_ID)
        other_ann, other_sidecar = index_paths(self.state_dir, OTHER_ID)
        ann, sidecar = index_paths(self.state_dir, MODEL_ID)
        assert other_ann.is_file() and not ann.exists()
        assert self.titles(capsys, "-c", "2", "title:seed-a") == ["a1", "a2"]
        # OTHER_ID's index under this model's file names (sidecar and file agree)
        shutil.copy2(other_ann, ann)
        shutil.copy2(other_sidecar, sidecar)
        titles = self.titles(capsys, "title:seed-a")
        assert titles[: len(A_ORDER)] == A_ORDER
        # the foreign index was dropped on exit (a library this small keeps none)
        assert not ann.exists() and not sidecar.exists()
        assert other_ann.is_file()  # the other model's own index is left alone

    def test_cli_exit_rebuilds_a_stale_index(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.config["deepsim"]["index"]["exact_below"] = 1
        assert "built" in self.index_message(capsys)
        fingerprint = self.sidecar()["fingerprint"]
        # a new track written behind the plugin's back, nearest of all to seed-a
        (self.lib_path / "a0.mp3").write_bytes(b"\0" * 64)
        new = self.add_item(title="a0", artist="Zed", album="Z", path=str(self.lib_path / "a0.mp3"))
        store.write_vectors(self.lib, [(new.id, direction(("toward", 0, 1, 5)))], MODEL_ID)
        # the stale index is not used (a0 is found) ...
        assert self.titles(capsys, "-c", "2", "title:seed-a") == ["a0", "a1"]
        # ... and was rebuilt on exit
        assert self.sidecar()["count"] == len(SPECS) + 1
        assert self.sidecar()["fingerprint"] != fingerprint
        assert "up to date" in self.index_message(capsys)
        # the rebuilt index finds it too
        assert self.titles(capsys, "-c", "2", "title:seed-a") == ["a0", "a1"]

    def test_cli_exit_event_rebuilds_after_removal(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        import beets.plugins

        self.config["deepsim"]["index"]["exact_below"] = 1
        assert "built" in self.index_message(capsys)
        self.lib.get_item(self.items["far-4"].id).remove()  # sends item_removed
        beets.plugins.send("cli_exit", lib=self.lib)
        assert self.sidecar()["count"] == len(SPECS) - 1
        # nothing changed since: cli_exit leaves the index alone
        mtime = index_paths(self.state_dir, MODEL_ID)[0].stat().st_mtime_ns
        beets.plugins.send("cli_exit", lib=self.lib)
        assert index_paths(self.state_dir, MODEL_ID)[0].stat().st_mtime_ns == mtime


class TestPlaylist(SimilarHelper):
    def paths(self, titles: list[str]) -> list[str]:
        return [os.fsdecode(self.items[t].path) for t in titles]

    def test_m3u_with_absolute_paths_in_a_new_directory(
        self, capsys: pytest.CaptureFixture[str], tmp_path: Path
    ) -> None:
        target = tmp_path / "new" / "dir" / "like-a.m3u"
        out = self.similar(capsys, "-c", "4", "-o", str(target), "title:seed-a")
        assert out == [f"similar: wrote 4 track(s) to {target}"]
        lines = target.read_text(encoding="utf-8").splitlines()
        assert lines == self.paths(A_ORDER[:4])
        assert all(os.path.isabs(line) and os.path.isfile(line) for line in lines)

    def test_extm3u_read_back_by_beets(
        self, capsys: pytest.CaptureFixture[str], tmp_path: Path
    ) -> None:
        target = tmp_path / "like-a.m3u8"
        self.similar(capsys, "-c", "3", "--extm3u", "-o", str(target), "title:seed-a")
        lines = target.read_text(encoding="utf-8").splitlines()
        assert lines[0] == "#EXTM3U"
        expected_extinf = [f"#EXTINF:{round(SPECS[t][4])},{SPECS[t][0]} - {t}" for t in A_ORDER[:3]]
        assert lines[1::2] == expected_extinf
        assert lines[1] == "#EXTINF:200,Ann - a1"  # 200.4 s
        assert lines[3] == "#EXTINF:121,Ann - a2"  # 120.6 s
        playlist = M3UFile(str(target))
        playlist.load()
        assert playlist.extm3u
        assert [os.fsdecode(p) for p in playlist.media_list] == self.paths(A_ORDER[:3])
        assert all(os.path.isfile(p) for p in playlist.media_list)

    def test_relative_paths(self, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
        target = tmp_path / "lists" / "rel.m3u"
        self.similar(capsys, "-c", "3", "--relative", "-o", str(target), "title:seed-a")
        lines = target.read_text(encoding="utf-8").splitlines()
        assert not any(os.path.isabs(line) for line in lines)
        resolved = [os.path.normpath(os.path.join(target.parent, line)) for line in lines]
        assert resolved == self.paths(A_ORDER[:3])
        assert all(os.path.isfile(p) for p in resolved)
        # from the config, and --absolute overrides it
        self.config["deepsim"]["relative"] = True
        self.similar(capsys, "-c", "3", "-o", str(target), "title:seed-a")
        assert target.read_text(encoding="utf-8").splitlines() == lines
        self.similar(capsys, "-c", "3", "--absolute", "-o", str(target), "title:seed-a")
        assert target.read_text(encoding="utf-8").splitlines() == self.paths(A_ORDER[:3])

    def test_existing_playlist_is_replaced(
        self, capsys: pytest.CaptureFixture[str], tmp_path: Path
    ) -> None:
        target = tmp_path / "same.m3u"
        target.write_text("old\n" * 50)
        self.similar(capsys, "-c", "2", "-o", str(target), "title:seed-b")
        assert target.read_text(encoding="utf-8").splitlines() == self.paths(B_ORDER[:2])
        assert sorted(p.name for p in tmp_path.iterdir()) == ["same.m3u"]  # no temp left

    def test_unwritable_location_names_the_path(
        self, capsys: pytest.CaptureFixture[str], tmp_path: Path
    ) -> None:
        blocker = tmp_path / "a-file"
        blocker.write_text("in the way")
        target = blocker / "sub" / "list.m3u"
        with pytest.raises(UserError, match=re.escape(str(blocker))):
            self.run_command("similar", "-o", str(target), "title:seed-a")
        assert blocker.read_text() == "in the way"
        # a directory where the file should go
        directory = tmp_path / "taken.m3u"
        directory.mkdir()
        with pytest.raises(UserError, match=re.escape(str(directory))):
            self.run_command("similar", "-o", str(directory), "title:seed-a")

    def test_tilde_in_output_is_expanded(self, capsys: pytest.CaptureFixture[str]) -> None:
        # HOME is the test's temporary directory
        self.similar(capsys, "-c", "1", "-o", "~/lists/t.m3u", "title:seed-a")
        target = Path(os.environ["HOME"]) / "lists" / "t.m3u"
        assert target.read_text(encoding="utf-8").splitlines() == self.paths(["a1"])


# ------------------------------------------------------------------------------- subprocess

_WRAPPER = """
import sys
import beets.ui
try:
    beets.ui.main(sys.argv[1:])
finally:
    sys.stdout.flush()
    print("TORCH-LOADED" if "torch" in sys.modules else "NO-TORCH", file=sys.stderr)
"""


@pytest.fixture(scope="module")
def beetsdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BEETSDIR with a config enabling deepsim and an on-disk library with planted vectors."""
    root = tmp_path_factory.mktemp("beetsdir")
    music = root / "music"
    music.mkdir()
    (root / "config.yaml").write_text(
        f"library: {root / 'library.db'}\ndirectory: {music}\nplugins: deepsim\n"
        # planted neighbours are closer than the version threshold: fold by tags only
        "deepsim:\n  dupes:\n    threshold: null\n",
        encoding="utf-8",
    )
    lib = Library(str(root / "library.db"), str(music))
    ids: dict[str, int] = {}
    for title, (artist, album, fmt, _genre, length, _) in SPECS.items():
        path = music / f"{title}.{fmt.lower()}"
        path.write_bytes(b"\0")
        item = Item(title=title, artist=artist, album=album, format=fmt, length=length)
        item.path = os.fsencode(path)
        ids[title] = lib.add(item)
    store.write_vectors(
        lib, [(ids[t], direction(SPECS[t][5])) for t in SPECS], MODEL_ID, batch_size=100
    )
    lib._close()
    return root


def run_beet(beetsdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BEETSDIR": str(beetsdir), "HOME": str(beetsdir)}
    return subprocess.run(
        [sys.executable, "-c", _WRAPPER, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_beet_similar_does_not_import_torch(beetsdir: Path, tmp_path: Path) -> None:
    proc = run_beet(beetsdir, "similar", "-c", "3", "-f", "$title", "title:seed-a")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == A_ORDER[:3]
    assert "NO-TORCH" in proc.stderr
    target = tmp_path / "p.m3u"
    proc = run_beet(beetsdir, "similar", "-c", "2", "--extm3u", "-o", str(target), "album:Seeds")
    assert proc.returncode == 0, proc.stderr
    assert "NO-TORCH" in proc.stderr
    assert target.read_text().splitlines()[0] == "#EXTM3U"


@pytest.mark.parametrize(
    ("setting", "line"),
    [
        ("auto: maybe", "deepsim: auto must be yes or no, got 'maybe'"),
        ("format: 5", "deepsim: format must be a beets format string or null, got 5"),
        ("index:\n        n_trees: 0", "deepsim: index.n_trees must be an integer >= 1, got 0"),
        ("index:", "deepsim: index must be a collection, not NoneType"),
        ("workers: -2", "deepsim: workers must be an integer >= 0, got -2"),
        ("device: gpu", "deepsim: device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
    ],
)
def test_bad_config_is_one_line_and_a_non_zero_exit(
    beetsdir: Path, tmp_path: Path, setting: str, line: str
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        (beetsdir / "config.yaml").read_text() + f"deepsim:\n    {setting}\n", encoding="utf-8"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "beets", "-c", str(config), "ls"],
        env={**os.environ, "BEETSDIR": str(beetsdir), "HOME": str(beetsdir)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == line
    assert proc.stdout == ""


def test_beet_similar_no_match_exits_non_zero(beetsdir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "beets", "similar", "title:nothing-like-this"],
        env={**os.environ, "BEETSDIR": str(beetsdir), "HOME": str(beetsdir)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0
    assert "title:nothing-like-this" in proc.stderr
    assert "Traceback" not in proc.stderr
