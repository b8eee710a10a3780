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
