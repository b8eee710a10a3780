"""The MPD radio against a real MPD (skipped where Debian's mpd is absent)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
from libgen import MODEL_ID, make_library, unit
from mpdserver import make_music, mpd_server  # noqa: F401 - the fixture

from deepsim.dupes import VersionFolder
from deepsim.errors import MpdError
from deepsim.radio import Mpd, MpdSettings, Radio
from deepsim.similar import find_similar

NAMES = [f"t{k}.mp3" for k in range(8)]


def _arc(degrees: float) -> np.ndarray:
    return unit([math.cos(math.radians(degrees)), math.sin(math.radians(degrees)), 0])


def _setup(server, seconds: float = 4.0):
    make_music(server.music / "sub", NAMES, seconds)
    tracks = [
        {"title": f"t{k}", "artist": f"A{k % 3}", "file": f"sub/t{k}.mp3", "vector": _arc(15 * k)}
        for k in range(8)
    ]
    lib, items = make_library(tracks, music=server.music)
    mpd = Mpd(MpdSettings(port=server.port, music_directory=str(server.music))).connect()
    mpd.update_database()
    return lib, items, mpd


def test_uri_mapping(tmp_path: Path) -> None:
    mpd = Mpd(MpdSettings(music_directory=str(tmp_path), strip_path="lib/"))
    assert mpd.uri_for(str(tmp_path / "a" / "b.mp3")) == "lib/a/b.mp3"
    assert mpd.uri_for(os.fsencode(tmp_path / "c.flac")) == "lib/c.flac"
    assert mpd.uri_for("/elsewhere/x.mp3") is None
    assert mpd.path_for("lib/a/b.mp3") == str(tmp_path / "a" / "b.mp3")
    assert mpd.path_for("http://radio.example/stream") is None


def test_connect_error_names_the_address() -> None:
    pytest.importorskip("mpd")
    from mpdserver import free_port

    port = free_port()
    with pytest.raises(MpdError, match=f"127.0.0.1:{port}"):
        Mpd(MpdSettings(host="127.0.0.1", port=port, timeout=2)).connect()


def test_enqueue_appends_and_skips_outside_files(mpd_server, tmp_path: Path) -> None:  # noqa: F811
    _lib, items, mpd = _setup(mpd_server)
    with mpd:
        outside = items["t0"]
        outside.path = os.fsencode(tmp_path / "not-in-music.mp3")
        result = mpd.enqueue([items["t1"], items["t2"], outside])
        assert [i.title for i in result.added] == ["t1", "t2"]
        assert len(result.skipped) == 1 and "music_directory" in result.skipped[0][1]
        assert mpd.queue_uris() == ["sub/t1.mp3", "sub/t2.mp3"]


def test_radio_keeps_the_queue_filled(mpd_server) -> None:  # noqa: F811
    lib, items, mpd = _setup(mpd_server)
    fold = VersionFolder(lib, MODEL_ID)

    def search(seeds, count, exclude):
        return find_similar(lib, seeds, model_id=MODEL_ID, count=count, exclude_ids=exclude,
                            fold=fold).items  # fmt: skip

    with mpd:
        mpd.enqueue([items["t0"]])
        mpd.call("play", 0)
        mpd.call("pause", 1)  # the position moves only when the test says so
        radio = Radio(lib, mpd, search, ahead=2, batch=3, history=2)
        step = radio.step()
        assert [s.title for s in step.seeds] == ["t0"]
        # the three nearest to t0 (15°, 30°, 45° away; 15° is below the version threshold)
        assert [i.title for i in step.added] == ["t1", "t2", "t3"]
        assert mpd.queue_uris() == [f"sub/t{k}.mp3" for k in range(4)]
        # enough queued after the current track: nothing added
        assert radio.step().added == []
        # the player moves on twice: one track left after the current one
        mpd.call("next")
        radio.step()
        mpd.call("next")
        step = radio.step()
        # seeds: the last two played (t1, t2); t0 played, t3 queued: neither added
        assert [s.title for s in step.seeds] == ["t1", "t2"]
        assert [i.title for i in step.added] == ["t4", "t5", "t6"]
        assert len(set(mpd.queue_uris())) == len(mpd.queue_uris()) == 7
        assert radio.added_total == 6


def test_radio_waits_without_seeds_and_starts_from_query(mpd_server) -> None:  # noqa: F811
    lib, items, mpd = _setup(mpd_server)

    def search(seeds, count, exclude):
        return find_similar(lib, seeds, model_id=MODEL_ID, count=count, exclude_ids=exclude).items

    with mpd:
        radio = Radio(lib, mpd, search, ahead=1, batch=2)
        assert radio.step().waiting.startswith("nothing is playing")
        radio = Radio(lib, mpd, search, seeds=[items["t7"]], ahead=1, batch=2)
        step = radio.step()
        assert [i.title for i in step.added] == ["t6", "t5"]


def test_radio_avoids_recently_played(mpd_server) -> None:  # noqa: F811
    import time

    lib, items, mpd = _setup(mpd_server)
    items["t1"]["last_played"] = time.time() - 60  # as mpdstats records it
    items["t1"].store()

    def search(seeds, count, exclude):
        return find_similar(lib, seeds, model_id=MODEL_ID, count=count, exclude_ids=exclude).items

    with mpd:
        mpd.enqueue([items["t0"]])
        mpd.call("play", 0)
        mpd.call("pause", 1)
        step = Radio(lib, mpd, search, ahead=1, batch=2).step()
        assert [i.title for i in step.added] == ["t2", "t3"]
