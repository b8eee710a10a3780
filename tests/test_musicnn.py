"""The musicnn port against the original TensorFlow graphs, and its Model wrappers.

``tests/data/musicnn_golden.npz`` holds the tags and penultimate layers that
musicnn 0.1.0's own TF graphs (``.meta`` + checkpoint) computed for six fixed
log-mel patches; ``tools/make_musicnn_golden.py`` regenerates it.
"""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from deepsim.errors import ModelError
from deepsim.frontend import FrontendParams
from deepsim.models import BUILTIN_MODELS, load_model, model_id
from deepsim.models.checkpoint import load_tensors, read_metadata, save_checkpoint
from deepsim.models.musicnn import (
    MSD_TAGS,
    MTT_TAGS,
    WEIGHTS_DIR,
    Int8Layout,
    MusicnnEnsemble,
    MusicnnModel,
    from_checkpoint,
    load_builtin,
)

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "data" / "musicnn_golden.npz"
TOLERANCE = 1e-4

VOCAL_MTT = (
    "vocal", "vocals", "singing", "female", "male", "woman", "man", "voice", "male vocal",
    "female vocal", "male voice", "female voice", "choir", "choral", "opera",
)  # fmt: skip


def _golden_tool() -> Any:
    """``tools/make_musicnn_golden.py`` as a module (TensorFlow is only imported in main)."""
    spec = importlib.util.spec_from_file_location(
        "make_musicnn_golden", ROOT / "tools" / "make_musicnn_golden.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def ensemble() -> MusicnnEnsemble:
    model = load_builtin("default")
    assert isinstance(model, MusicnnEnsemble)
    return model


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# -- the port against TensorFlow ---------------------------------------------------


@pytest.mark.parametrize("network", ["msd", "mtt"])
def test_matches_tensorflow_graph(
    ensemble: MusicnnEnsemble, golden: dict[str, np.ndarray], network: str
) -> None:
    model = getattr(ensemble, network)
    patches = torch.from_numpy(golden["patches"])
    with torch.inference_mode():
        out = model.embed_patches(patches)
    penultimate = out["embedding"].numpy()
    tags = out["tags"].numpy()
    assert penultimate.shape == (6, 200) and tags.shape == (6, 50)
    np.testing.assert_allclose(
        penultimate, golden[f"{network}_penultimate"], rtol=0, atol=TOLERANCE
    )
    np.testing.assert_allclose(tags, golden[f"{network}_tags"], rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("network", ["msd", "mtt"])
def test_the_comparison_above_leaves_the_dead_filters_out(
    golden: dict[str, np.ndarray], network: str
) -> None:
    # what matches the graphs is the pruned network deepsim runs, and it agrees with
    # every filter convolved (the graphs' own arithmetic) to float32 rounding
    net = load_builtin(f"{network}-musicnn").net
    patches = torch.from_numpy(golden["patches"])
    scale, shift = net.input_norm.scale_shift()
    with torch.inference_mode():
        assert net._pruning_for(patches * scale + shift) is not None
        pruned = net(patches)
        net.prune = False
        whole = net(patches)
    for key in ("embedding", "tags"):
        np.testing.assert_allclose(pruned[key].numpy(), whole[key].numpy(), rtol=0, atol=1e-5)


def test_golden_patches_are_not_degenerate(golden: dict[str, np.ndarray]) -> None:
    # The comparison above means something only if the six inputs differ and the
    # outputs spread: each patch gets a distinct top tag profile.
    for network in ("msd", "mtt"):
        tags = golden[f"{network}_tags"]
        assert np.ptp(tags, axis=0).max() > 0.2
        corr = np.corrcoef(golden[f"{network}_penultimate"])
        assert corr[np.triu_indices(6, 1)].min() < 0.9
    assert np.isfinite(golden["patches"]).all() and golden["patches"].max() > 5.0


@pytest.mark.parametrize("network", ["msd", "mtt"])
def test_bf16_stays_close(golden: dict[str, np.ndarray], network: str) -> None:
    model = load_builtin(f"{network}-musicnn", precision="bf16")
    assert model.precision == "bf16"
    with torch.inference_mode():
        out = model.embed_patches(torch.from_numpy(golden["patches"]))
    np.testing.assert_allclose(out["tags"].numpy(), golden[f"{network}_tags"], atol=0.01)
    cosine = (_unit(out["embedding"].numpy()) * _unit(golden[f"{network}_penultimate"])).sum(1)
    assert cosine.min() > 0.999


def test_whole_pipeline_on_synthetic_signal(
    ensemble: MusicnnEnsemble, golden: dict[str, np.ndarray]
) -> None:
    """Wave -> deepsim front end -> patches -> both networks -> mean -> vector."""
    wave = _golden_tool().synthetic_signal()
    mels = ensemble.compute_logmels([wave])
    patches, owner = ensemble.patchify(mels)
    assert patches.shape == (3, 187, 96) and owner.tolist() == [0, 0, 0]
    np.testing.assert_allclose(patches.numpy(), golden["patches"][3:], rtol=0, atol=1e-4)

    result = ensemble.embed([wave])
    expected = np.concatenate(
        [_unit(golden[f"{n}_penultimate"][3:].mean(0)) for n in ("msd", "mtt")]
    )
    np.testing.assert_allclose(result.vectors[0], _unit(expected), atol=TOLERANCE)
    assert result.tags is not None
    expected_tags = np.concatenate([golden[f"{n}_tags"][3:].mean(0) for n in ("msd", "mtt")])
    np.testing.assert_allclose(result.tags[0], expected_tags, atol=TOLERANCE)


# -- model attributes --------------------------------------------------------------


def test_single_network_attributes() -> None:
    expected_frontend = FrontendParams(
        sample_rate=16000,
        n_fft=512,
        hop_length=256,
        n_mels=96,
        compression="log10",
        compression_scale=10000.0,
        clip_seconds=30.0,
    )
    for name, network, tags in (("msd-musicnn", "msd", MSD_TAGS), ("mtt-musicnn", "mtt", MTT_TAGS)):
        model = load_builtin(name)
        assert isinstance(model, MusicnnModel)
        assert model.model_id == BUILTIN_MODELS[name] == f"musicnn-{network}-1"
        assert model.dim == 200 and model.patch_frames == 187
        assert model.frontend == expected_frontend
        assert model.tag_names == tags and len(set(tags)) == 50
        assert not model.training
        assert all(not p.requires_grad for p in model.parameters())
    assert MSD_TAGS[:3] == ("rock", "pop", "alternative") and MSD_TAGS[-1] == "happy"
    assert MTT_TAGS[:3] == ("guitar", "classical", "slow") and MTT_TAGS[-1] == "choral"


def test_ensemble_attributes(ensemble: MusicnnEnsemble) -> None:
    assert ensemble.model_id == BUILTIN_MODELS["default"] == "musicnn-msd-mtt-1"
    assert ensemble.dim == 400
    assert len(ensemble.tag_names) == 100
    assert ensemble.tag_names[:2] == ("msd:rock", "msd:pop")
    assert ensemble.tag_names[50:52] == ("mtt:guitar", "mtt:classical")
    assert ensemble.frontend == ensemble.msd.frontend == ensemble.mtt.frontend


def test_shipped_files_and_registry() -> None:
    for name in ("msd-musicnn", "mtt-musicnn"):
        path = WEIGHTS_DIR / f"{name}.safetensors"
        meta = read_metadata(path)
        assert meta["kind"] == "musicnn"
        assert meta["model_id"] == model_id(name)
        assert meta["config"]["tag_names"] == list(load_builtin(name).tag_names)
        tensors = load_tensors(path)
        assert len(tensors) == 64
        assert sum(t.numel() for t in tensors.values()) == 792_079
    licence = (WEIGHTS_DIR / "LICENSE-musicnn").read_text()
    assert "Universitat Pompeu Fabra" in licence and "Permission to use, copy" in licence
    model = load_model("default")
    assert isinstance(model, MusicnnEnsemble) and not model.training


# -- ensemble behaviour ----------------------------------------------------------------


def test_ensemble_is_concat_of_singles_renormalised(ensemble: MusicnnEnsemble) -> None:
    rng = np.random.default_rng(0)
    t = np.arange(16000 * 7) / 16000
    waves = [
        (0.1 * np.sin(2 * np.pi * 440 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32),
        (0.05 * rng.standard_normal(16000 * 4)).astype(np.float32),
        (0.2 * np.sign(np.sin(2 * np.pi * 110 * t[:20000]))).astype(np.float32),
    ]
    both = ensemble.embed(waves)
    msd = ensemble.msd.embed(waves)
    mtt = ensemble.mtt.embed(waves)
    assert both.vectors.shape == (3, 400)
    np.testing.assert_allclose(np.linalg.norm(both.vectors, axis=1), 1.0, atol=1e-5)
    expected = _unit(np.concatenate([msd.vectors, mtt.vectors], axis=1))
    np.testing.assert_allclose(both.vectors, expected, atol=1e-5)
    # Each network weighs the same: both halves have norm 1/sqrt(2).
    np.testing.assert_allclose(np.linalg.norm(both.vectors[:, :200], axis=1), 2**-0.5, atol=1e-5)
    assert both.tags is not None and msd.tags is not None and mtt.tags is not None
    np.testing.assert_allclose(both.tags, np.concatenate([msd.tags, mtt.tags], 1), atol=1e-6)
    # Different sounds give different vectors.
    assert (both.vectors @ both.vectors.T)[np.triu_indices(3, 1)].max() < 0.99


def _with_two_streams(monkeypatch: pytest.MonkeyPatch, model: Any, run: Any) -> Any:
    """``run()`` with two inference streams on two cores, as on this 2-core box (restored after)."""
    import torch

    from deepsim import threads

    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    before = torch.get_num_threads()
    try:
        threads.apply(1, parts=model.parallel_parts)
        assert threads.streams() == 2
        return run()
    finally:
        threads.apply(1, parts=1)
        torch.set_num_threads(before)


def _assert_same_result(a: Any, b: Any) -> None:
    np.testing.assert_allclose(a.vectors, b.vectors, atol=1e-6)
    assert a.tags is not None and b.tags is not None
    np.testing.assert_allclose(a.tags, b.tags, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize("name", ["default", "msd-musicnn"])
def test_two_inference_streams_give_the_same_vectors(
    monkeypatch: pytest.MonkeyPatch, name: str, precision: str
) -> None:
    """Two streams: a network's patches in two halves (cut at a whole int8 chunk: here
    10 + 4 + 1 patches, an odd count); the pair's four halves queued on the two streams."""
    import threading

    model = load_builtin(name, precision=precision)
    rng = np.random.default_rng(3)
    waves = [(0.1 * rng.standard_normal(16000 * s)).astype(np.float32) for s in (30, 12, 3)]
    alone = model.embed(waves)
    calls: list[tuple[str, int]] = []
    net = model.msd.net if isinstance(model, MusicnnEnsemble) else model.net
    forward = net.forward

    def spy(patches: torch.Tensor) -> dict[str, torch.Tensor]:
        calls.append((threading.current_thread().name, len(patches)))
        return forward(patches)

    monkeypatch.setattr(net, "forward", spy)
    side = _with_two_streams(monkeypatch, model, lambda: model.embed(waves))
    assert all(thread.startswith("deepsim-infer") for thread, _ in calls)
    # two halves of each network (8 + 7, cut at a multiple of 4)
    assert sorted(n for _, n in calls) == [7, 8]
    _assert_same_result(side, alone)


def test_recording_gradients_runs_the_pair_here(monkeypatch: pytest.MonkeyPatch) -> None:
    # fine-tuning after an embedding run chose two streams: backpropagation still works
    model = load_builtin("default")
    model.msd.net.dense.weight.requires_grad_(True)

    def backward() -> None:
        model.embed_patches(torch.randn(2, 187, 96))["embedding"].sum().backward()

    _with_two_streams(monkeypatch, model, backward)
    assert model.msd.net.dense.weight.grad is not None


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_patches_through_the_network_in_chunks_give_the_same_numbers(
    monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    from deepsim.models import musicnn

    net = load_builtin("msd-musicnn", precision=precision).net
    patches = torch.from_numpy(np.random.default_rng(2).standard_normal((10, 187, 96)) * 2)
    with torch.inference_mode():
        whole = net(patches.float())
        monkeypatch.setattr(musicnn, "FORWARD_CHUNK_PATCHES", 4)
        chunked = net(patches.float())
    for key in ("embedding", "tags"):
        np.testing.assert_allclose(chunked[key].numpy(), whole[key].numpy(), atol=1e-5)


def test_ensemble_computes_logmel_once() -> None:
    model = load_builtin("default")
    calls: list[tuple[int, ...]] = []
    model.logmel.register_forward_hook(lambda _m, args, _out: calls.append(tuple(args[0].shape)))
    waves = [np.zeros(16000 * 5, np.float32) + 0.01 * i for i in range(3)]
    model.embed(waves)
    assert calls == [(3, 16000 * 5)]  # one batched log-mel for the three tracks
    assert model.msd._logmel is None and model.mtt._logmel is None


def test_loud_input_is_finite(ensemble: MusicnnEnsemble) -> None:
    # A full-scale square wave: mel power far above float16's range once
    # multiplied by 10000 (musicnn's own extractor returns inf/nan here).
    t = np.arange(16000 * 6) / 16000
    wave = np.where(np.sin(2 * np.pi * 220 * t) >= 0, 1.0, -1.0).astype(np.float32)
    mel = ensemble.compute_logmels([wave])[0]
    assert float(mel.max()) > np.log10(65504.0)  # past float16 after x 10000
    result = ensemble.embed([wave])
    assert np.isfinite(result.vectors).all()
    assert result.tags is not None and np.isfinite(result.tags).all()
    assert abs(float(np.linalg.norm(result.vectors[0])) - 1.0) < 1e-5


# -- loading and errors ---------------------------------------------------------------


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="nope"):
        load_builtin("nope")
    with pytest.raises(ValueError, match="fp16"):
        load_builtin("msd-musicnn", precision="fp16")
    with pytest.raises(ValueError, match="'xyz'"):
        MusicnnModel(network="xyz")
    tensors = load_tensors(WEIGHTS_DIR / "msd-musicnn.safetensors")
    bad = save_checkpoint(
        tmp_path / "bad.safetensors",
        tensors,
        kind="musicnn",
        model_id="x",
        config={"network": "gtzan"},
    )
    with pytest.raises(ModelError, match="gtzan"):
        from_checkpoint(bad, read_metadata(bad))
    del tensors["dense.weight"]
    short = save_checkpoint(
        tmp_path / "short.safetensors",
        tensors,
        kind="musicnn",
        model_id="x",
        config={"network": "msd"},
    )
    with pytest.raises(ModelError, match="do not fit"):
        from_checkpoint(short, read_metadata(short))
    with pytest.raises(ValueError, match="patches of shape"):
        load_builtin("msd-musicnn").embed_patches(torch.zeros(2, 187, 128))


# -- real music ------------------------------------------------------------------------


def test_real_excerpt_tags(corpus: Path, ensemble: MusicnnEnsemble) -> None:
    """wesnoth "Battle Music": an orchestral, instrumental game soundtrack."""
    from deepsim.audio import decode_middle

    path = corpus / "excerpts" / "wesnoth-1.16-music-00.mp3"
    if not path.is_file():
        pytest.skip(f"{path} is not present")
    wave = decode_middle(path, sample_rate=16000, seconds=30.0)
    result = ensemble.embed([wave])
    assert result.tags is not None
    tags = dict(zip(ensemble.tag_names, result.tags[0].tolist(), strict=True))
    mtt = {name[4:]: p for name, p in tags.items() if name.startswith("mtt:")}
    msd = {name[4:]: p for name, p in tags.items() if name.startswith("msd:")}
    mtt_top = sorted(mtt, key=mtt.__getitem__, reverse=True)
    msd_top = sorted(msd, key=msd.__getitem__, reverse=True)
    assert mtt_top[0] == "classical"
    assert {"strings", "violin"} <= set(mtt_top[:4])
    assert max(mtt["strings"], mtt["violin"]) > max(mtt[t] for t in VOCAL_MTT)
    assert "instrumental" in msd_top[:5]
    assert not set(msd_top[:5]) & {"metal", "Hip-Hop", "punk", "hard rock", "heavy metal"}


# -- int8 (the five front-end convolutions on oneDNN's quantized kernels) -------------


needs_x86_int8 = pytest.mark.skipif(
    "x86" not in torch.backends.quantized.supported_engines,
    reason="this torch build has no x86 quantized engine",
)


@needs_x86_int8
@pytest.mark.parametrize("network", ["msd", "mtt"])
@pytest.mark.parametrize("bf16_midend", [True, False])
def test_int8_keeps_the_accuracy_contract(
    golden: dict[str, np.ndarray], network: str, bf16_midend: bool, monkeypatch
) -> None:
    # the golden patches are real music through the TensorFlow front end; the first
    # mid-end convolution runs in bfloat16 only on CPUs with native bfloat16
    from deepsim.models import musicnn

    monkeypatch.setattr(musicnn, "_NATIVE_BF16", [bf16_midend])
    model = load_builtin(f"{network}-musicnn", precision="int8")
    assert model.precision == "int8"
    with torch.inference_mode():
        out = model.embed_patches(torch.from_numpy(golden["patches"]))
    cosine = (_unit(out["embedding"].numpy()) * _unit(golden[f"{network}_penultimate"])).sum(1)
    assert cosine.min() > 0.995  # per patch; the contract is per track (a mean of 10)
    np.testing.assert_allclose(out["tags"].numpy(), golden[f"{network}_tags"], atol=0.03)


def test_bf16_by_hand_on_a_cpu_without_it_warns(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from deepsim.models import musicnn

    for native, warned in ((True, False), (False, True)):
        caplog.clear()
        monkeypatch.setattr(musicnn, "cpu_has_native_bf16", lambda native=native: native)
        with caplog.at_level(logging.WARNING, logger="deepsim"):
            assert musicnn.resolve_precision("bf16", "cpu") == "bf16"
            assert musicnn.resolve_precision("bf16", "cuda:0") == "bf16"
        assert ("no native bfloat16" in caplog.text) is warned
        assert len(caplog.records) == int(warned)  # the CPU only


def test_int8_input_levels_follow_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from deepsim.models import musicnn

    for vnni, levels in ((True, 255), (False, 127)):
        monkeypatch.setattr(musicnn, "_VNNI", [])
        monkeypatch.setattr(musicnn, "cpu_has_vnni", lambda vnni=vnni: vnni)
        assert musicnn.int8_input_levels() == levels
        assert musicnn.int8_input_levels() == levels  # read once


@needs_x86_int8
@pytest.mark.parametrize("network", ["msd", "mtt"])
def test_int8_on_seven_bits_keeps_the_accuracy_contract(
    golden: dict[str, np.ndarray], network: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # what a CPU without VNNI runs (its kernels saturate pairs of 8-bit products),
    # checked on every CPU: the input quantized on 0..127
    from deepsim.models import musicnn

    monkeypatch.setattr(musicnn, "_VNNI", [False])
    model = load_builtin(f"{network}-musicnn", precision="int8")
    assert model.net._int8_convs().levels == 127
    with torch.inference_mode():
        out = model.embed_patches(torch.from_numpy(golden["patches"]))
    cosine = (_unit(out["embedding"].numpy()) * _unit(golden[f"{network}_penultimate"])).sum(1)
    assert cosine.min() > 0.995
    np.testing.assert_allclose(out["tags"].numpy(), golden[f"{network}_tags"], atol=0.03)


@needs_x86_int8
@pytest.mark.parametrize("network", ["msd", "mtt"])
def test_int8_front_end_follows_each_convolution(
    golden: dict[str, np.ndarray], network: str
) -> None:
    # Each of the five convolutions' channels (the three temporal ones run as one
    # 128-tap convolution, the shorter kernels placed by their "same" padding) stay
    # within a few quantization steps of fp32; a kernel one frame off is 40-100 % off.
    patches = torch.from_numpy(golden["patches"])
    exact = load_builtin(f"{network}-musicnn").net
    int8 = load_builtin(f"{network}-musicnn", precision="int8").net
    with torch.inference_mode():
        a, b = exact.front_end(patches), int8.front_end(patches)
    edges = np.cumsum([0, 204, 204, 51, 51, 51])
    for lo, hi in itertools.pairwise(edges):
        error = float((a[:, lo:hi] - b[:, lo:hi]).abs().max() / a[:, lo:hi].abs().max())
        assert error < 0.08, (lo, hi, error)


def test_int8_layout_follows_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from deepsim.models import musicnn

    for vnni, layout in ((True, (255, 32, 4)), (False, (127, 8, None))):
        monkeypatch.setattr(musicnn, "_VNNI", [vnni])
        assert musicnn.int8_layout() == layout


@needs_x86_int8
def test_int8_layouts_change_no_integer(
    golden: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The 128 temporal taps read as 32, 4 or 1 input channels, the filters padded to
    # blocks of 32 or 8: the same integer sums, so the same front end to the last bit
    # (on 7-bit input, which no CPU's kernels saturate).  The temporal convolutions in
    # float32 instead (no VNNI): those channels are fp32's, the others unchanged.
    from deepsim.models import musicnn

    patches = torch.from_numpy(golden["patches"])
    outs = []
    for layout in ((127, 32, 32), (127, 32, 4), (127, 8, 1), (127, 8, None)):
        monkeypatch.setattr(musicnn, "int8_layout", lambda layout=layout: Int8Layout(*layout))
        net = load_builtin("mtt-musicnn", precision="int8").net
        convs = net._int8_convs()
        assert [c[-1] for c in convs.convs] == [7, 7] + ([] if layout[2] is None else [layout[2]])
        assert [len(c[0].weight()) % layout[1] for c in convs.convs] == [0] * len(convs.convs)
        with torch.inference_mode():
            outs.append(net.front_end(patches))
    assert all(torch.equal(outs[0], out) for out in outs[1:3])
    timbral = 2 * 204
    assert torch.equal(outs[3][:, :timbral], outs[0][:, :timbral])
    fp32 = load_builtin("mtt-musicnn").net
    with torch.inference_mode():
        exact = fp32.front_end(patches)[:, timbral:]
    # within the int8 dead-filter tolerance of fp32; the int8 ones a step of their grid off
    assert float((outs[3][:, timbral:] - exact).abs().max()) < musicnn.INT8_DEAD_TOLERANCE
    assert float((outs[0][:, timbral:] - exact).abs().max()) > 10 * musicnn.INT8_DEAD_TOLERANCE


# -- dead front-end filters ------------------------------------------------------------


def test_most_msd_filters_and_many_mtt_filters_are_dead() -> None:
    from deepsim.models import musicnn

    for name, live in (("msd-musicnn", 64), ("mtt-musicnn", 339)):
        net = load_builtin(name).net
        pruning = net.pruning()
        assert len(pruning.channels) == live and len(pruning.dead) == 561 - live
        # the bound of every dead filter: |s| * sum|w| * xcap below the tolerance
        convs = [*net.timbral, *net.temporal]
        norms = [*net.timbral_norm, *net.temporal_norm]
        for conv, norm, keep in zip(convs, norms, pruning.live, strict=True):
            scale, _ = norm.scale_shift()
            reach = scale.abs() * conv.weight.abs().flatten(1).sum(1) * pruning.xcap
            dead = torch.ones(conv.out_channels, dtype=torch.bool)
            dead[keep] = False
            assert (reach[dead] < musicnn.DEAD_TOLERANCE).all()
            assert (reach[~dead] >= musicnn.DEAD_TOLERANCE).all()
    # int8 (an error of ~1e-2 per channel of its own) leaves out those within 1e-3 too
    int8_live = load_builtin("mtt-musicnn").net.pruning(musicnn.INT8_DEAD_TOLERANCE).channels
    assert len(int8_live) == 226


@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize("name", ["msd-musicnn", "mtt-musicnn"])
def test_dead_filters_left_out_give_the_same_numbers(name: str, precision: str) -> None:
    if precision == "int8" and "x86" not in torch.backends.quantized.supported_engines:
        pytest.skip("this torch build has no x86 quantized engine")
    net = load_builtin(name, precision=precision).net
    rng = np.random.default_rng(5)
    # log-mel-like patches: loud, quiet and silent frames (values 0..7)
    patches = torch.from_numpy(rng.gamma(2.0, 1.0, (12, 187, 96)).clip(0, 7)).float()
    patches[3, 40:90] = 0.0
    with torch.inference_mode():
        pruned = net(patches)
        front = net.front_end(patches)
        net.prune = False
        whole = net(patches)
        whole_front = net.front_end(patches)
    live = net.pruning().channels
    # the live filters: the same numbers (int8: the same integers)
    np.testing.assert_allclose(front[:, live].numpy(), whole_front[:, live].numpy(), atol=1e-6)
    # the dead ones: their constant (int8 had it on its output grid, a step is ~1e-2)
    atol = 1e-5 if precision == "fp32" else 1e-2
    np.testing.assert_allclose(front.numpy(), whole_front.numpy(), rtol=0, atol=atol)
    for key in ("embedding", "tags"):
        np.testing.assert_allclose(pruned[key].numpy(), whole[key].numpy(), rtol=0, atol=1e-4)


def test_an_input_beyond_the_cap_runs_every_filter(monkeypatch: pytest.MonkeyPatch) -> None:
    from deepsim.models import musicnn

    net = load_builtin("msd-musicnn").net
    seen: list[object] = []
    front_end = musicnn.MusicnnNetwork._front_end

    def spy(self: Any, x: torch.Tensor, pruning: Any) -> torch.Tensor:
        seen.append(pruning)
        return front_end(self, x, pruning)

    monkeypatch.setattr(musicnn.MusicnnNetwork, "_front_end", spy)
    loud = torch.full((2, 187, 96), 3.0)
    loud[1, 10, 10] = musicnn.LOGMEL_CAP + 5.0  # one value beyond what the bound covers
    with torch.inference_mode():
        out = net(loud)
        net(loud[:1])
    assert seen[0] is None and seen[1] is not None
    net.prune = False
    with torch.inference_mode():
        np.testing.assert_allclose(out["embedding"].numpy(), net(loud)["embedding"].numpy())


def test_changed_weights_are_pruned_again_and_training_prunes_nothing() -> None:
    net = load_builtin("msd-musicnn").net
    before = net.pruning()
    dead = int(before.dead[0])  # a dead filter of the first timbral convolution
    assert dead < 204
    with torch.no_grad():
        net.timbral[0].weight[dead] = 0.05  # it comes alive
    after = net.pruning()
    assert dead in after.channels.tolist() and len(after.channels) == len(before.channels) + 1
    x = torch.rand(2, 187, 96)
    with torch.inference_mode():
        assert net._pruning_for(x) is not None
        inferred = net(x)["embedding"]  # its cache made of inference tensors
    with torch.no_grad():
        assert net._pruning_for(x) is not None
    # gradients recorded (fine-tuning, or an input that wants them): every filter
    assert torch.is_grad_enabled() and net._pruning_for(x) is None
    wanted = x.clone().requires_grad_(True)
    net(wanted)["embedding"].sum().backward()
    assert wanted.grad is not None
    net.timbral[0].weight.requires_grad_(True)
    out = net(x)["embedding"]
    out.sum().backward()
    assert net.timbral[0].weight.grad is not None
    np.testing.assert_allclose(out.detach().numpy(), inferred.numpy(), atol=1e-5)


@needs_x86_int8
def test_int8_on_real_excerpts_keeps_tracks_and_neighbours(corpus: Path) -> None:
    from deepsim.audio import decode_middle

    paths = sorted((corpus / "excerpts").iterdir())[::4]
    waves = [decode_middle(p, sample_rate=16000, seconds=30.0) for p in paths]
    exact = load_builtin("default", precision="fp32").embed(waves).vectors
    int8 = load_builtin("default", precision="int8").embed(waves).vectors
    assert np.sum(exact * int8, axis=1).min() >= 0.995
    sims_exact, sims_int8 = exact @ exact.T, int8 @ int8.T
    np.fill_diagonal(sims_exact, -2.0)
    np.fill_diagonal(sims_int8, -2.0)
    same = np.mean(sims_exact.argmax(1) == sims_int8.argmax(1))
    assert same >= 0.95


def test_precision_auto_picks_by_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from deepsim.models import musicnn

    monkeypatch.setattr(musicnn, "cpu_has_vnni", lambda: True)
    expected = "int8" if "x86" in torch.backends.quantized.supported_engines else "bf16"
    monkeypatch.setattr(musicnn, "cpu_has_native_bf16", lambda: True)
    assert musicnn.resolve_precision("auto", "cpu") == expected
    assert musicnn.resolve_precision("auto", "cuda:0") == "fp32"
    # no VNNI: int8 still where the x86 kernels run at AVX2 width
    monkeypatch.setattr(musicnn, "cpu_has_vnni", lambda: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert musicnn.resolve_precision("auto", "cpu") == expected
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert musicnn.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(musicnn, "cpu_has_native_bf16", lambda: False)
    assert musicnn.resolve_precision("auto", "cpu") == "fp32"
    assert musicnn.resolve_precision("fp32", "cpu") == "fp32"
    with pytest.raises(ValueError, match="int4"):
        musicnn.resolve_precision("int4", "cpu")


def test_int8_ranges_cover_the_golden_patches(golden: dict[str, np.ndarray]) -> None:
    # The calibrated output ranges (1.5x the corpus maxima) hold real music the
    # calibration never saw, with room to spare.
    from deepsim.models.musicnn import INT8_RANGES, conv_output_max

    patches = torch.from_numpy(golden["patches"])
    for network in ("msd", "mtt"):
        model = load_builtin(f"{network}-musicnn")
        tops = conv_output_max(model.net, patches)
        ranges = INT8_RANGES[model.model_id]
        assert len(tops) == len(ranges) == 5
        assert all(0 < top <= limit for top, limit in zip(tops, ranges, strict=True))


def test_int8_needs_calibrated_weights() -> None:
    from deepsim.errors import ModelError
    from deepsim.models.musicnn import MusicnnModel

    with pytest.raises(ModelError, match="int8"):
        MusicnnModel(network="msd", precision="int8", model_id="someone-else-1")
