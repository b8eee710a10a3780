"""`beet deepsim-train` end to end on a small library with planted backbone vectors.

The items carry backbone (``musicnn-msd-mtt-1``) vectors written straight to
the store, so no audio is decoded: 4 clusters of 16 tracks whose vectors
differ by cluster, plus a stronger "sound" structure unrelated to taste (so
the untrained vectors are a poor recommender and training has to help).  A
Last.fm CSV export holds 30 listeners' histories, each cut into 4 sessions
(2 h apart; 3 min between plays within one) that keep to one cluster; training
must find 120 sessions and learn a space where a track's neighbours are of its
own cluster.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import beets.plugins
import numpy as np
import pytest
from beets.exceptions import UserError
from beets.test.helper import PluginTestHelper

import deepsim.train
from deepsim import store
from deepsim.models import ACTIVE_FILE
from deepsim.models import model_id as model_id_of

BACKBONE_ID = "musicnn-msd-mtt-1"
DIM = 400
CLUSTERS = 4
PER_CLUSTER = 16
USERS = 30
SESSIONS = 4
PLAYS = 6
START = 1_600_000_000  # unix time of the first play


def title_of(cluster: int, k: int) -> str:
    return f"Song {cluster}-{k}"


def write_lastfm_csv(path: Path, *, seed: int = 0, artist_prefix: str = "Band") -> Path:
    """Listeners who keep to one cluster per session; sessions 2 h apart."""
    rng = np.random.default_rng(seed)
    lines = ["user,artist,album,track,uts"]
    for u in range(USERS):
        t = START + u * 7 * 86400
        for _ in range(SESSIONS):
            cluster = int(rng.integers(CLUSTERS))
            for k in rng.choice(PER_CLUSTER, PLAYS, replace=False):
                lines.append(
                    f"user{u},{artist_prefix} {cluster},Album {cluster},"
                    f"{title_of(cluster, int(k))},{t}"
                )
                t += 180
            t += 2 * 3600
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class TestTrainCommand(PluginTestHelper):
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
        nuisance = rng.standard_normal((CLUSTERS, DIM))
        self.cluster: dict[int, int] = {}
        rows = []
        for c in range(CLUSTERS):
            for k in range(PER_CLUSTER):
                item = self.add_item(
                    title=title_of(c, k),
                    artist=f"Band {c}",
                    album=f"Album {c}",
                    track=k + 1,
                    path=str(self._present(tmp_path / "music" / str(c) / f"{k}.mp3")),
                )
                self.cluster[item.id] = c
                sound = 2.5 * nuisance[rng.integers(CLUSTERS)]
                rows.append((item.id, means[c] + sound + 0.8 * rng.standard_normal(DIM)))
        store.write_vectors(self.lib, rows, BACKBONE_ID)
        self.listens = write_lastfm_csv(tmp_path / "scrobbles.csv")

    @staticmethod
    def _present(path: Path) -> Path:
        """A file on disk (`similar` leaves out tracks whose file is missing)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * 64)
        return path

    @property
    def state_dir(self) -> Path:
        return self.temp_path / "deepsim"

    def models(self) -> list[Path]:
        return sorted((self.state_dir / "models").glob("*.safetensors"))

    def active(self) -> dict[str, str] | None:
        pointer = self.state_dir / ACTIVE_FILE
        return json.loads(pointer.read_text()) if pointer.exists() else None

    def clear_plugin_cache(self) -> None:
        """Forget the active model the plugin resolved (a new `beet` process would)."""
        for plugin in beets.plugins.find_plugins():
            for key in ("model_name", "model_id"):
                plugin.__dict__.pop(key, None)

    def train(self, capsys: pytest.CaptureFixture[str], *args: str) -> str:
        capsys.readouterr()
        self.run_command("deepsim-train", "--listens", str(self.listens), *args)
        return capsys.readouterr().out

    def test_trains_activates_and_reembeds(self, capsys: pytest.CaptureFixture[str]) -> None:
        out = self.train(capsys)
        # the metrics table
        n = CLUSTERS * PER_CLUSTER
        assert f"training data: {n} tracks × {USERS * SESSIONS} users" in out
        assert f"{BACKBONE_ID} + ridge head → 8 factors" in out and "(now active)" in out
        assert "held-out evaluation:" in out
        names = {
            "wmf (upper bound)": "wmf",
            "trained: taste (x_u · predicted)": "taste",
            "untrained: sound profile": "untrained",
            "popularity (others' plays)": "popularity",
            "random": "random",
        }
        rows = {
            names[line[2:34].strip()]: line[34:].split()
            for line in out.splitlines()
            if line.startswith("  ") and line[2:34].strip() in names
        }
        assert len(rows) == 5, out
        # (cosine, AUC, mAP, users): the learnt model ranks the held-out tracks far better
        # than chance and than the untrained vectors
        auc = {name: float(row[1]) for name, row in rows.items()}
        assert auc["taste"] > auc["random"] + 0.2, out
        assert auc["taste"] > auc["untrained"] + 0.05, out
        assert "sound+taste profile (w=" in out and "activated: it beats the untrained" in out
        # the model file, now active
        (path,) = self.models()
        new_id = model_id_of(path)
        assert new_id != BACKBONE_ID
        assert f"model {new_id}:" in out and str(path) in out
        assert self.active() == {"path": str(path.resolve()), "model_id": new_id}
        assert f"re-embedded the library with {new_id}" in out
        # every item got the new model's vector (replacing the backbone vector)
        ids, matrix = store.read_vectors(self.lib, new_id)
        assert sorted(ids.tolist()) == sorted(self.cluster)
        assert matrix.shape == (n, DIM + 8)  # sound + taste
        # the backbone vectors are kept (backbone slot) for re-training without audio
        assert store.ids_with_vectors(self.lib, BACKBONE_ID) == set(self.cluster)

        # the learnt taste space keeps the clusters apart
        from deepsim.taste import layout_of, split_parts

        _sound, taste = split_parts(matrix, layout_of(path))
        cluster = np.asarray([self.cluster[i] for i in ids.tolist()])
        tsims = taste @ taste.T
        same = cluster[:, None] == cluster[None, :]
        np.fill_diagonal(same, False)
        other = cluster[:, None] != cluster[None, :]
        assert tsims[same].mean() > tsims[other].mean() + 0.3
        sims = matrix @ matrix.T
        assert sims[same].mean() > sims[other].mean() + 0.1

        # `beet similar` uses the new model's vectors: its ranking and printed
        # similarities are those of the new vectors
        seed = int(ids[0])
        expected = [int(ids[j]) for j in np.argsort(-sims[0]) if ids[j] != seed][:8]
        capsys.readouterr()
        self.run_command("similar", "-f", "$id $deepsim_similarity", "-c", "8", f"id:{seed}")
        lines = capsys.readouterr().out.splitlines()
        got = [int(line.split()[0]) for line in lines]
        assert got == expected
        for line, item_id in zip(lines, got, strict=True):
            row = int(np.flatnonzero(ids == item_id)[0])
            assert float(line.split()[1]) == pytest.approx(float(sims[0, row]), abs=2e-3)

    def test_no_embed_leaves_the_library_to_deepsim_embed(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        out = self.train(capsys, "--no-embed", "--epochs", "5")
        assert "run `beet deepsim-embed` to embed the library with it" in out
        (path,) = self.models()
        new_id = model_id_of(path)
        assert self.active()["model_id"] == new_id
        assert store.ids_with_vectors(self.lib, new_id) == set()
        assert len(store.ids_with_vectors(self.lib, BACKBONE_ID)) == len(self.cluster)
        # the new model is active, so `beet similar` finds no vector of it yet
        with pytest.raises(UserError, match=f"no {new_id} vector yet; run `beet deepsim-embed`"):
            self.run_command("similar", "title:Song 0-0")
        # a deleted active model is an error naming it, not a silent switch
        path.unlink()
        self.clear_plugin_cache()
        with pytest.raises(UserError, match=f"the active model {path} is missing"):
            self.run_command("similar", "title:Song 0-0")

    def test_pinned_model_is_not_replaced(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.config["deepsim"]["model"] = "default"
        out = self.train(capsys, "--epochs", "5")
        (path,) = self.models()
        assert (
            "deepsim.model is 'default', so the new model is not used; set it to auto "
            f"(or to {path}) to use it"
        ) in out
        # nothing re-embedded: the backbone vectors stay, `beet similar` uses them
        assert len(store.ids_with_vectors(self.lib, BACKBONE_ID)) == len(self.cluster)
        assert store.ids_with_vectors(self.lib, model_id_of(path)) == set()
        capsys.readouterr()
        self.run_command("similar", "-c", "1", "-f", "$title", "title:Song 0-0")
        assert capsys.readouterr().out.strip().startswith("Song 0-")

    def test_no_listening_data_is_a_user_error(self) -> None:
        with pytest.raises(UserError, match="no listening data"):
            self.run_command("deepsim-train")
        assert not self.state_dir.exists()

    def test_listens_from_the_config(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.config["deepsim"]["train"]["listens"] = [str(self.listens)]
        self.config["deepsim"]["train"]["epochs"] = 5
        self.config["deepsim"]["train"]["heldout"] = 0
        capsys.readouterr()
        self.run_command("deepsim-train", "--no-embed")
        out = capsys.readouterr().out
        assert "(64 to train on, 0 held out)" in out
        assert "no held-out tracks: no evaluation" in out
        assert len(self.models()) == 1

    def test_malformed_listens_file_names_the_line(self, tmp_path: Path) -> None:
        bad = tmp_path / "bad.csv"
        lines = self.listens.read_text().splitlines()
        lines[5] = "user1,Band 0,Album 0,Song 0-1,not a date"
        bad.write_text("\n".join(lines[:40]) + "\n")  # 1 bad of 39 records: over 1 %
        with pytest.raises(UserError, match=f"{bad}:6: "):
            self.run_command("deepsim-train", "--listens", str(bad))
        headerless = tmp_path / "three-columns.csv"
        headerless.write_text("Band 0,Song 0-1,1600000000\n")
        with pytest.raises(UserError, match=f"{headerless}:1: no header and 3 columns"):
            self.run_command("deepsim-train", "--listens", str(headerless))
        with pytest.raises(UserError, match="no such file"):
            self.run_command("deepsim-train", "--listens", str(tmp_path / "missing.csv"))
        assert not self.state_dir.exists()

    def test_no_matches_writes_nothing(self, tmp_path: Path) -> None:
        other = write_lastfm_csv(tmp_path / "other.csv", artist_prefix="Unknown Band")
        with pytest.raises(UserError, match="0 of 64 listened tracks matched the library"):
            self.run_command("deepsim-train", "--listens", str(other))
        assert self.models() == [] and self.active() is None
        assert len(store.ids_with_vectors(self.lib, BACKBONE_ID)) == len(self.cluster)

    def test_too_little_data_is_a_user_error(self) -> None:
        self.config["deepsim"]["train"]["min_tracks"] = 1000
        with pytest.raises(UserError, match="training needs at least 1000"):
            self.run_command("deepsim-train", "--listens", str(self.listens))
        assert self.models() == [] and self.active() is None

    def test_interrupt_keeps_the_previous_model(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        self.train(capsys, "--no-embed", "--epochs", "5")
        (previous,) = self.models()
        before = self.active()
        assert before is not None
        real = deepsim.train.train_head

        def interrupted(*args: Any, **kwargs: Any) -> Any:
            def stop(epoch: int, train_loss: float, val_loss: float) -> None:
                if epoch == 2:
                    raise KeyboardInterrupt

            kwargs["callback"] = stop
            return real(*args, **kwargs)

        monkeypatch.setattr(deepsim.train, "train_head", interrupted)
        # other data: a different model if it were saved
        self.listens = write_lastfm_csv(self.temp_path / "more.csv", seed=5)
        with pytest.raises(UserError, match="interrupted; nothing was saved"):
            self.train(capsys, "--epochs", "5")
        assert self.models() == [previous]
        assert self.active() == before
        # the library still holds the backbone vectors (nothing re-embedded)
        assert len(store.ids_with_vectors(self.lib, BACKBONE_ID)) == len(self.cluster)

    def test_bad_option_values_are_user_errors(self) -> None:
        self.config["deepsim"]["train"]["factors"] = "many"
        with pytest.raises(UserError, match="factors must be a positive integer, got 'many'"):
            self.run_command("deepsim-train", "--listens", str(self.listens))
        self.config["deepsim"]["train"]["factors"] = 8
        with pytest.raises(UserError, match="heldout"):
            self.run_command("deepsim-train", "--listens", str(self.listens), "--heldout", "1.5")
        with pytest.raises(UserError, match="format"):
            self.run_command(
                "deepsim-train", "--listens", str(self.listens), "--listens-format", "wav"
            )
        assert self.models() == []

    @pytest.mark.parametrize("option", ["--factors", "--epochs"])
    def test_zero_on_the_command_line_is_refused(self, option: str) -> None:
        # `--factors 0` must not fall back silently to the configured value.
        with pytest.raises(UserError, match=f"{option[2:]} must be a positive integer, got 0"):
            self.run_command("deepsim-train", "--listens", str(self.listens), option, "0")
        assert self.models() == []

    # The items' files do not exist (fake paths): the two tests below need no
    # audio only if the stored backbone vectors are used.

    def test_deepsim_embed_after_no_embed_uses_the_stored_backbone_vectors(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`--no-embed` says "run `beet deepsim-embed`"; that must not decode every file
        again when the items hold the head's backbone vectors (reembed_from_store)."""
        self.train(capsys, "--no-embed", "--epochs", "5")
        (path,) = self.models()
        capsys.readouterr()
        self.run_command("deepsim-embed")
        out = capsys.readouterr().out
        assert store.ids_with_vectors(self.lib, model_id_of(path)) == set(self.cluster), out

    def test_retraining_reuses_the_backbone_vectors(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A second `beet deepsim-train` (more listening data) after the first re-embedded
        the library must not need every file decoded again."""
        self.train(capsys, "--epochs", "5")
        first = self.models()
        self.listens = write_lastfm_csv(self.temp_path / "more.csv", seed=5)
        self.train(capsys, "--epochs", "5")
        (second,) = set(self.models()) - set(first)
        assert self.active()["model_id"] == model_id_of(second)

    def test_structureless_listening_is_not_activated_unless_asked(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        rng = np.random.default_rng(3)
        lines = ["user,artist,album,track,uts"]
        t = START
        for u in range(USERS):
            for _ in range(SESSIONS * PLAYS):  # every play a random track: no taste to learn
                c, k = int(rng.integers(CLUSTERS)), int(rng.integers(PER_CLUSTER))
                lines.append(f"user{u},Band {c},Album {c},{title_of(c, k)},{t}")
                t += 180
            t += 7 * 86400
        self.listens.write_text("\n".join(lines) + "\n", encoding="utf-8")
        out = self.train(capsys)
        assert "not activated: it does not clearly beat the untrained model" in out, out
        assert "the previous model stays active; nothing re-embedded" in out
        (path,) = self.models()  # saved all the same
        assert self.active() is None
        assert store.ids_with_vectors(self.lib, model_id_of(path)) == set()
        out = self.train(capsys, "--activate", "--no-embed")
        assert "activated as asked (--activate)" in out
        assert self.active()["model_id"] == model_id_of(path)
