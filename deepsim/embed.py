"""The embedding pipeline: decode in worker processes, infer in batches.

``embed_files`` yields one :class:`EmbedOutcome` per input path, in input
order, whatever happens to the file: a decoding failure comes back as an
:class:`~deepsim.errors.AudioError` value, never as an exception that stops
the run.

``plan_embedding`` + ``embed_items`` are the one "embed these items with this
model and store them" routine (``beet deepsim-embed``, the import hook,
training): which items need work (no vector, a damaged one, changed audio;
not an unchanged file that failed before), a head applied to stored backbone
vectors where it can be, the rest from audio, vectors stored through
:mod:`deepsim.store` with the audio identity of their file, failures
remembered, a summary.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from stat import S_ISREG
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from deepsim import store, threads
from deepsim.errors import AudioError
from deepsim.identity import AudioIdentity, compare, stat_identity
from deepsim.util import check_int, get_logger

if TYPE_CHECKING:
    from beets.library import Library

    from deepsim.audio import PathLike
    from deepsim.decoders import Decoding
    from deepsim.frontend import FrontendParams
    from deepsim.models.base import Model

log = get_logger(__name__)


def decoded_files(
    paths: Sequence[PathLike], *, sample_rate: int, seconds: float, workers: int, window: int
) -> Decoding:
    """:func:`deepsim.decoders.decoded` (started), imported when first used.

    PyAV (and the decoding workers' module) load only when something is
    decoded, so a run with nothing to embed never imports them.
    """
    from deepsim.decoders import decoded

    return decoded(paths, sample_rate=sample_rate, seconds=seconds, workers=workers, window=window)


def _window(batch_size: int, workers: int) -> int:
    """Files decoded ahead: two batches, at least two per worker."""
    return max(2 * batch_size, 2 * max(workers, 1))


def start_decoding(
    paths: Sequence[PathLike], frontend: FrontendParams, *, workers: int, batch_size: int = 8
) -> Decoding:
    """The decoding :func:`embed_files` would do for a model with this front end, started
    now (pass it as ``decoding``): the workers decode while the caller loads the model."""
    return decoded_files(
        paths,
        sample_rate=frontend.sample_rate,
        seconds=frontend.clip_seconds,
        workers=workers,
        window=_window(batch_size, workers),
    )


def _close(decoding: object) -> None:
    close = getattr(decoding, "close", None)  # a test may hand a plain generator
    if close is not None:
        close()


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
    audio: str | None = None  # the file's AudioIdentity text, taken beside the decoding


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


def embed_files(
    paths: Sequence[PathLike],
    model: Model,
    *,
    workers: int | None = None,
    batch_size: int = 8,
    decoding: Decoding | None = None,
) -> Generator[EmbedOutcome, None, None]:
    """Embed audio files with ``model``, yielding outcomes in input order.

    Parameters
    ----------
    paths
        Audio files.
    model
        A loaded :class:`~deepsim.models.base.Model`, already on its device.
    workers
        Decoding processes; ``None``: the thread budget's share
        (:func:`deepsim.threads.plan`); ``0`` decodes in this process.
        Inference runs on every usable core beside them.
    batch_size
        Most tracks per inference batch.  A batch runs as soon as it is full
        or the next file is not decoded yet, so inference never waits for
        decoding while it has something to do.
    decoding
        The decoding of ``paths`` already started by :func:`start_decoding`
        with the same ``workers`` and ``batch_size`` and this model's front end
        (decoded while the model loaded); ``None``: started here.

    Yields
    ------
    EmbedOutcome
        One per path, in order.
    """
    if workers is None:
        workers = threads.plan(None, device=model.device.type)[0]
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers!r}")
    threads.apply(workers, device=model.device.type, parts=model.parallel_parts)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size!r}")
    params = model.frontend
    batch: list[tuple[int, np.ndarray]] = []
    audio: dict[int, str | None] = {}
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
            error = AudioError(paths[index], f"model failed ({exc})")
            ready.append(EmbedOutcome(index, paths[index], error=error, audio=audio.pop(index)))
            batch.clear()
            return
        for row, (index, _) in enumerate(batch):
            tags = None if result.tags is None else result.tags[row]
            ready.append(
                EmbedOutcome(
                    index,
                    paths[index],
                    vector=result.vectors[row],
                    tags=tags,
                    audio=audio.pop(index),
                )
            )
        batch.clear()

    decoded = decoding
    if decoded is not None and (decoded.sample_rate, decoded.seconds) != (
        params.sample_rate,
        params.clip_seconds,
    ):  # started for another front end: start again
        decoded.close()
        decoded = None
    if decoded is None:
        decoded = start_decoding(paths, params, workers=workers, batch_size=batch_size)
    try:
        next_index = 0
        # Where the time goes (logged at the end, ``beet -v``): waiting for decoded
        # audio, inference, and the caller's work between outcomes (storing them).
        spent = {"waiting for audio": 0.0, "inference": 0.0, "storing": 0.0}
        started = mark = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal mark
            now = time.perf_counter()
            spent[stage] += now - mark
            mark = now

        for index, ((wave, ident), next_ready) in enumerate(decoded):
            lap("waiting for audio")
            if isinstance(wave, AudioError):
                ready.append(EmbedOutcome(index, paths[index], error=wave, audio=ident))
            else:
                audio[index] = ident
                batch.append((index, wave))
                if len(batch) >= batch_size or not next_ready:
                    run_batch()
                    lap("inference")
            # Emit, in order, everything that is complete.
            ready.sort(key=lambda o: o.index)
            while ready and ready[0].index == next_index and not _in_batch(batch, next_index):
                yield ready.pop(0)
                next_index += 1
            lap("storing")
        run_batch()
        lap("inference")
        ready.sort(key=lambda o: o.index)
        yield from ready
        lap("storing")
        total = time.perf_counter() - started
        log.debug(
            "%d tracks in %.2f s: %s",
            len(paths),
            total,
            ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in spent.items()),
        )
    finally:
        _close(decoded)


def _in_batch(batch: list[tuple[int, np.ndarray]], index: int) -> bool:
    return any(i == index for i, _ in batch)


# --------------------------------------------------------------------------------------------
# Items in, vectors stored: the one routine behind `beet deepsim-embed`, import and training


@dataclass
class EmbedPlan:
    """What :func:`plan_embedding` found: the ids to embed and why the others are left."""

    model_id: str
    todo: list[int] = field(default_factory=list)
    paths: dict[int, bytes] = field(default_factory=dict)
    done: int = 0  # a vector of the model for the same audio
    stale: int = 0  # in ``todo``: the audio changed since its vector was computed
    failed_before: int = 0  # the unchanged file failed before (``retry_failed`` retries)
    missing: list[tuple[int, str]] = field(default_factory=list)  # (id, path) not on disk
    retagged: dict[int, str] = field(default_factory=dict)  # new identities to record


@dataclass
class EmbedSummary:
    """What :func:`embed_items` did (``seconds``: the embedding itself, not model loading)."""

    plan: EmbedPlan
    model_id: str
    embedded: int = 0
    from_stored: int = 0
    failures: list[tuple[int, str, str]] = field(default_factory=list)  # (id, path, reason)
    interrupted: bool = False
    seconds: float = 0.0  # from the start of decoding (model loaded) to the last track
    timed: int = 0  # tracks finished in ``seconds``

    @property
    def rate(self) -> float | None:
        """Tracks per second from audio, or None when too few tracks to say."""
        if self.timed == 0 or self.seconds <= 0:
            return None
        return self.timed / self.seconds

    @property
    def remaining(self) -> int:
        return len(self.plan.todo) - self.embedded - self.from_stored - len(self.failures)


def _failure_text(path: bytes | str, reason: str) -> str:
    ident = stat_identity(path)
    return f"{ident.size}:{ident.mtime_ns}:{reason}" if ident else f"::{reason}"


def _failed_unchanged(failed: str | None, ident: AudioIdentity) -> bool:
    """Whether the recorded failure ``size:mtime_ns:reason`` is of the file as it is now."""
    return bool(failed) and str(failed).startswith(f"{ident.size}:{ident.mtime_ns}:")


#: Below this many items :func:`plan_embedding` decides in this process alone (a forked
#: child costs a few milliseconds; 10,000 tracks are decided in about 0.1 s).
SPLIT_MIN_ITEMS = 10_000


def plan_embedding(
    lib: Library,
    model_id: str,
    ids: Iterable[int] | None = None,
    *,
    force: bool = False,
    retry_failed: bool = False,
    processes: int | None = None,
) -> EmbedPlan:
    """Which of the items (all, or ``ids``) need a ``model_id`` vector computed.

    The store answers from SQL, one query per batch of ids
    (:func:`deepsim.store.current_audio_batches`: each item's path and the
    recorded identity of its vector of the model, read from indexes alone;
    memory flat in library size, no vector value read, no ``Item`` objects,
    no torch), then one ``stat`` per file decides the common case (a vector
    of the same file); the rest are decided from their full state
    (:func:`deepsim.store.embed_states`).  An item needs work when it has no vector of the model
    or its audio changed (see :mod:`deepsim.identity`: the packet digest is
    taken only for a file whose size or mtime moved); a retagged file keeps
    its vector (its new identity is recorded by :func:`embed_items`); a file
    that failed before and has not changed is left alone unless
    ``retry_failed``; a file missing on disk is listed, never embedded.
    ``force`` recomputes every present file (and so repairs a damaged value,
    which the readers name: see :func:`deepsim.store.read_stored`).

    ``processes``: the common case of a large library (:data:`SPLIT_MIN_ITEMS`
    items or more) is decided in that many runs of ids side by side, one here and
    the others in forked child processes, each reading the database through a
    connection of its own (:func:`deepsim.threads.in_processes`; the time is one
    ``stat`` and one SQL row per track, under the GIL: threads would take turns).
    ``None``: every usable core, at most 4; 1: here alone (and always inside a
    transaction of ``lib`` in this thread).  The plan is the same.
    """
    plan = EmbedPlan(model_id)
    if processes is None:
        processes = min(threads.usable_cores(), 4)
    processes = check_int("processes", processes, minimum=1)
    if store.in_transaction(lib):
        processes = 1  # a forked child would read beside this process's locks
    parts = store.split_items(lib, ids, processes, min_items=SPLIT_MIN_ITEMS)

    def common(part: store.ItemRun, child: bool) -> tuple[int, dict[int, os.stat_result | None]]:
        return _common_case(lib, model_id, part, force=force, own_connection=child)

    for done, rest in threads.in_processes(common, parts):
        plan.done += done
        if rest:  # every other case, from the full state of those items alone
            for state in store.embed_states(lib, model_id, rest):
                _plan_one(plan, state, rest[state.item_id], force=force, retry_failed=retry_failed)
    return plan


def _common_case(
    lib: Library,
    model_id: str,
    part: store.ItemRun,
    *,
    force: bool,
    own_connection: bool,
) -> tuple[int, dict[int, os.stat_result | None]]:
    """How many items of ``part`` (see :func:`deepsim.store.split_items`) hold a vector
    of the model for the file as it is (one ``stat`` each), and the ``stat`` of the others."""
    ids, start, stop = part
    done = 0
    rest: dict[int, os.stat_result | None] = {}
    stat = os.stat
    for rows in store.current_audio_batches(
        lib, model_id, ids, start=start, stop=stop, own_connection=own_connection
    ):
        for item_id, path, audio in rows:
            try:  # stat_identity, inlined: this runs once per track of the library
                st = stat(path) if path else None
            except (OSError, ValueError):
                st = None
            if (
                audio is not None
                and st is not None
                and not force
                and audio.startswith(f"{st.st_size}:{st.st_mtime_ns}:")
                and S_ISREG(st.st_mode)
            ):
                done += 1  # the common case: a vector of the same file, one stat
            else:
                rest[item_id] = st
    return done, rest


def _plan_one(
    plan: EmbedPlan,
    state: store.ItemState,
    st: os.stat_result | None,
    *,
    force: bool,
    retry_failed: bool,
) -> None:
    """Every case but the common one (see :func:`plan_embedding`), given the file's ``stat``."""
    path = state.path
    if not path:
        plan.missing.append((state.item_id, ""))
        return
    if st is None or not S_ISREG(st.st_mode):
        plan.missing.append((state.item_id, os.fsdecode(path)))
        return
    current = AudioIdentity(st.st_size, st.st_mtime_ns)
    if state.vector:
        audio = state.audio
        if audio is not None and audio.startswith(f"{st.st_size}:{st.st_mtime_ns}:"):
            change = "same"
        else:
            change, now = compare(AudioIdentity.parse(audio), path)
            if change == "missing":
                plan.missing.append((state.item_id, os.fsdecode(path)))
                return
            if now is not None and now.text != audio and change != "changed":
                plan.retagged[state.item_id] = now.text
        if change == "changed":
            if not (force or retry_failed) and _failed_unchanged(state.failed, current):
                plan.failed_before += 1  # the new audio failed: not every run again
                return
            plan.stale += 1
        elif not force:
            plan.done += 1
            return
        plan.retagged.pop(state.item_id, None)
    elif not (force or retry_failed) and _failed_unchanged(state.failed, current):
        plan.failed_before += 1
        return
    plan.todo.append(state.item_id)
    plan.paths[state.item_id] = path


def _head_of(model: Model) -> Any:
    """The model if it is a head on a frozen backbone (computable from stored vectors)."""
    if hasattr(model, "apply_to_vectors") and not getattr(model, "finetune", True):
        return model
    return None


def _from_stored_backbone(
    lib: Library, head: Any, plan: EmbedPlan, todo: list[int], *, commit_every: int
) -> list[int]:
    """Give ``todo`` items with a stored, current backbone vector the head's; return the rest."""
    backbone_id = head.config["backbone_id"]
    stored = store.read_stored(lib, backbone_id, ids=todo)
    usable: list[int] = []
    rows: list[int] = []
    for k, (item_id, audio) in enumerate(zip(stored.ids.tolist(), stored.audio, strict=True)):
        change, _ = compare(AudioIdentity.parse(audio), plan.paths[item_id])
        if change in ("same", "retagged"):
            usable.append(item_id)
            rows.append(k)
    if usable:
        vectors = head.apply_to_vectors(stored.matrix[rows])
        audios = [stored.audio[k] for k in rows]
        store.write_records(
            lib,
            (
                store.VectorRecord(i, head.model_id, v, audio=a)
                for i, v, a in zip(usable, vectors, audios, strict=True)
            ),
            batch_size=commit_every,
        )
        log.info("%d track(s) embedded from stored %s vectors", len(usable), backbone_id)
    done = set(usable)
    return [i for i in todo if i not in done]


def embed_items(
    lib: Library,
    plan: EmbedPlan,
    model: Model | Callable[[], Model],
    *,
    force: bool = False,
    workers: int | None = None,
    batch_size: int = 8,
    commit_every: int = 32,
    tag_text: Callable[[Sequence[str], np.ndarray], str] | None = None,
    on_progress: Callable[[int, int, float | None], None] | None = None,
    frontend: FrontendParams | None = None,
) -> EmbedSummary:
    """Embed the items of ``plan`` with ``model`` and store their vectors.

    Parameters
    ----------
    plan
        From :func:`plan_embedding` (under the embedding lock, see :mod:`deepsim.lock`).
    model
        A loaded model, or a function that loads it (called only when there is
        work, so a run with nothing to do never imports torch).
    force
        A head on a frozen backbone recomputes its backbone from audio too.
    tag_text
        Turns ``(tag names, probabilities)`` into the text stored as the
        track's tags; None stores none.
    on_progress
        Called with ``(done, total, tracks per second)`` after each track from
        audio; the rate counts from the start of decoding, after the model is
        loaded, so loading is not in it.
    frontend
        The front end of the model ``model`` loads, when known before loading
        it (a built-in model, with ``workers`` given): the decoding workers then
        start first and decode while the model loads.  Checked once it is
        loaded (another front end: decoding starts again).

    Returns
    -------
    EmbedSummary
        Counts, per-file failures (also recorded in the store with the
        file's identity, and logged one line each) and whether Ctrl-C
        stopped the run (everything finished before it is stored).
    """
    if plan.retagged:
        store.write_audio(lib, plan.model_id, plan.retagged)
    summary = EmbedSummary(plan, plan.model_id)
    todo = list(plan.todo)
    if not todo:
        return summary
    early = None
    if callable(model) and not hasattr(model, "embed"):
        if frontend is not None and workers is not None:
            early = start_decoding(
                [plan.paths[i] for i in todo], frontend, workers=workers, batch_size=batch_size
            )
        try:
            loaded = model()
        except BaseException:
            _close(early)
            raise
    else:
        loaded = cast("Model", model)
    head = _head_of(loaded)
    summary.model_id = (head or loaded).model_id
    network = loaded
    if head is not None:
        if not force:
            before = len(todo)
            todo = _from_stored_backbone(lib, head, plan, todo, commit_every=commit_every)
            summary.from_stored = before - len(todo)
        network = head.backbone
    if early is not None and (head is not None or not todo):
        early.close()  # started for other files
        early = None
    if not todo:
        return summary
    paths = [plan.paths[i] for i in todo]
    tag_names = list(getattr(network, "tag_names", None) or [])
    failures: list[tuple[int, str]] = []
    clock: dict[str, float] = {}

    def records() -> Iterator[store.VectorRecord]:
        clock["start"] = time.monotonic()  # the model is loaded: loading is not in the rate
        outcomes = embed_files(
            paths, network, workers=workers, batch_size=batch_size, decoding=early
        )
        try:
            for done, outcome in enumerate(outcomes, start=1):
                item_id = todo[outcome.index]
                if outcome.error is not None:
                    reason = outcome.error.reason
                    summary.failures.append((item_id, outcome.error.path, reason))
                    failures.append((item_id, _failure_text(paths[outcome.index], reason)))
                    log.error("%s", outcome.error)
                else:
                    assert outcome.vector is not None
                    tags = None
                    if tag_text is not None and tag_names and outcome.tags is not None:
                        tags = tag_text(tag_names, outcome.tags)
                    if head is not None:
                        vector = head.apply_to_vectors(outcome.vector[None])[0]
                        yield store.VectorRecord(
                            item_id, head.model_id, vector, audio=outcome.audio, tags=tags
                        )
                    yield store.VectorRecord(
                        item_id, network.model_id, outcome.vector, audio=outcome.audio, tags=tags
                    )
                    summary.embedded += 1
                now = time.monotonic()
                clock["last"], clock["done"] = now, done
                elapsed = now - clock["start"]
                rate = done / elapsed if elapsed > 0 else None
                if on_progress is not None:
                    on_progress(done, len(todo), rate)
        except KeyboardInterrupt:
            summary.interrupted = True
        finally:
            outcomes.close()

    try:
        store.write_records(lib, records(), batch_size=commit_every)
    finally:
        _close(early)
        if failures:
            store.record_failures(lib, failures)
        if "last" in clock:
            summary.seconds = clock["last"] - clock["start"]
            summary.timed = int(clock["done"])
    return summary
