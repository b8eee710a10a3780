from __future__ import annotations

import sys
from pathlib import Path

import beets
import pytest

sys.path.insert(0, str(Path(__file__).parent))

# Libraries opened by tests (":memory:" included) must not write migration
# backups into the working directory.
beets.config["create_backup_before_migrations"] = False

#: ../shared next to the checkout (absent on a user's clone: tests skip).
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def corpus() -> Path:
    path = SHARED / "corpus"
    if not path.is_dir():
        pytest.skip("../shared/corpus is not present")
    return path


@pytest.fixture
def forkable() -> None:
    """This process may fork (:func:`deepsim.threads.can_fork`): the threads earlier tests
    left are stopped (the inference pool; tqdm's monitor, which implicit's progress bars
    start).  On Linux any other thread fails the test (it would hide the forked path);
    elsewhere the test is skipped."""
    import threading

    from deepsim import threads

    threads.close_pool()
    monitor = getattr(sys.modules.get("tqdm._monitor"), "TMonitor", None)
    for thread in threading.enumerate():
        if monitor is not None and isinstance(thread, monitor):
            thread.exit()  # tqdm starts another with its next bar
    if not threads.can_fork():
        names = [t.name for t in threading.enumerate()]
        if sys.platform.startswith("linux"):
            pytest.fail(f"cannot fork here: threads {names}")
        pytest.skip(f"cannot fork here ({sys.platform})")
