"""beets' own commands on items that hold deepsim vectors: none may break, none may lose one.

A small library imported by beets itself (``import -A``) from generated clips,
each item holding a vector of the test model (with its audio identity) and one
of a second model; then every everyday command, and `beet similar` /
`beet deepsim-embed` after it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from audiogen import tone, write_audio
from beets.test.helper import PluginTestHelper

from deepsim import store
from deepsim.identity import identify

MODEL_ID = "musicnn-msd-1"
OTHER_ID = "other-model-1"
DIM = 200

#: album -> [(file name, title, tone frequencies)]
ALBUMS = {
    "Low": [("one.flac", "Beach", (110.0, 165.0)), ("two.mp3", "Dune", (110.0, 220.0))],
    "High": [("three.ogg", "Whistle", (2500.0, 3300.0)), ("four.flac", "Bird", (2500.0, 3750.0))],
}


def unit(seed: int, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


class TestBeetsCommands(PluginTestHelper):
    preload_plugin: ClassVar[bool] = False

    @pytest.fixture(autouse=True)
    def _library(self, setup: None) -> None:
        self.config["import"]["copy"] = True
        self.config["import"]["write"] = False
        self.config["deepsim"]["auto"] = False  # vectors are written below, not computed
        self.config["deepsim"]["model"] = "msd-musicnn"
        self.config["deepsim"]["workers"] = 0
        self.config["deepsim"]["device"] = "cpu"
        self.config["edit"]["itemfields"] = ["title", "deepsim_vector", "deepsim_model"]
        self.load_plugins("deepsim", "info", "export", "edit")
        self.incoming = self.temp_path / "incoming"
        for album, tracks in ALBUMS.items():
            folder = self.incoming / album
            folder.mkdir(parents=True)
            for k, (name, title, freqs) in enumerate(tracks):
                write_audio(
                    folder / name,
                    tone(5.0, freqs=freqs, seed=k),
                    rate=22050,
                    tags={"artist": "Gen", "album": album, "title": title, "track": str(k + 1)},
                )
        self.run_command("import", "-A", "-q", str(self.incoming))
        self.items = {item.title: item for item in self.lib.items()}
        assert len(self.items) == 4
        records = []
        for k, item in enumerate(self.items.values()):
            audio = identify(item.path)
            assert audio is not None
            records.append(store.VectorRecord(item.id, MODEL_ID, unit(k), audio=audio.text))
            records.append(store.VectorRecord(item.id, OTHER_ID, unit(10 + k, 8)))
        store.write_records(self.lib, records)
        self.before = self.vectors()

    def vectors(self, model_id: str = MODEL_ID) -> dict[int, np.ndarray]:
        ids, matrix = store.read_vectors(self.lib, model_id)
        return dict(zip(ids.tolist(), matrix, strict=True))

    def assert_vectors_kept(self) -> None:
        after = self.vectors()
        assert after.keys() == self.before.keys()
        for item_id, vector in self.before.items():
            np.testing.assert_array_equal(after[item_id], vector)
        assert len(self.vectors(OTHER_ID)) == 4

    def out(self, capsys: pytest.CaptureFixture[str], *args: str) -> str:
        capsys.readouterr()
        self.run_command(*args)
        return capsys.readouterr().out

    def assert_nothing_to_embed(self, capsys: pytest.CaptureFixture[str]) -> None:
        out = self.out(capsys, "deepsim-embed")
        assert "nothing to do" in out, out

    def test_modify_writes_tags_and_keeps_vectors(self, capsys: pytest.CaptureFixture[str]) -> None:
        out = self.out(capsys, "modify", "-y", "title:Beach", "title=Beach Mod")
        assert "Beach Mod" in out
        assert self.lib.items("title:Beach Mod").get() is not None
        self.assert_vectors_kept()
        # the file's tags (size, mtime) changed, its audio did not: no work
        self.assert_nothing_to_embed(capsys)
        assert "Dune" in self.out(capsys, "similar", "-f", "$title", "title:Beach Mod")

    def test_modify_without_writing_and_album_mode(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        self.run_command("modify", "-y", "-W", "title:Dune", "title=Dune 2")
        self.run_command("modify", "-y", "-a", "album:High", "genres=Birds")
        assert {i.title for i in self.lib.items("genres:Birds")} == {"Whistle", "Bird"}
        self.assert_vectors_kept()
        self.assert_nothing_to_embed(capsys)

    def test_modify_sets_and_clears_deepsim_fields(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        self.run_command("modify", "-y", "title:Bird", "deepsim_tags=chirpy")
        assert self.lib.items("title:Bird").get()[store.TAGS_FIELD] == "chirpy"
        self.run_command("modify", "-y", "title:Bird", "deepsim_vector!")
        bird = self.items["Bird"].id
        assert bird not in self.vectors()
        # the cleared vector is recomputed without -f; the other model's is kept
        out = self.out(capsys, "deepsim-embed", "-p")
        assert "would embed 1 track(s)" in out and "Bird" in out
        assert bird in self.vectors(OTHER_ID)

    def test_update_and_write(self, capsys: pytest.CaptureFixture[str]) -> None:
        beach = self.items["Beach"]
        beach.title = "Beach Written"
        beach.store()
        self.run_command("write")
        self.run_command("update")
        assert self.lib.get_item(beach.id).title == "Beach Written"
        self.assert_vectors_kept()
        self.assert_nothing_to_embed(capsys)

    def test_reimport_and_import_of_the_same_files(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        self.run_command("import", "-L", "-A", "-q", "album:Low")
        self.assert_vectors_kept()
        self.config["import"]["duplicate_action"] = "keep"
        self.run_command("import", "-A", "-q", str(self.incoming / "High"))
        assert len(self.lib.items()) == 6
        self.assert_vectors_kept()
        # the two new items need vectors; nothing else does
        assert "would embed 2 track(s)" in self.out(capsys, "deepsim-embed", "-p")

    def test_move_keeps_vectors_and_similar_finds_the_moved_files(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        elsewhere = self.temp_path / "elsewhere"
        elsewhere.mkdir()
        self.run_command("move", "-d", str(elsewhere))
        moved = [os.fsdecode(i.path) for i in self.lib.items()]
        assert all(p.startswith(str(elsewhere)) for p in moved)
        self.assert_vectors_kept()
        self.assert_nothing_to_embed(capsys)
        lines = self.out(capsys, "similar", "-f", "$path", "title:Beach").splitlines()
        assert len(lines) == 3 and all(line.startswith(str(elsewhere)) for line in lines)

    def test_info_ls_and_export(self, capsys: pytest.CaptureFixture[str]) -> None:
        out = self.out(capsys, "info", "-l", "title:Beach")
        assert "deepsim_vector" in out and "-d vector" in out
        fields = [
            store.VECTOR_FIELD,
            store.MODEL_FIELD,
            store.AUDIO_FIELD,
            store.TAGS_FIELD,
            store.FAILED_FIELD,
            "deepsim_similarity",
            "deepsim_distance",
        ]
        line = self.out(capsys, "ls", "-f", "|".join(f"${f}" for f in fields), "title:Beach")
        vector, model, audio, *_rest = line.strip().split("|")
        assert vector.startswith(f"<{DIM}-d vector") and model == MODEL_ID
        assert audio.count(":") == 2
        exported = json.loads(self.out(capsys, "export", "-l", "-f", "json", "title:Beach"))
        assert exported[0]["title"] == "Beach"
        assert str(exported[0][store.VECTOR_FIELD]).startswith(f"<{DIM}-d vector")
        rows = list(
            csv.DictReader(io.StringIO(self.out(capsys, "export", "-l", "-f", "csv", "Gen")))
        )
        assert len(rows) == 4 and all(r[store.VECTOR_FIELD].startswith("<") for r in rows)
        self.assert_vectors_kept()

    def test_edit_leaves_vectors_alone(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("EDITOR", "true")
        self.run_command("edit", "title:Beach")
        self.run_command("edit", "--all", "title:Dune")
        self.assert_vectors_kept()

    def test_edit_that_changes_a_title_keeps_the_shown_vector(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        script = tmp_path / "editor.sh"
        script.write_text("#!/bin/sh\nsed -i 's/^title: Beach$/title: Beach Edited/' \"$1\"\n")
        script.chmod(0o755)
        monkeypatch.setenv("EDITOR", str(script))
        import beetsplug.edit

        monkeypatch.setattr(beetsplug.edit.ui, "input_options", lambda *a, **k: "a")  # apply
        self.run_command("edit", "title:Beach")
        assert self.lib.items("title:Beach Edited").get() is not None
        self.assert_vectors_kept()

    def test_remove_and_remove_d(self, capsys: pytest.CaptureFixture[str]) -> None:
        whistle, bird = self.items["Whistle"], self.items["Bird"]
        self.run_command("remove", "-f", "title:Whistle")
        bird_path = os.fsdecode(bird.path)
        self.run_command("remove", "-f", "-d", "title:Bird")
        assert not os.path.exists(bird_path)
        left = self.vectors()
        assert whistle.id not in left and bird.id not in left and len(left) == 2
        titles = self.out(capsys, "similar", "-f", "$title", "-c", "5", "title:Beach").split()
        assert titles == ["Dune"]
        self.assert_nothing_to_embed(capsys)

    def test_deleted_file_is_never_a_result_nor_in_a_playlist(
        self, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, tmp_path: Path
    ) -> None:
        os.unlink(self.items["Dune"].path)  # behind beets' back
        titles = self.out(capsys, "similar", "-f", "$title", "title:Beach").split()
        assert "Dune" not in titles and len(titles) == 2
        assert "1 track(s) left out: file missing on disk" in caplog.text
        playlist = tmp_path / "p.m3u"
        self.run_command("similar", "-o", str(playlist), "title:Beach")
        written = playlist.read_text().splitlines()
        assert len(written) == 2 and all(os.path.isfile(p) for p in written)
        out = self.out(capsys, "deepsim-embed")
        assert "1 missing on disk" in out

    def test_changed_audio_is_stale_until_embedded_again(
        self, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
    ) -> None:
        # another song at the same path (same format, new audio)
        shutil.copyfile(self.items["Bird"].path, self.items["Beach"].path)
        titles = self.out(capsys, "similar", "-f", "$title", "title:Dune").split()
        assert "Beach" not in titles
        assert "audio changed since embedding; run `beet deepsim-embed`" in caplog.text
        out = self.out(capsys, "deepsim-embed", "-p")
        assert "would embed 1 track(s)" in out and "1 with changed audio" in out

    def test_a_failing_file_exits_1_once_and_a_seed_gets_its_reason(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        from beets.exceptions import UserError

        Path(os.fsdecode(self.items["Dune"].path)).write_bytes(b"not audio at all\n" * 200)
        with pytest.raises(UserError, match=r"1 track\(s\) could not be embedded"):
            self.run_command("deepsim-embed")
        out = capsys.readouterr().out
        assert "failed 1" in out and "not a readable audio file" in out
        # the unchanged broken file is not decoded again
        out = self.out(capsys, "deepsim-embed")
        assert "nothing to do" in out and "1 failed before (--retry-failed)" in out
        with pytest.raises(UserError, match="could not be embedded: not a readable audio file"):
            self.run_command("similar", "title:Dune")
