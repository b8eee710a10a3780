"""One musicnn network in other inference engines against deepsim's torch kernels.

Usage::

    pip install onnxruntime openvino nncf onnx onnxscript   # benchmark-only, none ships
    python benchmarks/bench_backends.py [--network msd] [--threads 1] [--rounds 7]

The issue asked for an int8/bf16 model in OpenVINO or ONNX Runtime as an optional
backend, shipped only if clearly faster than torch on the same tracks.  This script
is that measurement: the network (fp32 weights of the shipped file) exported from
torch as it is (front end, mid end, back end; the frequency max-pool after each
front-end convolution), then

* ``torch fp32`` / ``torch int8``: deepsim's own (``precision: fp32`` / ``int8``);
* ``openvino f32`` / ``openvino bf16``: ``openvino.convert_model`` of the fp32
  network, compiled with ``INFERENCE_PRECISION_HINT`` f32 or bf16 (AMX where the
  CPU has it);
* ``openvino int8``: NNCF post-training quantization of that model (calibrated on
  the patches below), the five front-end convolutions only (quantizing the rest
  is far outside the accuracy contract);
* ``onnxruntime fp32`` / ``onnxruntime int8``: the ONNX export, and its static QDQ
  quantization (per-channel int8 weights, uint8 activations) of the five
  front-end convolutions.

Each engine runs one thread (``--threads``), on one 30-s track's 10 patches at a
time, the engines taking turns (best of ``--rounds``), so the ratios share the
machine's load.  Accuracy: each track's vector (the mean of its patches'
penultimate layers, normalised) against torch fp32, the cosine's minimum over the
corpus excerpts.  Engines whose package is missing are skipped with a line.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from deepsim.audio import decode_middle
from deepsim.models import musicnn

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "excerpts"

Run = Callable[[np.ndarray], np.ndarray]


class _Exported(torch.nn.Module):
    """The fp32 network as one traceable graph: patches -> penultimate layer."""

    def __init__(self, net: musicnn.MusicnnNetwork) -> None:
        super().__init__()
        self.net = net

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.net._forward(patches)["embedding"]


def _have(*names: str) -> bool:
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        print(f"  skipped: {', '.join(missing)} not installed")
    return not missing


def _openvino(exported: _Exported, example: torch.Tensor, calib: list[np.ndarray], threads: int):
    import openvino as ov

    core = ov.Core()
    model = ov.convert_model(exported, example_input=example, input=[(-1, *example.shape[1:])])
    runs: dict[str, Run] = {}

    def compiled(m: object, hint: str) -> Run:
        config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": hint}
        request = core.compile_model(m, "CPU", config).create_infer_request()
        return lambda x: request.infer({0: x})[0]

    runs["openvino f32"] = compiled(model, "f32")
    runs["openvino bf16"] = compiled(model, "bf16")
    if _have("nncf"):
        import logging

        import nncf

        nncf.set_log_level(logging.ERROR)

        convs = [op.get_friendly_name() for op in model.get_ordered_ops()]
        convs = [n for n, op in zip(convs, model.get_ordered_ops(), strict=True) if
                 op.get_type_name() in ("Convolution", "MatMul")]  # fmt: skip
        quantized = nncf.quantize(
            model,
            nncf.Dataset(calib),
            subset_size=len(calib),
            # no quantizers but at the five front-end convolutions' inputs
            ignored_scope=nncf.IgnoredScope(
                names=convs[5:],
                types=["Concat", "Add", "ReduceMean", "ReduceMax", "Multiply", "Relu"],
                validate=False,
            ),
        )
        runs["openvino int8"] = compiled(quantized, "bf16")
    return runs


def _onnxruntime(
    exported: _Exported, example: torch.Tensor, calib: list[np.ndarray], threads: int, work: Path
) -> dict[str, Run]:
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    plain, prepared, quantized = work / "net.onnx", work / "pre.onnx", work / "int8.onnx"
    torch.onnx.export(
        exported,
        (example,),
        str(plain),
        input_names=["patches"],
        output_names=["embedding"],
        dynamo=False,
        opset_version=17,
    )
    convs = [n.name for n in onnx.load(str(plain)).graph.node if n.op_type == "Conv"][:5]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.left = iter([{"patches": c} for c in calib])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.left, None)

    quant_pre_process(str(plain), str(prepared))
    quantize_static(
        str(prepared),
        str(quantized),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_quantize=convs,
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    runs: dict[str, Run] = {}
    for name, path in (("onnxruntime fp32", plain), ("onnxruntime int8", quantized)):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        runs[name] = (lambda s: lambda x: s.run(None, {"patches": x})[0])(session)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", choices=["msd", "mtt"], default="msd")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    args = parser.parse_args()
    if not args.corpus.is_dir():
        raise SystemExit(f"--corpus {args.corpus}: not a folder (real music is needed)")
    torch.set_num_threads(args.threads)
    exact = musicnn.load_builtin(f"{args.network}-musicnn", precision="fp32")
    int8 = musicnn.load_builtin(f"{args.network}-musicnn", precision="int8")
    paths = sorted(args.corpus.iterdir())
    waves = [decode_middle(p, sample_rate=16000, seconds=30.0) for p in paths]
    with torch.inference_mode():
        patches, owner = exact.patchify(exact.compute_logmels(waves))
    # one track (10 patches) a call; the export sees exactly that shape
    tracks = [patches[owner == i].contiguous() for i in range(len(waves))]
    tracks = [t for t in tracks if len(t) == 10]
    calib = [t.numpy() for t in tracks]
    exported = _Exported(exact.net).eval()
    runs: dict[str, Run] = {
        "torch fp32": lambda x: exact.net(torch.from_numpy(x))["embedding"].numpy(),
        "torch int8": lambda x: int8.net(torch.from_numpy(x))["embedding"].numpy(),
    }
    with tempfile.TemporaryDirectory() as work:
        chunk, musicnn.CHUNK_PATCHES = musicnn.CHUNK_PATCHES, 10  # the export: one piece
        try:
            print("openvino:")
            if _have("openvino"):
                runs.update(_openvino(exported, tracks[0], calib, args.threads))
            print("onnxruntime:")
            if _have("onnxruntime", "onnx", "onnxscript"):
                runs.update(_onnxruntime(exported, tracks[0], calib, args.threads, Path(work)))
        finally:
            musicnn.CHUNK_PATCHES = chunk
        with torch.inference_mode():
            reference = np.stack([runs["torch fp32"](c).mean(0) for c in calib])
            reference /= np.linalg.norm(reference, axis=1, keepdims=True)
            cosine = {}
            for name, run in runs.items():
                got = np.stack([run(c).mean(0) for c in calib])
                got /= np.linalg.norm(got, axis=1, keepdims=True)
                cosine[name] = float((got * reference).sum(1).min())
            times: dict[str, list[float]] = {name: [] for name in runs}
            sample = calib[0]
            for _ in range(args.rounds):
                for name, run in runs.items():
                    started = time.perf_counter()
                    run(sample)
                    times[name].append(time.perf_counter() - started)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(
        f"{args.network}, one track (10 patches) a call, {args.threads} thread(s), "
        f"best of {args.rounds}, {len(calib)} tracks for accuracy, load average {load}"
    )
    base = min(times["torch int8"])
    for name, seconds in times.items():
        print(
            f"{name:<18} {min(seconds) * 1000:7.1f} ms  {base / min(seconds):5.2f}x torch int8  "
            f"track cosine to torch fp32 min {cosine[name]:.5f}"
        )


if __name__ == "__main__":
    main()
