"""The seed's CF-regression network (Dieleman, van den Oord & Schrauwen 2013/2014).

A convnet over log-mel spectrograms that regresses the collaborative-filtering
(WMF) factors of a track from its audio, trained by ``python -m
deepsim.pretrain``.  The layout follows the network described in Dieleman's
"Recommending music on Spotify with deep learning" (2014):

* input: 599 frames × 128 mel bands, about 30 s of audio at 22.05 kHz;
* four 1-D convolutions over time only (each filter spans all bands of the
  layer below and 4 frames), ReLU, with max-pooling over time by 4, 2 and 2
  between them (599 → 596 → 149 → 146 → 73 → 70 → 35 → 32 frames);
* global temporal pooling of the last layer: mean, max and L2 norm over time,
  concatenated;
* two dense layers of 2048 units with ReLU and dropout;
* a linear output of ``factors`` units (the WMF dimension).

Front end: 22 050 Hz, ``n_fft`` 1024, ``hop_length`` 1105, 128 Slaney mel
bands, ``log10(1 + 10000·x)``.  The hop is chosen so that the 30-s window
:func:`deepsim.audio.decode_middle` returns (661 500 samples) gives exactly
599 centred frames (``1 + 661500 // 1105``), the paper's input length; with
the textbook hop of 1024 a 30-s clip gives 647 frames.  Consecutive windows
then neither overlap nor leave more than 81 samples (3.7 ms) unanalysed.

The one addition to the 2014 layout is optional batch normalisation (of the
input bands and after each convolution, before the ReLU; on by default): it
makes training from scratch with plain SGD start reliably.  ``batch_norm:
false`` in the config gives the original network.

:meth:`DielemanModel.embed` (from :class:`~deepsim.models.base.Model`) cuts the
log-mel into non-overlapping patches of :attr:`patch_frames` frames (599 by
default: one patch per 30-s clip), averages the per-patch outputs and
L2-normalises them.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import torch
from torch import nn

from deepsim.errors import ModelError
from deepsim.frontend import FrontendParams
from deepsim.models.base import Model
from deepsim.models.checkpoint import load_tensors

KIND = "dieleman"

#: The front end of the published network (see the module docstring for the hop).
DEFAULT_FRONTEND = FrontendParams(
    sample_rate=22050,
    n_fft=1024,
    hop_length=1105,
    n_mels=128,
    fmin=0.0,
    fmax=None,
    compression="log10",
    compression_scale=10000.0,
    clip_seconds=30.0,
)

#: Hyper-parameters of the published network; every key may be overridden.
DEFAULT_CONFIG: dict[str, Any] = {
    "factors": 40,
    "filters": [256, 256, 256, 256],
    "kernel_size": 4,
    "pools": [4, 2, 2],
    "dense": [2048, 2048],
    "dropout": 0.5,
    "batch_norm": True,
    "patch_frames": 599,
    "frontend": DEFAULT_FRONTEND.to_dict(),
}


def _positive_ints(name: str, value: Any, *, allow_empty: bool = False) -> list[int]:
    if not isinstance(value, (list, tuple)) or (not value and not allow_empty):
        raise ModelError(
            f"dieleman config: {name} must be a list of positive integers, got {value!r}"
        )
    out: list[int] = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ModelError(f"dieleman config: {name} must hold positive integers, got {value!r}")
        out.append(v)
    return out


def normalise_config(config: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """Complete and validate a network configuration.

    Parameters
    ----------
    config
        Keys of :data:`DEFAULT_CONFIG` (missing ones take the default; the
        ``frontend`` entry may be partial).
    **overrides
        Applied on top of ``config``.

    Returns
    -------
    dict
        A full, JSON-serialisable configuration.

    Raises
    ------
    ModelError
        On unknown keys or bad values; the message names the value.
    """
    merged: dict[str, Any] = {**DEFAULT_CONFIG, **(config or {}), **overrides}
    unknown = sorted(set(merged) - set(DEFAULT_CONFIG))
    if unknown:
        raise ModelError(f"dieleman config: unknown keys {unknown}")
    frontend_dict = {**DEFAULT_FRONTEND.to_dict(), **(merged["frontend"] or {})}
    try:
        frontend = FrontendParams.from_dict(frontend_dict)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"dieleman config: bad frontend {merged['frontend']!r} ({exc})") from exc
    filters = _positive_ints("filters", merged["filters"])
    pools = _positive_ints("pools", merged["pools"], allow_empty=True)
    if len(pools) != len(filters) - 1:
        raise ModelError(
            f"dieleman config: need one pool size between consecutive conv layers "
            f"({len(filters) - 1} for filters {filters}), got pools {pools}"
        )
    dense = _positive_ints("dense", merged["dense"], allow_empty=True)
    for key in ("factors", "kernel_size", "patch_frames"):
        value = merged[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelError(f"dieleman config: {key} must be a positive integer, got {value!r}")
    dropout = merged["dropout"]
    if not isinstance(dropout, (int, float)) or not 0.0 <= float(dropout) < 1.0:
        raise ModelError(f"dieleman config: dropout must be in [0, 1), got {dropout!r}")
    if not isinstance(merged["batch_norm"], bool):
        raise ModelError(
            f"dieleman config: batch_norm must be true or false, got {merged['batch_norm']!r}"
        )
    out = {
        "factors": merged["factors"],
        "filters": filters,
        "kernel_size": merged["kernel_size"],
        "pools": pools,
        "dense": dense,
        "dropout": float(dropout),
        "batch_norm": merged["batch_norm"],
        "patch_frames": merged["patch_frames"],
        "frontend": frontend.to_dict(),
    }
    needed = min_frames(out)
    if out["patch_frames"] < needed:
        raise ModelError(
            f"dieleman config: patch_frames {out['patch_frames']} is shorter than the "
            f"{needed} frames the conv/pool stack needs"
        )
    return out


def min_frames(config: dict[str, Any]) -> int:
    """Fewest input frames for which the conv/pool stack leaves one frame."""
    kernel = int(config["kernel_size"])
    frames = kernel  # the last convolution needs one kernel width
    for pool in reversed(config["pools"]):
        frames = frames * pool + kernel - 1
    return frames


def output_frames(config: dict[str, Any], frames: int) -> int:
    """Frames left after the conv/pool stack for an input of ``frames`` frames."""
    kernel = int(config["kernel_size"])
    frames -= kernel - 1
    for pool in config["pools"]:
        frames = frames // pool - kernel + 1
    return frames


class DielemanModel(Model):
    """The seed's convnet regressing WMF factors from log-mels.

    Parameters
    ----------
    config
        Hyper-parameters (see :data:`DEFAULT_CONFIG`); validated by
        :func:`normalise_config`.
    model_id
        Id of the weights; :meth:`~deepsim.models.base.Model.save` sets it
        from a hash of the configuration and weights (``dieleman-<12 hex>``).
    """

    kind: ClassVar[str] = KIND

    def __init__(
        self, config: dict[str, Any] | None = None, *, model_id: str = "dieleman-untrained"
    ) -> None:
        super().__init__()
        self.config = normalise_config(config)
        cfg = self.config
        self.model_id = model_id
        self.frontend = FrontendParams.from_dict(cfg["frontend"])
        self.dim = int(cfg["factors"])
        self.patch_frames = int(cfg["patch_frames"])
        n_mels = self.frontend.n_mels
        use_bn = cfg["batch_norm"]

        self.input_norm: nn.Module = nn.BatchNorm1d(n_mels) if use_bn else nn.Identity()
        convs: list[nn.Module] = []
        channels = n_mels
        for i, width in enumerate(cfg["filters"]):
            block: list[nn.Module] = [
                nn.Conv1d(channels, width, cfg["kernel_size"], bias=not use_bn)
            ]
            if use_bn:
                block.append(nn.BatchNorm1d(width))
            block.append(nn.ReLU(inplace=True))
            if i < len(cfg["pools"]):
                block.append(nn.MaxPool1d(cfg["pools"][i]))
            convs.append(nn.Sequential(*block))
            channels = width
        self.convs = nn.Sequential(*convs)

        dense: list[nn.Module] = []
        width = 3 * channels  # mean, max and L2 pooling
        for units in cfg["dense"]:
            dense += [nn.Linear(width, units), nn.ReLU(inplace=True), nn.Dropout(cfg["dropout"])]
            width = units
        self.dense = nn.Sequential(*dense)
        self.output = nn.Linear(width, self.dim)

    # -- network ---------------------------------------------------------------

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        """Predict factors (not normalised) for log-mels ``(batch, frames, n_mels)``."""
        x = self.input_norm(mels.transpose(1, 2))
        x = self.convs(x)  # (batch, channels, frames')
        pooled = torch.cat(
            [x.mean(dim=2), x.amax(dim=2), x.float().square().mean(dim=2).sqrt().to(x.dtype)],
            dim=1,
        )
        return self.output(self.dense(pooled))

    def embed_patches(self, patches: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"embedding": self(patches)}

    def pool(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return outputs["embedding"]


def from_checkpoint(path: str | os.PathLike[str], meta: dict[str, Any]) -> DielemanModel:
    """Load a checkpoint written by :meth:`DielemanModel.save` (registered in ``KINDS``)."""
    if meta.get("kind") != KIND:
        raise ModelError(f"{path}: a {meta.get('kind')!r} checkpoint, not {KIND!r}")
    try:
        model = DielemanModel(meta["config"], model_id=meta["model_id"])
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from exc
    tensors = load_tensors(path)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelError(f"{path}: weights do not fit the stored config ({first})") from exc
    return model


def parse_int_list(text: str, *, name: str) -> list[int]:
    """Parse ``"256,256,512"`` into integers (for command-line options)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise ModelError(f"{name}: expected comma-separated integers, got {text!r}") from exc
    return values


def summary(config: dict[str, Any]) -> str:
    """One line describing the layer shapes for ``config``'s patch length."""
    cfg = normalise_config(config)
    frames = cfg["patch_frames"]
    parts = [f"{frames}x{cfg['frontend']['n_mels']}"]
    kernel = cfg["kernel_size"]
    for i, width in enumerate(cfg["filters"]):
        frames -= kernel - 1
        parts.append(f"conv{kernel} {frames}x{width}")
        if i < len(cfg["pools"]):
            frames //= cfg["pools"][i]
            parts.append(f"pool{cfg['pools'][i]} {frames}x{width}")
    parts.append(f"mean/max/L2 {3 * cfg['filters'][-1]}")
    parts += [f"dense {units}" for units in cfg["dense"]]
    parts.append(f"out {cfg['factors']}")
    return " -> ".join(parts)


__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_FRONTEND",
    "KIND",
    "DielemanModel",
    "from_checkpoint",
    "min_frames",
    "normalise_config",
    "output_frames",
    "parse_int_list",
    "summary",
]
