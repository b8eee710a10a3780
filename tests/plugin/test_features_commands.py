"""`similar --to/--keep-duplicates/--no-outliers/--mpd`, `deepsim-dupes`, `deepsim-outliers`,
`deepsim-map` and `deepsim-radio` end to end, on vectors planted in the store.

Vectors (6-d): ``t00`` … ``t80`` lie on an arc from axis 0 to axis 1, 20° apart
(no album, artists "Even"/"Odd"); ``t40`` has a second version (FLAC, 1° away);
album "Alpha" has six tracks near axis 2 and an ``intruder`` that sounds like
the arc (between t40 and t60, lifted off it by axis 5).
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from beets.exceptions import UserError
from beets.library import Item
from beets.test.helper import PluginTestHelper
from mpdserver import MpdServer, make_music

from deepsim import store

MODEL_ID = "musicnn-msd-mtt-1"  # the default model's id


def _unit(v: list[float]) -> np.ndarray:
    a = np.asarray(v, np.float64)
    return a / np.linalg.norm(a)


def _arc(degrees: float) -> np.ndarray:
    r = math.radians(degrees)
    return _unit([math.cos(r), math.sin(r), 0, 0, 0, 0])


def _tracks() -> list[tuple[dict[str, object], np.ndarray]]:
    out = []
    for k, deg in enumerate(range(0, 81, 20)):
        fields = {"title": f"t{deg:02d}", "artist": "Even" if k % 2 == 0 else "Odd",
                  "album": "", "format": "MP3"}  # fmt: skip
        out.append((fields, _arc(deg)))
    out.append(({"title": "t40", "artist": "Even", "album": "", "format": "FLAC"}, _arc(41)))
    for k in range(6):
        r = math.radians(60 * k)  # around axis 2: 0.9 cosine between neighbours
        v = _unit([0, 0, 1, 0.5 * math.cos(r), 0.5 * math.sin(r), 0])
        out.append(({"title": f"a{k}", "artist": "Al", "album": "Alpha", "format": "MP3"}, v))
    intruder = _unit([*_arc(50)[:2], 0, 0, 0, 0.6])
    out.append(({"title": "intruder", "artist": "Al", "album": "Alpha", "format": "MP3"}, intruder))
    return out


class FeatureHelper(PluginTestHelper):
    plugin: ClassVar[str] = "deepsim"

    @pytest.fixture(autouse=True)
    def _library(self, setup: None) -> None:
        self.items: dict[tuple[str, str], Item] = {}
        self.music = self.lib_path / "music"
        self.music.mkdir()
        rows = []
        for fields, vector in _tracks():
            path = self.music / f"{fields['title']}.{str(fields['format']).lower()}"
            path.write_bytes(b"\0" * 64)
            item = self.add_item(path=str(path), **fields)
            self.items[(str(fields["title"]), str(fields["format"]))] = item
            rows.append((item.id, vector))
        store.write_vectors(self.lib, rows, MODEL_ID)

    def out(self, capsys: pytest.CaptureFixture[str], *args: str) -> list[str]:
        capsys.readouterr()
        self.run_command(*args)
        return capsys.readouterr().out.splitlines()


class TestPaths(FeatureHelper):
    def test_path_with_similarities(self, capsys: pytest.CaptureFixture[str]) -> None:
        lines = self.out(capsys, "similar", "-v", "-c", "3", "-f", "$title", "title:t00",
                         "--to", "title:t80")  # fmt: skip
        assert lines[0].split() == ["start", "end", "track"]
        rows = [line.split() for line in lines[1:]]
        assert [r[2] for r in rows] == ["t00", "t20", "t40", "t60", "t80"]
        starts, ends = [float(r[0]) for r in rows], [float(r[1]) for r in rows]
        assert starts[0] == 1.0 and ends[-1] == 1.0
        assert starts == sorted(starts, reverse=True) and ends == sorted(ends)
        for r in rows:
            deg = int(r[2][1:])
            assert float(r[0]) == pytest.approx(math.cos(math.radians(deg)), abs=2e-3)
        # without -v: the beets format only
        assert self.out(capsys, "similar", "-c", "3", "-f", "$title", "title:t00", "--to",
                        "title:t80") == ["t00", "t20", "t40", "t60", "t80"]  # fmt: skip

    def test_path_filters_and_playlist(self, capsys: pytest.CaptureFixture[str]) -> None:
        titles = self.out(capsys, "similar", "-c", "3", "-f", "$title $format", "-w",
                          "format:FLAC", "title:t00", "--to", "title:t80")  # fmt: skip
        assert titles[1] == "t40 FLAC" and len(titles) == 3  # only one FLAC between
        target = self.temp_path / "path.m3u"
        out = self.out(capsys, "similar", "-c", "3", "-o", str(target), "title:t00", "--to",
                       "title:t80")  # fmt: skip
        assert out == [f"similar: wrote 5 track(s) to {target}"]
        entries = [line for line in target.read_text().splitlines() if line]
        assert [Path(e).stem for e in entries] == ["t00", "t20", "t40", "t60", "t80"]

    def test_path_errors(self) -> None:
        with pytest.raises(UserError, match="no tracks match --to query 'title:nothing'"):
            self.run_command("similar", "title:t00", "--to", "title:nothing")
        with pytest.raises(UserError, match="--each"):
            self.run_command("similar", "--each", "title:t00", "--to", "title:t80")


class TestVersions(FeatureHelper):
    def test_similar_folds_versions_by_default(self, capsys: pytest.CaptureFixture[str]) -> None:
        fmt = ["-f", "$title $format", "-c", "3"]
        # from t60: t40 FLAC is 19° away, t40 MP3 and t80 20°, the intruder 32°
        folded = self.out(capsys, "similar", *fmt, "title:t60")
        assert folded == ["t40 FLAC", "t80 MP3", "intruder MP3"]
        kept = self.out(capsys, "similar", *fmt, "--keep-duplicates", "title:t60")
        assert kept[0] == "t40 FLAC" and sorted(kept[1:]) == ["t40 MP3", "t80 MP3"]
        # a seed's own other version is folded too
        assert "t40 FLAC" not in self.out(capsys, "similar", *fmt, "title:t40 format:MP3")

    def test_dupes_command(self, capsys: pytest.CaptureFixture[str]) -> None:
        lines = self.out(capsys, "deepsim-dupes", "-f", "$title")
        assert lines[0] == "== 2 versions"
        assert [line.split()[1:] for line in lines[1:3]] == [["t40", "[MP3]"], ["t40", "[FLAC]"]]
        assert lines[-1] == "deepsim-dupes: 1 group(s), 2 tracks, 1 would be folded"
        assert self.out(capsys, "deepsim-dupes", "album:Alpha")[-1].startswith(
            "deepsim-dupes: 0 group(s)"
        )
        with pytest.raises(UserError, match="no tracks match query 'title:zzz'"):
            self.run_command("deepsim-dupes", "title:zzz")


class TestOutliers(FeatureHelper):
    def test_outliers_command(self, capsys: pytest.CaptureFixture[str]) -> None:
        lines = self.out(capsys, "deepsim-outliers", "-f", "$title")
        assert lines[0].split() == ["score", "fit", "track"]
        score, fit, title = lines[1].split()
        assert title == "intruder" and float(score) <= -3.5 and float(fit) < 0.5
        assert len(lines) == 3
        assert lines[-1] == (
            "deepsim-outliers: 1 outlier(s) (score <= -3.5) among 7 tracks of 1 album(s)"
        )
        everything = self.out(capsys, "deepsim-outliers", "--all", "-f", "$title")
        assert len(everything) == 1 + 7 + 1 and everything[1].endswith("intruder")

    def test_similar_no_outliers(self, capsys: pytest.CaptureFixture[str]) -> None:
        fmt = ["-f", "$title", "-c", "3"]
        assert "intruder" in self.out(capsys, "similar", *fmt, "title:t60")
        assert "intruder" not in self.out(capsys, "similar", *fmt, "--no-outliers", "title:t60")


class TestMap(FeatureHelper):
    def test_map_html_and_png(self, capsys: pytest.CaptureFixture[str]) -> None:
        pytest.importorskip("openTSNE")
        target = self.temp_path / "map.html"
        out = self.out(capsys, "deepsim-map", "-o", str(target), "--color-by", "artist")
        assert out == [
            f"deepsim-map: 13 tracks (computed projection, coloured by artist) written to {target}"
        ]
        html = target.read_text("utf-8")
        assert '"color_by":"artist"' in html and "intruder" in html
        out = self.out(capsys, "deepsim-map", "-o", str(target), "album:Alpha")
        assert out[0].startswith("deepsim-map: 7 tracks (cached projection, coloured by album)")
        if shutil.which("python3") and __import__("importlib").util.find_spec("matplotlib"):
            png = self.temp_path / "map.png"
            self.out(capsys, "deepsim-map", "-o", str(png))
            assert png.read_bytes()[:4] == b"\x89PNG"

    def test_map_errors(self) -> None:
        with pytest.raises(UserError, match=r"-o map\.html"):
            self.run_command("deepsim-map")
        with pytest.raises(UserError, match="color_by must be one of"):
            self.run_command("deepsim-map", "-o", str(self.temp_path / "m.html"),
                             "--color-by", "mood")  # fmt: skip


class TestMpd(FeatureHelper):
    @pytest.fixture
    def server(self) -> MpdServer:
        if shutil.which("mpd") is None:
            pytest.skip("mpd is not installed (Debian package mpd)")
        pytest.importorskip("mpd")
        root = self.temp_path / "mpd"
        root.mkdir()
        # real audio for the arc tracks, where MPD can see them
        names = [f"t{deg:02d}.mp3" for deg in range(0, 81, 20)]
        make_music(self.music, names, seconds=4.0)
        server = MpdServer(root, self.music)
        self.config["mpd"]["host"] = "127.0.0.1"
        self.config["mpd"]["port"] = server.port
        self.config["mpd"]["music_directory"] = str(self.music)
        from deepsim.radio import Mpd, MpdSettings

        with Mpd(MpdSettings(port=server.port, music_directory=str(self.music))) as mpd:
            mpd.update_database()
        yield server
        server.stop()

    def queue(self, server: MpdServer) -> list[str]:
        from deepsim.radio import Mpd, MpdSettings

        with Mpd(MpdSettings(port=server.port, music_directory=str(self.music))) as mpd:
            return mpd.queue_uris()

    def test_similar_mpd_appends(self, capsys: pytest.CaptureFixture[str], server) -> None:
        out = self.out(capsys, "similar", "--mpd", "-c", "2", "-w", "format:MP3", "title:t00")
        assert out == [f"similar: added 2 track(s) to MPD's queue at 127.0.0.1:{server.port}"]
        assert self.queue(server) == ["t20.mp3", "t40.mp3"]
        self.out(capsys, "similar", "--mpd", "-c", "3", "title:t00", "--to", "title:t80")
        assert self.queue(server)[2:] == ["t00.mp3", "t20.mp3", "t40.mp3", "t60.mp3", "t80.mp3"]
        with pytest.raises(UserError, match="--mpd queues one list"):
            self.run_command("similar", "--mpd", "--each", "title:t00")

    def test_radio_command(self, capsys: pytest.CaptureFixture[str], server,
                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
        import deepsim.radio

        calls = []

        def ctrl_c(seconds: float) -> None:
            calls.append(seconds)
            raise KeyboardInterrupt

        monkeypatch.setattr(deepsim.radio.time, "sleep", ctrl_c)
        self.config["deepsim"]["radio"]["batch"] = 2
        lines = self.out(capsys, "deepsim-radio", "-w", "format:MP3", "title:t00")
        assert (
            lines[0] == f"deepsim-radio: following MPD at 127.0.0.1:{server.port} (Ctrl-C to stop)"
        )
        assert lines[1] == "deepsim-radio: queued 2 track(s) like Even - t00:"
        assert re.search(r"t20$", lines[2]) and re.search(r"t40$", lines[3])
        assert lines[-1].startswith("deepsim-radio: stopped; queued 2 track(s) in")
        assert self.queue(server) == ["t20.mp3", "t40.mp3"]
        assert calls == [2.0]

    def test_unreachable_mpd_is_a_user_error(self) -> None:
        pytest.importorskip("mpd")
        from mpdserver import free_port

        self.config["mpd"]["host"] = "127.0.0.1"
        self.config["mpd"]["port"] = free_port()
        with pytest.raises(UserError, match=r"cannot connect to MPD at 127\.0\.0\.1"):
            self.run_command("similar", "--mpd", "title:t00")


_NO_TORCH = """
import sys
import beets.ui
try:
    beets.ui.main(sys.argv[1:])
