from __future__ import annotations

from pathlib import Path

import pytest
from audiogen import tone, write_audio


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
