"""deepsim.threads: decoding workers + inference threads fit the usable cores."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from deepsim import threads


@pytest.mark.parametrize("cores", [1, 2, 4, 16])
def test_the_budget_never_exceeds_the_cores(monkeypatch: pytest.MonkeyPatch, cores: int) -> None:
    monkeypatch.setattr(threads, "usable_cores", lambda: cores)
    workers, inference = threads.plan(None)
    assert workers >= 1 and inference >= 1
    assert workers + inference <= max(2, cores)
    assert threads.plan(0) == (0, cores)
    assert threads.plan(cores + 3)[1] == 1  # asked for more workers: one inference thread
    # on an accelerator every core decodes
    assert threads.plan(None, device="cuda") == (cores, 1)


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
