"""Small utilities shared by every module: parameter checks, atomic writes,
device resolution, short-clip looping and the library's logger.

One way to do each of these things; new code uses them instead of writing its
own.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from deepsim.errors import ParameterError

if TYPE_CHECKING:
    import torch

__all__ = [
    "atomic_write",
    "check_choice",
    "check_float",
    "check_int",
    "get_logger",
    "import_torch",
    "loop_to_length",
    "resolve_device",
]

LOGGER_NAME = "deepsim"


def get_logger(name: str) -> logging.Logger:
    """The logger of a library module (``getLogger(__name__)`` under ``deepsim``).

    The plugin routes the ``deepsim`` logger into beets' log; outside beets it
    behaves as any stdlib logger (silent unless the application configures it).
    """
    if name != LOGGER_NAME and not name.startswith(LOGGER_NAME + "."):
        name = f"{LOGGER_NAME}.{name}"
    return logging.getLogger(name)


# --------------------------------------------------------------------------------------------
# Parameter checks (raise ParameterError naming the parameter, the rule and the value)


def check_int(
    name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    """``value`` as an int within ``[minimum, maximum]``; bools and floats are refused."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if ok:
        number = int(value)
        ok = (minimum is None or number >= minimum) and (maximum is None or number <= maximum)
    if not ok:
        raise ParameterError(f"{name} must be {_int_rule(minimum, maximum)}, got {value!r}")
    return int(value)


