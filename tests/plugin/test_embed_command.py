"""`beet deepsim-embed` end to end, with the shipped MSD network on short generated tracks."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from audiogen import tone, write_audio, write_video_only
from beets.test.helper import PluginTestHelper

from deepsim import store

MODEL_ID = "musicnn-msd-1"


class TestEmbedCommand(PluginTestHelper):
    plugin: ClassVar[str] = "deepsim"

    @pytest.fixture(autouse=True)
    def _config(self, audio_dir: Path) -> None:
        self.audio_dir = audio_dir
        self.config["deepsim"]["model"] = "msd-musicnn"
        self.config["deepsim"]["workers"] = 0
        self.config["deepsim"]["device"] = "cpu"

    def add_files(self, *names: str) -> list:
        return [
            self.add_item(path=str(self.audio_dir / name), title=Path(name).stem) for name in names
        ]

    def test_embeds_every_item_and_skips_done_ones(self, capsys) -> None:
        items = self.add_files("low-a.mp3", "low-b.ogg", "mid-a.flac")
        self.run_command("deepsim-embed")
        out = capsys.readouterr().out
        assert "embedded 3, skipped 0" in out and "failed 0" in out
        ids, matrix = store.read_vectors(self.lib, MODEL_ID)
        assert sorted(ids.tolist()) == sorted(i.id for i in items)
        assert matrix.shape == (3, 200)
        fresh = self.lib.get_item(items[0].id)
        assert fresh[store.MODEL_FIELD] == MODEL_ID
        assert fresh[store.TAGS_FIELD]  # top tags stored as text
        assert isinstance(fresh[store.VECTOR_FIELD], store.Vector)
        assert np.asarray(fresh[store.VECTOR_FIELD]).shape == (200,)

        fingerprint = store.fingerprint(self.lib, MODEL_ID)
        self.run_command("deepsim-embed")
        assert "nothing to do: all 3 matching tracks already have" in capsys.readouterr().out
        assert store.fingerprint(self.lib, MODEL_ID) == fingerprint

        self.run_command("deepsim-embed", "-f", "title:low-a")
        assert "embedded 1, skipped 0" in capsys.readouterr().out
        assert store.fingerprint(self.lib, MODEL_ID) != fingerprint

    def test_pretend_writes_nothing(self, capsys) -> None:
        self.add_files("low-a.mp3", "mid-b.m4a")
        self.run_command("deepsim-embed", "-p")
        out = capsys.readouterr().out
        assert "would embed 2" in out
        assert "low-a" in out and "mid-b" in out
        assert store.ids_with_vectors(self.lib, MODEL_ID) == set()

    def test_same_music_in_two_codecs_is_nearest(self, tmp_path: Path) -> None:
        # Three different signals, each encoded twice (lossy and lossless): a
        # sound's own re-encoding must be its nearest neighbour.
        signals = {
            "low": tone(8.0, freqs=(110.0, 165.0), seed=1),
            "mid": tone(8.0, freqs=(660.0, 990.0, 1320.0), seed=2),
            "noise": np.random.default_rng(3).uniform(-0.5, 0.5, (2, 8 * 22050)).astype(np.float32),
        }
        for name, samples in signals.items():
            for ext in ("mp3", "flac"):
                path = write_audio(tmp_path / f"{name}.{ext}", samples, rate=22050)
                self.add_item(path=str(path), title=f"{name}.{ext}")
        self.run_command("deepsim-embed")
        ids, matrix = store.read_vectors(self.lib, MODEL_ID)
        titles = {i.id: i.title for i in self.lib.items()}
        names = [titles[i] for i in ids]
        sims = matrix @ matrix.T
        np.fill_diagonal(sims, -2)
        for i, name in enumerate(names):
            nearest = names[int(np.argmax(sims[i]))]
            assert nearest.split(".")[0] == name.split(".")[0], (name, nearest)

    def test_no_match_is_a_user_error(self) -> None:
        from beets.exceptions import UserError

        with pytest.raises(UserError, match="nothing-like-this"):
            self.run_command("deepsim-embed", "title:nothing-like-this")

    def test_bad_files_are_reported_and_stored_vectors_kept(self, tmp_path: Path, capsys) -> None:
        good = self.add_files("low-a.mp3", "mid-a.flac")
        self.run_command("deepsim-embed")
        capsys.readouterr()
        before = dict(zip(*store.read_vectors(self.lib, MODEL_ID), strict=True))

        bad: dict[str, Path] = {}
        bad["missing"] = tmp_path / "missing.mp3"
        bad["empty"] = tmp_path / "empty.mp3"
        bad["empty"].touch()
        bad["text"] = tmp_path / "text.mp3"
        bad["text"].write_text("hello\n" * 100)
        bad["video"] = write_video_only(tmp_path / "video.mp4")
        bad["silence"] = write_audio(
            tmp_path / "silence.flac", np.zeros((1, 22050 * 5), np.float32), rate=22050
        )
        full = write_audio(tmp_path / "full.flac", tone(40.0), rate=22050)
        bad["truncated"] = tmp_path / "truncated.flac"
        shutil.copy(full, bad["truncated"])
        with open(bad["truncated"], "r+b") as fh:
            fh.truncate(full.stat().st_size // 3)
        ok: dict[str, Path] = {
            "two-seconds": write_audio(tmp_path / "two.ogg", tone(2.0), rate=22050),
            "mono-8k": write_audio(
                tmp_path / "m8.wav", tone(10.0, rate=8000, channels=1), rate=8000
            ),
            "hires": write_audio(
                tmp_path / "hires.flac", tone(10.0, rate=96000), rate=96000, sample_format="s32"
            ),
            "non-ascii": write_audio(
                tmp_path / "Sigur Rós – Hoppípolla.mp3", tone(6.0), rate=22050
            ),
        }
        items = {
            name: self.add_item(path=str(path), title=name) for name, path in {**bad, **ok}.items()
        }
        # one of the good items already had a vector; -f re-embeds everything;
        # failures make the exit status non-zero, after the summary
        from beets.exceptions import UserError

        with pytest.raises(UserError, match="could not be embedded"):
            self.run_command("deepsim-embed", "-f")
        out = capsys.readouterr().out
        done = store.ids_with_vectors(self.lib, MODEL_ID)
        for name in ok:
            assert items[name].id in done, name
        for name in ("missing", "empty", "text", "video", "silence"):
            assert items[name].id not in done, name
        assert "failed 4" in out or "failed 5" in out  # truncated: vector or error
        assert "1 missing on disk" in out  # not a failure: never decoded
        for reason in (
            "empty",
            "not a readable audio file",
            "no audio stream",
            "silence",
        ):
            assert reason in out, reason
        for item in good:
            assert item.id in done  # re-embedded, not lost
        # stored vectors of the good files are unchanged (deterministic model)
        after = dict(zip(*store.read_vectors(self.lib, MODEL_ID), strict=True))
        for item_id, vector in before.items():
            np.testing.assert_allclose(after[item_id], vector, atol=2e-3)

    def test_bad_configuration_is_a_user_error(self) -> None:
        from beets.exceptions import UserError

        self.add_files("low-a.mp3")
        self.config["deepsim"]["model"] = "no-such-model"
        with pytest.raises(UserError, match="no-such-model"):
            self.run_command("deepsim-embed")

    def test_interrupt_keeps_committed_batches(self, monkeypatch, capsys) -> None:
        from beets.exceptions import UserError

        import deepsim.embed

        self.config["deepsim"]["commit_every"] = 1
        self.add_files("low-a.mp3", "low-b.ogg", "mid-a.flac", "mid-b.m4a")
        real = deepsim.embed.embed_files

        def interrupted(*args, **kwargs):
            for n, outcome in enumerate(real(*args, **kwargs)):
                if n == 2:
                    raise KeyboardInterrupt
                yield outcome

        monkeypatch.setattr(deepsim.embed, "embed_files", interrupted)
        with pytest.raises(UserError, match=r"interrupted; 2 vector\(s\) saved.*again to resume"):
            self.run_command("deepsim-embed")
        assert len(store.ids_with_vectors(self.lib, MODEL_ID)) == 2
        monkeypatch.setattr(deepsim.embed, "embed_files", real)
        self.run_command("deepsim-embed")
        assert "embedded 2, skipped 2" in capsys.readouterr().out


# ------------------------------------------------------------------------------- a killed run


def _children(pid: int) -> list[int]:
    """The running (not zombie) child processes of ``pid`` (Linux ``/proc``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_killed_run_leaves_no_worker_holding_the_lock(tmp_path: Path) -> None:
    # `beet deepsim-embed` holds the embedding lock while it runs, and its decoding worker
    # is forked from it (a copy of the lock's file among its files).  Killed outright, the
    # run must not leave the worker behind, holding the lock: the next run would wait for
    # it for good.  The next run here must finish, and embed every track.
    import os
    import signal
    import subprocess
    import sys
    import time

    music = tmp_path / "music"
    music.mkdir()
    for k in range(16):
        write_audio(
            music / f"t{k:02d}.flac", tone(20.0, freqs=(200.0 + 40 * k,), seed=k), rate=22050
        )
    (tmp_path / "config.yaml").write_text(
        f"library: {tmp_path / 'library.db'}\ndirectory: {music}\nplugins: deepsim\n"
        "import:\n  copy: no\n  autotag: no\n"
        "deepsim:\n  auto: no\n  model: msd-musicnn\n  device: cpu\n  workers: 1\n",
        encoding="utf-8",
    )
    env = {**os.environ, "BEETSDIR": str(tmp_path)}
    beet = [sys.executable, "-m", "beets"]
    subprocess.run([*beet, "import", "-q", str(music)], env=env, check=True, capture_output=True)
    first = subprocess.Popen(
        [*beet, "deepsim-embed"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    workers: list[int] = []
    while not workers and first.poll() is None and time.monotonic() < deadline:
        workers = [pid for pid in _children(first.pid) if "forkserver" not in _cmdline(pid)]
        time.sleep(0.02)
    assert workers, "the run never started a decoding worker"
    first.send_signal(signal.SIGKILL)
    first.wait()
    try:
        second = subprocess.run(
            [*beet, "deepsim-embed"], env=env, capture_output=True, text=True, timeout=180
        )
    finally:
        for pid in workers:  # whatever happened, nothing is left running after the test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert second.returncode == 0, second.stderr
    assert "failed 0" in second.stdout and "embedded" in second.stdout, second.stdout


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
