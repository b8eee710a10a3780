"""The decoding workers: results in order, errors as values, whether the next one is ready."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from audiogen import tone, write_audio

from deepsim.audio import decode_middle
from deepsim.decoders import decode_job, decoded
from deepsim.errors import AudioError


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("decoders")
    paths = [
        write_audio(root / f"{i}.flac", tone(5.0, freqs=(300.0 * (i + 1),), seed=i), rate=22050)
        for i in range(4)
    ]
    (root / "bad.ogg").write_text("not audio")
    paths.insert(1, root / "bad.ogg")
    return paths


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_results_in_order_equal_to_decoding_here(files: list[Path], workers: int) -> None:
    results = list(decoded(files, sample_rate=8000, seconds=4.0, workers=workers, window=2))
    assert len(results) == len(files)
    for path, ((wave, audio), next_ready) in zip(files, results, strict=True):
        assert isinstance(next_ready, bool)
        if path.name == "bad.ogg":
            assert isinstance(wave, AudioError) and str(path) in str(wave)
        else:
            np.testing.assert_array_equal(wave, decode_middle(path, sample_rate=8000, seconds=4.0))
            assert audio is not None and audio == decode_job(path, 8000, 4.0)[1]
    assert results[-1][1] is True  # nothing after the last one to wait for
    if workers == 0:
        assert all(ready for _, ready in results)  # decoded here, when asked for


def test_next_ready_says_whether_a_result_waits(files: list[Path]) -> None:
    # With one worker and a window of every file, the worker runs ahead of a slow
    # consumer: after a pause, the next result is there.
    import time

    stream = iter(decoded(files, sample_rate=8000, seconds=4.0, workers=1, window=len(files)))
    first = next(stream)
    assert first[0][0] is not None
    time.sleep(3.0)
    _, ready = next(stream)
    assert ready is True
    stream.close()


def test_decoding_runs_before_anything_is_asked_for(files: list[Path]) -> None:
    # The workers start when the decoding is made (the caller loads its model meanwhile).
    import multiprocessing
    import time

    decoding = decoded(files, sample_rate=8000, seconds=4.0, workers=1, window=len(files))
    time.sleep(3.0)
    stream = iter(decoding)
    _, ready = next(stream)
    assert ready is True  # the second file was decoded before the first was asked for
    decoding.close()
    assert list(stream) == []  # closed: nothing more
    assert list(decoding) == []  # not even decoded here
    assert multiprocessing.active_children() == []
    here = decoded(files, sample_rate=8000, seconds=4.0, workers=0, window=1)
    stream = iter(here)
    next(stream)
    here.close()
    assert list(stream) == []


def test_workers_fork_from_this_process_only_where_that_is_safe(
    forkable: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys
    import threading

    import torch  # noqa: F401 - loaded: its OpenMP runtime may run threads a fork would copy

    from deepsim.util import worker_context

    assert worker_context("deepsim.decoders").get_start_method() == "forkserver"
    monkeypatch.delitem(sys.modules, "torch")
    assert worker_context("deepsim.decoders").get_start_method() == "fork"
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:  # another thread: a child would copy its locks as they are
        assert worker_context("deepsim.decoders").get_start_method() == "forkserver"
    finally:
        stop.set()
        other.join()


def test_forked_workers_decode_and_never_repeat_buffered_output(files: list[Path]) -> None:
    # A process that has not loaded torch (as `beet deepsim-embed` when it starts decoding):
    # the workers are forked from it; what it printed before, still in its buffer (a pipe
    # is block-buffered), comes out once, not again from each worker.
    from fresh import run_fresh

    names = [str(p) for p in files]
    out = run_fresh(
        "import multiprocessing, os, sys\n"
        "from deepsim.decoders import decoded\n"
        "from deepsim.audio import decode_middle\n"
        "from deepsim.errors import AudioError\n"
        "print('before decoding')\n"
        f"paths = {names!r}\n"
        "decoding = decoded(paths, sample_rate=8000, seconds=4.0, workers=2, window=4)\n"
        "kids = multiprocessing.active_children()\n"
        "assert kids and all(k._popen.__class__.__module__.endswith('popen_fork') for k in kids)\n"
        "for path, ((wave, _), _) in zip(paths, decoding):\n"
        "    if isinstance(wave, AudioError):\n"
        "        print('failed', os.path.basename(path))\n"
        "    else:\n"
        "        assert (wave == decode_middle(path, sample_rate=8000, seconds=4.0)).all()\n"
        "assert 'torch' not in sys.modules\n"
        "print('done')\n"
    )
    assert out.splitlines() == ["before decoding", "failed bad.ogg", "done"]


def test_ctrl_c_stops_forked_workers_with_the_run(files: list[Path]) -> None:
    # Ctrl-C reaches the whole process group, as from a terminal: the forked workers
    # ignore it (the run's to handle: they leave when it stops them, exit status 0), the
    # run stops at once with KeyboardInterrupt, and closing the decoding leaves no worker
    # behind (each pid gone once the run has ended).
    import os
    import signal
    import subprocess
    import sys

    names = [str(p) for p in files if p.suffix == ".flac"] * 20
    code = (
        "import multiprocessing, sys, time\n"
        "from deepsim.decoders import decoded\n"
        f"decoding = decoded({names!r}, sample_rate=8000, seconds=4.0, workers=2, window=4)\n"
        "kids = multiprocessing.active_children()\n"
        "print(' '.join(str(k.pid) for k in kids), flush=True)\n"
        "try:\n"
        "    for n, _ in enumerate(decoding):\n"
        "        if n == 1:\n"
        "            print('decoding', flush=True)\n"
        "        time.sleep(0.2)\n"
        "    print('never interrupted', flush=True)\n"
        "except KeyboardInterrupt:\n"
        "    decoding.close()\n"
        "    codes = [k.exitcode for k in kids]\n"
        "    print('interrupted', codes, len(multiprocessing.active_children()), flush=True)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert proc.stdout is not None
    pids = [int(pid) for pid in proc.stdout.readline().split()]
    assert len(pids) == 2
    assert proc.stdout.readline().strip() == "decoding"
    os.killpg(proc.pid, signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert rest.strip() == "interrupted [0, 0] 0"
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("start", ["fork", "forkserver"])
def test_workers_end_with_a_killed_parent(files: list[Path], start: str) -> None:
    # A run killed outright (SIGKILL, the OOM killer) never closes its workers' queue: they
    # must not wait on it for good (a forked one holds beet's files, the embedding lock's).
    import os
    import signal
    import subprocess
    import time

    names = [str(p) for p in files if p.suffix == ".flac"] * 20
    code = (
        "import multiprocessing, sys, time\n"
        + ("import torch\n" if start == "forkserver" else "")  # loaded: no fork from here
        + "from deepsim.decoders import decoded\n"
        f"decoding = decoded({names!r}, sample_rate=8000, seconds=4.0, workers=2, window=4)\n"
        "stream = iter(decoding)\n"
        "next(stream)\n"
        "kids = multiprocessing.active_children()\n"
        f"assert kids[0]._popen.__class__.__module__.endswith('popen_{start}')\n"
        "print(' '.join(str(k.pid) for k in kids), flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    pids = [int(pid) for pid in proc.stdout.readline().split()]
    assert len(pids) == 2 and all(_running(pid) for pid in pids)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [pid for pid in pids if _running(pid)]
    for pid in left:  # clean up before failing
        os.kill(pid, signal.SIGKILL)
    assert left == []
