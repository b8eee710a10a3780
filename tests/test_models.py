"""The contract every :class:`~deepsim.models.base.Model` keeps (one test over every model class).

In the manner of implicit's ``RecommenderBaseTestMixin``: each case below builds
one model (the shipped musicnn weights, or small real networks with seeded
weights) and the same tests run over all of them: the id names the weights,
save/load gives the same model back (config, id, vectors), and ``embed`` gives
unit float32 vectors that depend only on the audio.  A new model class must
be added to ``CASES`` (``test_every_model_class_has_a_case`` fails until it is).
"""

from __future__ import annotations

import copy
import importlib
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from audiogen import tone

from deepsim.errors import ModelError, ParameterError
from deepsim.models import KINDS
from deepsim.models import model_id as model_id_of
from deepsim.models.base import Model
from deepsim.models.checkpoint import load_tensors, read_metadata
from deepsim.models.dieleman import DielemanModel
from deepsim.models.head import HeadModel
from deepsim.models.musicnn import load_builtin

#: A Dieleman network that runs in milliseconds (8-d output, 16-frame patches).
TINY = {
    "factors": 8,
    "filters": [4, 4],
    "pools": [2],
    "dense": [],
    "batch_norm": False,
    "patch_frames": 16,
    "frontend": {"sample_rate": 8000, "n_fft": 256, "hop_length": 128, "n_mels": 16},
}


def _dieleman(tmp_path: Path) -> DielemanModel:
    torch.manual_seed(0)
    return DielemanModel(TINY).eval()


def _head(backbone: Model, name: str, **kwargs: object) -> HeadModel:
    torch.manual_seed(1)
    head = HeadModel(
        backbone=name, in_dim=backbone.dim, out_dim=5, backbone_model=backbone, **kwargs
    )
    head.head[0].fit(np.random.default_rng(2).standard_normal((20, backbone.dim)))
    return head.eval()


def _head_on_tiny(tmp_path: Path, **kwargs: object) -> HeadModel:
    backbone = _dieleman(tmp_path)
    path = tmp_path / "backbone.safetensors"
    backbone.save(path)
    return _head(backbone, str(path), hidden=12, **kwargs)


def _head_on_musicnn(tmp_path: Path) -> HeadModel:
    extra = {"cf_item_ids": np.arange(4, dtype=np.int64), "cf_item_factors": np.eye(4, 5)}
    return _head(
        load_builtin("msd-musicnn"), "msd-musicnn", hidden=0, taste_weight=0.3, extra=extra
    )


#: name -> (build the model in a temporary directory, a weight its id must follow)
CASES: dict[str, tuple[Callable[[Path], Model], Callable[[Model], torch.Tensor]]] = {
    "musicnn": (lambda _: load_builtin("msd-musicnn"), lambda m: m.net.dense.weight),
    "musicnn-ensemble": (lambda _: load_builtin("default"), lambda m: m.mtt.net.classifier.bias),
    "dieleman": (_dieleman, lambda m: m.output.bias),
    "head": (_head_on_tiny, lambda m: m.head[-1].bias),
    "head-sound-and-taste": (_head_on_musicnn, lambda m: m.head[-1].weight),
    "head-finetuned": (
        lambda tmp: _head_on_tiny(tmp, finetune=True),
        lambda m: m.backbone.output.weight,  # a fine-tuned backbone is part of the weights
    ),
}


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Model, torch.Tensor]:
    build, weight = CASES[request.param]
    model = build(tmp_path)
    return model, weight(model)


def sounds(rate: int) -> list[np.ndarray]:
    """Three generated sounds at ``rate``: 2.5 s of a chord, 0.2 s of noise, a 4-s sweep."""
    chord = tone(2.5, rate=rate, freqs=(220.0, 277.0, 330.0), channels=1)[0]
    burst = (0.3 * np.random.default_rng(3).standard_normal(int(0.2 * rate))).astype(np.float32)
    t = np.arange(4 * rate) / rate
    sweep = (0.4 * np.sin(2 * np.pi * (100 + 300 * t) * t)).astype(np.float32)
    return [chord, burst, sweep]


