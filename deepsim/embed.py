"""The embedding pipeline: decode in worker processes, infer in batches.

``embed_files`` yields one :class:`EmbedOutcome` per input path, in input
order, whatever happens to the file: a decoding failure comes back as an
:class:`~deepsim.errors.AudioError` value, never as an exception that stops
the run.  Writing to the database is the caller's job (:mod:`deepsim.store`).
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from deepsim import threads
from deepsim.audio import PathLike, decode_middle
from deepsim.errors import AudioError

if TYPE_CHECKING:
    from deepsim.models.base import Model


@dataclass
class EmbedOutcome:
    """The result for one input file.

    Exactly one of ``vector`` and ``error`` is set.
    """

    index: int
    path: PathLike
    vector: np.ndarray | None = None
    tags: np.ndarray | None = None
    error: AudioError | None = None


def resolve_device(device: str) -> str:
    """Turn ``auto|cpu|cuda|cuda:N|mps`` into a torch device string.

    ``auto`` picks CUDA when available, then MPS, else the CPU.
    """
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"
    if device == "cpu" or device == "mps" or device.startswith("cuda"):
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        return device
    raise ValueError(f"device must be auto, cpu, cuda or mps, got {device!r}")


def default_workers() -> int:
    """Decoding processes for CPU inference: the thread budget's share (:mod:`deepsim.threads`)."""
    return threads.plan(None)[0]


def _decode_job(path: PathLike, sample_rate: int, seconds: float) -> np.ndarray | AudioError:
    try:
        return decode_middle(path, sample_rate=sample_rate, seconds=seconds)
    except AudioError as exc:
        return exc
    except Exception as exc:  # a decoder bug must not take the run down
        return AudioError(path, f"unexpected decoding failure ({type(exc).__name__}: {exc})")


def _worker_init() -> None:
    # Decoding workers must not compete with the inference threads for cores.
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    except (ImportError, ValueError):
        pass


def _decoded(
    paths: Sequence[PathLike], *, sample_rate: int, seconds: float, workers: int, window: int
) -> Iterator[np.ndarray | AudioError]:
    """Decoded audio per path, in order, with at most ``window`` files in flight."""
    if workers <= 0:
        for path in paths:
            yield _decode_job(path, sample_rate, seconds)
        return
    context = multiprocessing.get_context("forkserver" if os.name == "posix" else "spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init)
    pending: deque[tuple[int, Future[np.ndarray | AudioError]]] = deque()
    submitted = 0

    def submit_next() -> None:
        nonlocal submitted
        if submitted < len(paths):
            path = paths[submitted]
            pending.append((submitted, pool.submit(_decode_job, path, sample_rate, seconds)))
            submitted += 1

    try:
        while submitted < min(window, len(paths)):
            submit_next()
        while pending:
            index, future = pending.popleft()
            try:
                result = future.result()
            except Exception as exc:  # a worker died (e.g. killed by the OOM killer)
                result = AudioError(paths[index], f"decoder process failed ({exc})")
            submit_next()
            yield result
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def embed_files(
    paths: Sequence[PathLike],
    model: Model,
    *,
    workers: int | None = None,
    batch_size: int = 8,
    on_decoded: Callable[[int], None] | None = None,
) -> Iterator[EmbedOutcome]:
    """Embed audio files with ``model``, yielding outcomes in input order.

    Parameters
    ----------
    paths
        Audio files.
    model
        A loaded :class:`~deepsim.models.base.Model`, already on its device.
    workers
        Decoding processes; ``None``: the thread budget's share
        (:func:`deepsim.threads.plan`); ``0`` decodes in this process.  The
        inference threads get the remaining cores.
    batch_size
        Tracks per inference batch.
    on_decoded
        Called with the index of each file as soon as it is decoded (for
        progress reporting).

    Yields
    ------
    EmbedOutcome
        One per path, in order.
    """
    if workers is None:
        workers = threads.plan(None, device=model.device.type)[0]
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers!r}")
    threads.apply(workers, device=model.device.type)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size!r}")
    params = model.frontend
    window = max(2 * batch_size, 2 * max(workers, 1))
    batch: list[tuple[int, np.ndarray]] = []
    ready: list[EmbedOutcome] = []

    def run_batch() -> None:
        if not batch:
            return
        try:
            result = model.embed([wave for _, wave in batch])
        except Exception as exc:  # e.g. out of memory on one odd file: retry one by one
            if len(batch) > 1:
                items = list(batch)
                batch.clear()
                for item in items:
                    batch.append(item)
                    run_batch()
                return
            index, _ = batch[0]
            ready.append(
                EmbedOutcome(
                    index, paths[index], error=AudioError(paths[index], f"model failed ({exc})")
                )
            )
            batch.clear()
            return
        for row, (index, _) in enumerate(batch):
            tags = None if result.tags is None else result.tags[row]
            ready.append(EmbedOutcome(index, paths[index], vector=result.vectors[row], tags=tags))
        batch.clear()

    decoded = _decoded(
        paths,
        sample_rate=params.sample_rate,
        seconds=params.clip_seconds,
        workers=workers,
        window=window,
    )
    next_index = 0
    for index, wave in enumerate(decoded):
        if on_decoded is not None:
            on_decoded(index)
        if isinstance(wave, AudioError):
            ready.append(EmbedOutcome(index, paths[index], error=wave))
        else:
            batch.append((index, wave))
            if len(batch) >= batch_size:
                run_batch()
        # Emit, in order, everything that is complete.
        ready.sort(key=lambda o: o.index)
        while ready and ready[0].index == next_index and not _in_batch(batch, next_index):
            yield ready.pop(0)
            next_index += 1
    run_batch()
    ready.sort(key=lambda o: o.index)
    yield from ready


def _in_batch(batch: list[tuple[int, np.ndarray]], index: int) -> bool:
    return any(i == index for i, _ in batch)
