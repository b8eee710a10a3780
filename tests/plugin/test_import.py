"""The import hook: with ``auto: yes`` `beet import` embeds the new tracks once they are in place.

Short generated clips, imported as-is (``-A -q``) and *moved* into the library
directory, so embedding the files where they were before the move would fail:
a vector proves the item was embedded from its library path.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from audiogen import tone, write_audio
from beets.test.helper import PluginTestHelper

from deepsim import store

MODEL_ID = "musicnn-msd-1"

#: file name -> (title, tone frequencies)
CLIPS = {
    "one.flac": ("Low Hum", (110.0, 165.0)),
    "two.mp3": ("Middle Tone", (660.0, 990.0)),
    "three.ogg": ("High Whistle", (2500.0, 3300.0)),
}


class ImportHelper(PluginTestHelper):
    plugin: ClassVar[str] = "deepsim"
    preload_plugin: ClassVar[bool] = False  # `auto` is read when the plugin starts
    auto: ClassVar[bool] = True

    @pytest.fixture(autouse=True)
    def _config(self, setup: None) -> None:
        self.config["import"]["move"] = True
        self.config["import"]["copy"] = False
        self.config["import"]["write"] = False
        self.config["deepsim"]["auto"] = self.auto
        self.config["deepsim"]["model"] = "msd-musicnn"
        self.config["deepsim"]["workers"] = 0
        self.config["deepsim"]["device"] = "cpu"
        self.load_plugins()

    def make_album(self, names: list[str], album: str) -> Path:
        folder = self.temp_path / "incoming" / album
        folder.mkdir(parents=True)
        for i, name in enumerate(names):
            title, freqs = CLIPS[name]
            write_audio(
                folder / name,
                tone(5.0, freqs=freqs, seed=i),
                rate=22050,
                tags={"artist": "Generator", "album": album, "title": title, "track": str(i + 1)},
            )
        return folder

    def import_dir(self, folder: Path, capsys: pytest.CaptureFixture[str]) -> str:
        capsys.readouterr()
        self.run_command("import", "-A", "-q", str(folder))
        return capsys.readouterr().out


class TestAutoEmbed(ImportHelper):
    def test_imported_tracks_are_embedded_at_their_library_paths(
        self, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
    ) -> None:
        folder = self.make_album(["one.flac", "two.mp3"], "First")
        sources = sorted(folder.iterdir())
        with caplog.at_level(logging.INFO, logger="beets"):
            out = self.import_dir(folder, capsys)
        items = list(self.lib.items())
        assert sorted(i.title for i in items) == ["Low Hum", "Middle Tone"]
        assert "embedding 2 imported track(s)" in caplog.text
        assert "embedded 2, skipped 0" in out and "failed 0" in out
        library_dir = os.fsdecode(self.lib.directory)
        for item in items:
            path = os.fsdecode(item.path)
            assert path.startswith(library_dir + os.sep) and os.path.isfile(path)
        assert not any(p.exists() for p in sources)  # moved, not copied
        ids, matrix = store.read_vectors(self.lib, MODEL_ID)
        assert sorted(ids.tolist()) == sorted(i.id for i in items)
        assert matrix.shape == (2, 200)
        np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-3)
        for item in items:
            stored = self.lib.get_item(item.id)
            assert stored[store.MODEL_FIELD] == MODEL_ID
            assert stored[store.TAGS_FIELD]  # msd-musicnn's top tags
        before = dict(zip(ids.tolist(), matrix, strict=True))

        # A second import embeds only its own track.
        caplog.clear()
        folder = self.make_album(["three.ogg"], "Second")
        with caplog.at_level(logging.INFO, logger="beets"):
            out = self.import_dir(folder, capsys)
        assert "embedding 1 imported track(s)" in caplog.text
        assert "embedded 1, skipped 0" in out
        ids, matrix = store.read_vectors(self.lib, MODEL_ID)
        assert sorted(ids.tolist()) == sorted(i.id for i in self.lib.items())
        assert len(ids) == 3
        after = dict(zip(ids.tolist(), matrix, strict=True))
        for item_id, vector in before.items():
            np.testing.assert_array_equal(after[item_id], vector)  # not recomputed

        # The new vectors are searchable straight away.
        capsys.readouterr()
        self.run_command("similar", "-f", "$title", "title:Low Hum")
        assert sorted(capsys.readouterr().out.splitlines()) == ["High Whistle", "Middle Tone"]


class TestNoAutoEmbed(ImportHelper):
    auto: ClassVar[bool] = False

    def test_nothing_is_embedded(self, capsys: pytest.CaptureFixture[str]) -> None:
        folder = self.make_album(["one.flac", "two.mp3"], "First")
        out = self.import_dir(folder, capsys)
        items = list(self.lib.items())
        assert len(items) == 2
        assert "embedded" not in out
        assert store.ids_with_vectors(self.lib, MODEL_ID) == set()
        assert all(self.lib.get_item(i.id).get(store.MODEL_FIELD) is None for i in items)
        # the plugin is loaded, and the tracks can still be embedded by hand
        capsys.readouterr()
        self.run_command("deepsim-embed", "-p")
        assert "would embed 2 track(s) with musicnn-msd-1" in capsys.readouterr().out
