"""The seed's CF-regression convnet (deepsim.models.dieleman)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deepsim.errors import ModelError
from deepsim.frontend import FrontendParams
from deepsim.models import load_model
from deepsim.models.checkpoint import save_checkpoint
from deepsim.models.dieleman import (
    DEFAULT_CONFIG,
    DielemanModel,
    min_frames,
    normalise_config,
    output_frames,
    summary,
)

SMALL = {
    "factors": 6,
    "filters": [8, 12],
    "pools": [2],
    "dense": [16],
    "dropout": 0.0,
    "patch_frames": 20,
    "frontend": {"n_mels": 16},
}


def test_default_front_end_gives_599_frames_for_30_seconds() -> None:
    frontend = FrontendParams.from_dict(normalise_config()["frontend"])
    assert (frontend.sample_rate, frontend.n_fft, frontend.n_mels) == (22050, 1024, 128)
    assert frontend.n_frames(round(30.0 * 22050)) == 599
    assert frontend.clip_seconds == 30.0


def test_default_layers_follow_the_published_shapes() -> None:
    config = normalise_config()
    # 599 -> 596 -> 149 -> 146 -> 73 -> 70 -> 35 -> 32 frames, as in Dieleman (2014).
    assert output_frames(config, 599) == 32
    assert "conv4 596x256 -> pool4 149x256" in summary(config)
    assert "mean/max/L2 768 -> dense 2048 -> dense 2048 -> out 40" in summary(config)
    model = DielemanModel().eval()
    assert (model.dim, model.patch_frames) == (40, 599)
    with torch.no_grad():
        out = model(torch.randn(2, 599, 128))
    assert out.shape == (2, 40)


def test_global_pooling_accepts_any_length_down_to_the_minimum() -> None:
    model = DielemanModel(SMALL).eval()
    shortest = min_frames(model.config)
    with torch.no_grad():
        for frames in (shortest, 20, 57):
            assert model(torch.randn(3, frames, 16)).shape == (3, 6)
        with pytest.raises(RuntimeError):
            model(torch.randn(1, shortest - 1, 16))


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"patch_frames": 5}, "patch_frames 5"),
        ({"pools": [2, 2]}, "pools [2, 2]"),
        ({"filters": [8, 0]}, "[8, 0]"),
        ({"dropout": 1.0}, "dropout must be in [0, 1), got 1.0"),
        ({"factors": "40"}, "factors must be a positive integer, got '40'"),
        ({"colour": "blue"}, "unknown keys ['colour']"),
        ({"frontend": {"n_mels": 0}}, "bad frontend"),
    ],
)
def test_bad_configs_are_refused_naming_the_value(overrides: dict, fragment: str) -> None:
    with pytest.raises(ModelError) as info:
        normalise_config({**SMALL, **overrides})
    assert fragment in str(info.value)


def test_defaults_are_not_mutated_by_configs() -> None:
    before = repr(DEFAULT_CONFIG)
    normalise_config({"filters": [4, 4, 4, 4], "frontend": {"n_mels": 40}})
    assert repr(DEFAULT_CONFIG) == before


def test_checkpoint_whose_weights_do_not_fit_the_config_is_refused(tmp_path: Path) -> None:
    model = DielemanModel(SMALL)
    wrong = {**SMALL, "dense": [32]}
    path = save_checkpoint(
        tmp_path / "bad.safetensors",
        model.state_dict(),
        kind="dieleman",
        model_id="dieleman-000000000000",
        config=normalise_config(wrong),
    )
    with pytest.raises(ModelError, match="weights do not fit the stored config"):
        load_model(path)


def test_original_layers_without_batch_norm() -> None:
    model = DielemanModel({**SMALL, "batch_norm": False})
    names = [type(m).__name__ for m in model.modules()]
    assert "BatchNorm1d" not in names
    assert all(
        conv.bias is not None for conv in model.modules() if isinstance(conv, torch.nn.Conv1d)
    )
