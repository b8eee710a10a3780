"""Tests of deepsim.models.head: the regression head on a (tiny, real) backbone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from modelgen import tiny_backbone, tiny_config

from deepsim.errors import ModelError
from deepsim.models import load_model
from deepsim.models.checkpoint import read_metadata, save_checkpoint
from deepsim.models.dieleman import DielemanModel
from deepsim.models.head import HeadModel, from_checkpoint, make_head


def waves(n: int, *, seed: int = 0) -> list[np.ndarray]:
    """Tones of different pitch and loudness over noise, 1 to 2 s at 8 kHz."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = np.arange(8000 + 1000 * i) / 8000
        tone = (0.5 / (i + 1)) * np.sin(2 * np.pi * (150 + 400 * i) * t)
        out.append((tone + 0.05 * rng.standard_normal(t.size)).astype(np.float32))
    return out


def new_head(backbone_path: Path, backbone: DielemanModel, **kwargs) -> HeadModel:  # type: ignore[no-untyped-def]
    torch.manual_seed(1)
    model = HeadModel(
        backbone=str(backbone_path),
        in_dim=backbone.dim,
        out_dim=5,
        hidden=12,
        backbone_model=backbone,
        **kwargs,
    )
    model.head[0].fit(np.random.default_rng(2).standard_normal((20, backbone.dim)))
    return model.eval()


@pytest.fixture
def backbone(tmp_path: Path) -> tuple[Path, DielemanModel]:
    path = tmp_path / "backbone.safetensors"
    return path, tiny_backbone(path)


