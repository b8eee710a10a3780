"""``python -m deepsim.pretrain`` at small scale on the CPU.

The audio is generated: three timbre clusters (low harmonic tones, high
vibrato tones, noise bursts), six 3-s tracks each, and listeners who each play
tracks of one cluster only.  WMF then gives the clusters distinct factors, and
a network that learns anything from the audio must map each cluster near its
own factors.  One file is corrupt and must be skipped, not fatal.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from audiogen import write_audio

from deepsim import pretrain
from deepsim.audio import decode_middle
from deepsim.errors import TrainingError
from deepsim.frontend import make_logmel
from deepsim.listening import Listens, TrackKey
from deepsim.melcache import build_cache
from deepsim.models import load_model
from deepsim.models.dieleman import DEFAULT_FRONTEND

RATE = 22050
SECONDS = 3.0
CLUSTERS = 3
PER_CLUSTER = 6

#: A network small enough to train in seconds on one core.
SMALL = [
    "--factors", "6", "--filters", "12,12", "--pools", "2", "--dense", "24", "--dropout", "0",
    "--patch-frames", "24", "--n-mels", "24", "--source-seconds", str(SECONDS),
    "--batch-size", "6", "--optimizer", "adam", "--lr", "0.01", "--holdout", "0.2",
    "--threads", "1", "--log-every", "2",
]  # fmt: skip


def _clip(cluster: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(SECONDS * RATE)) / RATE
    if cluster == 0:  # low harmonic tones
        f0 = rng.uniform(110, 220)
        x = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in (1, 2, 3))
    elif cluster == 1:  # high tones with vibrato
        x = np.sin(2 * np.pi * rng.uniform(2000, 4000) * t + 3 * np.sin(2 * np.pi * 5 * t))
    else:  # noise bursts
        x = rng.standard_normal(t.size) * (np.sin(2 * np.pi * rng.uniform(2, 4) * t) > 0.6)
    return (x / np.max(np.abs(x)) * 0.5)[None].astype(np.float32)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("pretrain")
    audio = root / "audio"
    audio.mkdir()
    songs: list[tuple[str, int, Path, str, str]] = []
    for c in range(CLUSTERS):
        for k in range(PER_CLUSTER):
            path = audio / f"c{c}-{k}.flac"
            artist, title = f"Artist {c}", f"Song {c}-{k}"
            write_audio(
                path, _clip(c, 100 * c + k), rate=RATE, tags={"artist": artist, "title": title}
            )
            songs.append((f"SO{c}{k:02d}", c, path, artist, title))
    broken = audio / "broken.flac"
    broken.write_bytes(b"fLaC" + bytes(range(256)) * 8)  # a FLAC signature, then garbage

    rng = np.random.default_rng(0)
    triplets: list[str] = []
    scrobbles: list[list[object]] = []
    t = 1_600_000_000
    for c in range(CLUSTERS):
        mine = [s for s in songs if s[1] == c]
        for u in range(8):
            for j in rng.choice(len(mine), size=4, replace=False):
                song, _, _, artist, title = mine[j]
                triplets.append(f"U{c}{u}\t{song}\t{int(rng.integers(1, 4))}")
                scrobbles.append([f"u{c}{u}", artist, "Album", title, t])
                t += 200
            if u < 3:  # a few listeners also play the corrupt file
                triplets.append(f"U{c}{u}\tSOBROKEN\t2")
            t += 10_000
    listens = root / "listens.txt"
    listens.write_text("\n".join(triplets) + "\n")
    mapping = root / "mapping.tsv"
    mapping.write_text("".join(f"{s[0]}\t{s[2].name}\n" for s in songs) + "SOBROKEN\tbroken.flac\n")
    lastfm = root / "scrobbles.csv"
    with open(lastfm, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["user", "artist", "album", "track", "uts"])
        writer.writerows(scrobbles)
    return {
        "root": root,
        "audio": audio,
        "broken": broken,
        "listens": listens,
        "mapping": mapping,
        "lastfm": lastfm,
        "cluster": {os.fspath(s[2]): s[1] for s in songs},
    }


def _args(data: dict[str, object], out: Path, *extra: str) -> list[str]:
    return [
        "--audio", os.fspath(data["audio"]), "--listens", os.fspath(data["listens"]),
        "--format", "taste-profile", "--mapping", os.fspath(data["mapping"]),
        "--out", os.fspath(out), *SMALL, *extra,
    ]  # fmt: skip


def _losses(stdout: str) -> list[float]:
    return [float(v) for v in re.findall(r"^step \d+/\d+ epoch \d+ loss ([0-9.]+)", stdout, re.M)]


def _cluster_separation(model_path: Path, cluster: dict[str, int]) -> float:
    """Mean cosine of embedded tracks within clusters minus across clusters."""
    model = load_model(model_path)
    paths = sorted(cluster)
    waves = [decode_middle(p, sample_rate=model.frontend.sample_rate) for p in paths]
    vectors = model.embed(waves).vectors
    labels = np.array([cluster[p] for p in paths])
    same = labels[:, None] == labels[None, :]
    np.fill_diagonal(same, False)
    sims = vectors @ vectors.T
    different = labels[:, None] != labels[None, :]
    return float(sims[same].mean() - sims[different].mean())


def test_training_learns_the_planted_structure_and_skips_a_corrupt_file(
    data: dict[str, object], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert pretrain.main(_args(data, out, "--epochs", "12", "--workers", "0")) == 0
    captured = capsys.readouterr()
    # the corrupt file is named once per dataset that meets it, and training goes on
    assert f"skipping {data['broken']}:" in captured.err
    losses = _losses(captured.out)
    assert len(losses) >= 6
    assert np.mean(losses[-2:]) < 0.75 * np.mean(losses[:2]), losses
    assert "throughput:" in captured.out and "samples/s" in captured.out

    # the saved model puts each timbre cluster near its own CF factors
    assert _cluster_separation(out / "model.safetensors", data["cluster"]) > 0.3

    summary = json.loads((out / "metrics.json").read_text())
    val = summary["validation"]
    # held-out tracks (never in the WMF fit) are ranked for their listeners far above chance
    assert val["n_tracks"] >= 2
    assert val["auc"] > 0.8 and val["cosine"] > 0.4
    assert summary["samples_per_second"] > 0
    # the table has the baselines (deepsim-train's formatter): the untrained network both
    # ways, popularity, random, the WMF upper bound (here the timbre clusters are the taste
    # groups, so the untrained network's content profile is already a good recommender)
    rows = val["rows"]
    for name in (
        "wmf (upper bound)",
        pretrain.UNTRAINED_ROW,
        pretrain.UNTRAINED_PROFILE_ROW,
        "popularity (others' plays)",
        "random",
    ):
        assert name in rows and name in captured.out
    assert "mAP@500" in captured.out
    assert 0.0 <= rows[pretrain.UNTRAINED_PROFILE_ROW]["auc"] <= 1.0
    assert val["auc"] > rows[pretrain.UNTRAINED_ROW]["auc"]


def test_checkpoint_and_resume(data: dict[str, object], tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    first = _args(data, out, "--epochs", "50", "--workers", "0", "--steps-per-checkpoint", "2")
    assert pretrain.main([*first, "--max-steps", "3"]) == 0
    state = torch.load(out / "checkpoint-state.pt", weights_only=True)
    assert state["progress"]["step"] == 3
    step3 = load_model(out / "checkpoint.safetensors")
    assert step3.model_id == state["model_id"]
    capsys.readouterr()

    # without --resume an existing run is not overwritten
    assert pretrain.main([*first, "--max-steps", "6"]) == 1
    assert "pass --resume" in capsys.readouterr().err

    assert pretrain.main([*first, "--max-steps", "6", "--resume"]) == 0
    stdout = capsys.readouterr().out
    assert "resuming from step 3" in stdout
    assert "targets: reusing" in stdout  # the same WMF targets, not a new fit
    assert re.search(r"^step 6/6 ", stdout, re.M)
    assert not re.search(r"^step [1-3]/", stdout, re.M)
    state = torch.load(out / "checkpoint-state.pt", weights_only=True)
    assert state["progress"]["step"] == 6
    # Adam's own step counters continued from 3 instead of restarting at 0
    adam_steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    assert adam_steps == {6.0}
    final = load_model(out / "model.safetensors")
    assert final.model_id == state["model_id"] != step3.model_id


def test_torchrun_two_processes_on_cpu_gloo(data: dict[str, object], tmp_path: Path) -> None:
    """Smoke test of the DDP path: ``torchrun --nproc_per_node=2`` with the gloo backend.

    Two processes share the mel cache build and the epochs; tracks are matched
    by their tags to a Last.fm scrobble file (no mapping).  The checkpoint it
    writes must load and embed.
    """
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "deepsim.pretrain", "--audio", os.fspath(data["audio"]),
        "--listens", os.fspath(data["lastfm"]), "--out", os.fspath(out), *SMALL,
        "--epochs", "3", "--workers", "1", "--cache-mels", "--min-listeners", "1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    assert "cached log-mels" in proc.stdout
    assert "rank 0 decoding" in proc.stderr and "rank 1 decoding" in proc.stderr
    assert f"{data['broken']}: cannot read tags, not matched" in proc.stderr
    assert "Traceback" not in proc.stderr

    model = load_model(out / "model.safetensors")
    wave = decode_middle(next(iter(data["cluster"])), sample_rate=model.frontend.sample_rate)
    vectors = model.embed([wave, wave[: RATE // 2]]).vectors
    assert vectors.shape == (2, 6)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def test_mel_cache_matches_the_front_end_and_marks_failures(
    data: dict[str, object], tmp_path: Path, capsys
) -> None:
    frontend = DEFAULT_FRONTEND
    good = sorted(data["cluster"])[:2]
    paths = [good[0], os.fspath(data["broken"]), good[1]]
    cache = build_cache(tmp_path / "mels", paths, frontend=frontend, seconds=SECONDS, workers=0)
    assert f"skipping {data['broken']}" in capsys.readouterr().err
    assert cache.ok.tolist() == [True, False, True]
    assert cache.shape == (3, frontend.n_frames(round(SECONDS * RATE)), frontend.n_mels)
    wave = decode_middle(good[1], sample_rate=RATE, seconds=SECONDS)
    with torch.no_grad():
        expected = make_logmel(frontend)(torch.from_numpy(wave)[None])[0].numpy()
    n = min(len(expected), cache.shape[1])
    np.testing.assert_allclose(cache.read(2)[:n], expected[:n], rtol=2e-3, atol=2e-3)

    # a complete cache is reused without decoding again
    again = build_cache(tmp_path / "mels", paths, frontend=frontend, seconds=SECONDS, workers=0)
    assert "decoding" not in capsys.readouterr().err
    assert again.ok.tolist() == cache.ok.tolist()
    # another window length is another cache
    other = build_cache(tmp_path / "mels", paths[:1], frontend=frontend, seconds=2.0, workers=0)
    assert "decoding 1 of 1" in capsys.readouterr().err
    assert other.shape[0] == 1


def _listens(counts: np.ndarray) -> Listens:
    users = [f"u{i}" for i in range(counts.shape[0])]
    tracks = [TrackKey(f"t{j}") for j in range(counts.shape[1])]
    return Listens(sp.csr_matrix(counts.astype(np.float32)), users, tracks)


def test_targets_hold_out_tracks_from_wmf_and_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(3), 10)  # 30 tracks in 3 taste groups
    counts = np.zeros((60, 30))
    for u in range(60):
        mine = np.flatnonzero(groups == u % 3)
        counts[u, rng.choice(mine, size=5, replace=False)] = rng.integers(1, 5, size=5)
    paths = [f"/music/{j}.mp3" for j in range(30)]
    targets = pretrain.make_targets(
        _listens(counts), paths, factors=4, holdout=0.2, seed=0, iterations=10
    )
    held = np.flatnonzero(targets.heldout)
    assert len(held) == 6
    assert targets.heldout_plays.shape == (60, 6)
    np.testing.assert_array_equal(targets.heldout_plays.toarray(), counts[:, held])
    np.testing.assert_allclose(np.linalg.norm(targets.factors, axis=1), 1.0, rtol=1e-5)
    # a held-out track's solved factor points to its own group's training tracks
    train = np.flatnonzero(~targets.heldout)
    for j in held:
        sims = targets.factors[train] @ targets.factors[j]
        own = sims[groups[train] == groups[j]].mean()
        other = sims[groups[train] != groups[j]].mean()
        assert own > other + 0.3

    # the ranking metrics can be restricted to a fixed sample of users who played held-out tracks
    sample = pretrain._sample_users(targets, 10, seed=0)
    assert sample is not None and len(sample) == 10 and len(set(sample.tolist())) == 10
    assert np.all(np.diff(targets.heldout_plays[sample].indptr) > 0)
    assert pretrain._sample_users(targets, 0, seed=0) is None

    pretrain.save_targets(tmp_path / "t.npz", targets)
    loaded = pretrain.load_targets(tmp_path / "t.npz")
    assert loaded.paths == paths
    np.testing.assert_array_equal(loaded.factors, targets.factors)
    np.testing.assert_array_equal(loaded.heldout, targets.heldout)
    assert (loaded.heldout_plays != targets.heldout_plays).nnz == 0
    np.testing.assert_array_equal(targets.train_plays.toarray(), counts[:, train])
    assert (loaded.train_plays != targets.train_plays).nnz == 0
    assert loaded.info == targets.info


def test_mapping_and_matching_errors(data: dict[str, object], tmp_path: Path) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_text("# comment\nSO1\ta.mp3\nonly-one-field\n")
    with pytest.raises(TrainingError, match=r"bad.tsv:3: expected"):
        pretrain.read_mapping(bad, audio_dir=tmp_path)
    names = tmp_path / "names.tsv"
    names.write_text("The Artist\tSong (Remastered)\tx/y.flac\n")
    by_key, by_name = pretrain.read_mapping(names, audio_dir="/music")
    assert by_name == {("artist", "song"): "/music/x/y.flac"} and not by_key

    listens = _listens(np.ones((2, 2)))
    with pytest.raises(TrainingError, match="none of the 2 listened tracks matched"):
        pretrain.match_audio(listens, audio_dir=data["audio"])
    keyed = Listens(
        sp.csr_matrix(np.ones((2, 2), np.float32)),
        ["a", "b"],
        [TrackKey("SO000"), TrackKey("SO101", "Artist 1", "Song 1-1")],
    )
    matched, files = pretrain.match_audio(keyed, audio_dir=data["audio"])  # by tags
    assert [Path(f).name for f in files] == ["c1-1.flac"]
    matched, files = pretrain.match_audio(keyed, audio_dir=data["audio"], mapping=data["mapping"])
    assert [Path(f).name for f in files] == ["c0-0.flac", "c1-1.flac"]
    assert matched.n_tracks == 2
