"""Decoding workers: the analysis window and the audio identity of each file, in order.

The embedding pipeline (:mod:`deepsim.embed`) reads files through
:func:`decoded`: a pool of worker processes decodes ahead (at most ``window``
files in flight) while the caller runs the network on what is already
decoded.  Each result says whether the next one is ready too, so the caller
can start inference on what it has instead of waiting for a full batch (one
decoding process and one inference thread then both stay busy on two cores).

This module is what the worker processes import: PyAV, numpy and
:mod:`deepsim.identity`, no beets, no torch, so a worker starts in a fraction
of a second.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor

import numpy as np

from deepsim.audio import PathLike, decode_middle
from deepsim.errors import AudioError
from deepsim.identity import identify

#: One file's result: the decoded window (or why not) and its audio identity text.
Decoded = tuple[np.ndarray | AudioError, str | None]


def decode_job(path: PathLike, sample_rate: int, seconds: float) -> Decoded:
    """The decoded window (or the error) and the file's audio identity."""
    ident = identify(path)
    audio = None if ident is None else ident.text
    try:
        return decode_middle(path, sample_rate=sample_rate, seconds=seconds), audio
    except AudioError as exc:
        return exc, audio
    except Exception as exc:  # a decoder bug must not take the run down
        reason = f"unexpected decoding failure ({type(exc).__name__}: {exc})"
        return AudioError(path, reason), audio


def _worker_init() -> None:
    # Decoding workers must not compete with the inference threads for cores.
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    except (ImportError, ValueError):
        pass


def _context() -> multiprocessing.context.BaseContext:
    if os.name != "posix":
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # The server imports this module once; each worker is forked from it ready to decode.
    context.set_forkserver_preload([__name__])
    return context


def decoded(
    paths: Sequence[PathLike], *, sample_rate: int, seconds: float, workers: int, window: int
) -> Iterator[tuple[Decoded, bool]]:
    """``(result, next_ready)`` per path, in order, at most ``window`` files in flight.

    ``next_ready`` is whether the result of the next path is already there (always
    true when ``workers`` is 0: then each file is decoded in this process when asked
    for).
    """
    if workers <= 0:
        for path in paths:
            yield decode_job(path, sample_rate, seconds), True
        return
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=_context(), initializer=_worker_init)
    pending: deque[tuple[int, Future[Decoded]]] = deque()
    submitted = 0

    def submit_next() -> None:
        nonlocal submitted
        if submitted < len(paths):
            path = paths[submitted]
            pending.append((submitted, pool.submit(decode_job, path, sample_rate, seconds)))
            submitted += 1

    try:
        while submitted < min(max(window, 1), len(paths)):
            submit_next()
        while pending:
            index, future = pending.popleft()
            try:
                result = future.result()
            except Exception as exc:  # a worker died (e.g. killed by the OOM killer)
                result = (AudioError(paths[index], f"decoder process failed ({exc})"), None)
            submit_next()
            yield result, not pending or pending[0][1].done()
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
