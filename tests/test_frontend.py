from __future__ import annotations

import numpy as np
import pytest
import torch

librosa = pytest.importorskip("librosa")

from deepsim.frontend import FrontendParams, make_logmel, mel_filterbank  # noqa: E402


@pytest.mark.parametrize(
    ("sr", "n_fft", "n_mels", "fmin", "fmax"),
    [
        (16000, 512, 96, 0.0, None),
        (22050, 1024, 128, 0.0, None),
        (44100, 2048, 40, 30.0, 8000.0),
        (8000, 256, 20, 0.0, 4000.0),
    ],
)
def test_filterbank_equals_librosa_slaney(sr, n_fft, n_mels, fmin, fmax) -> None:
    ours = mel_filterbank(sample_rate=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)
    theirs = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)
    assert ours.shape == theirs.shape
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-7)


def test_logmel_equals_musicnn_librosa_pipeline() -> None:
    params = FrontendParams()  # musicnn's: 16 kHz, 512/256, 96 bands, log10(10000x+1)
    rng = np.random.default_rng(0)
    t = np.arange(16000 * 4) / 16000
    y = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    mel = librosa.feature.melspectrogram(
        y=y, sr=16000, n_fft=512, hop_length=256, n_mels=96, pad_mode="reflect"
    )
    expected = np.log10(10000 * mel.T + 1)
    ours = make_logmel(params)(torch.from_numpy(y)[None])[0].numpy()
    assert ours.shape == expected.shape == (params.n_frames(len(y)), 96)
    np.testing.assert_allclose(ours, expected, atol=2e-4, rtol=1e-4)


def test_ln_compression_and_other_parameters() -> None:
    params = FrontendParams(
        sample_rate=22050,
        n_fft=1024,
        hop_length=512,
        n_mels=128,
        compression="ln",
        compression_scale=1.0,
    )
    y = np.random.default_rng(1).standard_normal(22050).astype(np.float32) * 0.1
    mel = librosa.feature.melspectrogram(
        y=y, sr=22050, n_fft=1024, hop_length=512, n_mels=128, pad_mode="reflect"
    )
    ours = make_logmel(params)(torch.from_numpy(y)[None])[0].numpy()
    np.testing.assert_allclose(ours, np.log1p(mel.T), atol=1e-4, rtol=1e-4)


def test_batch_rows_are_independent() -> None:
    module = make_logmel(FrontendParams())
    y = torch.randn(3, 16000) * 0.1
    batch = module(y)
    for i in range(3):
        torch.testing.assert_close(batch[i], module(y[i : i + 1])[0])


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"sample_rate": 0}, "sample_rate"),
        ({"n_mels": -3}, "-3"),
        ({"fmax": 9000.0}, "9000"),
        ({"compression": "db"}, "'db'"),
    ],
)
def test_invalid_parameters_name_the_value(kwargs, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        FrontendParams(**kwargs)
