"""musicnn (Pons & Serra, MTG-UPF, 2019) in PyTorch: deepsim's shipped default model.

Two networks of the same architecture ship with deepsim, converted from the
TensorFlow checkpoints of the musicnn 0.1.0 package (ISC licence): MSD_musicnn,
trained on the Million Song Dataset's 50 most common Last.fm tags, and
MTT_musicnn, trained on MagnaTagATune's 50 tags.  See ``docs/model-card.md``.

Architecture of one network (input: log-mel patches of 187 frames x 96 bands,
about 3 s; every block is convolution -> ReLU -> batch norm, eps 1e-3):

front end
    A batch norm of the whole input (one channel), then five convolutions read
    it: two *timbral* ones spanning 7 frames x 38 or 67 bands (204 filters
    each, time zero-padded 3+3, no padding in frequency) and three *temporal*
    ones spanning 128, 64 or 32 frames x 1 band (51 filters each, TF "same"
    padding in time: ``(k - 1) // 2`` zeros before, the rest after).  Each is
    max-pooled over all frequencies and the five are concatenated: 561
    channels per frame.
mid end
    Three 1-D convolutions over time (7 frames, 64 filters, zero-padded 3+3),
    the 2nd and 3rd with residual connections; the front-end output and the
    three mid-end outputs are concatenated (dense connections): 753 channels.
back end
    Max and mean over time of each channel, interleaved (max_0, mean_0,
    max_1, ...: 1506 values), batch norm, dense 200 + ReLU + batch norm (the
    *penultimate* layer, deepsim's embedding), dense 50 + sigmoid (tags).

Inference evaluates the frequency max-pool before ReLU and batch norm, which
is exact: ``max_f(s * relu(z_f) + t)`` is ``s * relu(max_f z_f) + t`` when the
batch-norm scale ``s`` is positive and ``s * relu(min_f z_f) + t`` when it is
negative, and ``min_f z_f = -max_f(-z_f)`` is computed by negating those
filters.  So the large per-frequency maps are only convolved and reduced.

Inference also leaves out the *dead* front-end filters: training drove most of
MSD_musicnn's filters (497 of 561) and many of MTT_musicnn's (222) to weights
of about 1e-8, so their output ``s * relu(b + w . x) + t`` is within
``|s| * sum|w| * max|x|`` < :data:`DEAD_TOLERANCE` (1e-7) of the constant
``s * relu(b) + t`` for every input up to :data:`LOGMEL_CAP`.  Those filters
are not convolved; their constant stands in the features, and the first
mid-end convolution reads only the live channels plus a fixed map of what the
constants add (zero-padded at the ends as the input is).  The same function
to float32 rounding (vectors within 1e-7 of all 561 filters convolved, the
TensorFlow graphs' arithmetic); the MSD network runs 3-6x as fast, the MTT
network about 1.5x.  ``precision="int8"``, whose own error is about 1e-2 per
channel, also leaves out the filters within :data:`INT8_DEAD_TOLERANCE` (1e-3)
of a constant (MTT: 226 live instead of 339, 1.55x).  An input beyond the cap,
or a pass that records gradients (torch's grad mode on: fine-tuning), runs
every filter.

Preprocessing (:data:`FRONTEND`): 16 kHz mono, 512-point STFT with a Hann
window, hop 256, Slaney mel filterbank of 96 bands, ``log10(10000 x + 1)``;
unlike musicnn's own extractor this is computed in float32, so loud music does
not overflow float16 to infinity.  Patches do not overlap (10 in 30 s).  A
track's vector per network is the mean of its patches' penultimate layers,
L2-normalised; its tags are the mean of the patches' sigmoid outputs.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, NamedTuple, TypeVar, cast

import numpy as np
import torch
import torch.nn.functional as F

from deepsim.errors import ModelError, ParameterError
from deepsim.frontend import FrontendParams
from deepsim.models import BUILTIN_MODELS
from deepsim.models.base import Model
from deepsim.models.checkpoint import load_tensors, read_metadata
from deepsim.util import get_logger

log = get_logger(__name__)

#: The log-mel front end both networks were trained with.
FRONTEND = FrontendParams(
    sample_rate=16000,
    n_fft=512,
    hop_length=256,
    n_mels=96,
    compression="log10",
    compression_scale=10000.0,
    clip_seconds=30.0,
)

#: Frames per input patch (3 s).
PATCH_FRAMES = 187

#: The 50 Last.fm tags of MSD_musicnn, in output order (musicnn's configuration.py).
MSD_TAGS: tuple[str, ...] = (
    "rock", "pop", "alternative", "indie", "electronic", "female vocalists", "dance", "00s",
    "alternative rock", "jazz", "beautiful", "metal", "chillout", "male vocalists",
    "classic rock", "soul", "indie rock", "Mellow", "electronica", "80s", "folk", "90s", "chill",
    "instrumental", "punk", "oldies", "blues", "hard rock", "ambient", "acoustic", "experimental",
    "female vocalist", "guitar", "Hip-Hop", "70s", "party", "country", "easy listening", "sexy",
    "catchy", "funk", "electro", "heavy metal", "Progressive rock", "60s", "rnb", "indie pop",
    "sad", "House", "happy",
)  # fmt: skip

#: The 50 MagnaTagATune tags of MTT_musicnn, in output order.
MTT_TAGS: tuple[str, ...] = (
    "guitar", "classical", "slow", "techno", "strings", "drums", "electronic", "rock", "fast",
    "piano", "ambient", "beat", "violin", "vocal", "synth", "female", "indian", "opera", "male",
    "singing", "vocals", "no vocals", "harpsichord", "loud", "quiet", "flute", "woman",
    "male vocal", "no vocal", "pop", "soft", "sitar", "solo", "man", "classic", "choir", "voice",
    "new age", "dance", "male voice", "female vocal", "beats", "harp", "cello", "no voice",
    "weird", "country", "metal", "female voice", "choral",
)  # fmt: skip

#: Network key -> tag vocabulary.
NETWORK_TAGS: dict[str, tuple[str, ...]] = {"msd": MSD_TAGS, "mtt": MTT_TAGS}
#: Network key -> id of the shipped weights (the ids are listed in :data:`BUILTIN_MODELS`).
NETWORK_IDS: dict[str, str] = {
    "msd": BUILTIN_MODELS["msd-musicnn"],
    "mtt": BUILTIN_MODELS["mtt-musicnn"],
}
#: Id of the two networks used together.
ENSEMBLE_ID = BUILTIN_MODELS["default"]

#: Where the shipped weights live.
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
#: Built-in name -> weight files (one per network, in ensemble order).
BUILTIN_FILES: dict[str, tuple[str, ...]] = {
    "default": ("msd-musicnn.safetensors", "mtt-musicnn.safetensors"),
    "msd-musicnn": ("msd-musicnn.safetensors",),
    "mtt-musicnn": ("mtt-musicnn.safetensors",),
}

#: Numeric precisions of the convolutions; see :class:`MusicnnNetwork`.
PRECISIONS = ("fp32", "bf16", "int8")

#: Output range of each front-end convolution (after bias and ReLU; the two
#: timbral ones, then the temporal ones of 128, 64 and 32 frames) of the shipped
#: networks, for int8: the largest value over the 56 corpus excerpts times 1.5
#: (``python benchmarks/check_precision.py --calibrate`` prints the maxima).
#: Larger values saturate at the top of the range.
INT8_RANGES: dict[str, tuple[float, ...]] = {
    NETWORK_IDS["msd"]: tuple(1.5 * top for top in (7.5819, 9.0310, 2.5266, 2.1280, 2.0784)),
    NETWORK_IDS["mtt"]: tuple(1.5 * top for top in (3.4898, 4.5406, 2.1301, 1.7994, 1.9814)),
}

#: Patches convolved at a time on a CPU (on other devices: all at once).  One
#: at a time was the fastest setting measured (see docs/model-card.md).
CHUNK_PATCHES = 1

#: Patches per int8 convolution call (their uint8 maps are ~3.4 MB a patch; 4 measured
#: 4-5 % faster than 2 once the temporal convolutions ran as one, 1 slower).
INT8_CHUNK_PATCHES = 4

#: Filters of an int8 convolution are padded with zero ones to a multiple of this, with
#: VNNI and without (:func:`int8_layout`; their maps are dropped).  With VNNI: 23 filters
#: 4.8 ms, 32 filters 3.6 ms, the int8 max-pool 1.4 vs 0.2 ms.  On an AVX2-only AMD EPYC
#: (Zen 2) the MTT network took 187 ms a track with 8, 189 with 16, 209 with 32, 270 with 64.
INT8_FILTER_BLOCK = 32
INT8_FILTER_BLOCK_NO_VNNI = 8

#: Time taps of the temporal int8 convolution read as input channels with VNNI: kernel
#: 128 / 4 taps dilated by 4 (one input channel measured 2-3x slower).  Without VNNI
#: (:func:`int8_layout`) the three temporal convolutions run in float32, exact: on an
#: AVX2-only AMD EPYC (Zen 2), 4 patches of MTT took 19.4 ms so, against 27.7 ms as one
#: int8 convolution of 128 taps (32 read as channels, the best fold there), MSD 9.7 against 14.8.
INT8_TEMPORAL_FOLD = 4

#: Patches through the whole network at a time on a CPU (a multiple of the chunks above,
#: so the same numbers): the (P, 753, 187) mid-end features of a batch of 8 tracks are
#: 45 MB at once otherwise; measured as fast, 100 MB less peak memory a network.
FORWARD_CHUNK_PATCHES = 20

#: A front-end filter is *dead* when its output cannot move more than this from a
#: constant for any input up to :data:`LOGMEL_CAP` (``|s| * sum|w| * max|x|``: batch-norm
#: scale, filter weights, largest normalised input).  Most of MSD_musicnn's filters
#: (497 of 561) were driven to weights of about 1e-8 in training, MTT_musicnn's ~210:
#: they are not convolved, their constant is written (see :class:`_Pruning`).  1e-7 is
#: below the rounding of float32 sums of these sizes.
DEAD_TOLERANCE = 1e-7

#: The same for ``precision="int8"`` on the CPU, whose own error is about 1e-2 per
#: channel (a step of each convolution's uint8 output grid): a filter within 1e-3 of a
#: constant is left out there too (MTT_musicnn: 226 live filters instead of 339; on the
#: corpus the vectors are those of every filter in int8 to 1e-6, see docs/model-card.md).
INT8_DEAD_TOLERANCE = 1e-3

#: The log-mel value up to which a dead filter is known to be constant.  Audio within
#: full scale gives at most about 9 (``log10(1 + 10000 x)`` of the largest mel power);
#: an input beyond it is run through every filter.
LOGMEL_CAP = 12.0

_BN_EPS = 1e-3

_Layer = TypeVar("_Layer", bound=torch.nn.Module)

if TYPE_CHECKING:
    from collections.abc import Iterator

    class _Layers(torch.nn.ModuleList, Generic[_Layer]):
        """What the type checker sees of a ``ModuleList`` holding one kind of layer."""

        def __iter__(self) -> Iterator[_Layer]: ...


def _bias(conv: torch.nn.Conv1d | torch.nn.Conv2d) -> torch.Tensor:
    """A convolution's bias (every musicnn convolution has one)."""
    return cast(torch.Tensor, conv.bias)


