"""deepsim.lock: one embedding process at a time, the second waits or is told."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from deepsim.lock import Busy, hold

HOLDER = """
import sys, time
from deepsim.lock import hold
with hold(sys.argv[1], label="test holder"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_a_second_process_waits_or_is_told(tmp_path: Path) -> None:
    path = tmp_path / "state" / "embed.lock"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), "1.5"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with pytest.raises(Busy) as busy, hold(path, wait=False):
            pass
        assert f"pid {proc.pid}: test holder" in busy.value.holder
        told: list[str] = []
        started = time.monotonic()
        with hold(path, on_wait=told.append) as waited:
            pass  # got it once the holder let go
        assert told and f"pid {proc.pid}" in told[0]
        assert waited > 0.5 and time.monotonic() - started >= waited
    finally:
        proc.wait(timeout=30)
    # free again: no waiting, no message
    told.clear()
    with hold(path, on_wait=told.append) as waited:
        assert waited < 0.5
    assert told == []
