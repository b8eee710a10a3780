"""An advisory lock between deepsim processes (``fcntl.flock`` on a file in the state dir).

``beet deepsim-embed`` holds ``<state dir>/embed.lock`` while it decides what
to embed and embeds it; a second one waits for it and then finds that the
work is done, so the same track is never embedded twice at once.  An
import's auto-embed does not wait (an import must not hang behind an hour of
embedding): it leaves its tracks to the next ``beet deepsim-embed`` and says
so.  The lock is released when the process ends, however it ends.  Where
``flock`` does not exist (Windows), the lock is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]

EMBED_LOCK = "embed.lock"


class Busy(Exception):
    """The lock is held by another process (``holder``: what it wrote, e.g. its pid)."""

    def __init__(self, path: Path, holder: str) -> None:
        self.path = path
        self.holder = holder
        super().__init__(f"{path}: held by {holder or 'another process'}")


def _holder(handle: object) -> str:
    with contextlib.suppress(OSError, ValueError):
        handle.seek(0)  # type: ignore[attr-defined]
        return handle.read().strip()  # type: ignore[attr-defined]
    return ""


@contextlib.contextmanager
def hold(
    path: str | os.PathLike[str],
    *,
    wait: bool = True,
    on_wait: Callable[[str], None] | None = None,
    label: str = "",
) -> Iterator[float]:
    """Hold the lock at ``path`` for the ``with`` block; yields the seconds spent waiting.

    Parameters
    ----------
    wait
        Block until the lock is free (``on_wait`` is called once, with the
        holder's description, before blocking); False raises :class:`Busy`.
    label
        What this process is doing, written into the file for the next one.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "a+", encoding="utf-8") as handle:
        if fcntl is None:
            yield 0.0
            return
        started = time.monotonic()
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(handle)
            if not wait:
                raise Busy(target, holder) from None
            if on_wait is not None:
                on_wait(holder)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        waited = time.monotonic() - started
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()}{': ' + label if label else ''}\n")
            handle.flush()
            yield waited
        finally:
            with contextlib.suppress(OSError):
                handle.seek(0)
                handle.truncate()
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
