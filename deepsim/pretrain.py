"""Pretrain the seed's network from scratch: ``python -m deepsim.pretrain``.

The recipe of van den Oord, Dieleman & Schrauwen (NIPS 2013) and Dieleman's
Spotify network (2014): factorise listening data with WMF, then train the
convnet of :mod:`deepsim.models.dieleman` to regress each track's
(unit-normalised) factor vector from its audio.

Pipeline
--------
1. **Match** the listening data (:func:`deepsim.listening.read_listens`) to audio
   files under ``--audio``: by a mapping file (``--mapping``, lines ``key <TAB>
   path`` or ``artist <TAB> title <TAB> path``, paths relative to ``--audio``)
   or by the files' tags (MusicBrainz recording id, then normalised artist +
   title, through :func:`deepsim.matching.match_tracks`).
2. **Split** the matched tracks into training and held-out tracks
   (``--holdout``) after dropping tracks and users with too little data, as
   ``beet deepsim-train`` does (:func:`make_targets`).  WMF
   (:func:`deepsim.wmf.fit_wmf`) is fitted on the training tracks only, so
   held-out tracks are cold-start tracks as in the paper; their reference
   factors are solved against the fixed user factors (one ALS half-step).
   Done once, by rank 0, into ``<out>/targets.npz``; the other ranks load
   that file.
3. **Train** with a :class:`torch.utils.data.DataLoader` whose workers decode
   the middle ``--source-seconds`` of each file (PyAV, :mod:`deepsim.audio`)
   and take a random crop of ``patch_frames`` frames (time-shift
   augmentation), or, with ``--cache-mels``, crop memory-mapped log-mels
   computed once (:mod:`deepsim.melcache`).  Loss: mean squared error to the
   unit-normalised factors.  Nesterov-momentum SGD (``--optimizer adam`` for
   Adam); mixed precision on CUDA with ``--amp``.
4. **Validate** at the end of each epoch on the held-out tracks with the
   metrics of ``beet deepsim-train`` (:func:`deepsim.metrics.evaluate_heldout`:
   per-user AUC and mAP@500 against the WMF upper bound and chance, and the
   mean cosine to the reference factors).
5. **Checkpoint** every ``--steps-per-checkpoint`` steps:
   ``<out>/checkpoint.safetensors`` (the model, a normal deepsim checkpoint)
   and ``<out>/checkpoint-state.pt`` (optimizer and progress, tensors and
   plain values only, loadable with ``torch.load(weights_only=True)``), both
   written atomically; ``--resume`` continues from them.  The final weights go
   to ``<out>/model.safetensors``, loadable by
   :func:`deepsim.models.load_model` and usable as ``model: <path>`` in beets.

Several GPUs or nodes: launch with ``torchrun`` (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` in the environment).  Each process then trains a
:class:`~torch.nn.parallel.DistributedDataParallel` replica on its share of
every epoch (:class:`~torch.utils.data.DistributedSampler`); the backend is
NCCL on CUDA, gloo on the CPU.  ``--out`` and ``--audio`` must be visible to
every process (a shared filesystem when there are several nodes).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from deepsim.audio import decode_middle
from deepsim.cf import factorise_split, filter_counts, split_tracks
from deepsim.errors import AudioError, DeepsimError, TrainingError
from deepsim.frontend import FrontendParams, make_logmel
from deepsim.listening import Listens, read_listens
from deepsim.matching import (
    LibraryKeys,
    MatchResult,
    collapse,
    match_tracks,
    normalise_artist,
    normalise_title,
)
from deepsim.melcache import MelCache, build_cache, loader_context
from deepsim.metrics import (
    PREDICTED_ROW,
    HeldoutMetrics,
    MetricRow,
    evaluate_heldout,
    profile_scores,
)
from deepsim.models.checkpoint import read_metadata
from deepsim.models.dieleman import (
    DEFAULT_CONFIG,
    DEFAULT_FRONTEND,
    DielemanModel,
    from_checkpoint,
    normalise_config,
    parse_int_list,
    summary,
)
from deepsim.util import loop_to_length
from deepsim.wmf import unit_normalise

#: Extensions taken as audio when scanning ``--audio``.
AUDIO_SUFFIXES = frozenset(
    {".mp3", ".flac", ".ogg", ".oga", ".opus", ".m4a", ".mp4", ".aac", ".alac", ".wav"}
    | {".aif", ".aiff", ".wma", ".ape", ".wv", ".mpc"}
)
#: What the loader workers' fork server imports once (the imports of this module).
_WORKER_PRELOAD = (
    "scipy.sparse",
    "deepsim.listening",
    "deepsim.matching",
    "deepsim.metrics",
    "deepsim.models.dieleman",
    "deepsim.train",
    "deepsim.wmf",
)
TARGETS_FILE = "targets.npz"
CHECKPOINT_FILE = "checkpoint.safetensors"
STATE_FILE = "checkpoint-state.pt"
FINAL_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Matching listening data to audio files


def scan_audio(directory: str | os.PathLike[str]) -> list[str]:
    """Audio files under ``directory`` (recursively, sorted, hidden entries skipped)."""
    root = Path(directory)
    if not root.is_dir():
        raise TrainingError(f"--audio {os.fspath(directory)!r} is not a directory")
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in AUDIO_SUFFIXES:
                found.append(os.path.join(dirpath, name))
    return sorted(found)


def audio_keys(paths: Sequence[str]) -> LibraryKeys:
    """Read artist, title and recording MBID tags of ``paths`` (ids = list positions).

    Files whose tags cannot be read get one line on stderr and no keys.
    """
    from mediafile import FileTypeError, MediaFile, UnreadableFileError

    artists: list[str] = []
    titles: list[str] = []
    mbids: list[str] = []
    by_mbid: dict[str, int] = {}
    by_name: dict[tuple[str, str], int] = {}
    for index, path in enumerate(paths):
        artist = title = mbid = ""
        try:
            tags = MediaFile(path)
            artist = tags.artist or ""
            title = tags.title or ""
            mbid = (tags.mb_trackid or "").strip().lower()
        except (FileTypeError, UnreadableFileError, OSError) as exc:
            _err(f"{path}: cannot read tags, not matched ({exc})")
        artists.append(artist)
        titles.append(title)
        mbids.append(mbid)
        if mbid:
            by_mbid.setdefault(mbid, index)
        name = (normalise_artist(artist), normalise_title(title))
        if name[0] and name[1]:
            by_name.setdefault(name, index)
    return LibraryKeys(
        np.arange(len(paths), dtype=np.int64), artists, titles, mbids, by_mbid, by_name
    )


def read_mapping(
    path: str | os.PathLike[str], *, audio_dir: str | os.PathLike[str]
) -> tuple[dict[str, str], dict[tuple[str, str], str]]:
    """Read a mapping file.

    Lines are ``key <TAB> path`` (``key`` as in the listening data: an MSD song
    id, a MusicBrainz recording id...) or ``artist <TAB> title <TAB> path``;
    blank lines and lines starting with ``#`` are ignored.  Relative paths are
    relative to ``audio_dir``.

    Returns
    -------
    by_key, by_name
        Key → path and (normalised artist, normalised title) → path.
    """
    by_key: dict[str, str] = {}
    by_name: dict[tuple[str, str], str] = {}
    root = Path(audio_dir)
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, raw in enumerate(fh, 1):
                line = raw.rstrip("\r\n")
                if not line.strip() or line.startswith("#"):
                    continue
                parts = line.split("\t")
                if len(parts) == 2:
                    key, rel = parts[0].strip(), parts[1]
                    by_key.setdefault(key, os.fspath(root / rel))
                    if key.lower() != key:
                        by_key.setdefault(key.lower(), os.fspath(root / rel))
                elif len(parts) == 3:
                    name = (normalise_artist(parts[0]), normalise_title(parts[1]))
                    by_name.setdefault(name, os.fspath(root / parts[2]))
                else:
                    raise TrainingError(
                        f"{path}:{lineno}: expected 'key<TAB>path' or "
                        f"'artist<TAB>title<TAB>path', got {len(parts)} fields"
                    )
    except OSError as exc:
        raise TrainingError(f"--mapping {os.fspath(path)!r}: cannot read ({exc.strerror})") from exc
    if not by_key and not by_name:
        raise TrainingError(f"--mapping {os.fspath(path)!r}: no entries")
    return by_key, by_name


def match_audio(
    listens: Listens,
    *,
    audio_dir: str | os.PathLike[str],
    mapping: str | os.PathLike[str] | None = None,
) -> tuple[Listens, list[str]]:
    """Restrict ``listens`` to tracks with an audio file.

    Returns
    -------
    listens, paths
        The listens with one column per audio file (plays of keys matched to
        the same file summed) and the file of each column.

    Raises
    ------
    TrainingError
        When no track matches.
    """
    if mapping is not None:
        by_key, by_name = read_mapping(mapping, audio_dir=audio_dir)
        paths: list[str] = []
        index_of: dict[str, int] = {}
        ids = np.full(listens.n_tracks, -1, dtype=np.int64)
        missing: list[str] = []
        for j, track in enumerate(listens.tracks):
            path = by_key.get(track.key) or by_key.get(track.key.lower())
            if path is None and track.mbid:
                path = by_key.get(track.mbid)
            if path is None and by_name and track.artist and track.title:
                path = by_name.get((normalise_artist(track.artist), normalise_title(track.title)))
            if path is None:
                continue
            if path not in index_of:
                if not os.path.isfile(path):
                    missing.append(path)
                    index_of[path] = -1
                else:
                    index_of[path] = len(paths)
                    paths.append(path)
            ids[j] = index_of[path]
        if missing:
            _err(
                f"mapping: {len(missing)} mapped files do not exist (first: {missing[0]}); "
                "their tracks are left out"
            )
        n = int(np.sum(ids >= 0))
        match = MatchResult(ids, n, n / max(1, listens.n_tracks), 0, 0, 0)
    else:
        paths = scan_audio(audio_dir)
        if not paths:
            raise TrainingError(f"--audio {os.fspath(audio_dir)!r}: no audio files found")
        match = match_tracks(listens.tracks, audio_keys(paths))
    if match.n_matched == 0:
        how = "the mapping file" if mapping is not None else "tags (MBID, artist + title)"
        raise TrainingError(
            f"none of the {listens.n_tracks} listened tracks matched an audio file under "
            f"{os.fspath(audio_dir)!r} by {how}"
        )
    collapsed = collapse(listens, match)
    files = [paths[int(t.item_id)] for t in collapsed.tracks]  # type: ignore[arg-type]
    return collapsed, files


# ---------------------------------------------------------------------------------------------
# Targets


@dataclass
class Targets:
    """What training needs from the listening data, saved once in ``targets.npz``.

    Attributes
    ----------
    paths
        Audio file of each track.
    factors
        ``(n_tracks, f)`` unit-normalised reference factors: the WMF factors
        of training tracks, the folded-in factors of held-out tracks.
    heldout
        Boolean mask of held-out tracks.
    user_factors
        ``(n_users, f)`` WMF user factors (fitted on the training tracks).
    heldout_plays
        ``(n_users, n_heldout)`` play counts on the held-out tracks, columns in
        the order of ``np.flatnonzero(heldout)``.
    train_plays
        ``(n_users, n_train)`` play counts on the training tracks, columns in
        the order of ``np.flatnonzero(~heldout)`` (the listeners' profiles of
        the content-based baseline).
    info
        Provenance (counts, WMF parameters).
    """

    paths: list[str]
    factors: np.ndarray
    heldout: np.ndarray
    user_factors: np.ndarray
    heldout_plays: sp.csr_matrix
    train_plays: sp.csr_matrix
    info: dict[str, Any] = field(default_factory=dict)


def _pack_strings(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = [os.fsencode(s) for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


def _unpack_strings(blob: np.ndarray, offsets: np.ndarray) -> list[str]:
    raw = blob.tobytes()
    return [os.fsdecode(raw[offsets[i] : offsets[i + 1]]) for i in range(len(offsets) - 1)]


def save_targets(path: str | os.PathLike[str], targets: Targets) -> None:
    """Write ``targets`` atomically as an ``.npz`` file without pickled objects."""
    path = Path(path)
    blob, offsets = _pack_strings(targets.paths)
    plays = sp.csr_matrix(targets.heldout_plays, dtype=np.float32)
    train = sp.csr_matrix(targets.train_plays, dtype=np.float32)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(
        tmp,
        paths_blob=blob,
        paths_offsets=offsets,
        factors=targets.factors.astype(np.float32),
        heldout=targets.heldout.astype(bool),
        user_factors=targets.user_factors.astype(np.float32),
        plays_data=plays.data,
        plays_indices=plays.indices,
        plays_indptr=plays.indptr,
        plays_shape=np.asarray(plays.shape, dtype=np.int64),
        train_data=train.data,
        train_indices=train.indices,
        train_indptr=train.indptr,
        train_shape=np.asarray(train.shape, dtype=np.int64),
        info=np.frombuffer(json.dumps(targets.info).encode(), dtype=np.uint8),
    )
    os.replace(tmp, path)


def load_targets(path: str | os.PathLike[str]) -> Targets:
    """Read a file written by :func:`save_targets`."""
    try:
        with np.load(path, allow_pickle=False) as data:
            shape = tuple(int(v) for v in data["plays_shape"])
            train_shape = tuple(int(v) for v in data["train_shape"])
            return Targets(
                paths=_unpack_strings(data["paths_blob"], data["paths_offsets"]),
                factors=data["factors"],
                heldout=data["heldout"],
                user_factors=data["user_factors"],
                heldout_plays=sp.csr_matrix(
                    (data["plays_data"], data["plays_indices"], data["plays_indptr"]), shape=shape
                ),
                train_plays=sp.csr_matrix(
                    (data["train_data"], data["train_indices"], data["train_indptr"]),
                    shape=train_shape,
                ),
                info=json.loads(data["info"].tobytes().decode()),
            )
    except (OSError, KeyError, ValueError) as exc:
        raise TrainingError(f"{path}: unreadable targets file ({exc})") from exc


def make_targets(
    listens: Listens,
    paths: Sequence[str],
    *,
    factors: int,
    holdout: float,
    min_plays: float = 2,
    min_listeners: int = 2,
    min_user_tracks: int = 2,
    seed: int = 0,
    **wmf_options: Any,
) -> Targets:
    """Filter, split, factorise: the data preparation of ``beet deepsim-train``.

    Tracks and users with too little data are dropped
    (:func:`deepsim.cf.filter_counts`), a seeded share ``holdout`` of the
    tracks is held out (:func:`deepsim.cf.split_tracks`), WMF is fitted on
    the rest and the held-out tracks' factors are solved against its user
    factors (:func:`deepsim.cf.factorise_split`).  ``wmf_options`` go to
    :func:`deepsim.wmf.fit_wmf`.
    """
    users, tracks = filter_counts(
        listens.counts,
        min_plays=min_plays,
        min_listeners=min_listeners,
        min_user_tracks=min_user_tracks,
    )
    if len(tracks) < 2 or len(users) < 2:
        raise TrainingError(
            f"after dropping tracks with fewer than {min_plays} plays or {min_listeners} "
            f"listeners and users with fewer than {min_user_tracks} tracks, {len(tracks)} "
            f"tracks and {len(users)} users are left; need at least 2 of each"
        )
    counts = sp.csr_matrix(listens.counts[users][:, tracks])
    train, held = split_tracks(len(tracks), heldout_fraction=holdout, seed=seed)
    if len(train) < 2:
        raise TrainingError(f"--holdout {holdout} leaves {len(train)} tracks to train on")
    split = factorise_split(counts, train, held, factors=factors, seed=seed, **wmf_options)
    ref = np.zeros((len(tracks), factors), dtype=np.float32)
    ref[train] = split.train_factors
    ref[held] = unit_normalise(split.heldout_factors)
    heldout = np.zeros(len(tracks), dtype=bool)
    heldout[held] = True
    info = {
        "n_users": len(users),
        "n_tracks": len(tracks),
        "n_train": len(train),
        "n_heldout": len(held),
        "nnz": int(counts.nnz),
        "wmf": split.params,
        "wmf_seconds": split.seconds,
    }
    return Targets(
        [paths[t] for t in tracks.tolist()],
        ref,
        heldout,
        split.user_factors,
        counts[:, held].tocsr(),
        counts[:, train].tocsr(),
        info,
    )


# ---------------------------------------------------------------------------------------------
# Data


def samples_for_frames(frontend: FrontendParams, frames: int) -> int:
    """Fewest samples for which the front end yields ``frames`` frames."""
    if frontend.center:
        return (frames - 1) * frontend.hop_length
    return frontend.n_fft + (frames - 1) * frontend.hop_length


class ClipDataset(Dataset):
    """Crops of log-mels with their target factors.

    Items are ``(mel (patch_frames, n_mels) float32, target (f,) float32, index,
    ok)``.  Training crops start at a random frame; evaluation crops are
    centred.  Without a cache each item decodes its file (in the DataLoader
    worker).  A training item whose file fails to decode is replaced by
    another track (one line on stderr names the file, once per process), so
    batches keep their size, which DDP needs; an evaluation item comes back
    with ``ok = False`` instead.

    Parameters
    ----------
    indices
        Track numbers (into ``paths``/``factors``) this dataset serves.
    paths, factors
        All tracks' files and target factors.
    frontend
        The model's front end.
    patch_frames
        Frames per crop.
    source_seconds
        Middle window decoded per file (without a cache).
    train
        Random (``True``) or centred crops.
    cache
        A :class:`~deepsim.melcache.MelCache` holding every track, or ``None``.
    """

    def __init__(
        self,
        indices: np.ndarray,
        *,
        paths: Sequence[str],
        factors: np.ndarray,
        frontend: FrontendParams,
        patch_frames: int,
        source_seconds: float,
        train: bool,
        cache: MelCache | None = None,
    ) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)
        self.paths = list(paths)
        self.factors = np.asarray(factors, dtype=np.float32)
        self.frontend = frontend
        self.patch_frames = patch_frames
        self.source_seconds = source_seconds
        self.train = train
        self.cache = cache
        self._logmel: torch.nn.Module | None = None
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.indices)

    def _start(self, available: int, needed: int) -> int:
        if available <= needed:
            return 0
        if self.train:
            return int(torch.randint(0, available - needed + 1, ()).item())
        return (available - needed) // 2

    def _mel(self, track: int) -> np.ndarray:
        if self.cache is not None:
            frames = self.cache.shape[1]
            if frames < self.patch_frames:
                return loop_to_length(self.cache.read(track), self.patch_frames)[
                    : self.patch_frames
                ]
            return self.cache.read(
                track, start=self._start(frames, self.patch_frames), frames=self.patch_frames
            )
        wave = decode_middle(
            self.paths[track], sample_rate=self.frontend.sample_rate, seconds=self.source_seconds
        )
        need = samples_for_frames(self.frontend, self.patch_frames)
        if len(wave) < need:
            wave = np.tile(wave, -(-need // len(wave)))
        start = self._start(len(wave), need)
        crop = np.ascontiguousarray(wave[start : start + need])
        if self._logmel is None:
            self._logmel = make_logmel(self.frontend)
        with torch.inference_mode():
            mel = self._logmel(torch.from_numpy(crop)[None])[0].numpy()
        return loop_to_length(mel, self.patch_frames)[: self.patch_frames]

    def _load(self, track: int) -> np.ndarray | None:
        if track in self._bad:
            return None
        try:
            return self._mel(track)
        except AudioError as exc:
            reason = exc.reason
        except Exception as exc:  # a decoder bug must not kill the worker
            reason = f"unexpected decoding failure ({type(exc).__name__}: {exc})"
        self._bad.add(track)
        _err(f"skipping {self.paths[track]}: {reason}")
        return None

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
        n = len(self.indices)
        attempts = min(n, 32) if self.train else 1
        for attempt in range(attempts):
            # Substitutes are spread over the dataset, not neighbours of i.
            track = int(self.indices[(i + attempt * 7919) % n])
            mel = self._load(track)
            if mel is not None:
                return (
                    torch.from_numpy(mel),
                    torch.from_numpy(self.factors[track]),
                    track,
                    True,
                )
        if self.train:
            raise TrainingError(f"{attempts} audio files in a row could not be decoded")
        track = int(self.indices[i])
        empty = np.zeros((self.patch_frames, self.frontend.n_mels), dtype=np.float32)
        return torch.from_numpy(empty), torch.from_numpy(self.factors[track]), track, False


class _EpochSampler(Sampler[int]):
    """A :class:`DistributedSampler` whose epoch may start part-way (resuming).

    It is iterated in the main process at the start of every epoch, so one
    DataLoader with persistent workers serves all epochs.
    """

    def __init__(self, inner: DistributedSampler) -> None:
        self.inner = inner
        self.skip = 0

    def start_epoch(self, epoch: int, *, skip: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.inner)[self.skip :])

    def __len__(self) -> int:
        return max(0, len(self.inner) - self.skip)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# Distributed setup


@dataclass
class Runtime:
    """Where this process runs."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    distributed: bool

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def setup_runtime(device: str, *, timeout_minutes: float = 120.0) -> Runtime:
    """Join the process group when launched by torchrun; pick the device.

    ``timeout_minutes`` bounds how long a process waits in a collective
    (the other ranks wait while rank 0 reads the listening data and fits WMF).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise TrainingError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError("--device cuda requested but CUDA is not available")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    distributed = world > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    return Runtime(rank, world, local_rank, dev, distributed)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_training_state(
    out: Path,
    model: DielemanModel,
    *,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    progress: dict[str, int],
    args: dict[str, Any],
) -> str:
    """Write ``checkpoint.safetensors`` and ``checkpoint-state.pt`` (each atomically).

    The state records the model id of the weights it belongs to, so a crash
    between the two writes is detected on resume.
    """
    model.save(out / CHECKPOINT_FILE)
    state = {
        "model_id": model.model_id,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "progress": dict(progress),
        "args": json.dumps(args, sort_keys=True),
    }
    tmp = out / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out / STATE_FILE)
    return model.model_id


def load_training_state(out: Path) -> tuple[DielemanModel, dict[str, Any]]:
    """Read the checkpoint pair written by :func:`save_training_state`."""
    weights = out / CHECKPOINT_FILE
    meta = read_metadata(weights)
    model = from_checkpoint(weights, meta)
    try:
        state = torch.load(out / STATE_FILE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise TrainingError(f"{out / STATE_FILE}: cannot load training state ({exc})") from exc
    if state.get("model_id") != meta["model_id"]:
        raise TrainingError(
            f"{out}: {CHECKPOINT_FILE} ({meta['model_id']}) and {STATE_FILE} "
            f"({state.get('model_id')}) are from different steps (interrupted while saving?)"
        )
    return model, state


# ---------------------------------------------------------------------------------------------
# Validation


@dataclass
class Validation:
    """Held-out results of one evaluation."""

    loss: float
    metrics: HeldoutMetrics | None
    n_tracks: int

    def lines(self) -> list[str]:
        out = [f"held-out: {self.n_tracks} tracks, mse {self.loss:.5f}"]
        if self.metrics is not None:
            m = self.metrics
            out.append(f"  {m.n_users} users with {m.n_plays} plays on them")
            out.append(m.format_table())
        return out

    def line(self, epoch: int) -> str:
        """One line for the end of an epoch."""
        text = f"epoch {epoch} held-out: mse {self.loss:.5f}"
        if self.metrics is not None:
            m = self.metrics
            text += (
                f", cosine {m.cosine:.3f}, AUC {m.predicted.auc:.3f}, "
                f"mAP@{m.predicted.k} {m.predicted.map_at_k:.3f} "
                f"(WMF {m.wmf.auc:.3f}/{m.wmf.map_at_k:.3f}, "
                f"random {m.random.auc:.3f}/{m.random.map_at_k:.3f})"
            )
        return text

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"mse": self.loss, "n_tracks": self.n_tracks}
        if self.metrics is not None:
            m = self.metrics
            data.update(
                cosine=m.cosine,
                auc=m.predicted.auc,
                map=m.predicted.map_at_k,
                auc_wmf=m.wmf.auc,
                map_wmf=m.wmf.map_at_k,
                auc_random=m.random.auc,
                map_random=m.random.map_at_k,
                n_users=m.n_users,
                rows={
                    r.name: {"auc": r.scores.auc, "map": r.scores.map_at_k, "cosine": r.cosine}
                    for r in m.rows
                },
            )
        return data


def _with_untrained(
    val: Validation, untrained: Validation | None, profile: MetricRow | None = None
) -> Validation:
    """``val`` with the untrained network's rows (when known): its ranking, its content profile."""
    if val.metrics is None:
        return val
    metrics = val.metrics
    if untrained is not None and untrained.metrics is not None:
        row = MetricRow(UNTRAINED_ROW, untrained.metrics.predicted, untrained.metrics.cosine)
        metrics = metrics.with_row(row, after=PREDICTED_ROW)
    if profile is not None:
        names = [r.name for r in metrics.rows]
        after = UNTRAINED_ROW if UNTRAINED_ROW in names else PREDICTED_ROW
        metrics = metrics.with_row(profile, after=after)
    return Validation(val.loss, metrics, val.n_tracks)