def _int_rule(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f"an integer in [{minimum}, {maximum}]"
    if minimum is not None:
        return f"an integer >= {minimum}"
    if maximum is not None:
        return f"an integer <= {maximum}"
    return "an integer"


def check_float(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite float within the interval; bools and strings are refused."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )
    number = float(value) if ok else math.nan
    ok = ok and math.isfinite(number)
    if ok and low is not None:
        ok = number > low if low_open else number >= low
    if ok and high is not None:
        ok = number < high if high_open else number <= high
    if not ok:
        lo = "(-inf" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "inf)" if high is None else f"{high:g}" + (")" if high_open else "]")
        raise ParameterError(f"{name} must be a number in {lo}, {hi}, got {value!r}")
    return number


def check_choice(name: str, value: Any, choices: tuple[str, ...] | list[str]) -> str:
    """``value`` if it is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ParameterError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# Atomic writes


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike[str], mode: str = "wb", *, perms: int = 0o644
) -> Iterator[IO[Any]]:
    """Write ``path`` through a unique temporary file beside it and :func:`os.replace`.

    Readers see the old file or the new one, never a half-written one; an
    exception (Ctrl-C included) inside the block removes the temporary file and
    leaves any previous ``path`` untouched.  The file gets ``perms`` less the
    umask (a temporary from :func:`tempfile.mkstemp` would be 0600).

    Examples
    --------
    >>> with atomic_write(path, "w") as handle:  # doctest: +SKIP
    ...     handle.write(text)
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, perms)
    try:
        if "b" in mode:
            handle: IO[Any] = os.fdopen(fd, mode)
        else:
            handle = os.fdopen(fd, mode, encoding="utf-8", newline="")
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_temp_path(path: str | os.PathLike[str]) -> Path:
    """A unique temporary path beside ``path``, for writers that need a file name
    (``np.savez``, ``safetensors.save_file``, Annoy's ``save``).  Move it into
    place with :func:`os.replace`; remove it on failure."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


# --------------------------------------------------------------------------------------------
# Devices


def import_torch() -> None:
    """Import torch, the first time, with Python's cyclic garbage collector paused, then
    move every object alive (torch's modules, about 170k tracked objects) out of its
    view (:func:`gc.freeze`).

    Those objects live as long as the process; left in view, each full collection walks
    them all: during the import itself, and once more when the interpreter exits —
    measured on a 2-core machine, a process that imports torch took 0.35–0.5 s longer
    to exit than its import's end, and 0.15–0.2 s with them frozen; the import itself
    0.1 s less (``docs/performance.md``).  Objects frozen here are still freed when
    their last reference goes; only a reference cycle among them would stay until exit.
    Called by :func:`resolve_device` and :func:`deepsim.models.load_model`, which come
    first on the way to a model; a no-op once torch is imported.
    """
    if "torch" in sys.modules:
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        import torch  # noqa: F401
    finally:
        if enabled:
            gc.enable()
    gc.freeze()


def resolve_device(device: str) -> str:
    """Turn ``auto|cpu|cuda|cuda:N|mps`` into a torch device string (imports torch).

    ``auto`` picks CUDA when available, then MPS, else the CPU.

    Raises
    ------
    ParameterError
        An unknown name, or an accelerator that this machine does not have.
    """
    import_torch()
    import torch

    if not isinstance(device, str):
        raise ParameterError(f"device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")
    mps = getattr(torch.backends, "mps", None)
    has_mps = mps is not None and mps.is_available()
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if has_mps else "cpu"
    if device == "cpu":
        return device
    if device == "mps":
        if not has_mps:
            raise ParameterError("device 'mps' requested but MPS is not available")
        return device
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ParameterError(f"device {device!r} requested but CUDA is not available")
        return device
    raise ParameterError(f"device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")


# --------------------------------------------------------------------------------------------
# Short clips


def loop_to_length(frames: torch.Tensor | np.ndarray, length: int) -> Any:
    """Tile ``frames`` along its first axis until it has at least ``length`` rows,
    then cut to exactly ``length`` rows if it was shorter.

    A clip shorter than a model's patch is described by its own sound repeated,
    not by padding.  Arrays at least ``length`` long are returned unchanged.
    Works on numpy arrays and torch tensors alike.
    """
    n = frames.shape[0]
    if n == 0:
        raise ParameterError("cannot loop an empty clip")
    if n >= length:
        return frames
    reps = -(-length // n)
    if isinstance(frames, np.ndarray):
        return np.concatenate([frames] * reps, axis=0)[:length]
    return frames.repeat(reps, *([1] * (frames.dim() - 1)))[:length]


def worker_context(preload: str) -> Any:
    """The multiprocessing context of deepsim's worker pools.

    Forked from this process itself where that is safe (Linux, one Python thread,
    torch not imported: no OpenMP runtime or other native threads to copy): the
    workers start at once with every module this process has loaded, with no
    interpreter of their own to start (multiprocessing flushes standard output and
    error before it forks, so a child never writes them again).  Else a forkserver that
    imports ``preload`` (a module name) once, each worker forked from it ready
    (spawn where there is no fork)."""
    import multiprocessing

    if os.name != "posix":
        return multiprocessing.get_context("spawn")
    from deepsim.threads import can_fork

    if can_fork() and "torch" not in sys.modules:
        return multiprocessing.get_context("fork")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([preload])
    return context


def worker_started() -> None:
    """The initializer of every deepsim worker process.

    Ctrl-C is the parent's to handle (it stops the pool), so the worker ignores it.  And
    the worker ends with the process that started the pool: a pool's workers wait on that
    process's queue, which a killed process (``SIGKILL``, the OOM killer) never closes, and
    a worker forked from ``beet`` holds copies of its files, the embedding lock's among
    them, so a worker left behind would hold the lock for good.  A thread of the worker
    waits for that process to end (a pidfd on Linux, else a check each second) and then
    ends the worker.
    """
    import multiprocessing
    import signal
    import threading

    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid is not None:
        threading.Thread(
            target=_end_with, args=(parent.pid,), name="deepsim-parent-watch", daemon=True
        ).start()


def _end_with(pid: int) -> None:
    """End this process (at once, status 1) when process ``pid`` has ended."""
    import select
    import time

    try:
        handle = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)  # gone already
    except (AttributeError, OSError):  # no pidfd here (not Linux, an old kernel)
        while True:
            time.sleep(1.0)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except OSError:
                pass
    select.select([handle], [], [])  # readable once the process has ended
    os._exit(1)
