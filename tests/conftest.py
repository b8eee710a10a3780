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
    """This process may fork (:func:`deepsim.threads.can_fork`): the inference threads an
    earlier test left are stopped; skips where other threads still run."""
    import threading

    from deepsim import threads

    threads.close_pool()
    if not threads.can_fork():
        pytest.skip(f"cannot fork here ({threading.active_count()} threads, {sys.platform})")