def validate(
    model: DielemanModel,
    loader: DataLoader,
    targets: Targets,
    *,
    runtime: Runtime,
    amp: bool,
    users: np.ndarray | None = None,
) -> Validation | None:
    """Predict the held-out tracks (``loader`` splits them over the ranks); score on rank 0.

    ``users`` restricts the ranking metrics to those rows of the user factors
    (all users when ``None``).
    """
    if len(loader.dataset) == 0:  # type: ignore[arg-type]
        return None
    by_track = _predict(model, loader, runtime=runtime, amp=amp)
    if by_track is None:
        return None
    held_cols = np.flatnonzero(targets.heldout)
    present, predicted = _predicted(by_track, held_cols)
    if not np.any(present):
        return Validation(float("nan"), None, 0)
    cols = held_cols[present]
    true = targets.factors[cols]
    loss = float(np.mean((predicted - true) ** 2))
    plays = targets.heldout_plays[:, np.flatnonzero(present)]
    user_factors = targets.user_factors
    if users is not None:
        plays, user_factors = plays[users], user_factors[users]
    metrics = evaluate_heldout(user_factors, plays, predicted, true)
    return Validation(loss, metrics, len(cols))


def _predict(
    model: DielemanModel, loader: DataLoader, *, runtime: Runtime, amp: bool
) -> dict[int, np.ndarray] | None:
    """The network's outputs for the tracks of ``loader`` (split over the ranks), on rank 0.

    Tracks whose audio failed are missing; other ranks get ``None``.
    """
    was_training = model.training
    model.eval()
    if runtime.distributed:
        for buffer in model.buffers():  # every rank predicts with rank 0's BN statistics
            dist.broadcast(buffer, 0)
    indices: list[np.ndarray] = []
    preds: list[np.ndarray] = []
    with torch.inference_mode(), _autocast(runtime.device, amp):
        for mel, _target, index, ok in loader:
            out = model(mel.to(runtime.device, non_blocking=True)).float().cpu().numpy()
            keep = ok.numpy().astype(bool)
            indices.append(index.numpy()[keep])
            preds.append(out[keep])
    model.train(was_training)
    local = (
        np.concatenate(indices) if indices else np.zeros(0, np.int64),
        np.concatenate(preds) if preds else np.zeros((0, model.dim), np.float32),
    )
    gathered: list[Any] = [local]
    if runtime.distributed:
        gathered = [None] * runtime.world
        dist.all_gather_object(gathered, local)
    if not runtime.main:
        return None
    by_track: dict[int, np.ndarray] = {}
    for idx, pred in gathered:
        for i, p in zip(idx.tolist(), pred, strict=True):
            by_track[i] = p
    return by_track


