from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from audiogen import tone, write_audio


@pytest.fixture(autouse=True)
def _fresh_type_cache() -> Iterator[None]:
    """beets caches ``Item._types`` (the plugins' field types) per class: start and end
    every plugin test without a cache, as beets' own test suite does, so that no test
    sees the types of another test's plugins, whatever the order."""
    from beets.util import cached_classproperty

    cached_classproperty.cache.clear()
    yield
    cached_classproperty.cache.clear()


@pytest.fixture(autouse=True)
def _library_logger_restored() -> Iterator[None]:
    """The plugin routes the ``deepsim`` logger into beets' log; undo that after each test."""
    import logging

    library_log = logging.getLogger("deepsim")
    handlers, level, propagate = (
        list(library_log.handlers),
        library_log.level,
        library_log.propagate,
    )
    yield
    library_log.handlers[:] = handlers
    library_log.setLevel(level)
    library_log.propagate = propagate


@pytest.fixture(scope="session")
def audio_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six short generated tracks in three pairs of similar timbre, plus bad files."""
    root = tmp_path_factory.mktemp("audio")
    specs = {
        "low-a.mp3": (110.0, 165.0),
        "low-b.ogg": (110.0, 220.0),
        "mid-a.flac": (660.0, 990.0),
        "mid-b.m4a": (660.0, 880.0),
        "high-a.opus": (2500.0, 3750.0),
        "high-b.wav": (2500.0, 3300.0),
    }
    for i, (name, freqs) in enumerate(specs.items()):
        write_audio(root / name, tone(8.0, freqs=freqs, seed=i), rate=22050)
    return root
