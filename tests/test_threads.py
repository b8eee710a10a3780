"""deepsim.threads: inference on every usable core, decoding workers beside it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from deepsim import threads


@pytest.mark.parametrize("cores", [1, 2, 4, 16])
def test_the_plan_follows_the_usable_cores(monkeypatch: pytest.MonkeyPatch, cores: int) -> None:
    monkeypatch.setattr(threads, "usable_cores", lambda: cores)
    workers, inference = threads.plan(None)
    assert workers == max(1, cores // 2)  # half the cores decode
    assert inference == cores  # inference on every core (the decoders idle once ahead)
    assert threads.plan(0) == (0, cores)
    assert threads.plan(cores + 3) == (cores + 3, cores)
    # on an accelerator every core decodes
    assert threads.plan(None, device="cuda") == (cores, 1)


@pytest.mark.parametrize(
    ("cores", "parts", "streams", "intra"), [(1, 2, 1, 1), (2, 1, 1, 2), (2, 2, 2, 1), (4, 2, 2, 2)]
)
def test_model_parts_side_by_side_share_the_inference_threads(
    monkeypatch: pytest.MonkeyPatch, cores: int, parts: int, streams: int, intra: int
) -> None:
    import threading

    import torch

    monkeypatch.setattr(threads, "usable_cores", lambda: cores)
    before = torch.get_num_threads()
    try:
        assert threads.apply(1, parts=parts) == cores
        assert threads.streams() == streams and torch.get_num_threads() == intra
        here = threading.current_thread().name
        with torch.no_grad():
            names = threads.parallel([lambda: threading.current_thread().name] * 2)
        if streams > 1:  # each call ran in a stream of its own, in the caller's modes
            assert all(n.startswith("deepsim-infer") for n in names)
            with torch.inference_mode():
                assert threads.parallel([torch.is_inference_mode_enabled] * 2) == [True, True]
            with torch.no_grad():
                assert threads.parallel([torch.is_inference_mode_enabled] * 2) == [False, False]
                assert threads.parallel([torch.is_grad_enabled] * 2) == [False, False]
        else:
            assert names == [here, here]
        # recording gradients (fine-tuning): always here, one after another
        names = threads.parallel([lambda: threading.current_thread().name] * 2)
        assert names == [here, here]
        # called from inside a stream (the pair's networks splitting their patches):
        # in that stream, one after another (the streams are taken: no deadlock)
        with torch.no_grad():

            def inner() -> list[str]:
                return threads.parallel([lambda: threading.current_thread().name] * 2)

            nested = threads.parallel([inner, inner])
        assert all(len(set(names)) == 1 for names in nested)
    finally:
        threads.apply(1, parts=1)
        torch.set_num_threads(before)


def test_usable_cores_follows_the_affinity_mask() -> None:
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this platform")
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))});"
        "from deepsim import threads; print(threads.usable_cores(), threads.plan(None))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[0] == "1"


def test_openmp_waits_passively_unless_the_user_chose() -> None:
    code = (
        "import os, sys\n"
        "import deepsim.models\n"
        "assert 'torch' not in sys.modules\n"
        "print(os.environ['OMP_WAIT_POLICY'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "ACTIVE"


# --------------------------------------------------------------------------------------------
# in_processes: parts side by side in forked children


def _where(part: int, child: bool) -> tuple[int, bool, int]:
    return part * part, child, os.getpid()


def test_parts_run_in_children_side_by_side_in_order(forkable: None) -> None:
    results = threads.in_processes(_where, [1, 2, 3, 4])
    assert [r[0] for r in results] == [1, 4, 9, 16]
    assert [r[1] for r in results] == [False, True, True, True]
    pids = [r[2] for r in results]
    assert pids[0] == os.getpid() and len(set(pids)) == 4  # one child a part
    for pid in pids[1:]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # waited for: not even a zombie is left
    assert threads.in_processes(_where, [5]) == [(25, False, os.getpid())]


def test_a_failed_child_has_its_part_done_here(forkable: None) -> None:
    def picky(part: int, child: bool) -> tuple[int, bool]:
        if child and part == 2:
            raise RuntimeError("a child's failure")
        if child and part == 3:
            os._exit(0)  # gone without a result
        return part, child

    assert threads.in_processes(picky, [1, 2, 3, 4]) == [
        (1, False),
        (2, False),
        (3, False),
        (4, True),
    ]


def test_without_fork_every_part_runs_here(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "can_fork", lambda: False)
    here = os.getpid()
    assert threads.in_processes(_where, [1, 2]) == [(1, False, here), (4, False, here)]


def test_a_failure_here_stops_the_children(forkable: None, tmp_path) -> None:
    import time

    def slow(part: int, child: bool) -> int:
        if child:
            (tmp_path / str(os.getpid())).write_text("started")
            time.sleep(120)
            return part
        deadline = time.monotonic() + 60
        while not list(tmp_path.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.01)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        threads.in_processes(slow, [1, 2])
    (started,) = [int(p.name) for p in tmp_path.iterdir()]
    with pytest.raises(ProcessLookupError):
        os.kill(started, 0)  # killed and waited for: no such process any more


def test_no_fork_beside_another_thread(forkable: None) -> None:
    import threading

    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        assert not threads.can_fork()
        assert threads.in_processes(_where, [1, 2])[1] == (4, False, os.getpid())
    finally:
        release.set()
        other.join()
    assert threads.can_fork()
