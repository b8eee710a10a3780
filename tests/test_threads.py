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
