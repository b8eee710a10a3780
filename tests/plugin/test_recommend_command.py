"""`beet recommend` and `beet similar --taste-weight` on a library with planted taste.

The library of ``test_train_command`` (4 taste clusters of 16 tracks whose
backbone vectors also carry a stronger "sound" structure unrelated to taste),
plus 4 cluster-2 tracks nobody ever played.  After `beet deepsim-train`, a new
listener who played a few cluster-2 tracks must be recommended cluster 2 first
— the never-played tracks included.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import ClassVar

import beets.plugins
import numpy as np
import pytest
from beets.exceptions import UserError
from beets.test.helper import PluginTestHelper

from deepsim import store
from deepsim.models import active_model
from deepsim.models import model_id as model_id_of
from deepsim.taste import layout_of, split_parts
from plugin.test_train_command import (
    BACKBONE_ID,
    CLUSTERS,
    DIM,
    PER_CLUSTER,
    START,
    title_of,
    write_lastfm_csv,
)

NEW = 4  # never-played cluster-2 tracks
DAY = 86400


def write_listener(path: Path, plays: list[tuple[str, int, int]], user: str = "alice") -> Path:
    """``(title, cluster, unix time)`` plays of one listener as a Last.fm CSV."""
    lines = ["user,artist,album,track,uts"]
    for title, cluster, t in plays:
        lines.append(f"{user},Band {cluster},Album {cluster},{title},{t}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class TestRecommendCommand(PluginTestHelper):
    plugin: ClassVar[str] = "deepsim"
    db_on_disk: ClassVar[bool] = True

    @pytest.fixture(autouse=True)
    def _library(self, setup: None, tmp_path: Path) -> None:
        cfg = self.config["deepsim"]
        cfg["device"] = "cpu"
        cfg["workers"] = 0
        cfg["train"].set({"min_tracks": 10, "factors": 8, "epochs": 100, "threads": 1})
        rng = np.random.default_rng(1)
        means = rng.standard_normal((CLUSTERS, DIM))
        nuisance = rng.standard_normal((CLUSTERS, DIM))
        self.cluster: dict[int, int] = {}
        self.new_ids: list[int] = []
        rows = []
        titles = [(c, title_of(c, k), k) for c in range(CLUSTERS) for k in range(PER_CLUSTER)]
        titles += [(2, f"Unheard {k}", PER_CLUSTER + k) for k in range(NEW)]
        for c, title, k in titles:
            path = tmp_path / "music" / str(c) / f"{k}.mp3"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"\0" * 64)  # on disk: `similar` leaves out missing files
            item = self.add_item(
                title=title,
                artist=f"Band {c}",
                album=f"Album {c}",
                track=k + 1,
                path=str(path),
            )
            self.cluster[item.id] = c
            if title.startswith("Unheard"):
                self.new_ids.append(item.id)
            sound = 2.5 * nuisance[rng.integers(CLUSTERS)]
            rows.append((item.id, means[c] + sound + 0.8 * rng.standard_normal(DIM)))
        store.write_vectors(self.lib, rows, BACKBONE_ID)
        self.listens = write_lastfm_csv(tmp_path / "scrobbles.csv")
        now = START + 400 * DAY
        self.alice = write_listener(
            tmp_path / "alice.csv", [(title_of(2, k), 2, now - k * 600) for k in range(4)]
        )
        self.alice_ids = {
            i
            for i in self.cluster
            if self.lib.get_item(i).title in {title_of(2, k) for k in range(4)}
        }

    @property
    def state_dir(self) -> Path:
        return self.temp_path / "deepsim"

    def out(self, capsys: pytest.CaptureFixture[str], *args: str) -> list[str]:
        capsys.readouterr()
        self.run_command(*args)
        return capsys.readouterr().out.splitlines()

    def train(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.out(capsys, "deepsim-train", "--listens", str(self.listens))
        assert active_model("auto", state_dir=self.state_dir) != "default"
        for key in ("model_name", "model_id"):  # a new `beet` process would re-read it
            for plugin in beets.plugins.find_plugins():
                plugin.__dict__.pop(key, None)

    def test_ranks_the_listeners_group_first_never_played_tracks_included(
        self, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
    ) -> None:
        self.train(capsys)
        with caplog.at_level(logging.INFO, logger="beets"):
            lines = self.out(
                capsys,
                "recommend",
                "--listens",
                str(self.alice),
                "--unplayed",
                "-c",
                "16",
                "-f",
                "$id $deepsim_similarity",
            )
        ids = [int(line.split()[0]) for line in lines]
        assert len(ids) == 16 and not set(ids) & self.alice_ids
        # the unplayed cluster-2 tracks first (12 heard by others, 4 by nobody): the first
        # ten are all of them, and the never-played ones are among them
        clusters = [self.cluster[i] for i in ids]
        assert clusters[:10] == [2] * 10 and clusters.count(2) >= 14, lines
        assert len(set(self.new_ids) & set(ids[:14])) >= 3, lines
        scores = [float(line.split()[1]) for line in lines]
        assert scores == sorted(scores, reverse=True)
        assert "taste profile: 4 of the 4 tracks played folded" in caplog.text

        # without --unplayed the listener's own tracks may come back
        lines = self.out(capsys, "recommend", "--listens", str(self.alice), "-c", "20", "-f", "$id")
        assert self.alice_ids <= {int(x) for x in lines}

        # output options of `similar`: --where, caps, playlists
        lines = self.out(
            capsys, "recommend", "-l", str(self.alice), "--where", "title:Unheard", "-f", "$title"
        )
        assert sorted(lines) == [f"Unheard {k}" for k in range(NEW)]
        lines = self.out(
            capsys, "recommend", "-l", str(self.alice), "--max-per-album", "2", "-f", "$album"
        )
        assert max(lines.count(a) for a in set(lines)) == 2 and len(set(lines)) == CLUSTERS
        playlist = self.temp_path / "for-alice.m3u"
        lines = self.out(
            capsys, "recommend", "-l", str(self.alice), "-c", "5", "--extm3u", "-o", str(playlist)
        )
        assert lines == [f"recommend: wrote 5 track(s) to {playlist} (taste profile)"]
        text = playlist.read_text(encoding="utf-8")
        assert text.startswith("#EXTM3U") and text.count("#EXTINF") == 5

    def test_recent_plays_weigh_more(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.train(capsys)
        now = START + 400 * DAY
        plays = [(title_of(2, k), 2, now - 365 * DAY - k * 600) for k in range(4)]
        plays += [(title_of(1, k), 1, now - k * 600) for k in range(2)]
        both = write_listener(self.temp_path / "both.csv", plays)
        top = self.out(capsys, "recommend", "-l", str(both), "--unplayed", "-c", "5", "-f", "$id")
        assert [self.cluster[int(i)] for i in top][:4] == [1] * 4
        # with a very long half-life the four old plays outweigh the two recent ones
        top = self.out(
            capsys,
            "recommend",
            "-l",
            str(both),
            "--unplayed",
            "-c",
            "5",
            "-f",
            "$id",
            "--half-life",
            "100000",
        )
        assert [self.cluster[int(i)] for i in top].count(2) >= 4

    def test_sound_profile_without_a_trained_model(
        self, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
    ) -> None:
        with caplog.at_level(logging.INFO, logger="beets"):
            lines = self.out(
                capsys, "recommend", "-l", str(self.alice), "--unplayed", "-c", "5", "-f", "$id"
            )
        assert len(lines) == 5 and not {int(x) for x in lines} & self.alice_ids
        assert "sound profile: the recency-weighted mean sound of the 4 most-played" in caplog.text
        assert "not trained on listening data" in caplog.text

    def test_play_counts_in_the_library(self, capsys: pytest.CaptureFixture[str]) -> None:
        for item_id in self.alice_ids:
            item = self.lib.get_item(item_id)
            item["play_count"] = 3
            item.store()
        lines = self.out(capsys, "recommend", "--library", "--unplayed", "-c", "4", "-f", "$id")
        assert len(lines) == 4 and not {int(x) for x in lines} & self.alice_ids

    def test_several_listeners_need_user_and_errors_are_user_errors(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        with pytest.raises(
            UserError, match=r"30 listeners \(user0, user1, .*choose one with --user"
        ):
            self.run_command("recommend", "--listens", str(self.listens))
        lines = self.out(capsys, "recommend", "-l", str(self.listens), "--user", "user3", "-c", "3")
        assert len(lines) == 3
        with pytest.raises(UserError, match="no listener 'nobody'"):
            self.run_command("recommend", "-l", str(self.listens), "--user", "nobody")
        with pytest.raises(UserError, match="--listens FILE or --library"):
            self.run_command("recommend")
        strangers = write_listener(self.temp_path / "x.csv", [("Nothing", 9, START)])
        with pytest.raises(
            UserError, match="none of the 1 tracks 'alice' played is in the library"
        ):
            self.run_command("recommend", "-l", str(strangers))
        with pytest.raises(UserError, match="half_life"):
            self.run_command("recommend", "-l", str(self.alice), "--half-life", "0")
        with pytest.raises(UserError, match="no track passes the filters"):
            self.run_command("recommend", "-l", str(self.alice), "--where", "title:zzz")

    def test_recommend_and_similar_do_not_import_torch(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        import subprocess
        import sys

        self.train(capsys)
        code = (
            "import sys, beets.ui\n"
            "try:\n    beets.ui.main(sys.argv[1:])\n"
            "finally:\n    sys.stdout.flush()\n"
            "    print('TORCH-LOADED' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n"
        )
        (self.temp_path / "config.yaml").write_text(
            f"library: {os.fspath(self.lib.path)}\ndirectory: {self.lib_path}\nplugins: deepsim\n",
            encoding="utf-8",
        )
        env = {**os.environ, "BEETSDIR": str(self.temp_path), "HOME": str(self.temp_path)}
        for args in (
            ["recommend", "-l", str(self.alice), "-c", "3"],
            ["similar", "--taste-weight", "0.2", "-c", "3", "title:Unheard 0"],
        ):
            done = subprocess.run(
                [sys.executable, "-c", code, *args],
                capture_output=True,
                text=True,
                env=env,
                timeout=120,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            assert len(done.stdout.splitlines()) == 3, done.stdout + done.stderr
            assert "NO-TORCH" in done.stderr

    def test_taste_weight_changes_the_ranking_without_re_embedding(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        with pytest.raises(UserError, match="has sound vectors only"):
            self.run_command("similar", "--taste-weight", "0.5", "title:Unheard 0")
        self.train(capsys)
        path = active_model("auto", state_dir=self.temp_path / "deepsim")
        layout = layout_of(path)
        assert layout is not None
        model_id = model_id_of(path)
        ids, matrix = store.read_vectors(self.lib, model_id)
        sound, taste = split_parts(matrix, layout)
        seed = int(ids[0])
        for w in (0.0, 0.3, 1.0):
            sims = (1 - w) * (sound @ sound[0]) + w * (taste @ taste[0])
            expected = [int(ids[j]) for j in np.argsort(-sims, kind="stable") if ids[j] != seed][:6]
            capsys.readouterr()
            self.run_command(
                "similar",
                "--taste-weight",
                str(w),
                "-c",
                "6",
                "-f",
                "$id $deepsim_similarity",
                f"id:{seed}",
            )
            lines = capsys.readouterr().out.splitlines()
            assert [int(x.split()[0]) for x in lines] == expected, (w, lines)
            for line, item_id in zip(lines, expected, strict=True):
                row = int(np.flatnonzero(ids == item_id)[0])
                assert float(line.split()[1]) == pytest.approx(float(sims[row]), abs=3e-3)
        # the config key does the same as the option; the option wins
        self.config["deepsim"]["taste_weight"] = 1.0
        capsys.readouterr()
        self.run_command("similar", "-c", "6", "-f", "$id", f"id:{seed}")
        by_config = capsys.readouterr().out.split()
        self.run_command("similar", "--taste-weight", "1", "-c", "6", "-f", "$id", f"id:{seed}")
        assert capsys.readouterr().out.split() == by_config
        with pytest.raises(UserError, match="taste_weight must be a number in"):
            self.run_command("similar", "--taste-weight", "1.5", f"id:{seed}")