def checkpoint_config(network: str) -> dict[str, Any]:
    """The ``deepsim_config`` of a musicnn checkpoint for ``network`` ("msd"/"mtt")."""
    if network not in NETWORK_TAGS:
        raise ParameterError(f"network must be 'msd' or 'mtt', got {network!r}")
    return {
        "network": network,
        "tag_names": list(NETWORK_TAGS[network]),
        "frontend": FRONTEND.to_dict(),
    }


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX).

    Only there is ``precision="bf16"`` faster than ``"fp32"``.  Reads
    ``/proc/cpuinfo``; ``False`` where that is unavailable.
    """
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", text) is not None


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX-INT8).

    Only there is ``precision="int8"`` clearly faster (oneDNN's quantized
    convolutions use them).  Reads ``/proc/cpuinfo``; ``False`` elsewhere.
    """
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return re.search(r"\b(avx512_vnni|avx_vnni|amx_int8)\b", text) is not None


def cpu_has_int8_kernels() -> bool:
    """Whether PyTorch's x86 quantized kernels run here at full width (AVX2 or better).

    :func:`cpu_has_vnni` CPUs, and those with AVX2 or AVX-512 without VNNI, where
    the kernels pair ``u8 x s8`` products in 16 bits (see :func:`int8_input_levels`).
    """
    if "x86" not in torch.backends.quantized.supported_engines:
        return False
    return cpu_has_vnni() or torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


class Int8Layout(NamedTuple):
    """How the int8 front end is laid out on this CPU (:func:`int8_layout`)."""

    #: the input's largest quantized value
    levels: int
    #: filters of a convolution are padded with zero ones to a multiple of this
    filter_block: int
    #: time taps of the merged temporal convolution read as input channels; None: the
    #: three temporal convolutions run in float32
    temporal_fold: int | None


def int8_layout() -> Int8Layout:
    """The int8 front end's layout here: with VNNI, 8-bit input, filters in blocks of
    :data:`INT8_FILTER_BLOCK`, the temporal convolutions in int8; without, 7-bit input
    (:func:`int8_input_levels`), blocks of :data:`INT8_FILTER_BLOCK_NO_VNNI`, the temporal
    convolutions in float32 (faster there, see :data:`INT8_TEMPORAL_FOLD`)."""
    if int8_input_levels() == 255:
        return Int8Layout(255, INT8_FILTER_BLOCK, INT8_TEMPORAL_FOLD)
    return Int8Layout(127, INT8_FILTER_BLOCK_NO_VNNI, None)


