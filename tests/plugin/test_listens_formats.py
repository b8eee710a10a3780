"""`beet deepsim-train --listens` with the histories people have: a Spotify export
(the folder and the zip as downloaded) and the MSD Taste Profile with `--song-table`.

As in test_train_command.py, the items carry planted backbone vectors (4
clusters of 16 tracks), so no audio is decoded; the listening data keeps to
one cluster per session, and training must read it, match it by artist and
title and learn a space where a track's neighbours are of its own cluster.
"""

from __future__ import annotations

import json
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from beets.test.helper import PluginTestHelper

from deepsim import store
from deepsim.listening import FORMATS
from deepsim.models import model_id as model_id_of

BACKBONE_ID = "musicnn-msd-mtt-1"
DIM = 400
CLUSTERS = 4
PER_CLUSTER = 16
SESSIONS = 120
PLAYS = 6
START = 1_600_000_000


def title_of(cluster: int, k: int) -> str:
    return f"Song {cluster}-{k}"


def spotify_row(artist: str | None, title: str | None, t: int, ms: int, **extra: object) -> dict:
    row = {
        "ts": datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "platform": "linux",
        "ms_played": ms,
        "conn_country": "DE",
        "ip_addr": "192.0.2.1",
        "master_metadata_track_name": title,
        "master_metadata_album_artist_name": artist,
        "master_metadata_album_album_name": artist and f"Album of {artist}",
        "spotify_track_uri": title and "spotify:track:0000000000000000000000",
        "episode_name": None,
        "episode_show_name": None,
        "spotify_episode_uri": None,
        "reason_start": "trackdone",
        "reason_end": "trackdone",
        "shuffle": False,
        "skipped": False,
        "offline": False,
        "offline_timestamp": None,
        "incognito_mode": False,
    }
    row.update(extra)
    return row


def write_spotify_history(folder: Path, seed: int = 0) -> Path:
    """Sessions 2 h apart that keep to one cluster, split over two files out of time
    order, with podcast episodes and skips between the songs."""
    rng = np.random.default_rng(seed)
    rows = []
    t = START
    for s in range(SESSIONS):
        cluster = int(rng.integers(CLUSTERS))
        for k in rng.choice(PER_CLUSTER, PLAYS, replace=False):
            rows.append(spotify_row(f"Band {cluster}", title_of(cluster, int(k)), t, 200_000))
            t += 200
        rows.append(spotify_row(f"Band {(cluster + 1) % CLUSTERS}", "Song 0-0", t, 6_000))
        if s % 10 == 0:
            rows.append(
                spotify_row(
                    None, None, t + 60, 1_200_000, episode_name="Ep", spotify_episode_uri="x"
                )
            )
        t += 2 * 3600
    order = rng.permutation(len(rows))
    folder.mkdir(parents=True)
    half = len(rows) // 2
    for name, part in (
        ("Streaming_History_Audio_2020_1.json", order[:half]),
        ("Streaming_History_Audio_2020-2021_0.json", order[half:]),
    ):
        (folder / name).write_text(json.dumps([rows[i] for i in part], indent=4), encoding="utf-8")
    (folder / "ReadMeFirst_ExtendedStreamingHistory.pdf").write_bytes(b"%PDF-1.4\n%%EOF\n")
    return folder


