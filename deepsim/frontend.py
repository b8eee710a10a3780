"""Log-mel front end in torch.

The filterbank is the Slaney-style mel filterbank (``librosa.filters.mel`` with
``htk=False, norm="slaney"``), so a network ported from a librosa pipeline sees
exactly the features it was trained on.  Every number comes from a
:class:`FrontendParams` supplied by the model; nothing here is specific to one
model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

Compression = Literal["log10", "ln"]


@dataclass(frozen=True)
class FrontendParams:
    """Everything needed to go from a file to the network's input.

    Parameters
    ----------
    sample_rate
        Rate the audio is resampled to, in Hz.
    n_fft
        FFT size in samples (also the Hann window length).
    hop_length
        Hop between frames in samples.
    n_mels
        Number of mel bands.
    fmin, fmax
        Frequency range of the filterbank in Hz; ``fmax=None`` means Nyquist.
    power
        Exponent of the magnitude spectrogram (2 = power).
    center
        Whether frames are centred (the signal is reflect-padded by
        ``n_fft // 2`` on both sides), as librosa does by default.
    pad_mode
        Padding used when ``center`` is true.
    compression
        ``"log10"`` gives ``log10(scale * x + 1)``; ``"ln"`` gives
        ``log(scale * x + 1)``.
    compression_scale
        The ``scale`` above.
    clip_seconds
        Length of the window taken from the middle of each track.
    """

    sample_rate: int = 16000
    n_fft: int = 512
    hop_length: int = 256
    n_mels: int = 96
    fmin: float = 0.0
    fmax: float | None = None
    power: float = 2.0
    center: bool = True
    pad_mode: str = "reflect"
    compression: Compression = "log10"
    compression_scale: float = 10000.0
    clip_seconds: float = 30.0

    def __post_init__(self) -> None:
        for name in ("sample_rate", "n_fft", "hop_length", "n_mels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        nyquist = self.sample_rate / 2
        fmax = nyquist if self.fmax is None else self.fmax
        if not 0 <= self.fmin < fmax <= nyquist:
            raise ValueError(
                f"need 0 <= fmin < fmax <= sample_rate/2, got fmin={self.fmin!r}, "
                f"fmax={self.fmax!r}, sample_rate={self.sample_rate!r}"
            )
        if self.compression not in ("log10", "ln"):
            raise ValueError(f"compression must be 'log10' or 'ln', got {self.compression!r}")
        if self.compression_scale <= 0 or self.power <= 0 or self.clip_seconds <= 0:
            raise ValueError(
                "compression_scale, power and clip_seconds must be positive, got "
                f"{self.compression_scale!r}, {self.power!r}, {self.clip_seconds!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FrontendParams:
        return cls(**data)

    def n_frames(self, n_samples: int) -> int:
        """Number of frames the front end yields for ``n_samples`` samples."""
        if self.center:
            return 1 + n_samples // self.hop_length
        return 1 + max(0, n_samples - self.n_fft) // self.hop_length


def _hz_to_mel(freq: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    freq = np.asarray(freq, dtype=np.float64)
    mels = freq / f_sp
    above = freq >= min_log_hz
    mels[above] = min_log_mel + np.log(freq[above] / min_log_hz) / logstep
    return mels


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    mels = np.asarray(mels, dtype=np.float64)
    freqs = f_sp * mels
    above = mels >= min_log_mel
    freqs[above] = min_log_hz * np.exp(logstep * (mels[above] - min_log_mel))
    return freqs


def mel_filterbank(
    *,
    sample_rate: int,
    n_fft: int,
    n_mels: int,
    fmin: float = 0.0,
    fmax: float | None = None,
) -> np.ndarray:
    """Slaney-normalised mel filterbank.

    Parameters
    ----------
    sample_rate, n_fft, n_mels, fmin, fmax
        As in :class:`FrontendParams`.

    Returns
    -------
    numpy.ndarray
        float32 array of shape ``(n_mels, 1 + n_fft // 2)``, equal to
        ``librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels,
        fmin=fmin, fmax=fmax)``.
    """
    if fmax is None:
        fmax = sample_rate / 2.0
    fft_freqs = np.linspace(0.0, sample_rate / 2.0, 1 + n_fft // 2)
    mel_freqs = _mel_to_hz(
        np.linspace(_hz_to_mel(np.array([fmin]))[0], _hz_to_mel(np.array([fmax]))[0], n_mels + 2)
    )
    fdiff = np.diff(mel_freqs)
    ramps = mel_freqs[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    enorm = 2.0 / (mel_freqs[2 : n_mels + 2] - mel_freqs[:n_mels])
    weights *= enorm[:, None]
    return weights.astype(np.float32)


def make_logmel(params: FrontendParams) -> Any:
    """Build a :class:`torch.nn.Module` computing log-mel spectrograms.

    The module maps a float32 tensor of shape ``(batch, samples)`` to
    ``(batch, frames, n_mels)``.  torch is imported here, not at module import.
    """
    import torch

    class LogMel(torch.nn.Module):
        mel_basis: torch.Tensor
        window: torch.Tensor

        def __init__(self, params: FrontendParams) -> None:
            super().__init__()
            self.params = params
            fb = mel_filterbank(
                sample_rate=params.sample_rate,
                n_fft=params.n_fft,
                n_mels=params.n_mels,
                fmin=params.fmin,
                fmax=params.fmax,
            )
            self.register_buffer("mel_basis", torch.from_numpy(fb.T.copy()), persistent=False)
            self.register_buffer(
                "window", torch.hann_window(params.n_fft, periodic=True), persistent=False
            )

        def forward(self, waves: torch.Tensor) -> torch.Tensor:
            p = self.params
            spec = torch.stft(
                waves.float(),
                n_fft=p.n_fft,
                hop_length=p.hop_length,
                window=self.window,
                center=p.center,
                pad_mode=p.pad_mode,
                return_complex=True,
            )
            if p.power == 2.0:  # re^2 + im^2: no square root (about 3x as fast as |z|^2)
                power = torch.addcmul(spec.real.square(), spec.imag, spec.imag)
            else:
                power = spec.abs().pow(p.power)
            mel = torch.matmul(power.transpose(1, 2), self.mel_basis)
            mel = torch.log1p(mel * p.compression_scale)
            if p.compression == "log10":
                mel = mel / float(np.log(10.0))
            return mel

    return LogMel(params)