finally:
    sys.stdout.flush()
    print("TORCH-LOADED" if "torch" in sys.modules else "NO-TORCH", file=sys.stderr)
"""


def test_commands_do_not_import_torch(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from beets.library import Library

    music = tmp_path / "music"
    music.mkdir()
    (tmp_path / "config.yaml").write_text(
        f"library: {tmp_path / 'library.db'}\ndirectory: {music}\nplugins: deepsim\n",
        encoding="utf-8",
    )
    lib = Library(str(tmp_path / "library.db"), str(music))
    rows = []
    for fields, vector in _tracks():
        item = Item(**fields)
        item.path = os.fsencode(music / f"{fields['title']}.mp3")
        (music / f"{fields['title']}.mp3").write_bytes(b"\0")  # `similar` skips missing files
        rows.append((lib.add(item), vector))
    store.write_vectors(lib, rows, MODEL_ID)
    lib._close()
    env = {**os.environ, "BEETSDIR": str(tmp_path), "HOME": str(tmp_path)}
    commands = [
        ["similar", "-v", "-c", "2", "title:t00", "--to", "title:t80"],
        ["similar", "--no-outliers", "title:t20"],
        ["deepsim-dupes"],
        ["deepsim-outliers"],
    ]
    if __import__("importlib").util.find_spec("openTSNE"):
        commands.append(["deepsim-map", "-o", str(tmp_path / "m.html")])
    for args in commands:
        proc = subprocess.run([sys.executable, "-c", _NO_TORCH, *args], env=env,
                              capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
        assert proc.returncode == 0, (args, proc.stderr)
        assert "NO-TORCH" in proc.stderr, args


class TestRecommendFolds(FeatureHelper):
    def test_recommend_folds_versions(self, capsys: pytest.CaptureFixture[str]) -> None:
        played = self.items[("t60", "MP3")]
        played["play_count"] = 5
        played.store()
        fmt = ["-f", "$title $format", "-c", "3", "--library"]
        folded = self.out(capsys, "recommend", *fmt)
        assert folded == ["t60 MP3", "t40 FLAC", "t80 MP3"]
        kept = self.out(capsys, "recommend", *fmt, "--keep-duplicates")
        assert kept[:2] == ["t60 MP3", "t40 FLAC"] and kept[2] in ("t40 MP3", "t80 MP3")
