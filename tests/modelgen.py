"""A Dieleman network small enough to run in milliseconds on a CPU, as a real backbone for
the tests of heads and training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from deepsim.models.dieleman import DielemanModel


def tiny_config(*, factors: int = 8, **frontend: Any) -> dict[str, Any]:
    """Two 4-filter layers over 16 mel bands at 8 kHz; ``frontend`` adds front-end fields."""
    return {
        "factors": factors,
        "filters": [4, 4],
        "pools": [2],
        "dense": [],
        "batch_norm": False,
        "patch_frames": 16,
        "frontend": {"sample_rate": 8000, "n_fft": 256, "hop_length": 128, "n_mels": 16} | frontend,
    }


def tiny_backbone(
    path: Path, config: dict[str, Any] | None = None, *, seed: int = 0
) -> DielemanModel:
    """A seeded network of ``config`` (default :func:`tiny_config`) saved at ``path``; eval mode."""
    torch.manual_seed(seed)
    model = DielemanModel(tiny_config() if config is None else config)
    model.save(path)
    return model.eval()