def test_make_head_shapes_and_validation() -> None:
    mlp = make_head(10, 3, hidden=7, dropout=0.2)
    assert mlp(torch.zeros(4, 10)).shape == (4, 3)
    linear = make_head(10, 3, hidden=0)
    assert [type(m).__name__ for m in linear] == ["Standardise", "Linear"]
    for kwargs, word in (
        ({"hidden": -1}, "hidden"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": True}, "dropout"),
    ):
        with pytest.raises(ModelError, match=word):
            make_head(10, 3, **kwargs)
    with pytest.raises(ModelError, match="in_dim"):
        make_head(0, 3)


def test_standardise_layer_centres_and_scales() -> None:
    mlp = make_head(3, 2)
    x = np.array([[1.0, 10.0, 5.0], [3.0, 30.0, 5.0]])
    mlp[0].fit(x)
    out = mlp[0](torch.tensor(x, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(out, [[-1, -1, 0], [1, 1, 0]], atol=1e-6)  # constant dim kept


def test_embed_equals_head_applied_to_backbone_vectors(backbone) -> None:  # type: ignore[no-untyped-def]
    path, net = backbone
    model = new_head(path, net)
    audio = waves(3)
    result = model.embed(audio)
    assert result.vectors.shape == (3, 5)
    assert not np.allclose(result.vectors[0], result.vectors[1], atol=1e-3)  # not degenerate
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)
    base = net.embed(audio).vectors
    np.testing.assert_allclose(model.apply_to_vectors(base), result.vectors, atol=1e-5)
    assert model.frontend == net.frontend and model.patch_frames == net.patch_frames


def test_apply_to_vectors_is_deterministic_in_train_mode(backbone) -> None:  # type: ignore[no-untyped-def]
    path, net = backbone
    model = new_head(path, net, dropout=0.5)
    model.train()
    x = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    np.testing.assert_array_equal(model.apply_to_vectors(x), model.apply_to_vectors(x))
    assert model.head.training  # mode restored
    with pytest.raises(ValueError, match="backbone vectors"):
        model.apply_to_vectors(x[:, :4])


def test_a_saved_head_needs_no_backbone_for_stored_vectors(
    backbone: tuple[Path, DielemanModel], tmp_path: Path
) -> None:
    # save/load, ids and config in general: tests/test_models.py
    path, net = backbone
    model = new_head(path, net, info={"note": "test"})
    out = model.save(tmp_path / "head.safetensors")
    assert read_metadata(out)["config"]["backbone_id"] == net.model_id
    path.unlink()  # the backbone's file is gone: stored vectors still go through the head
    loaded = load_model(out)
    assert isinstance(loaded, HeadModel)
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    np.testing.assert_array_equal(loaded.apply_to_vectors(x), model.apply_to_vectors(x))
    with pytest.raises(ModelError, match="no such checkpoint"):
        loaded.embed(waves(1))  # audio needs it


def test_changed_backbone_weights_are_refused(backbone, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, net = backbone
    out = new_head(path, net).save(tmp_path / "head.safetensors")
    tiny_backbone(path, seed=5)  # the backbone file now holds other weights
    loaded = load_model(out)
    loaded.apply_to_vectors(np.ones((1, 8), np.float32))  # still fine: no backbone needed
    with pytest.raises(ModelError, match="trained on"):
        loaded.embed(waves(1))


def test_finetuned_backbone_is_saved_and_restored(backbone, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, net = backbone
    model = new_head(path, net, finetune=True)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.3 * torch.randn_like(p))
    out = model.save(tmp_path / "ft.safetensors")
    names = set(read_metadata(out)["config"])
    assert {"backbone", "backbone_id", "finetune"} <= names
    loaded = load_model(out)
    audio = waves(2)
    # the original backbone gives different vectors: the stored weights were used
    original = HeadModel(backbone=str(path), in_dim=8, out_dim=5, hidden=12)
    original.head.load_state_dict(model.head.state_dict())
    assert not np.allclose(original.eval().embed(audio).vectors, loaded.embed(audio).vectors)
    with pytest.raises(ModelError, match="fine-tuned"):
        loaded.apply_to_vectors(np.ones((1, 8), np.float32))
    # an explicitly given backbone receives the fine-tuned weights too
    given = DielemanModel(tiny_config()).eval()
    again = from_checkpoint(out, read_metadata(out), backbone_model=given)
    np.testing.assert_allclose(
        again.eval().embed(audio).vectors, model.embed(audio).vectors, atol=1e-6
    )


def test_bad_checkpoints_are_refused(backbone, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, net = backbone
    with pytest.raises(ModelError, match="not 'head'"):
        from_checkpoint(path, read_metadata(path))
    bad = tmp_path / "bad.safetensors"
    save_checkpoint(
        bad,
        {"head.1.weight": torch.zeros(3, 3)},
        kind="head",
        model_id="head-000000000000",
        config={
            "backbone": str(path),
            "in_dim": 8,
            "hidden": 12,
            "out_dim": 5,
            "dropout": 0.1,
            "finetune": False,
        },
    )
    with pytest.raises(ModelError, match="do not fit"):
        load_model(bad)
    save_checkpoint(bad, {}, kind="head", model_id="head-x", config={"in_dim": 8})
    with pytest.raises(ModelError, match="lacks"):
        load_model(bad)
    with pytest.raises(ModelError, match="expects 9"):
        HeadModel(backbone=str(path), in_dim=9, out_dim=5, backbone_model=net)


def test_combined_vectors_sound_and_taste(backbone, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from deepsim.taste import combine, layout_of, query_scale, split_parts

    path, net = backbone
    taste_only = new_head(path, net)
    model = new_head(path, net, taste_weight=0.3, extra={"ids": np.arange(3, dtype=np.int64)})
    assert model.dim == 8 + 5
    audio = waves(3)
    vectors = model.embed(audio).vectors
    assert vectors.shape == (3, 13)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    base = net.embed(audio).vectors
    expected = combine(base, taste_only.apply_to_vectors(base), 0.3)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    np.testing.assert_allclose(model.apply_to_vectors(base), vectors, atol=1e-5)
    # cosine = 0.7 · cos_sound + 0.3 · cos_taste
    sound, taste = split_parts(vectors, layout_of_config(model))
    np.testing.assert_allclose(
        vectors @ vectors.T, 0.7 * sound @ sound.T + 0.3 * taste @ taste.T, atol=1e-5
    )
    # another weight by scaling the query only
    layout = layout_of_config(model)
    for w in (0.0, 0.5, 1.0):
        q = vectors[0] * query_scale(layout, w)
        np.testing.assert_allclose(
            vectors @ q, (1 - w) * sound @ sound[0] + w * taste @ taste[0], atol=1e-5
        )
    # the weight and the extra arrays travel with the checkpoint; a taste-only head keeps its id
    out = model.save(tmp_path / "combined.safetensors")
    assert (
        layout_of(out) == layout and layout_of(taste_only.save(tmp_path / "t.safetensors")) is None
    )
    loaded = load_model(out)
    assert isinstance(loaded, HeadModel) and loaded.taste_weight == 0.3 and loaded.dim == 13
    np.testing.assert_array_equal(loaded.extra["ids"], np.arange(3))
    assert model.model_id != taste_only.model_id
    with pytest.raises(ModelError, match="taste_weight"):
        new_head(path, net, taste_weight=1.5)


def layout_of_config(model: HeadModel):  # type: ignore[no-untyped-def]
    from deepsim.taste import layout_from_config

    return layout_from_config(model.config)
