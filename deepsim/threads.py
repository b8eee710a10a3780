"""The thread budget of the embedding pipeline: decoding workers + inference threads ≤ cores.

Two cores running two torch threads *and* two decoding processes are
oversubscribed: the processes take turns, and torch's OpenMP threads spin
while they wait for each other (burning the time another process could use).
Measured on a 2-core machine with two busy loops beside it, that left deepsim
0.36 of its quiet speed where a fair share is 0.5 (``docs/performance.md``).
So:

* the cores this process may use (its CPU affinity) are split between
  decoding processes and inference threads, never more in total
  (:func:`plan`);
* OpenMP threads wait passively (``OMP_WAIT_POLICY=PASSIVE``), so a thread
  with nothing to do gives its core back at once.  That must be set before
  torch loads its OpenMP runtime: :mod:`deepsim.models` imports this module
  first, which sets it unless the user already chose a policy.

No torch at import time.
"""

from __future__ import annotations

import os
import sys

from deepsim.util import get_logger

_log = get_logger(__name__)


def passive_openmp_wait() -> bool:
    """Ask OpenMP threads to sleep, not spin, while idle; True if it takes effect.

    Sets ``OMP_WAIT_POLICY=PASSIVE`` unless already set (the user's choice
    wins).  It only takes effect when torch has not been imported yet.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return "torch" not in sys.modules


def usable_cores() -> int:
    """The number of cores this process may run on (its affinity mask, else all)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def plan(workers: int | None = None, *, device: str = "cpu") -> tuple[int, int]:
    """``(decoding workers, inference threads)`` that together fit the usable cores.

    Parameters
    ----------
    workers
        Decoding processes asked for (``None``: choose).  On the CPU the
        inference threads get the cores left, at least one; ``0`` decodes in
        this process, between batches, and leaves every core to inference.
    device
        ``"cpu"``, or an accelerator (then inference needs one thread and
        decoding gets every core).
    """
    cores = usable_cores()
    if not str(device).startswith("cpu"):
        return (cores if workers is None else workers), 1
    if workers is None:
        # Half the cores decode: on the default model (int8 on VNNI CPUs) decoding the
        # window and running both networks cost about the same (docs/performance.md).
        workers = max(1, cores // 2)
    return workers, max(1, cores - workers)


def apply(workers: int, *, device: str = "cpu") -> int:
    """Set torch's intra-op threads for ``workers`` decoding processes; returns the count."""
    import torch

    _, threads = plan(workers, device=device)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
        _log.debug("%d decoding workers, %d inference threads", workers, threads)
    return threads