def int8_input_levels() -> int:
    """The largest quantized input of the int8 convolutions: 255 with VNNI, else 127.

    VNNI's ``vpdpbusd`` adds each ``u8 x s8`` product straight into 32 bits.
    Without it (AVX2, AVX-512 without VNNI) the kernels add pairs of products
    in 16 bits with saturation (``vpmaddubsw``): ``2 * 255 * 127`` overflows,
    ``2 * 127 * 127 = 32258`` does not, so the input is quantized on 7 bits
    there (PyTorch's ``reduce_range``).  On 8 bits an AVX2 CPU (AMD EPYC,
    Zen 3) gave a per-track cosine of 0.868 to fp32 on the corpus; on 7 bits
    0.99903 (docs/performance.md).
    """
    if not _VNNI:
        _VNNI.append(cpu_has_vnni())
    return 255 if _VNNI[0] else 127


_NATIVE_BF16: list[bool] = []
_VNNI: list[bool] = []


def _native_bf16() -> bool:
    """:func:`cpu_has_native_bf16`, read once."""
    if not _NATIVE_BF16:
        _NATIVE_BF16.append(cpu_has_native_bf16())
    return _NATIVE_BF16[0]


def resolve_precision(precision: str, device: str = "cpu") -> str:
    """Turn ``"auto"`` into the fastest precision within the accuracy contract here.

    ``"int8"`` on x86 CPUs with VNNI/AMX-INT8 or AVX2 (:func:`cpu_has_int8_kernels`:
    1.7-2.0x fp32 on AVX2-only AMD EPYCs, within the contract with its input on 7
    bits), else ``"bf16"`` on CPUs with native bfloat16, else ``"fp32"``; always
    ``"fp32"`` off the CPU (the quantized kernels are CPU-only).  Other values are
    checked and returned.
    """
    if precision != "auto":
        precision = _check_precision(precision)
        if precision == "bf16" and str(device).startswith("cpu") and not cpu_has_native_bf16():
            log.warning(
                "precision bf16: this CPU has no native bfloat16 instructions, so bf16 runs "
                "emulated, far slower than fp32 (20-30x measured); precision auto picks the "
                "fastest within the accuracy contract"
            )
        return precision
    if not str(device).startswith("cpu"):
        return "fp32"
    if cpu_has_int8_kernels():
        return "int8"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def _check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ParameterError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


class _Pruning(NamedTuple):
    """The front-end filters worth convolving for one set of weights (:data:`DEAD_TOLERANCE`).

    ``live``: per front-end convolution (the timbral ones, then the temporal ones)
    the indices of its live filters; ``channels`` and ``dead``: the live and the
    dead channels of the 561, in front-end order; ``fill``: every channel's
    constant ``s * relu(b) + t`` (what a dead filter outputs, within the
    tolerance); ``xcap``: the largest ``|x|`` of the normalised input the bound
    holds for; ``cache``: what is derived from them (the int8 convolutions of the
    live filters, the first mid-end convolution's live weights, its dead channels'
    contribution per length)."""

    live: tuple[torch.Tensor, ...]
    channels: torch.Tensor
    dead: torch.Tensor
    fill: torch.Tensor
    xcap: float
    cache: dict[str, Any]