def test_every_model_class_has_a_case(tmp_path: Path) -> None:
    for module in set(KINDS.values()):
        importlib.import_module(module)
    classes: set[type[Model]] = set()
    pending = list(Model.__subclasses__())
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        if cls.__module__.startswith("deepsim."):
            classes.add(cls)
    covered = {type(build(tmp_path)) for build, _ in CASES.values()}
    assert classes and classes <= covered
    for cls in classes:
        assert cls.kind in KINDS, cls  # its checkpoints can be loaded by kind


def test_model_id_and_weights_id_format(case: tuple[Model, torch.Tensor]) -> None:
    model, _ = case
    assert re.fullmatch(r"[a-z0-9]+(?:[.-][a-z0-9]+)*", model.model_id), model.model_id
    assert re.fullmatch(rf"{re.escape(model.kind)}-[0-9a-f]{{12}}", model.weights_id())


def test_weights_id_is_stable_and_follows_the_weights(case: tuple[Model, torch.Tensor]) -> None:
    model, weight = case
    first = model.weights_id()
    assert model.weights_id() == first
    assert copy.deepcopy(model).weights_id() == first  # a function of the weights alone
    original = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1e-3)
        assert model.weights_id() != first
        weight.copy_(original)
    assert model.weights_id() == first


def test_save_and_load_give_the_same_model(
    case: tuple[Model, torch.Tensor], tmp_path: Path
) -> None:
    model, _ = case
    audio = sounds(model.frontend.sample_rate)
    before = model.embed(audio)
    path = model.save(tmp_path / "saved" / "model.safetensors")
    assert model.model_id == model.weights_id()  # the file is named by its weights
    meta = read_metadata(path)
    assert (meta["kind"], meta["model_id"]) == (model.kind, model.model_id)
    assert meta["config"] == model.config  # the config survives JSON
    assert model_id_of(path) == model.model_id  # read without loading tensors
    stored = set(load_tensors(path))
    assert stored == set(model.checkpoint_tensors()) | set(model.extra_tensors())

    loaded = type(model).load(path)
    assert type(loaded) is type(model) and not loaded.training
    assert loaded.model_id == model.model_id and loaded.weights_id() == model.model_id
    assert loaded.config == model.config
    assert (loaded.dim, loaded.tag_names, loaded.frontend, loaded.patch_frames) == (
        model.dim,
        model.tag_names,
        model.frontend,
        model.patch_frames,
    )
    after = loaded.embed(audio)
    np.testing.assert_allclose(after.vectors, before.vectors, atol=1e-6)
    if before.tags is not None:
        assert after.tags is not None
        np.testing.assert_allclose(after.tags, before.tags, atol=1e-6)

    # saved again (loaded or not): the same id
    again = loaded.save(tmp_path / "again.safetensors")
    assert read_metadata(again)["model_id"] == model.model_id
    other = HeadModel if not isinstance(model, HeadModel) else DielemanModel
    with pytest.raises(ModelError, match=f"not a {other.__name__}"):
        other.load(path)


def test_embed_gives_unit_float32_vectors_that_depend_only_on_the_audio(
    case: tuple[Model, torch.Tensor],
) -> None:
    model, _ = case
    audio = sounds(model.frontend.sample_rate)
    assert len(audio[1]) < model.patch_frames * model.frontend.hop_length  # looped to a patch
    result = model.embed(audio)
    vectors = result.vectors
    assert vectors.shape == (3, model.dim) and vectors.dtype == np.float32
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cosines = vectors @ vectors.T
    assert cosines[np.triu_indices(3, 1)].max() < 0.9999  # different sounds, different vectors
    if model.tag_names:
        assert result.tags is not None and result.tags.dtype == np.float32
        assert result.tags.shape == (3, len(model.tag_names))
        assert ((result.tags >= 0) & (result.tags <= 1)).all()
    else:
        assert result.tags is None
    # deterministic, and a track's vector does not depend on the rest of its batch
    np.testing.assert_allclose(model.embed(audio).vectors, vectors, atol=1e-6)
    np.testing.assert_allclose(model.embed([audio[2]]).vectors[0], vectors[2], atol=1e-5)
    assert model.embed([]).vectors.shape == (0, model.dim)
    with pytest.raises(ParameterError, match="empty"):
        model.embed([np.zeros(0, np.float32)])