class TestListensFormats(PluginTestHelper):
    plugin: ClassVar[str] = "deepsim"

    @pytest.fixture(autouse=True)
    def _library(self, setup: None, tmp_path: Path) -> None:
        cfg = self.config["deepsim"]
        cfg["device"] = "cpu"
        cfg["workers"] = 0
        cfg["train"]["min_tracks"] = 10
        cfg["train"]["factors"] = 8
        cfg["train"]["epochs"] = 200
        cfg["train"]["threads"] = 1
        rng = np.random.default_rng(1)
        means = rng.standard_normal((CLUSTERS, DIM))
        self.cluster: dict[int, int] = {}
        self.song_ids: dict[tuple[int, int], str] = {}
        rows = []
        for c in range(CLUSTERS):
            for k in range(PER_CLUSTER):
                item = self.add_item(
                    title=title_of(c, k),
                    artist=f"Band {c}",
                    album=f"Album {c}",
                    track=k + 1,
                    path=f"/music/{c}/{k}.mp3",
                )
                self.cluster[item.id] = c
                self.song_ids[(c, k)] = f"SO{c:02d}{k:02d}ABCDEF12345"
                rows.append((item.id, means[c] + 0.8 * rng.standard_normal(DIM)))
        store.write_vectors(self.lib, rows, BACKBONE_ID)
        self.tmp = tmp_path

    def train(self, capsys: pytest.CaptureFixture[str], *args: str) -> str:
        capsys.readouterr()
        # The planted sound vectors already separate the clusters, so a new model need
        # not beat them (the activation rule); --activate keeps these tests about reading.
        self.run_command("deepsim-train", "--activate", *args)
        return capsys.readouterr().out

    def assert_trained(self, out: str, rows: int) -> None:
        n = CLUSTERS * PER_CLUSTER
        assert f"training data: {n} tracks × {rows} users" in out, out
        assert "(now active)" in out, out
        (path,) = sorted((self.temp_path / "deepsim" / "models").glob("*.safetensors"))
        ids, matrix = store.read_vectors(self.lib, model_id_of(path))
        assert sorted(ids.tolist()) == sorted(self.cluster)
        cluster = np.asarray([self.cluster[i] for i in ids.tolist()])
        sims = matrix @ matrix.T
        same = cluster[:, None] == cluster[None, :]
        np.fill_diagonal(same, False)
        assert sims[same].mean() > sims[cluster[:, None] != cluster[None, :]].mean() + 0.3

    def test_spotify_history_folder_reads_matches_and_trains(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        folder = write_spotify_history(self.tmp / "Spotify Extended Streaming History")
        out = self.train(capsys, "--listens", str(folder))
        # the skips (6 s) and podcast episodes are left out; files out of order still
        # give one session per evening
        self.assert_trained(out, SESSIONS)

    def test_my_spotify_data_zip_with_a_forced_format(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        folder = write_spotify_history(self.tmp / "unzipped" / "Spotify Extended Streaming History")
        zpath = self.tmp / "my_spotify_data.zip"
        with zipfile.ZipFile(zpath, "w") as zf:
            for f in sorted(folder.iterdir()):
                zf.write(f, f"Spotify Extended Streaming History/{f.name}")
                zf.writestr(f"__MACOSX/Spotify Extended Streaming History/._{f.name}", b"\0\5")
        out = self.train(capsys, "--listens", str(zpath), "--listens-format", "spotify-extended")
        self.assert_trained(out, SESSIONS)

    def test_taste_profile_with_song_table(self, capsys: pytest.CaptureFixture[str]) -> None:
        rng = np.random.default_rng(2)
        triplets = []
        for u in range(SESSIONS):
            cluster = int(rng.integers(CLUSTERS))
            for k in rng.choice(PER_CLUSTER, PLAYS, replace=False):
                song = self.song_ids[(cluster, int(k))]
                triplets.append(f"{u:040x}\t{song}\t{int(rng.integers(1, 5))}")
        path = self.tmp / "train_triplets.txt.zip"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("train_triplets.txt", "\n".join(triplets) + "\n")
        table = self.tmp / "unique_tracks.txt"
        table.write_text(
            "".join(
                f"TR{c:02d}{k:02d}XYZ1234567<SEP>{song}<SEP>Band {c}<SEP>{title_of(c, k)}\n"
                for (c, k), song in self.song_ids.items()
            ),
            encoding="utf-8",
        )
        out = self.train(capsys, "--listens", str(path), "--song-table", str(table))
        self.assert_trained(out, SESSIONS)

    def test_help_lists_every_format(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit):
            self.run_command("deepsim-train", "--help")
        text = " ".join(capsys.readouterr().out.split())
        for fmt in FORMATS:
            assert fmt in text, fmt
        assert "--song-table" in text