class _Int8Convs:
    """The front end's convolutions as oneDNN int8 convolutions, max-pooled in int8.

    Weights per filter (symmetric int8), the input per call (one scale for the
    batch, asymmetric uint8 up to :attr:`Int8Layout.levels`: zero padding stays
    exact), the output on the calibrated range (:data:`INT8_RANGES`, uint8).  By
    the argument in the module docstring a filter with a negative batch-norm scale needs
    ``relu(min_f (z_f + b))`` = ``relu(-max_f (-(z_f + b)))``: the convolution
    of the negated filter and bias, quantized on ``[-top, 0]`` (values above 0
    clip to 0, which is where the ReLU gives 0 anyway), then an int8 max-pool
    over all frequencies.  One with a positive scale needs
    ``max_f relu(z_f + b)``: in the same convolution, with its bias lowered by
    ``top``, ``max_f clamp(z_f + b - top, -top, 0) + top`` is exactly that
    (clipped at ``top``, as a fused ReLU on ``[0, top]`` clips it), on the same
    grid.  So one call and one max-pool per convolution for both signs.  Only
    the pooled ``(P, C, T)`` results are turned back into float32.

    A timbral convolution (7 frames x 38 or 67 bands, one input channel) runs
    as a convolution of 7 input channels, the input shifted by 0..6 frames,
    with a kernel of 1 frame: the same sums of the same integers, but oneDNN's
    int8 kernels reduce over input channels, and one channel leaves most of
    each dot-product instruction empty (about 10x slower measured).

    With VNNI (:func:`int8_layout`) the three temporal convolutions (128, 64 and
    32 frames) run as one: the shorter kernels zero-padded to 128 taps where
    their "same" padding puts them, so each output sums the same integers.
    Their output ranges differ, so each filter's weights and bias are scaled by
    ``top / own top`` (the integer weights stay the same: their scale is per
    filter) and the pooled value is scaled back.  One call instead of three, and
    one max-pool: about 12 % of the network's time, same integers.  Without VNNI
    they run in float32 (:attr:`Int8Layout.temporal_fold` None), as in fp32.
    """

    def __init__(
        self,
        net: MusicnnNetwork,
        ranges: Sequence[float],
        live: Sequence[torch.Tensor] | None = None,
        layout: Int8Layout | None = None,
    ) -> None:
        import warnings

        torch.backends.quantized.engine = "x86"
        self.layout = int8_layout() if layout is None else layout
        #: the input's largest quantized value
        self.levels = float(self.layout.levels)
        layers = list(zip(net.timbral, net.timbral_norm, strict=True))
        layers += list(zip(net.temporal, net.temporal_norm, strict=True))
        # (convolution, norm, output range, first channel, filters convolved), grouped by
        # the input they read; ``live`` (see _Pruning) leaves the dead filters out
        members = []
        channels = 0
        for k, ((conv, norm), top) in enumerate(zip(layers, ranges, strict=True)):
            keep = torch.arange(conv.out_channels) if live is None else live[k].cpu()
            members.append((conv, norm, float(top), channels, keep))
            channels += conv.out_channels
        timbral, temporal = members[: len(net.timbral)], members[len(net.timbral) :]
        groups = [[m] for m in timbral]
        if self.layout.temporal_fold is not None:
            groups.append(temporal)
        self.convs: list[_Int8Group] = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the quantized-tensor API is marked deprecated
            for group in groups:
                group = [m for m in group if len(m[4])]
                if group:
                    self.convs.append(self._group(group, self.layout))
        #: float32 convolutions after the int8 ones (without VNNI, the temporal ones): kernel
        #: length and the sign-folded ``(weight, bias, sign, scale, shift)`` of the filters kept
        self.exact: list[tuple[int, list[torch.Tensor]]] = []
        if self.layout.temporal_fold is None:
            for conv, norm, _, _, keep in temporal:
                if len(keep):
                    folded = [t.detach()[keep] for t in net._folded(conv, norm)]
                    self.exact.append((conv.kernel_size[0], folded))
        #: the front-end channel of each output channel
        indices = [index for _, index, *_ in self.convs]
        if self.exact:
            indices += [first + keep for _, _, _, first, keep in temporal]
        self.index = torch.cat(indices)

    @staticmethod
    def _group(
        group: list[tuple[torch.nn.Conv2d, FrozenBatchNorm, float, int, torch.Tensor]],
        layout: Int8Layout,
    ) -> _Int8Group:
        """One group's convolution, output channels, value affine, padding and folded taps."""
        from torch.ao.nn.quantized import Conv2d as QConv2d

        taps = max(conv.kernel_size[0] for conv, *_ in group)
        width = group[0][0].kernel_size[1]
        # time taps as input channels: all 7 of a timbral kernel; ``temporal_fold`` of the
        # 128 temporal ones (4 with VNNI: kernel 32 taps, dilated 4, the same sums)
        temporal = layout.temporal_fold or 1
        fold = taps if width > 1 else (temporal if taps % temporal == 0 else 1)
        height = taps // fold
        timbral = width > 1
        pad = (3, 3) if timbral else ((taps - 1) // 2, taps - 1 - (taps - 1) // 2)
        top = max(own for _, _, own, _, _ in group)
        weights, biases, scales, shifts = [], [], [], []
        for conv, norm, own, _, keep in group:
            scale, shift = (v.detach().float()[keep] for v in norm.scale_shift())
            k = conv.kernel_size[0]
            weight = conv.weight.detach().float()[keep]
            if k < taps:  # zero taps around it, where its "same" padding puts it
                at = (taps - 1) // 2 - (k - 1) // 2
                weight = F.pad(weight, (0, 0, at, taps - k - at))
            grow = top / own  # onto the group's output range
            weights.append(weight * grow)
            biases.append(_bias(conv).detach().float()[keep] * grow)
            scales.append(scale / grow)
            shifts.append(shift)
        weight, bias = torch.cat(weights), torch.cat(biases)
        scale, shift = torch.cat(scales), torch.cat(shifts)
        # tap fold * q + j -> input channel j, kernel row q: (n, fold, height, width)
        weight = weight.reshape(len(weight), height, fold, width).permute(0, 2, 1, 3).contiguous()
        # One convolution for both signs, on the negative range: a filter of negative
        # batch-norm scale negated (max_f min(-z, 0) = -relu(min_f z)), one of positive
        # scale with its bias lowered by the range's top (max_f clamp(z - top, -top, 0)
        # + top = relu(max_f z), clipped at top as a fused ReLU clips it): the same grid.
        sign = torch.where(scale < 0, -1.0, 1.0)
        w = weight * sign.view(-1, 1, 1, 1)
        positive = (sign > 0).float()
        q_bias = bias * sign - top * positive
        # zero filters up to a multiple of the layout's block (their maps are dropped):
        # oneDNN's kernels and its int8 max-pool run much faster on such counts
        extra = -len(w) % layout.filter_block
        w = torch.cat([w, w.new_zeros(extra, *w.shape[1:])])
        q_bias = torch.cat([q_bias, q_bias.new_zeros(extra)])
        w_scale = (w.abs().amax(dim=(1, 2, 3)) / 127.0).clamp_min(1e-12)
        q_weight = torch.quantize_per_channel(
            w, w_scale.double(), torch.zeros(len(w), dtype=torch.long), 0, torch.qint8
        )
        module = QConv2d(fold, len(w), (height, width), dilation=(fold if height > 1 else 1, 1))
        module.set_weight_bias(q_weight, q_bias)
        module.scale = top / 255.0
        module.zero_point = 255
        # pooled * (sign * s) + t (+ top * s where the bias was lowered): the value back
        a = (sign * scale).view(1, -1, 1).contiguous()
        b = (shift + top * positive * scale).view(1, -1, 1).contiguous()
        # the group's output channels among the 561
        index = torch.cat([first + keep for _, _, _, first, keep in group])
        return module, index, a, b, pad, fold

    def __call__(self, chunk: torch.Tensor) -> torch.Tensor:
        """``(P, T, 96)`` normalised patches -> ``(P, C, T)`` features of the filters
        convolved, in the order of :attr:`index` (the 561 front-end channels, or the live
        ones of a :class:`_Pruning`)."""
        import warnings

        lo, hi = min(float(chunk.min()), 0.0), max(float(chunk.max()), 0.0)
        step = max(hi - lo, 1e-8) / self.levels
        zero = round(min(max(-lo / step, 0.0), self.levels))
        out = torch.empty(chunk.shape[0], len(self.index), chunk.shape[1])
        at = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            padded: dict[tuple[int, int], torch.Tensor] = {}
            inputs: dict[tuple[int, int, int], torch.Tensor] = {}
            for module, index, a, b, (before, after), fold in self.convs:
                qx = inputs.get((before, after, fold))
                if qx is None:
                    q = padded.get((before, after))
                    if q is None:
                        q = F.pad(chunk, (0, 0, before, after))
                        q = padded[before, after] = torch.quantize_per_tensor(
                            q, step, zero, torch.quint8
                        )
                    # (P, fold, T, F): frame t + k in channel k, unfolded in uint8 (a
                    # quarter of the float copy), channels last: the layout the int8
                    # kernels read (no copy per call)
                    qx = q.unfold(1, fold, 1).permute(0, 3, 1, 2)
                    qx = qx.contiguous(memory_format=torch.channels_last)
                    inputs[(before, after, fold)] = qx
                maps = module(qx)  # (P, n, T, F)
                pooled = F.max_pool2d(maps, (1, maps.shape[3])).dequantize()[:, : len(index), :, 0]
                torch.addcmul(b, pooled, a, out=out[:, at : at + len(index)])
                at += len(index)
        for taps, (weight, *rest) in self.exact:
            value = MusicnnNetwork._temporal(chunk, taps, weight, *rest)
            out[:, at : at + len(weight)] = value.transpose(1, 2)
            at += len(weight)
        return out


#: One int8 convolution of :class:`_Int8Convs`: module, output channels (indices of the 561),
#: pooled -> value affine (a, b), time padding and folded taps.
_Int8Group = tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int], int]


class FrozenBatchNorm(torch.nn.Module):
    """Batch norm with fixed statistics (inference only), TF's epsilon of 1e-3.

    Applied to dimension 1 of its input, as :class:`torch.nn.BatchNorm1d`/``2d``.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor

    def __init__(self, channels: int, *, eps: float = _BN_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s, t)`` with ``norm(x) = s * x + t`` per channel."""
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale_shift()
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.view(shape) + shift.view(shape)


