"""A real MPD for tests: Debian's ``mpd`` on a free localhost port, a temporary config,
a null audio output and a music directory of generated files.  Tests using it skip
cleanly where ``mpd`` is not installed (``.ci/run`` installs it)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from audiogen import tone, write_audio


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MpdServer:
    def __init__(self, root: Path, music: Path) -> None:
        self.root, self.music = root, music
        self.port = free_port()
        self.conf = root / "mpd.conf"
        self.conf.write_text(
            f'music_directory "{music}"\n'
            f'db_file "{root / "database"}"\n'
            f'log_file "{root / "log"}"\n'
            f'state_file "{root / "state"}"\n'
            'bind_to_address "127.0.0.1"\n'
            f'port "{self.port}"\n'
            'auto_update "no"\n'
            'audio_output {\n  type "null"\n  name "null"\n  mixer_type "none"\n}\n'
        )
        self.process = subprocess.Popen(
            ["mpd", "--no-daemon", "--stderr", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(64).startswith(b"OK MPD"):
                        break
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                stream = self.process.stderr
                err = stream.read().decode(errors="replace") if stream else ""
                self.stop()
                raise RuntimeError(f"mpd did not start: {err[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def make_music(music: Path, names: list[str], seconds: float = 30.0) -> None:
    music.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        write_audio(music / name, tone(seconds, freqs=(220.0 + 40 * k,), seed=k), rate=22050)


@pytest.fixture
def mpd_server(tmp_path: Path) -> Iterator[MpdServer]:
    """A started MPD whose music directory (``server.music``) the test fills, then updates."""
    if shutil.which("mpd") is None:
        pytest.skip("mpd is not installed (Debian package mpd)")
    pytest.importorskip("mpd", reason="python-mpd2 is not installed")
    music = tmp_path / "music"
    music.mkdir()
    server = MpdServer(tmp_path, music)
    try:
        yield server
    finally:
        server.stop()
