"""A memory-mapped cache of log-mel spectrograms for pretraining.

Decoding a compressed file costs far more than a training step of the seed's
network, and pretraining reads every track once per epoch.  The cache decodes
each track once (the middle ``seconds`` of it, through
:func:`deepsim.audio.decode_middle`), computes its log-mel with the model's
front end and stores it as float16 in one ``numpy.memmap`` of shape
``(n_tracks, frames, n_mels)``; epochs then read crops straight from the page
cache.  A track shorter than ``seconds`` is looped to fill its row, as
:meth:`deepsim.models.base.Model.patchify` does at inference.

Layout of the cache directory::

    mels.f16          the memmap, row i = track i
    status-<r>.npy    per-process progress: 0 to do, 1 done, 2 failed (uint8)
    index.json        key, shape, front end; written last, once complete

The key hashes the track list, the front-end parameters and ``seconds``, so a
cache built for other tracks or another front end is never reused.  An
interrupted build resumes: tracks whose status is "done" are not decoded
again.  Several processes (ranks under ``torchrun``) can fill one cache
together, each taking every ``world``-th track; the directory must then be
on a filesystem all of them see.

Disk: ``n_tracks × frames × n_mels × 2`` bytes, e.g. 380 000 × 599 × 128 ×
2 B ≈ 58 GB for the Taste Profile tracks with the seed's front end.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from deepsim.audio import decode_middle
from deepsim.errors import AudioError, DeepsimError, ParameterError
from deepsim.frontend import FrontendParams
from deepsim.util import loop_to_length

MELS_FILE = "mels.f16"
INDEX_FILE = "index.json"
TODO, DONE, FAILED = 0, 1, 2


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cache_key(paths: Sequence[str], *, frontend: FrontendParams, seconds: float) -> str:
    """Hash of everything the cached values depend on."""
    digest = hashlib.sha256()
    digest.update(json.dumps(frontend.to_dict(), sort_keys=True).encode())
    digest.update(repr(float(seconds)).encode())
    for path in paths:
        digest.update(os.fsencode(path))
        digest.update(b"\0")
    return digest.hexdigest()


def cache_frames(frontend: FrontendParams, seconds: float) -> int:
    """Frames stored per track: those of a ``seconds``-long window."""
    return frontend.n_frames(round(seconds * frontend.sample_rate))


@dataclass
class MelCache:
    """Read access to a complete cache.

    The memmap is opened lazily, in whichever process first reads, so the
    object can be handed to DataLoader worker processes cheaply.

    Attributes
    ----------
    directory
        The cache directory.
    shape
        ``(n_tracks, frames, n_mels)``.
    ok
        Boolean mask of tracks whose log-mel is present (failed decodes are
        ``False``).
    """

    directory: Path
    shape: tuple[int, int, int]
    ok: np.ndarray

    def __post_init__(self) -> None:
        self._mels: np.memmap | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_mels"] = None  # never pickle the mapping itself
        return state

    @property
    def mels(self) -> np.memmap:
        if self._mels is None:
            self._mels = np.memmap(
                self.directory / MELS_FILE, dtype=np.float16, mode="r", shape=self.shape
            )
        return self._mels

    def read(self, index: int, *, start: int = 0, frames: int | None = None) -> np.ndarray:
        """``frames`` frames of track ``index`` from frame ``start``, as float32."""
        n = self.shape[1] if frames is None else frames
        if not 0 <= start <= self.shape[1] - n:
            raise ParameterError(f"crop of {n} frames from {start} exceeds {self.shape[1]} frames")
        return np.asarray(self.mels[index, start : start + n], dtype=np.float32)

    @classmethod
    def open(cls, directory: str | os.PathLike[str], *, key: str) -> MelCache | None:
        """The complete cache in ``directory`` built for ``key``, or ``None``."""
        directory = Path(directory)
        try:
            index = json.loads((directory / INDEX_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if index.get("key") != key or not index.get("complete"):
            return None
        shape = tuple(int(v) for v in index["shape"])
        mels = directory / MELS_FILE
        if not mels.is_file() or mels.stat().st_size != 2 * int(np.prod(shape)):
            return None
        status = _merged_status(directory, shape[0])
        return cls(directory=directory, shape=shape, ok=status == DONE)  # type: ignore[arg-type]


def _status_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("status-*.npy"))


def _merged_status(directory: Path, n: int) -> np.ndarray:
    merged = np.zeros(n, dtype=np.uint8)
    for path in _status_files(directory):
        try:
            status = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            continue  # a torn file from a crash: its tracks are simply redone
        if status.shape == (n,):
            done = status == DONE
            merged[done] = DONE
            merged[(status == FAILED) & (merged != DONE)] = FAILED
    return merged


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array, allow_pickle=False)
    os.replace(tmp, path)


class _DecodeMels:
    """Dataset (map-style) decoding track ``indices[i]`` to a float16 log-mel."""

    def __init__(
        self,
        paths: Sequence[str],
        indices: np.ndarray,
        *,
        frontend: FrontendParams,
        seconds: float,
        frames: int,
    ) -> None:
        self.paths = list(paths)
        self.indices = indices
        self.frontend = frontend
        self.seconds = seconds
        self.frames = frames
        self._logmel: Any = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str]:
        import torch

        from deepsim.frontend import make_logmel

        index = int(self.indices[i])
        path = self.paths[index]
        try:
            wave = decode_middle(path, sample_rate=self.frontend.sample_rate, seconds=self.seconds)
        except AudioError as exc:
            return index, None, exc.reason
        except Exception as exc:  # a decoder bug must not stop the build
            return index, None, f"unexpected decoding failure ({type(exc).__name__}: {exc})"
        if self._logmel is None:
            self._logmel = make_logmel(self.frontend)
        with torch.inference_mode():
            mel = self._logmel(torch.from_numpy(wave)[None])[0].numpy()
        return index, loop_to_length(mel, self.frames)[: self.frames].astype(np.float16), ""


def loader_context(workers: int, *, preload: Sequence[str] = ()) -> Any:
    """The multiprocessing context for DataLoader workers (``None`` without workers).

    ``forkserver`` where the platform has it, else ``spawn``: never a plain
    ``fork`` of a process that already runs threads (a ``torch.distributed``
    process group, OpenMP, the loader's own pin-memory thread), which can
    leave a worker deadlocked right after the fork.  The fork server imports
    torch and ``preload`` once, so starting a worker stays cheap.
    """
    if workers <= 0:
        return None
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["torch", "numpy", "deepsim.melcache", *preload])
        return context
    return multiprocessing.get_context("spawn")


def _collate_one(batch: list[Any]) -> Any:
    return batch[0]


def _worker_init(_: int) -> None:
    import torch

    torch.set_num_threads(1)


def build_cache(
    directory: str | os.PathLike[str],
    paths: Sequence[str],
    *,
    frontend: FrontendParams,
    seconds: float,
    rank: int = 0,
    world: int = 1,
    workers: int = 2,
    barrier: Callable[[], None] = lambda: None,
    progress_every: int = 1000,
    mp_context: Any = None,
) -> MelCache:
    """Build (or finish, or reuse) the cache for ``paths``.

    Every participating process calls this with the same arguments and its
    own ``rank``; ``barrier`` synchronises them (``torch.distributed.barrier``
    under ``torchrun``).  Files that cannot be decoded get one line on stderr
    naming them and are marked as failed.

    Parameters
    ----------
    directory
        Cache directory (created).
    paths
        Audio files, in the order of the cache rows.
    frontend
        The model's front end.
    seconds
        Length of the middle window cached per track.
    rank, world
        This process's rank and the number of processes.
    workers
        DataLoader worker processes decoding for this process (0: decode in
        this process).
    barrier
        Called where every process must have arrived.
    progress_every
        Tracks between progress lines (and between progress saves).
    mp_context
        Start method of the workers; default :func:`loader_context`.

    Returns
    -------
    MelCache

    Raises
    ------
    DeepsimError
        If no track at all could be decoded.
    """
    import torch

    if world < 1 or not 0 <= rank < world:
        raise ParameterError(f"need 0 <= rank < world, got rank={rank!r}, world={world!r}")
    if seconds <= 0:
        raise ParameterError(f"seconds must be positive, got {seconds!r}")
    directory = Path(directory)
    key = cache_key(paths, frontend=frontend, seconds=seconds)
    existing = MelCache.open(directory, key=key)
    if existing is not None:
        return existing

    frames = cache_frames(frontend, seconds)
    shape = (len(paths), frames, frontend.n_mels)
    mels_path = directory / MELS_FILE
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        try:
            index = json.loads((directory / INDEX_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            index = {}
        fresh = index.get("key") != key or not mels_path.is_file()
        if fresh:
            # Another track list or front end: start over.
            for stale in _status_files(directory):
                stale.unlink()
            mels_path.unlink(missing_ok=True)
            np.memmap(mels_path, dtype=np.float16, mode="w+", shape=shape).flush()
        index = {
            "key": key,
            "shape": list(shape),
            "frontend": frontend.to_dict(),
            "seconds": float(seconds),
            "complete": False,
        }
        _write_index(directory, index)
    barrier()

    status = _merged_status(directory, len(paths))
    mine = np.arange(rank, len(paths), world)
    todo = mine[status[mine] != DONE]
    status_path = directory / f"status-{rank}.npy"
    if len(todo):
        _log(f"mel cache: rank {rank} decoding {len(todo)} of {len(paths)} tracks")
        mels = np.memmap(mels_path, dtype=np.float16, mode="r+", shape=shape)
        dataset = _DecodeMels(paths, todo, frontend=frontend, seconds=seconds, frames=frames)
        loader: torch.utils.data.DataLoader[Any] = torch.utils.data.DataLoader(
            cast("torch.utils.data.Dataset[Any]", dataset),  # map-style: __len__, __getitem__
            batch_size=1,
            shuffle=False,
            num_workers=workers,
            collate_fn=_collate_one,
            worker_init_fn=_worker_init if workers else None,
            multiprocessing_context=mp_context or loader_context(workers),
        )
        for count, (index, mel, reason) in enumerate(loader, 1):
            if mel is None:
                _log(f"skipping {paths[index]}: {reason}")
                status[index] = FAILED
            else:
                mels[index] = mel
                status[index] = DONE
            if count % progress_every == 0:
                mels.flush()
                _save_atomic(status_path, status)
                _log(f"mel cache: rank {rank}: {count}/{len(todo)}")
        mels.flush()
        del mels
    _save_atomic(status_path, status)
    barrier()
    merged = _merged_status(directory, len(paths))
    if not np.any(merged == DONE):  # every process sees it and stops
        raise DeepsimError(f"{directory}: none of the {len(paths)} audio files could be decoded")
    if rank == 0:
        index = json.loads((directory / INDEX_FILE).read_text(encoding="utf-8"))
        index["complete"] = True
        index["failed"] = int(np.sum(merged == FAILED))
        _write_index(directory, index)
    barrier()
    cache = MelCache.open(directory, key=key)
    if cache is None:
        raise DeepsimError(f"{directory}: the mel cache is incomplete after building it")
    return cache


def _write_index(directory: Path, index: dict[str, Any]) -> None:
    tmp = directory / (INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps(index, indent=1), encoding="utf-8")
    os.replace(tmp, directory / INDEX_FILE)
