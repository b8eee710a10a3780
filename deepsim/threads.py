"""The thread budget of the embedding pipeline: inference on every core, decoding beside it.

Two cores running two torch threads *and* two decoding processes were
oversubscribed with *spinning* threads: torch's OpenMP threads spun while they
waited for each other, burning the time another process could use.  Measured on
a 2-core machine with two busy loops beside it, that left deepsim 0.36 of its
quiet speed where a fair share is 0.5 (``docs/performance.md``).  So:

* OpenMP threads wait passively (``OMP_WAIT_POLICY=PASSIVE``), so a thread
  with nothing to do gives its core back at once.  That must be set before
  torch loads its OpenMP runtime: :mod:`deepsim.models` imports this module
  first, which sets it unless the user already chose a policy;
* on the CPU, inference gets every core this process may use (its CPU
  affinity), as :func:`parallel` streams (a model's independent parts side by
  side: the default pair's two networks, or one network's patches in two
  halves, one thread each) times torch's intra-op threads; half the cores (at
  least one) decode beside it
  (:func:`plan`).  A decoding worker is busy only while it is behind: with the
  default model decoding a window costs about half of inference (0.1 vs 0.2
  CPU-s a track), so once the decoders are a window ahead they wait, and two
  inference streams on two cores beat one stream plus a decoder that idles
  half the time (measured 1.3x; ``docs/performance.md``).  The cores are
  shared by the operating system when both run; no thread spins.

No torch at import time.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from deepsim.util import get_logger

_log = get_logger(__name__)
_T = TypeVar("_T")


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
    """``(decoding workers, inference threads)`` for the usable cores.

    Parameters
    ----------
    workers
        Decoding processes asked for (``None``: half the cores, at least one;
        ``0`` decodes in this process, between batches).  On the CPU the
        inference threads are every usable core (the decoders run beside them:
        see the module docstring).
    device
        ``"cpu"``, or an accelerator (then inference needs one thread and
        decoding gets every core).
    """
    cores = usable_cores()
    if not str(device).startswith("cpu"):
        return (cores if workers is None else workers), 1
    if workers is None:
        # Half the cores decode: on the default model (int8 on x86 CPUs) decoding the
        # window costs about half of running both networks (docs/performance.md).
        workers = max(1, cores // 2)
    return workers, cores


_streams = 1  # what apply() last chose: model parts run side by side
_inside = threading.local()  # .stream: this thread runs a call of parallel()


def apply(workers: int, *, device: str = "cpu", parts: int = 1) -> int:
    """Set the inference threads for ``workers`` decoding processes; returns their count.

    ``parts`` is how many independent parts the model can run side by side (its
    :attr:`~deepsim.models.base.Model.parallel_parts`): the inference threads
    are split between that many streams (:func:`parallel`), each with
    ``threads // streams`` torch intra-op threads.
    """
    import torch

    global _streams
    _, threads = plan(workers, device=device)
    streams = max(1, min(parts, threads)) if str(device).startswith("cpu") else 1
    intra = max(1, threads // streams)
    if torch.get_num_threads() != intra or _streams != streams:
        torch.set_num_threads(intra)
        _log.debug(
            "%d decoding workers, %d inference threads (%d side by side)", workers, threads, streams
        )
    _streams = streams
    return threads


def streams() -> int:
    """How many model parts can run side by side from here: what :func:`apply` chose
    (1 until it chose more), and 1 inside one of :func:`parallel`'s calls (the streams
    are taken: the pair's networks do not split their patches again)."""
    return 1 if getattr(_inside, "stream", False) else _streams


_pool: Any = None  # (size, ThreadPoolExecutor) of parallel()


def close_pool() -> None:
    """Stop :func:`parallel`'s threads and wait for them (they start again when needed)."""
    global _pool
    if _pool is not None:
        _pool[1].shutdown(wait=True)
        _pool = None


