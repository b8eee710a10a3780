"""Decoding workers: the analysis window and the audio identity of each file, in order.

The embedding pipeline (:mod:`deepsim.embed`) reads files through
:func:`decoded`: a pool of worker processes decodes ahead (at most ``window``
files in flight) while the caller runs the network on what is already
decoded.  Each result says whether the next one is ready too, so the caller
can start inference on what it has instead of waiting for a full batch (one
decoding process and one inference thread then both stay busy on two cores).

The workers are forked from the calling process itself where that is safe
(one Python thread, torch not loaded yet: ``beet deepsim-embed`` starts its
decoding before it imports torch), so they start at once, with this module
already loaded; else from a forkserver that imports this module alone
(:func:`deepsim.util.worker_context`): PyAV, numpy and :mod:`deepsim.identity`,
no beets, no torch, so a worker starts in a fraction of a second.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor

import numpy as np

from deepsim.audio import PathLike, decode_middle
from deepsim.errors import AudioError
from deepsim.identity import identify
from deepsim.util import worker_context, worker_started

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
    worker_started()


class Decoding:
    """``(result, next_ready)`` per path, in order, at most ``window`` files in flight.

    ``next_ready`` is whether the result of the next path is already there (always
    true when ``workers`` is 0: then each file is decoded in this process when asked
    for).  With workers, the processes start and the first ``window`` files are
    handed to them when the object is made, so decoding runs while the caller does
    something else (loads its model).  Iterate once; the workers stop when the
    iteration ends or :meth:`close` is called.
    """

    def __init__(
        self,
        paths: Sequence[PathLike],
        *,
        sample_rate: int,
        seconds: float,
        workers: int,
        window: int,
    ) -> None:
        self.paths = paths
        self.sample_rate = sample_rate
        self.seconds = seconds
        self.workers = workers
        self._pending: deque[tuple[int, Future[Decoded]]] = deque()
        self._submitted = 0
        self._pool: ProcessPoolExecutor | None = None
        self._closed = False
        if workers > 0 and paths:
            self._pool = ProcessPoolExecutor(
                max_workers=workers, mp_context=worker_context(__name__), initializer=_worker_init
            )
            try:
                while self._submitted < min(max(window, 1), len(paths)):
                    self._submit_next()
            except BaseException:
                self.close()
                raise

    def _submit_next(self) -> None:
        if self._pool is not None and self._submitted < len(self.paths):
            path = self.paths[self._submitted]
            job = self._pool.submit(decode_job, path, self.sample_rate, self.seconds)
            self._pending.append((self._submitted, job))
            self._submitted += 1

    def __iter__(self) -> Iterator[tuple[Decoded, bool]]:
        if self.workers <= 0:
            for path in self.paths:
                if self._closed:
                    return
                yield decode_job(path, self.sample_rate, self.seconds), True
            return
        pending = self._pending  # empty once closed
        try:
            while pending:
                index, future = pending.popleft()
                try:
                    result = future.result()
                except Exception as exc:  # a worker died (e.g. killed by the OOM killer)
                    result = (
                        AudioError(self.paths[index], f"decoder process failed ({exc})"),
                        None,
                    )
                self._submit_next()
                yield result, not pending or pending[0][1].done()
        finally:
            self.close()

    def close(self) -> None:
        """Stop the workers (what they have not started is cancelled); nothing more comes."""
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            for _, future in self._pending:
                future.cancel()
            self._pending.clear()
            pool.shutdown(wait=True, cancel_futures=True)


def decoded(
    paths: Sequence[PathLike], *, sample_rate: int, seconds: float, workers: int, window: int
) -> Decoding:
    """The decoding of ``paths`` (see :class:`Decoding`), started."""
    return Decoding(paths, sample_rate=sample_rate, seconds=seconds, workers=workers, window=window)