class MusicnnNetwork(torch.nn.Module):
    """One musicnn network ("musicnn" architecture of Pons & Serra, 2019).

    Parameters
    ----------
    n_tags
        Size of the tag output layer.
    precision
        ``"fp32"`` (default) or ``"bf16"``: with ``"bf16"`` the two timbral
        convolutions (about 80 % of the arithmetic) run as bfloat16 matrix
        products with float32 accumulation, everything else in float32.  About
        1.6 times as fast on CPUs with native bfloat16 dot products
        (AVX512-BF16 or AMX, see :func:`cpu_has_native_bf16`), with slightly
        perturbed outputs (see ``docs/model-card.md``); no faster, or slower,
        on other CPUs.

    The network is inference-only: its parameters do not require gradients
    and the batch norms use their stored statistics in every mode.
    """

    #: Leave the dead front-end filters out (:meth:`pruning`); False convolves all 561,
    #: as the TensorFlow graphs do (the outputs agree within about 2e-6).
    prune: bool = True

    n_mels = 96
    timbral_widths = (38, 67)  # int(0.4 * 96), int(0.7 * 96)
    timbral_filters = 204  # int(1.6 * 128)
    temporal_lengths = (128, 64, 32)
    temporal_filters = 51  # int(1.6 * 32)
    midend_filters = 64
    backend_units = 200

    def __init__(
        self,
        *,
        n_tags: int = 50,
        precision: str = "fp32",
        int8_ranges: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.precision = _check_precision(precision)
        if self.precision == "int8" and int8_ranges is None:
            raise ModelError("precision int8 needs the output ranges of these weights")
        self.int8_ranges = int8_ranges
        self._int8: tuple[Any, _Int8Convs] | None = None
        self._pruned: dict[tuple[Any, float], _Pruning] = {}
        self.input_norm = FrozenBatchNorm(1)
        self.timbral = cast(
            "_Layers[torch.nn.Conv2d]",
            torch.nn.ModuleList(
                torch.nn.Conv2d(1, self.timbral_filters, (7, w)) for w in self.timbral_widths
            ),
        )
        self.timbral_norm = cast(
            "_Layers[FrozenBatchNorm]",
            torch.nn.ModuleList(FrozenBatchNorm(self.timbral_filters) for _ in self.timbral_widths),
        )
        self.temporal = cast(
            "_Layers[torch.nn.Conv2d]",
            torch.nn.ModuleList(
                torch.nn.Conv2d(1, self.temporal_filters, (k, 1)) for k in self.temporal_lengths
            ),
        )
        self.temporal_norm = cast(
            "_Layers[FrozenBatchNorm]",
            torch.nn.ModuleList(
                FrozenBatchNorm(self.temporal_filters) for _ in self.temporal_lengths
            ),
        )
        front = (
            len(self.timbral_widths) * self.timbral_filters
            + len(self.temporal_lengths) * self.temporal_filters
        )
        mid = self.midend_filters
        self.midend = cast(
            "_Layers[torch.nn.Conv1d]",
            torch.nn.ModuleList(torch.nn.Conv1d(c, mid, 7) for c in (front, mid, mid)),
        )
        self.midend_norm = cast(
            "_Layers[FrozenBatchNorm]", torch.nn.ModuleList(FrozenBatchNorm(mid) for _ in range(3))
        )
        pooled = 2 * (front + 3 * mid)
        self.pool_norm = FrozenBatchNorm(pooled)
        self.dense = torch.nn.Linear(pooled, self.backend_units)
        self.dense_norm = FrozenBatchNorm(self.backend_units)
        self.classifier = torch.nn.Linear(self.backend_units, n_tags)
        self.requires_grad_(False)

    def _folded(
        self, conv: torch.nn.Conv2d, norm: FrozenBatchNorm
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Weights with the filters of negative batch-norm scale negated.

        Returns ``(weight, bias, sign, scale, shift)``; see the module docstring.
        """
        scale, shift = norm.scale_shift()
        sign = torch.where(scale < 0, -1.0, 1.0).to(scale.dtype)
        weight = conv.weight * sign.view(-1, 1, 1, 1)
        return weight, _bias(conv) * sign, sign, scale, shift

    @staticmethod
    def _finish(
        peak: torch.Tensor,
        bias: torch.Tensor,
        sign: torch.Tensor,
        scale: torch.Tensor,
        shift: torch.Tensor,
    ) -> torch.Tensor:
        """Bias, ReLU and batch norm of the (sign-folded) frequency maxima ``(P, T, C)``."""
        return torch.relu((peak.float() + bias) * sign) * scale + shift

    @staticmethod
    def _temporal(
        chunk: torch.Tensor,
        taps: int,
        weight: torch.Tensor,
        bias: torch.Tensor,
        sign: torch.Tensor,
        scale: torch.Tensor,
        shift: torch.Tensor,
    ) -> torch.Tensor:
        """One temporal convolution of ``taps`` frames ("same" padding in time) of normalised
        patches ``(P, T, 96)`` in float32, max-pooled over frequency: ``(P, T, C)``."""
        before = (taps - 1) // 2
        shifted = F.pad(chunk, (0, 0, before, taps - 1 - before)).unsqueeze(1)
        peak = F.conv2d(shifted, weight).amax(dim=3).transpose(1, 2)
        return MusicnnNetwork._finish(peak, bias, sign, scale, shift)

    def _weights_key(self) -> tuple[tuple[int, int], ...]:
        """Changes whenever a weight or a statistic does (what is derived from them is
        rebuilt then)."""
        tensors = [*self.parameters(), *self.buffers()]
        return tuple((t.data_ptr(), t._version) for t in tensors)

    def _int8_convs(self, pruning: _Pruning | None = None) -> _Int8Convs:
        """The int8 front-end convolutions: every filter, rebuilt whenever the weights
        change; or the live filters of ``pruning``, kept with it (it is remade then)."""
        assert self.int8_ranges is not None
        if pruning is not None:
            convs = pruning.cache.get("int8")
            if not isinstance(convs, _Int8Convs):
                convs = pruning.cache["int8"] = _Int8Convs(self, self.int8_ranges, pruning.live)
            return convs
        key = self._weights_key()
        if self._int8 is None or self._int8[0] != key:
            self._int8 = (key, _Int8Convs(self, self.int8_ranges))
        return self._int8[1]

    def pruning(self, tolerance: float | None = None) -> _Pruning:
        """Which front-end filters are dead for these weights.

        A filter's output is ``s * relu(z) + t`` (before the exact frequency max),
        ``z = b + w . x``; with ``|x| <= xcap`` it is within ``|s| * sum|w| * xcap`` of
        the constant ``s * relu(b) + t``.  Where that is below ``tolerance`` (default:
        :data:`INT8_DEAD_TOLERANCE` for an int8 network, else :data:`DEAD_TOLERANCE`)
        the filter is dead.  Recomputed whenever the weights change.
        """
        if tolerance is None:
            tolerance = INT8_DEAD_TOLERANCE if self.precision == "int8" else DEAD_TOLERANCE
        key = (self._weights_key(), tolerance)
        if key not in self._pruned:
            self._pruned = {k: v for k, v in self._pruned.items() if k[0] == key[0]}
            self._pruned[key] = self._find_dead(tolerance)
        return self._pruned[key]

    def _find_dead(self, tolerance: float) -> _Pruning:
        s0, t0 = (float(v.reshape(-1)[0]) for v in self.input_norm.scale_shift())
        xcap = max(abs(t0), abs(s0 * LOGMEL_CAP + t0))
        live, channels, fills = [], [], []
        first = 0
        convs = [*self.timbral, *self.temporal]
        norms = [*self.timbral_norm, *self.temporal_norm]
        for conv, norm in zip(convs, norms, strict=True):
            scale, shift = (v.detach().float() for v in norm.scale_shift())
            reach = scale.abs() * conv.weight.detach().float().abs().flatten(1).sum(dim=1) * xcap
            keep = torch.nonzero(reach >= tolerance).flatten()
            live.append(keep)
            channels.append(first + keep)
            fills.append(torch.relu(_bias(conv).detach().float()) * scale + shift)
            first += conv.out_channels
        live_channels = torch.cat(channels)
        dead = torch.ones(first, dtype=torch.bool, device=live_channels.device)
        dead[live_channels] = False
        return _Pruning(
            tuple(live), live_channels, torch.nonzero(dead).flatten(), torch.cat(fills), xcap, {}
        )

    def _pruning_for(self, x: torch.Tensor) -> _Pruning | None:
        """:meth:`pruning` where it holds for the normalised input ``x``; None where
        gradients are recorded (fine-tuning moves every weight; deepsim embeds under
        ``torch.inference_mode`` or ``no_grad``) or for an input beyond
        :data:`LOGMEL_CAP`, which runs through every filter."""
        if not self.prune or torch.is_grad_enabled():
            return None
        int8 = self.precision == "int8" and x.device.type == "cpu"
        pruning = self.pruning(INT8_DEAD_TOLERANCE if int8 else DEAD_TOLERANCE)
        if len(x) == 0 or float(x.abs().amax()) > pruning.xcap:
            return None
        return pruning

    def front_end(self, patches: torch.Tensor) -> torch.Tensor:
        """``(P, T, 96)`` log-mel patches -> ``(P, 561, T)`` front-end features."""
        scale, shift = self.input_norm.scale_shift()
        x = patches.float() * scale + shift
        pruning = self._pruning_for(x)
        computed = self._front_end(x, pruning)
        if pruning is None:
            return computed
        # into place among the dead filters' constants
        shape = (len(x), len(pruning.fill), x.shape[1])
        full = pruning.fill.view(1, -1, 1).expand(shape).clone()
        return full.index_copy_(1, pruning.channels, computed)

    def _front_end(self, x: torch.Tensor, pruning: _Pruning | None) -> torch.Tensor:
        """The front end of normalised patches ``x``: ``(P, 561, T)``, or with
        ``pruning`` the live channels alone, ``(P, len(pruning.channels), T)``."""
        int8 = self.precision == "int8" and x.device.type == "cpu"
        bf16 = self.precision == "bf16"
        alive = (lambda k, t: t) if pruning is None else (lambda k, t: t[pruning.live[k]])
        timbral = []
        for k, (conv, norm) in enumerate(zip(self.timbral, self.timbral_norm, strict=True)):
            weight, *rest = (alive(k, t) for t in self._folded(conv, norm))
            if bf16:
                # (7 * width, 204): the kernel taps are the reduction dimension.
                weight = weight.flatten(1).t().to(torch.bfloat16).contiguous()
            timbral.append((conv.kernel_size, weight, rest))
        first = len(self.timbral)
        temporal = [
            [alive(first + k, t) for t in self._folded(c, n)]
            for k, (c, n) in enumerate(zip(self.temporal, self.temporal_norm, strict=True))
        ]
        outputs = []
        # On a CPU, one patch at a time: its per-frequency maps (about 20 MB in
        # float32) then stay in cache between the convolution and the max.
        chunk_size = CHUNK_PATCHES if x.device.type == "cpu" else max(1, len(x))
        if int8:
            chunk_size = INT8_CHUNK_PATCHES
        for chunk in x.split(chunk_size):
            features = []
            if int8:
                outputs.append(self._int8_convs(pruning)(chunk))  # (P, C, T) already
                continue
            padded = F.pad(chunk, (0, 0, 3, 3))
            low = padded.to(torch.bfloat16) if bf16 else padded
            for (taps, width), weight, rest in timbral:
                if bf16:
                    # A one-channel convolution gains nothing from bfloat16 dot
                    # products (they pair input channels), a matrix product over
                    # the unfolded taps does (about 2x on AVX512-BF16).
                    cols = low.unfold(1, taps, 1).unfold(2, width, 1)
                    maps = cols.reshape(-1, taps * width) @ weight
                    peak = maps.view(*chunk.shape[:2], -1, weight.shape[1]).amax(dim=2)
                else:
                    peak = F.conv2d(padded.unsqueeze(1), weight).amax(dim=3).transpose(1, 2)
                features.append(self._finish(peak, *rest))
            for (weight, *rest), k in zip(temporal, self.temporal_lengths, strict=True):
                features.append(self._temporal(chunk, k, weight, *rest))
            outputs.append(torch.cat(features, dim=2).transpose(1, 2))
        return torch.cat(outputs)

    def _first_midend(self, pruning: _Pruning, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first mid-end convolution's weights of the live channels, and its bias plus
        what the dead channels' constants add at each of ``frames`` frames (``(64, T)``)."""
        conv = cast(torch.nn.Conv1d, self.midend[0])
        weight = pruning.cache.get("weight")
        if weight is None:
            weight = pruning.cache["weight"] = conv.weight.index_select(1, pruning.channels)
        maps: dict[int, torch.Tensor] = pruning.cache.setdefault("fixed", {})
        fixed = maps.get(frames)
        if fixed is None:
            constant = pruning.fill[pruning.dead].view(1, -1, 1).expand(1, -1, frames)
            dead_weight = conv.weight.index_select(1, pruning.dead)
            fixed = F.conv1d(F.pad(constant, (3, 3)), dead_weight, _bias(conv))
            if len(maps) >= 8:  # patches of many lengths: keep a few
                maps.clear()
            maps[frames] = fixed
        return weight, fixed

    def forward(self, patches: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the network.

        Parameters
        ----------
        patches
            ``(P, 187, 96)`` log-mel patches (any number of frames >= 1 works,
            as in musicnn; deepsim always uses 187).

        Returns
        -------
        dict
            ``"embedding"``: the penultimate layer ``(P, 200)``; ``"tags"``:
            sigmoid tag probabilities ``(P, n_tags)``; both float32.
        """
        if patches.dim() != 3 or patches.shape[2] != self.n_mels:
            raise ValueError(
                f"expected patches of shape (P, frames, {self.n_mels}), got {tuple(patches.shape)}"
            )
        if patches.device.type != "cpu" or len(patches) <= FORWARD_CHUNK_PATCHES:
            return self._forward(patches)
        parts = [self._forward(part) for part in patches.split(FORWARD_CHUNK_PATCHES)]
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}

    def _forward(self, patches: torch.Tensor) -> dict[str, torch.Tensor]:
        scale, shift = self.input_norm.scale_shift()
        x = patches.float() * scale + shift
        pruning = self._pruning_for(x)
        front = self._front_end(x, pruning)  # the live channels only, with pruning
        layers = []
        h = front
        # int8 on a CPU with bfloat16 matrix units: the first (561-channel) mid-end
        # convolution in bfloat16 (fp32 accumulation), about 6x as fast as fp32.
        low = self.precision == "int8" and h.device.type == "cpu" and _native_bf16()
        for i, (conv, norm) in enumerate(zip(self.midend, self.midend_norm, strict=True)):
            if i == 0 and pruning is not None:
                # the live channels convolved; the dead ones' constants (zero-padded at
                # both ends, as the whole input is) add a fixed map, made once per length
                weight, fixed = self._first_midend(pruning, h.shape[2])
            else:
                weight, fixed = conv.weight, _bias(conv).view(1, -1, 1)
            x = F.pad(h, (3, 3))
            if low and i == 0:
                z = F.conv1d(x.to(torch.bfloat16), weight.to(torch.bfloat16)).float() + fixed
            elif i == 0:
                z = F.conv1d(x, weight) + fixed
            else:
                z = F.conv1d(x, conv.weight, conv.bias)
            out = norm(torch.relu(z))
            h = out if i == 0 else out + h
            layers.append(h)
        mid = torch.cat(layers, dim=1)  # (P, 192, frames)
        # max and mean over time of the 561 + 192 channels, interleaved; a dead
        # front-end channel's are its constant
        highs, means = front.amax(dim=2), front.mean(dim=2)
        if pruning is not None:
            fill = pruning.fill.view(1, -1).expand(len(front), -1)
            highs = fill.clone().index_copy_(1, pruning.channels, highs)
            means = fill.clone().index_copy_(1, pruning.channels, means)
        highs = torch.cat([highs, mid.amax(dim=2)], dim=1)
        means = torch.cat([means, mid.mean(dim=2)], dim=1)
        pooled = torch.stack([highs, means], dim=2).flatten(1)
        embedding = self.dense_norm(torch.relu(self.dense(self.pool_norm(pooled))))
        tags = torch.sigmoid(self.classifier(embedding))
        return {"embedding": embedding, "tags": tags}


@torch.inference_mode()
def conv_output_max(net: MusicnnNetwork, patches: torch.Tensor) -> tuple[float, ...]:
    """The largest output (after bias and ReLU) of each front-end convolution on ``patches``.

    The two timbral convolutions, then the three temporal ones: what
    :data:`INT8_RANGES` is calibrated from (``(P, 187, 96)`` log-mel patches
    of real music, in float32).
    """
    scale, shift = net.input_norm.scale_shift()
    pads = [(3, 3)] * len(net.timbral)
    pads += [((k - 1) // 2, k - 1 - (k - 1) // 2) for k in net.temporal_lengths]
    tops = []
    for conv, (before, after) in zip([*net.timbral, *net.temporal], pads, strict=True):
        top = 0.0
        for chunk in patches.split(4):
            x = F.pad(chunk.float() * scale + shift, (0, 0, before, after)).unsqueeze(1)
            top = max(top, float(torch.relu(F.conv2d(x, conv.weight, conv.bias)).max()))
        tops.append(top)
    return tuple(tops)


class MusicnnModel(Model):
    """One musicnn network as a deepsim :class:`~deepsim.models.base.Model` (200-d).

    Parameters
    ----------
    network
        ``"msd"`` or ``"mtt"``.
    precision
        ``"fp32"`` or ``"bf16"``; see :class:`MusicnnNetwork`.
    model_id
        Id of the weights (default: that of the shipped weights of ``network``).
    tag_names
        Tag vocabulary (default: the network's 50 tags).
    frontend
        Front-end parameters (default: :data:`FRONTEND`).

    The network starts with untrained (random) weights; :func:`load_builtin`
    and :func:`from_checkpoint` return it loaded.  A saved copy (kind
    ``"musicnn"``, the format of the shipped files) is named by its weights'
    hash, ``musicnn-<12 hex digits>``, not by the shipped id.
    """

    kind: ClassVar[str] = "musicnn"
    patch_frames = PATCH_FRAMES

    def __init__(
        self,
        *,
        network: str,
        precision: str = "fp32",
        model_id: str | None = None,
        tag_names: Sequence[str] | None = None,
        frontend: FrontendParams | None = None,
    ) -> None:
        super().__init__()
        if network not in NETWORK_TAGS:
            raise ParameterError(f"network must be 'msd' or 'mtt', got {network!r}")
        names = tuple(NETWORK_TAGS[network] if tag_names is None else tag_names)
        self.network = network
        self.model_id = NETWORK_IDS[network] if model_id is None else model_id
        self.frontend = FRONTEND if frontend is None else frontend
        self.tag_names = names
        self.config = {
            "network": network,
            "tag_names": list(names),
            "frontend": self.frontend.to_dict(),
        }
        self.dim = MusicnnNetwork.backend_units
        self.net = MusicnnNetwork(
            n_tags=len(names),
            precision=precision,
            int8_ranges=INT8_RANGES.get(self.model_id) if precision == "int8" else None,
        )

    @property
    def precision(self) -> str:
        return self.net.precision

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return self.net.state_dict()  # the shipped files' tensor names

    #: A network's patches are independent: two halves run side by side (two
    #: streams of one thread beat one stream of two threads, 1.2-1.5x measured:
    #: a parallel region of two threads waits for both, and the decoding
    #: workers share the cores; docs/performance.md).
    parallel_parts: ClassVar[int] = 2

    def embed_patches(self, patches: torch.Tensor) -> dict[str, torch.Tensor]:
        from deepsim import threads

        pieces = _split_patches(patches, threads.streams())
        if len(pieces) == 1:
            return self.net(patches)
        return _joined(threads.parallel([functools.partial(self.net, p) for p in pieces]))

    def pool(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return outputs["embedding"]


class MusicnnEnsemble(Model):
    """The MSD and MTT networks side by side on one shared front end (400-d).

    The log-mel is computed once and both networks read the same patches.  The
    vector is the concatenation of the two networks' L2-normalised mean
    penultimate layers (so each network weighs the same), renormalised by
    :meth:`~deepsim.models.base.Model.embed`.  Tags are the MSD tags prefixed
    ``"msd:"`` followed by the MTT tags prefixed ``"mtt:"``.

    Parameters
    ----------
    msd, mtt
        The two loaded networks.
    model_id
        Id of the pair (default :data:`ENSEMBLE_ID`).

    Saved as kind ``"musicnn-ensemble"``: tensors ``msd.net.*`` and
    ``mtt.net.*``, the config of each network under ``"msd"`` and ``"mtt"``.
    """

    kind: ClassVar[str] = "musicnn-ensemble"
    patch_frames = PATCH_FRAMES

    def __init__(
        self, msd: MusicnnModel, mtt: MusicnnModel, *, model_id: str = ENSEMBLE_ID
    ) -> None:
        super().__init__()
        if msd.frontend != mtt.frontend:
            raise ParameterError("the two networks of an ensemble must share one front end")
        if msd.precision != mtt.precision:
            raise ParameterError(
                f"the two networks of an ensemble must share one precision, got "
                f"{msd.precision!r} and {mtt.precision!r}"
            )
        self.msd = msd
        self.mtt = mtt
        self.model_id = model_id
        self.frontend = msd.frontend
        self.dim = msd.dim + mtt.dim
        self.tag_names = tuple(f"msd:{t}" for t in msd.tag_names) + tuple(
            f"mtt:{t}" for t in mtt.tag_names
        )
        self.config = {"msd": msd.config, "mtt": mtt.config}

    @property
    def precision(self) -> str:
        return self.msd.precision

    parallel_parts: ClassVar[int] = 2

    def embed_patches(self, patches: torch.Tensor) -> dict[str, torch.Tensor]:
        from deepsim import threads

        # Each network's patches in as many pieces as there are streams, all queued on
        # them, the costlier network (MTT: more live filters) first: a stream that is done
        # takes the next piece, so the streams finish together (the two networks as the
        # two streams left the faster one idle for half of the slower one's time).
        pieces = _split_patches(patches, threads.streams())
        nets = (self.mtt.net, self.msd.net)
        calls = [functools.partial(net, piece) for net in nets for piece in pieces]
        parts = threads.parallel(calls)
        b, a = _joined(parts[: len(pieces)]), _joined(parts[len(pieces) :])
        return {
            "embedding": torch.cat([a["embedding"], b["embedding"]], dim=1),
            "tags": torch.cat([a["tags"], b["tags"]], dim=1),
        }

    def pool(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        emb = outputs["embedding"]
        split = self.msd.dim
        return torch.cat(
            [F.normalize(emb[:, :split], dim=1), F.normalize(emb[:, split:], dim=1)], dim=1
        )


def _split_patches(patches: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """``patches`` in ``parts`` pieces of whole int8 chunks (so the same chunks, and the
    same numbers, as all at once); one piece off the CPU or when there are too few."""
    if parts <= 1 or len(patches) < 2 * INT8_CHUNK_PATCHES or patches.device.type != "cpu":
        return [patches]
    size = -(-len(patches) // parts)
    size += -size % INT8_CHUNK_PATCHES
    return list(patches.split(size))


def _joined(parts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Outputs of pieces of one batch of patches, as one."""
    if len(parts) == 1:
        return parts[0]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def _new_network(
    path: Path, config: dict[str, Any], *, model_id: str, precision: str
) -> MusicnnModel:
    network = config.get("network")
    if network not in NETWORK_TAGS:
        raise ModelError(f"{path}: unknown musicnn network {network!r} (expected 'msd' or 'mtt')")
    try:
        frontend = FrontendParams.from_dict(config.get("frontend", FRONTEND.to_dict()))
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{path}: bad front-end parameters ({exc})") from exc
    return MusicnnModel(
        network=network,
        precision=precision,
        model_id=model_id,
        tag_names=config.get("tag_names"),
        frontend=frontend,
    )


def _load_state(path: Path, module: torch.nn.Module) -> None:
    try:
        module.load_state_dict(load_tensors(path), strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{path}: weights do not fit the musicnn network ({exc})") from exc


def _load_network(path: Path, meta: dict[str, Any], *, precision: str) -> MusicnnModel:
    if meta.get("kind") != MusicnnModel.kind:
        raise ModelError(f"{path}: not a musicnn checkpoint (kind {meta.get('kind')!r})")
    config = meta.get("config") or {}
    model = _new_network(path, config, model_id=str(meta["model_id"]), precision=precision)
    _load_state(path, model.net)
    return model.eval()


def _load_ensemble(path: Path, meta: dict[str, Any], *, precision: str) -> MusicnnEnsemble:
    config = meta.get("config") or {}
    msd, mtt = (
        _new_network(path, config.get(key) or {}, model_id=f"musicnn-{key}", precision=precision)
        for key in ("msd", "mtt")
    )
    model = MusicnnEnsemble(msd, mtt, model_id=str(meta["model_id"]))
    _load_state(path, model)
    for network in (msd, mtt):
        network.model_id = network.weights_id()
    return model.eval()


def from_checkpoint(
    path: str | os.PathLike[str], meta: dict[str, Any], *, precision: str = "fp32"
) -> MusicnnModel | MusicnnEnsemble:
    """Load a ``kind="musicnn"`` (one network) or ``"musicnn-ensemble"`` checkpoint.

    Parameters
    ----------
    path
        The ``.safetensors`` file.
    meta
        Its metadata, as returned by :func:`deepsim.models.checkpoint.read_metadata`.
    precision
        ``"fp32"`` or ``"bf16"``.
    """
    precision = _check_precision(precision)
    if meta.get("kind") == MusicnnEnsemble.kind:
        return _load_ensemble(Path(path), meta, precision=precision)
    return _load_network(Path(path), meta, precision=precision)


def load_builtin(name: str, *, precision: str = "fp32") -> Model:
    """Load a shipped model: ``"default"`` (ensemble), ``"msd-musicnn"`` or ``"mtt-musicnn"``.

    Raises
    ------
    ModelError
        If ``name`` is unknown or a weight file is missing or damaged.
    """
    if name not in BUILTIN_FILES:
        known = ", ".join(sorted(BUILTIN_FILES))
        raise ModelError(f"unknown built-in model {name!r} (known: {known})")
    _check_precision(precision)
    networks = []
    for filename in BUILTIN_FILES[name]:
        path = WEIGHTS_DIR / filename
        networks.append(_load_network(path, read_metadata(path), precision=precision))
    if len(networks) == 1:
        return networks[0]
    return MusicnnEnsemble(*networks).eval()


def _main(argv: Sequence[str] | None = None) -> int:
    """``python -m deepsim.models.musicnn FILE...``: print top tags and vector size."""
    import argparse
    import sys

    from deepsim.audio import decode_middle
    from deepsim.errors import DeepsimError

    parser = argparse.ArgumentParser(
        prog="python -m deepsim.models.musicnn",
        description="Tag audio files with the shipped musicnn networks.",
    )
    parser.add_argument("files", nargs="+", help="audio files")
    parser.add_argument("--model", default="default", choices=sorted(BUILTIN_FILES))
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS)
    parser.add_argument("--top", type=int, default=5, help="tags to show per vocabulary")
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error(f"--top must be at least 1, got {args.top}")
    model = load_builtin(args.model, precision=args.precision)
    failed = 0
    for path in args.files:
        try:
            wave = decode_middle(
                path, sample_rate=model.frontend.sample_rate, seconds=model.frontend.clip_seconds
            )
        except DeepsimError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
            continue
        result = model.embed([wave])
        vector = result.vectors[0]
        print(
            f"{path}: {len(wave) / model.frontend.sample_rate:.1f} s, model {model.model_id}, "
            f"vector {vector.shape[0]}-d, norm {np.linalg.norm(vector):.4f}"
        )
        tags = result.tags[0] if result.tags is not None else np.zeros(0, np.float32)
        vocabularies: dict[str, list[int]] = {}
        for i, name in enumerate(model.tag_names):
            vocabularies.setdefault(
                name.split(":")[0] if ":" in name else model.model_id, []
            ).append(i)
        for vocab, indices in vocabularies.items():
            top = sorted(indices, key=lambda i: -tags[i])[: args.top]
            shown = ", ".join(f"{model.tag_names[i].split(':', 1)[-1]} {tags[i]:.3f}" for i in top)
            print(f"  {vocab}: {shown}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(_main())