def parallel(calls: Sequence[Callable[[], _T]]) -> list[_T]:
    """Run ``calls`` side by side (at most :func:`streams` at once), in the caller's
    inference mode; their results in order.  With one stream, where gradients are
    recorded (fine-tuning), or from inside one of these calls (:func:`streams` is 1
    there), they run here, one after another."""
    import torch

    if streams() <= 1 or len(calls) <= 1 or torch.is_grad_enabled():
        return [call() for call in calls]
    inference = torch.is_inference_mode_enabled()
    global _pool
    if _pool is None or _pool[0] != _streams:
        from concurrent.futures import ThreadPoolExecutor

        if _pool is not None:
            _pool[1].shutdown(wait=False)
        _pool = (_streams, ThreadPoolExecutor(_streams, thread_name_prefix="deepsim-infer"))

    def run(call: Callable[[], _T]) -> _T:
        _inside.stream = True
        try:
            with torch.inference_mode(inference), torch.no_grad():  # thread-local: as the caller's
                return call()
        finally:
            _inside.stream = False

    return list(_pool[1].map(run, calls))


# --------------------------------------------------------------------------------------------
# Work split between processes: the no-op plan of a large library on every core

_P = TypeVar("_P")


def can_fork() -> bool:
    """Whether :func:`in_processes` may fork here: on Linux, from the main thread of a
    process that runs no other Python thread (a forked child gets a copy of every lock
    as it was; with one thread none is held by another) and outside :func:`parallel`."""
    return (
        sys.platform.startswith("linux")
        and hasattr(os, "fork")
        and threading.active_count() == 1
        and threading.current_thread() is threading.main_thread()
        and not getattr(_inside, "stream", False)
    )


def in_processes(fn: Callable[[_P, bool], _T], parts: Sequence[_P]) -> list[_T]:
    """``fn(part, child)`` for every part, their results in order: the first part here,
    the others each in a child process forked for it (``child`` True there), side by
    side, where :func:`can_fork` allows; else all here, one after another.

    For work whose cost is system calls and SQLite reads under the GIL (deciding, at
    100k tracks, that nothing needs embedding: one ``stat`` and one row per track):
    threads would take turns on the GIL; processes use every core.  A child returns
    its result through a pipe (pickled: only this process reads it) and leaves with
    ``os._exit`` (no clean-up of the state it copied: no buffers flushed twice, no
    database connection of this process touched: ``fn`` must open its own where
    ``child`` is True).  A child that fails or is killed has its part done here
    instead; an exception here (Ctrl-C included) stops the children first.
    """
    if len(parts) <= 1 or not can_fork():
        return [fn(part, False) for part in parts]
    import pickle
    import signal

    children: list[tuple[int, int]] = []
    try:
        for part in parts[1:]:
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: never returns
                code = 1
                try:
                    os.close(read)
                    view = memoryview(pickle.dumps(fn(part, True), pickle.HIGHEST_PROTOCOL))
                    while view:
                        view = view[os.write(write, view) :]
                    code = 0
                except BaseException:
                    pass
                finally:
                    os._exit(code)
            os.close(write)
            children.append((pid, read))
        results = [fn(parts[0], False)]
        for pid, read in list(children):
            chunks = []
            while data := os.read(read, 1 << 20):
                chunks.append(data)
            os.close(read)
            _, status = os.waitpid(pid, 0)
            children.remove((pid, read))
            part = parts[len(results)]
            data = b"".join(chunks)
            try:
                if os.waitstatus_to_exitcode(status) != 0 or not data:
                    raise ChildProcessError(f"exit status {status}, {len(data)} bytes")
                results.append(pickle.loads(data))
            except Exception as exc:  # whatever went wrong there, the part is redone here
                _log.debug("child %d gave no result (%s): its part is done here", pid, exc)
                results.append(fn(part, False))
        return results
    finally:
        for pid, read in children:  # only after an exception here
            os.close(read)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