def _predicted(by_track: dict[int, np.ndarray], cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which of ``cols`` have an output in ``by_track``, and those outputs stacked (float32)."""
    present = np.asarray([t in by_track for t in cols.tolist()], bool)
    if not present.any():
        return present, np.zeros((0, 0), np.float32)
    return present, np.stack([by_track[t] for t in cols[present].tolist()]).astype(np.float32)


#: The baseline rows of the pretraining table: the network before any step, ranking by
#: ``x_u · output``, and as a content-based recommender.
UNTRAINED_ROW = "untrained network (step 0)"
UNTRAINED_PROFILE_ROW = "untrained network: content profile"


def untrained_profile(
    model: DielemanModel,
    loader: DataLoader,
    targets: Targets,
    *,
    runtime: Runtime,
    amp: bool,
    users: np.ndarray | None = None,
) -> MetricRow | None:
    """The network's outputs as a content-based recommender (rank 0; others ``None``).

    ``loader`` serves centred crops of the held-out tracks and of the
    training tracks the evaluated ``users`` played.  A user's profile is the
    play-weighted mean of the (unit) outputs of their training tracks; the
    held-out tracks are ranked by cosine to it (:func:`deepsim.metrics.profile_scores`),
    as ``beet deepsim-train``'s ``untrained: sound profile`` row.  Measured
    once, before the first step: the honest "no training" baseline.
    """
    by_track = _predict(model, loader, runtime=runtime, amp=amp)
    if by_track is None:
        return None
    held_cols = np.flatnonzero(targets.heldout)
    train_cols = np.flatnonzero(~targets.heldout)
    held_ok, held_out = _predicted(by_track, held_cols)
    train_ok, train_out = _predicted(by_track, train_cols)
    if not held_ok.any() or not train_ok.any():
        return None
    rows = np.arange(len(targets.user_factors)) if users is None else np.asarray(users)
    train_plays, held_plays = targets.train_plays[rows], targets.heldout_plays[rows]
    # the users of the other rows: with a factor (so with training plays)
    has = (np.diff(train_plays.indptr) > 0) & np.any(targets.user_factors[rows] != 0, axis=1)
    train_plays, held_plays = train_plays[has], held_plays[has]
    scores = profile_scores(
        train_plays[:, np.flatnonzero(train_ok)],
        train_out,
        held_plays[:, np.flatnonzero(held_ok)],
        held_out,
    )
    return MetricRow(UNTRAINED_PROFILE_ROW, scores)


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Command line


@dataclass
class PretrainConfig:
    """Everything a pretraining run is told: the fields of ``python -m deepsim.pretrain``.

    The command line is parsed into one of these (:meth:`from_args`); the
    parser's defaults are these defaults, and :func:`run` and :class:`Trainer`
    read only this object.  See ``python -m deepsim.pretrain --help`` for each
    field (``--wmf-alpha`` is ``wmf_alpha``, and so on).
    """

    audio: str
    listens: list[str]
    format: str = "auto"
    song_table: str | None = None
    session_gap: float = 1800.0
    mapping: str | None = None
    out: str = "pretrain-out"
    holdout: float = 0.1
    min_plays: float = 2
    min_listeners: int = 2
    min_user_tracks: int = 2
    cache_mels: bool = False
    source_seconds: float | None = None
    factors: int = 40
    wmf_alpha: float = 2.0
    wmf_epsilon: float = 1e-6
    wmf_regularization: float = 0.01
    wmf_iterations: int = 15
    filters: str = "256,256,256,256"
    pools: str = "4,2,2"
    kernel_size: int = 4
    dense: str = "2048,2048"
    dropout: float = 0.5
    no_batch_norm: bool = False
    patch_frames: int = 599
    n_mels: int = 128
    hop_length: int = 1105
    epochs: int = 10
    max_steps: int = 0
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    steps_per_checkpoint: int = 500
    resume: bool = False
    prepare_only: bool = False
    dist_timeout: float = 120.0
    workers: int = 2
    amp: bool = False
    device: str = "auto"
    threads: int = 0
    seed: int = 0
    log_every: int = 20
    eval_users: int = 20000

    @classmethod
    def from_args(cls, args: PretrainConfig | argparse.Namespace) -> PretrainConfig:
        """The config of parsed command-line ``args`` (a config passes through)."""
        if isinstance(args, PretrainConfig):
            return args
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in known})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m deepsim.pretrain`` argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m deepsim.pretrain",
        description="Train the seed's CF-regression convnet from scratch on an audio folder "
        "and listening data (single process, or several under torchrun).",
    )
    data = p.add_argument_group("data")
    data.add_argument("--audio", required=True, help="folder of audio files (searched recursively)")
    data.add_argument("--listens", required=True, nargs="+", help="listening files or folders")
    data.add_argument("--format", default="auto", help="listening-data format (default: auto)")
    data.add_argument("--song-table", help="Taste Profile: MSD unique_tracks.txt (song names)")
    data.add_argument("--session-gap", type=float, default=1800.0, help="seconds ending a session")
    data.add_argument("--mapping", help="TSV: key<TAB>path or artist<TAB>title<TAB>path")
    data.add_argument("--out", default="pretrain-out", help="output folder (default: %(default)s)")
    data.add_argument("--holdout", type=float, default=0.1, help="held-out share of tracks")
    data.add_argument("--min-plays", type=float, default=2, help="plays a track needs")
    data.add_argument("--min-listeners", type=int, default=2, help="listeners a track needs")
    data.add_argument("--min-user-tracks", type=int, default=2, help="tracks a user needs")
    data.add_argument("--cache-mels", action="store_true", help="decode once into a mel memmap")
    data.add_argument(
        "--source-seconds",
        type=float,
        default=None,
        help="middle window decoded/cached per track (default: the front end's 30 s)",
    )
    wmf = p.add_argument_group("WMF")
    wmf.add_argument("--factors", type=int, default=40, help="WMF factors = network outputs")
    wmf.add_argument("--wmf-alpha", type=float, default=2.0)
    wmf.add_argument("--wmf-epsilon", type=float, default=1e-6)
    wmf.add_argument("--wmf-regularization", type=float, default=0.01)
    wmf.add_argument("--wmf-iterations", type=int, default=15)
    net = p.add_argument_group("network (ignored with --resume: the checkpoint's are used)")
    net.add_argument("--filters", default=",".join(map(str, DEFAULT_CONFIG["filters"])))
    net.add_argument("--pools", default=",".join(map(str, DEFAULT_CONFIG["pools"])))
    net.add_argument("--kernel-size", type=int, default=DEFAULT_CONFIG["kernel_size"])
    net.add_argument("--dense", default=",".join(map(str, DEFAULT_CONFIG["dense"])))
    net.add_argument("--dropout", type=float, default=DEFAULT_CONFIG["dropout"])
    net.add_argument("--no-batch-norm", action="store_true", help="the original 2014 layers")
    net.add_argument("--patch-frames", type=int, default=DEFAULT_CONFIG["patch_frames"])
    net.add_argument("--n-mels", type=int, default=DEFAULT_FRONTEND.n_mels)
    net.add_argument("--hop-length", type=int, default=DEFAULT_FRONTEND.hop_length)
    train = p.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--max-steps", type=int, default=0, help="stop after N steps (0: no limit)")
    train.add_argument("--batch-size", type=int, default=32, help="per process")
    train.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    train.add_argument("--lr", type=float, default=None, help="default 0.01 (sgd), 0.001 (adam)")
    train.add_argument("--momentum", type=float, default=0.9, help="Nesterov momentum (sgd)")
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--steps-per-checkpoint", type=int, default=500)
    train.add_argument("--resume", action="store_true", help="continue from <out>'s checkpoint")
    train.add_argument(
        "--prepare-only",
        action="store_true",
        help="stop after the targets (and, with --cache-mels, the mel cache)",
    )
    train.add_argument(
        "--dist-timeout",
        type=float,
        default=120.0,
        help="minutes a process waits for the others under torchrun (default %(default)s)",
    )
    train.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    train.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    train.add_argument("--device", default="auto", help="auto, cpu or cuda")
    train.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads per process (0: torch's default)"
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--log-every", type=int, default=20, help="steps between loss lines")
    train.add_argument(
        "--eval-users",
        type=int,
        default=20000,
        help="users sampled for the held-out ranking metrics (0: all; default %(default)s)",
    )
    # One set of defaults: the config's.
    p.set_defaults(
        **{f.name: f.default for f in fields(PretrainConfig) if f.default is not MISSING}
    )
    return p


def _network_config(args: PretrainConfig) -> dict[str, Any]:
    frontend = {**DEFAULT_FRONTEND.to_dict(), "n_mels": args.n_mels, "hop_length": args.hop_length}
    return normalise_config(
        {
            "factors": args.factors,
            "filters": parse_int_list(args.filters, name="--filters"),
            "pools": parse_int_list(args.pools, name="--pools"),
            "kernel_size": args.kernel_size,
            "dense": parse_int_list(args.dense, name="--dense"),
            "dropout": args.dropout,
            "batch_norm": not args.no_batch_norm,
            "patch_frames": args.patch_frames,
            "frontend": frontend,
        }
    )


def _check_args(args: PretrainConfig) -> None:
    for name in ("epochs", "batch_size", "steps_per_checkpoint", "log_every", "factors"):
        value = getattr(args, name)
        if value < 1:
            raise TrainingError(f"--{name.replace('_', '-')} must be at least 1, got {value!r}")
    for name in ("max_steps", "workers", "threads", "eval_users"):
        if getattr(args, name) < 0:
            raise TrainingError(
                f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)!r}"
            )
    if args.lr is not None and not args.lr > 0:
        raise TrainingError(f"--lr must be positive, got {args.lr!r}")
    if not args.dist_timeout > 0:
        raise TrainingError(f"--dist-timeout must be positive, got {args.dist_timeout!r}")
    if args.source_seconds is not None and not args.source_seconds > 0:
        raise TrainingError(f"--source-seconds must be positive, got {args.source_seconds!r}")


def targets_key(args: PretrainConfig) -> str:
    """What ``targets.npz`` depends on: inputs (with sizes and times) and options."""
    files = []
    for name in [*args.listens, args.mapping, args.song_table]:
        if name is None:
            continue
        try:
            st = os.stat(name)
            files.append([os.path.abspath(name), st.st_size, st.st_mtime_ns])
        except OSError:
            files.append([os.path.abspath(name), None, None])
    options = {
        name: getattr(args, name)
        for name in (
            "format", "session_gap", "holdout", "min_plays", "min_listeners",
            "min_user_tracks", "factors", "wmf_alpha", "wmf_epsilon",
            "wmf_regularization", "wmf_iterations", "seed",
        )
    }  # fmt: skip
    options["audio"] = os.path.abspath(args.audio)
    return json.dumps({"files": files, "options": options}, sort_keys=True)


def _prepare_targets(args: PretrainConfig, out: Path, runtime: Runtime) -> Targets:
    """Compute ``targets.npz`` on rank 0 unless one for the same inputs exists; load it."""
    path = out / TARGETS_FILE
    key = targets_key(args)
    if runtime.main:
        existing = None
        if path.is_file():
            with contextlib.suppress(TrainingError):
                existing = load_targets(path)
        if existing is not None and existing.info.get("key") == key:
            print(f"targets: reusing {path}", flush=True)
        elif existing is not None and args.resume:
            # The checkpoint was trained on these targets: keep them.
            print(
                f"targets: reusing {path} (made from other inputs or options than given "
                "now; they apply to a new --out only)",
                flush=True,
            )
        else:
            _compute_targets(args, path, key)
    runtime.barrier()
    return load_targets(path)


def _compute_targets(args: PretrainConfig, path: Path, key: str) -> None:
    try:
        listens = read_listens(
            args.listens,
            format=args.format,
            song_table=args.song_table,
            session_gap=args.session_gap,
        )
    except ValueError as exc:
        raise TrainingError(str(exc)) from exc
    print(
        f"listening data: {listens.n_users} users/sessions, {listens.n_tracks} tracks, "
        f"{listens.nnz} user-track pairs",
        flush=True,
    )
    listens, paths = match_audio(listens, audio_dir=args.audio, mapping=args.mapping)
    print(
        f"matched to audio: {listens.n_tracks} tracks, {listens.n_users} users, "
        f"{listens.nnz} pairs",
        flush=True,
    )
    targets = make_targets(
        listens,
        paths,
        factors=args.factors,
        holdout=args.holdout,
        min_plays=args.min_plays,
        min_listeners=args.min_listeners,
        min_user_tracks=args.min_user_tracks,
        seed=args.seed,
        alpha=args.wmf_alpha,
        epsilon=args.wmf_epsilon,
        regularization=args.wmf_regularization,
        iterations=args.wmf_iterations,
    )
    info = targets.info
    info["key"] = key
    print(
        f"WMF: {args.factors} factors, {info['n_users']} users x {info['n_train']} training "
        f"tracks, {info['wmf_seconds']:.1f} s; {info['n_heldout']} tracks held out",
        flush=True,
    )
    save_targets(path, targets)


def _optimizer(model: torch.nn.Module, args: PretrainConfig) -> torch.optim.Optimizer:
    if args.optimizer == "adam":
        lr = 1e-3 if args.lr is None else args.lr
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=args.weight_decay)
    lr = 0.01 if args.lr is None else args.lr
    return torch.optim.SGD(
        model.parameters(),
        lr=lr,
        momentum=args.momentum,
        nesterov=args.momentum > 0,
        weight_decay=args.weight_decay,
    )


def run(args: PretrainConfig | argparse.Namespace) -> dict[str, Any]:
    """Run pretraining as configured (a :class:`PretrainConfig`, or parsed ``args``).

    Returns the final summary.
    """
    args = PretrainConfig.from_args(args)
    _check_args(args)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    runtime = setup_runtime(args.device, timeout_minutes=args.dist_timeout)
    try:
        return _run(args, runtime)
    finally:
        torch.set_num_threads(threads)
        if runtime.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _run(args: PretrainConfig, runtime: Runtime) -> dict[str, Any]:
    out = Path(args.out)
    say = _say if runtime.main else _quiet
    if runtime.main:
        out.mkdir(parents=True, exist_ok=True)
        if not args.resume and (out / CHECKPOINT_FILE).exists():
            raise TrainingError(
                f"{out} already holds a checkpoint; pass --resume to continue it "
                "or choose another --out"
            )
    resuming = args.resume and (out / STATE_FILE).is_file()
    if args.resume and not resuming:
        say(f"--resume: no checkpoint in {out}, starting from scratch")
    runtime.barrier()

    targets = _prepare_targets(args, out, runtime)
    torch.manual_seed(args.seed)
    state: dict[str, Any] | None = None
    if resuming:
        model, state = load_training_state(out)
        say(f"resuming from step {state['progress']['step']} ({model.model_id})")
    else:
        model = DielemanModel(_network_config(args))
    if model.dim != targets.factors.shape[1]:
        raise TrainingError(
            f"the network has {model.dim} outputs but the targets have "
            f"{targets.factors.shape[1]} factors (--factors changed since {TARGETS_FILE}?)"
        )
    say(f"network: {summary(model.config)}")
    say(f"parameters: {sum(p.numel() for p in model.parameters())}")
    source_seconds = args.source_seconds or model.frontend.clip_seconds
    # Not deepsim.pretrain itself: a worker imports it as the main module first.
    context = loader_context(args.workers, preload=_WORKER_PRELOAD)
    cache = None
    if args.cache_mels:
        t0 = time.perf_counter()
        cache = build_cache(
            out / "mels",
            targets.paths,
            frontend=model.frontend,
            seconds=source_seconds,
            rank=runtime.rank,
            world=runtime.world,
            workers=args.workers,
            barrier=runtime.barrier,
            mp_context=context,
        )
        say(
            f"mel cache: {cache.directory} {cache.shape}, {int(cache.ok.sum())} tracks "
            f"({time.perf_counter() - t0:.1f} s)"
        )
    if args.prepare_only:
        say(f"prepared {out}; train with the same options (without --prepare-only)")
        return {"steps": 0}
    trainer = Trainer(
        args,
        runtime,
        model=model,
        targets=targets,
        cache=cache,
        source_seconds=source_seconds,
        state=state,
        mp_context=context,
    )
    last_val = trainer.fit()
    result = trainer.finish(last_val) if runtime.main else {"steps": trainer.step}
    runtime.barrier()
    return result


def _sample_users(targets: Targets, count: int, *, seed: int) -> np.ndarray | None:
    """A fixed random sample of ``count`` users who played a held-out track (``None``: all).

    Ranking every held-out track for every user costs ``users × tracks`` per
    evaluation, far too much for the Taste Profile's million users at every
    epoch; a fixed sample keeps epochs comparable.
    """
    active = np.flatnonzero(
        (np.diff(targets.heldout_plays.indptr) > 0) & np.any(targets.user_factors != 0, axis=1)
    )
    if count == 0 or len(active) <= count:
        return None
    return np.sort(np.random.default_rng(seed).choice(active, size=count, replace=False))


def _say(message: str) -> None:
    print(message, flush=True)


def _quiet(message: str) -> None:
    pass


class Trainer:
    """The training loop of one process (one DDP replica under torchrun).

    Parameters
    ----------
    args
        Parsed command line.
    runtime
        Rank, world size and device.
    model
        The network (fresh, or loaded from the checkpoint when resuming).
    targets
        Tracks, targets and the held-out split.
    cache
        The mel cache, or ``None`` to decode in the loader workers.
    source_seconds
        Middle window decoded per file.
    state
        The training state loaded with the checkpoint when resuming.
    mp_context
        Start method of the loader workers (see :func:`loader_context`).
    """

    #: Steps left out of the throughput figure (start-up, first allocations).
    WARMUP = 2

    def __init__(
        self,
        args: PretrainConfig,
        runtime: Runtime,
        *,
        model: DielemanModel,
        targets: Targets,
        cache: MelCache | None,
        source_seconds: float,
        state: dict[str, Any] | None,
        mp_context: Any,
    ) -> None:
        self.args = args
        self.runtime = runtime
        self.out = Path(args.out)
        self.model = model
        self.targets = targets
        self.say = _say if runtime.main else _quiet
        ok = cache.ok if cache is not None else np.ones(len(targets.paths), dtype=bool)
        common: dict[str, Any] = {
            "paths": targets.paths,
            "factors": targets.factors,
            "frontend": model.frontend,
            "patch_frames": model.patch_frames,
            "source_seconds": source_seconds,
            "cache": cache,
        }
        self.train_set = ClipDataset(np.flatnonzero(~targets.heldout & ok), train=True, **common)
        self.held_set = ClipDataset(np.flatnonzero(targets.heldout & ok), train=False, **common)
        self._common, self._ok, self._mp_context = common, ok, mp_context

        model.to(runtime.device)
        self.ddp: torch.nn.Module = model
        if runtime.distributed:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[runtime.local_rank] if runtime.device.type == "cuda" else None
            )
        if runtime.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.optimizer = _optimizer(model, args)
        self.amp = args.amp and runtime.device.type == "cuda"
        if args.amp and not self.amp:
            self.say("--amp: mixed precision applies to CUDA only; training in float32")
        self.use_scaler = self.amp and not torch.cuda.is_bf16_supported()
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=self.use_scaler)

        self.sampler = _EpochSampler(
            DistributedSampler(
                self.train_set,
                num_replicas=runtime.world,
                rank=runtime.rank,
                shuffle=True,
                seed=args.seed,
                drop_last=True,
            )
        )
        self.steps_per_epoch = len(self.sampler.inner) // args.batch_size
        if self.steps_per_epoch == 0:
            raise TrainingError(
                f"{len(self.train_set)} training tracks over {runtime.world} process(es) are "
                f"fewer than one batch of {args.batch_size}; lower --batch-size"
            )
        workers = args.workers
        self.loader = DataLoader(
            self.train_set,
            batch_size=args.batch_size,
            sampler=self.sampler,
            num_workers=workers,
            drop_last=True,
            pin_memory=runtime.device.type == "cuda",
            worker_init_fn=_worker_init if workers else None,
            generator=torch.Generator().manual_seed(args.seed * 1_000_003 + runtime.rank),
            persistent_workers=workers > 0,
            multiprocessing_context=mp_context,
        )
        self.held_loader = DataLoader(
            self.held_set,
            batch_size=args.batch_size,
            sampler=DistributedSampler(
                self.held_set,
                num_replicas=runtime.world,
                rank=runtime.rank,
                shuffle=False,
                drop_last=False,
            ),
            num_workers=min(workers, 1),
            worker_init_fn=_worker_init if workers else None,
            persistent_workers=workers > 0,
            multiprocessing_context=mp_context,
        )

        self.eval_users = _sample_users(targets, args.eval_users, seed=args.seed)
        self.step = self.epoch = self.batch = 0
        if state is not None:
            self._restore(state)
        self.first_step = self.step
        self.total_steps = self.steps_per_epoch * args.epochs
        if args.max_steps:
            self.total_steps = min(self.total_steps, args.max_steps)
        self.run_args = {
            **{
                k: v
                for k, v in args.as_dict().items()
                if isinstance(v, (int, float, str, bool, list))
            },
            "world": runtime.world,
        }
        self.timed_steps = 0
        self.timed_seconds = 0.0
        self.data_seconds = 0.0
        self.say(
            f"training: {len(self.train_set)} tracks, {len(self.held_set)} held out; "
            f"{runtime.world} process(es) x batch {args.batch_size}; {self.steps_per_epoch} "
            f"steps/epoch; {self.total_steps} steps in all; device {runtime.device}"
            + ("; cached log-mels" if cache is not None else "; decoding in workers")
        )

    def _restore(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.use_scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        progress = {k: int(v) for k, v in state["progress"].items()}
        self.step, self.epoch, self.batch = progress["step"], progress["epoch"], progress["batch"]
        old = json.loads(state.get("args", "{}"))
        old_world = int(old.get("world", self.runtime.world))
        old_batch = int(old.get("batch_size", self.args.batch_size))
        if (old_world, old_batch) != (self.runtime.world, self.args.batch_size):
            # Keep the position within the epoch, counted in samples.
            seen = self.batch * old_batch * old_world
            self.batch = seen // (self.args.batch_size * self.runtime.world)

    @property
    def progress(self) -> dict[str, int]:
        return {"step": self.step, "epoch": self.epoch, "batch": self.batch}

    def train_step(self, mel: torch.Tensor, target: torch.Tensor) -> float:
        """One optimisation step on a batch; returns its loss."""
        device = self.runtime.device
        mel = mel.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with _autocast(device, self.amp):
            pred = self.ddp(mel)
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingError(f"the loss became {value} at step {self.step + 1}; lower --lr")
        return value

    def samples_per_second(self) -> float:
        if self.timed_seconds <= 0:
            return float("nan")
        return self.timed_steps * self.args.batch_size * self.runtime.world / self.timed_seconds

    def _log(self, losses: list[float]) -> None:
        mean_loss = sum(losses) / len(losses)
        if self.runtime.distributed:
            t = torch.tensor([mean_loss], device=self.runtime.device)
            dist.all_reduce(t)
            mean_loss = float(t) / self.runtime.world
        self.say(
            f"step {self.step}/{self.total_steps} epoch {self.epoch + 1} loss {mean_loss:.5f} "
            f"{self.samples_per_second():.1f} samples/s"
        )

    def _profile_loader(self) -> DataLoader:
        """Centred crops of the held-out tracks and of the training tracks the evaluated
        users played (for :func:`untrained_profile`), split over the ranks."""
        targets = self.targets
        train_cols = np.flatnonzero(~targets.heldout)
        plays = (
            targets.train_plays if self.eval_users is None else targets.train_plays[self.eval_users]
        )
        played = train_cols[np.diff(plays.tocsc().indptr) > 0]
        tracks = np.union1d(np.flatnonzero(targets.heldout), played)
        dataset = ClipDataset(tracks[self._ok[tracks]], train=False, **self._common)
        workers = self.args.workers
        return DataLoader(
            dataset,
            batch_size=self.args.batch_size,
            sampler=DistributedSampler(
                dataset,
                num_replicas=self.runtime.world,
                rank=self.runtime.rank,
                shuffle=False,
                drop_last=False,
            ),
            num_workers=min(workers, 1),
            worker_init_fn=_worker_init if workers else None,
            multiprocessing_context=self._mp_context,
        )

    def checkpoint(self) -> None:
        """Save model and training state (rank 0)."""
        if self.runtime.main:
            model_id = save_training_state(
                self.out,
                self.model,
                optimizer=self.optimizer,
                scaler=self.scaler,
                progress=self.progress,
                args=self.run_args,
            )
            self.say(f"checkpoint at step {self.step}: {self.out / CHECKPOINT_FILE} ({model_id})")

    def fit(self) -> Validation | None:
        """Train up to ``--epochs``/``--max-steps``; validate after every epoch."""
        args = self.args
        last_val: Validation | None = None
        losses: list[float] = []
        untrained: Validation | None = None
        profile: MetricRow | None = None
        if self.step == 0:
            # The honest baselines: the same network before any training step, ranking by
            # x_u · output and as a content-based recommender.
            untrained = validate(
                self.model,
                self.held_loader,
                self.targets,
                runtime=self.runtime,
                amp=self.amp,
                users=self.eval_users,
            )
            profile = untrained_profile(
                self.model,
                self._profile_loader(),
                self.targets,
                runtime=self.runtime,
                amp=self.amp,
                users=self.eval_users,
            )
        self.ddp.train()
        while self.step < self.total_steps and self.epoch < args.epochs:
            self.sampler.start_epoch(self.epoch, skip=self.batch * args.batch_size)
            t_wait = time.perf_counter()
            for mel, target, _index, _ok in self.loader:
                t_start = time.perf_counter()
                losses.append(self.train_step(mel, target))
                self.step += 1
                self.batch += 1
                if self.step > self.first_step + self.WARMUP:
                    self.timed_steps += 1
                    self.timed_seconds += time.perf_counter() - t_wait
                    self.data_seconds += t_start - t_wait
                if self.step % args.log_every == 0 or self.step == self.total_steps:
                    self._log(losses)
                    losses = []
                if self.step % args.steps_per_checkpoint == 0:
                    self.checkpoint()
                if self.step >= self.total_steps:
                    break
                t_wait = time.perf_counter()
            finished_epoch = self.batch >= self.steps_per_epoch
            epoch_number = self.epoch + 1
            if finished_epoch and self.step < self.total_steps:
                self.epoch, self.batch = self.epoch + 1, 0
            if finished_epoch or self.step >= self.total_steps:
                val = validate(
                    self.model,
                    self.held_loader,
                    self.targets,
                    runtime=self.runtime,
                    amp=self.amp,
                    users=self.eval_users,
                )
                if val is not None:
                    val = _with_untrained(val, untrained, profile)
                    last_val = val
                    self.say(val.line(epoch_number))
        return last_val

    def finish(self, last_val: Validation | None) -> dict[str, Any]:
        """Save the final checkpoint and model, print and return the summary (rank 0)."""
        if self.step % self.args.steps_per_checkpoint != 0:
            self.checkpoint()
        final = self.model.save(self.out / FINAL_FILE)
        rate = self.samples_per_second()
        result: dict[str, Any] = {
            "steps": self.step,
            "model": os.fspath(final),
            "model_id": self.model.model_id,
            "samples_per_second": rate if math.isfinite(rate) else None,
            "seconds_per_step": self.timed_seconds / self.timed_steps if self.timed_steps else None,
            "data_wait_fraction": (
                self.data_seconds / self.timed_seconds if self.timed_seconds else None
            ),
            "world": self.runtime.world,
            "batch_size": self.args.batch_size,
            "device": str(self.runtime.device),
            "validation": last_val.as_dict() if last_val is not None else None,
        }
        tmp = self.out / (METRICS_FILE + ".tmp")
        tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
        os.replace(tmp, self.out / METRICS_FILE)
        if last_val is not None:
            for line in last_val.lines():
                _say(line)
        _say(f"model: {final} ({self.model.model_id})")
        if self.timed_steps:
            n = len(self.train_set)
            _say(
                f"throughput: {rate:.1f} samples/s ({result['seconds_per_step']:.3f} s/step, "
                f"batch {self.args.batch_size} x {self.runtime.world} process(es) on "
                f"{self.runtime.device}; {100 * result['data_wait_fraction']:.0f}% of it waiting "
                f"for data); one epoch of {n} tracks takes {_duration(n / rate)}"
            )
        return result


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m deepsim.pretrain``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except DeepsimError as exc:
        _err(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        _err("interrupted; the last checkpoint is kept (continue with --resume)")
        return 130
    return 0


if __name__ == "__main__":
    # Run the function of the imported module, not of ``__main__``, so that objects
    # sent to loader workers pickle as ``deepsim.pretrain.*`` under any start method.
    from deepsim.pretrain import main as _main

    sys.exit(_main())
