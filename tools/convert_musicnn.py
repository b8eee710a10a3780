"""Convert the musicnn 0.1.0 TensorFlow checkpoints into deepsim's shipped weights.

This is a maintenance tool, not part of deepsim.  It runs in deepsim's own
environment (torch + safetensors) and does NOT need TensorFlow: the TF
checkpoint format (a LevelDB-style table of ``BundleEntryProto`` records in
``.index`` plus raw little-endian tensor bytes in ``.data-00000-of-00001``) is
read by the small parser below, which checks every tensor's CRC-32C.  The
golden test (``tests/test_musicnn.py`` against ``tools/make_musicnn_golden.py``,
which runs the original graphs in TensorFlow) checks the result end to end.

Usage::

    pip download --no-deps musicnn==0.1.0 -d /tmp/dl
    .venv/bin/python tools/convert_musicnn.py /tmp/dl/musicnn-0.1.0-py3-none-any.whl \\
        deepsim/models/weights

writes ``msd-musicnn.safetensors`` and ``mtt-musicnn.safetensors`` (model
variables only; Adam moments and step counters are dropped) and copies the
wheel's ISC licence to ``LICENSE-musicnn``.
"""

from __future__ import annotations

import argparse
import hashlib
import struct
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: Network directory in the wheel -> (deepsim network key, output file).
NETWORKS = {
    "MSD_musicnn": ("msd", "msd-musicnn.safetensors"),
    "MTT_musicnn": ("mtt", "mtt-musicnn.safetensors"),
}

#: TF layer scope -> deepsim module name, in the order TF created the layers.
LAYERS = {
    "batch_normalization": "input_norm",
    "conv2d": "timbral.0",
    "batch_normalization_1": "timbral_norm.0",
    "conv2d_1": "timbral.1",
    "batch_normalization_2": "timbral_norm.1",
    "conv2d_2": "temporal.0",
    "batch_normalization_3": "temporal_norm.0",
    "conv2d_3": "temporal.1",
    "batch_normalization_4": "temporal_norm.1",
    "conv2d_4": "temporal.2",
    "batch_normalization_5": "temporal_norm.2",
    "conv2d_5": "midend.0",
    "batch_normalization_6": "midend_norm.0",
    "conv2d_6": "midend.1",
    "batch_normalization_7": "midend_norm.1",
    "conv2d_7": "midend.2",
    "batch_normalization_8": "midend_norm.2",
    "batch_normalization_9": "pool_norm",
    "dense": "dense",
    "batch_normalization_10": "dense_norm",
    "dense_1": "classifier",
}
BN_PARAMS = {
    "gamma": "weight",
    "beta": "bias",
    "moving_mean": "running_mean",
    "moving_variance": "running_var",
}

# -- a minimal reader of TF's tensor_bundle checkpoints -----------------------

_TABLE_MAGIC = 0xDB4775248B80FB57
_DT_FLOAT = 1


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) pairs of a serialised protobuf message."""
    fields: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            fields.append((number, value))
        elif wire == 2:
            length, pos = _varint(buf, pos)
            fields.append((number, buf[pos : pos + length]))
            pos += length
        elif wire == 5:
            fields.append((number, struct.unpack_from("<I", buf, pos)[0]))
            pos += 4
        elif wire == 1:
            fields.append((number, struct.unpack_from("<Q", buf, pos)[0]))
            pos += 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    return fields


def _block(data: bytes, offset: int, size: int) -> list[tuple[bytes, bytes]]:
    """Key/value entries of one uncompressed table block."""
    if data[offset + size] != 0:
        raise ValueError("compressed checkpoint index blocks are not supported")
    block = data[offset : offset + size]
    n_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    end = len(block) - 4 - 4 * n_restarts
    entries: list[tuple[bytes, bytes]] = []
    key = b""
    pos = 0
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_len, pos = _varint(block, pos)
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        entries.append((key, block[pos : pos + value_len]))
        pos += value_len
    return entries


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_tf_checkpoint(
    directory: Path, *, basename: str = "", names: set[str] | None = None
) -> dict[str, np.ndarray]:
    """Read float32 tensors of a single-shard TF 1.x/2.x checkpoint.

    Parameters
    ----------
    directory, basename
        ``directory/<basename>.index`` and ``directory/<basename>.data-00000-of-00001``
        must exist (musicnn's checkpoints have an empty basename).
    names
        Variables to read (default: all).
    """
    prefix = Path(directory) / basename
    index = (Path(directory) / f"{basename}.index").read_bytes()
    shard = (Path(directory) / f"{basename}.data-00000-of-00001").read_bytes()
    footer = index[-48:]
    if struct.unpack("<Q", footer[-8:])[0] != _TABLE_MAGIC:
        raise ValueError(f"{prefix}.index: not a TF checkpoint index")
    pos = 0
    _, pos = _varint(footer, pos)  # metaindex offset
    _, pos = _varint(footer, pos)  # metaindex size
    index_offset, pos = _varint(footer, pos)
    index_size, pos = _varint(footer, pos)
    tensors: dict[str, np.ndarray] = {}
    for _, handle in _block(index, index_offset, index_size):
        block_offset, hpos = _varint(handle, 0)
        block_size, _ = _varint(handle, hpos)
        for raw_key, value in _block(index, block_offset, block_size):
            name = raw_key.decode()
            if not name or (names is not None and name not in names):
                continue  # "" is the bundle header
            entry = dict(_proto_fields(value))
            if entry.get(1) != _DT_FLOAT or entry.get(3, 0) != 0 or 7 in entry:
                raise ValueError(f"{name}: only unsliced float32 tensors in shard 0 are supported")
            shape = [
                int(dict(_proto_fields(dim)).get(1, 0))
                for number, dim in _proto_fields(entry.get(2, b""))
                if number == 2
            ]
            offset, size = int(entry.get(4, 0)), int(entry[5])
            raw = shard[offset : offset + size]
            if _masked_crc32c(raw) != entry[6]:
                raise ValueError(f"{name}: CRC-32C mismatch in {prefix}.data-00000-of-00001")
            tensors[name] = np.frombuffer(raw, "<f4").reshape(shape).copy()
    return tensors


# -- TF layout -> deepsim layout ------------------------------------------------


def expected_variables() -> set[str]:
    """Names of the 64 model variables of a musicnn checkpoint."""
    names = set()
    for scope in LAYERS:
        params = BN_PARAMS if scope.startswith("batch_normalization") else ("kernel", "bias")
        names.update(f"{scope}/{p}" for p in params)
    return names


def convert(tf_vars: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename and transpose musicnn's 64 variables into the deepsim network's."""
    out: dict[str, np.ndarray] = {}
    for scope, module in LAYERS.items():
        if scope.startswith("batch_normalization"):
            for tf_name, torch_name in BN_PARAMS.items():
                out[f"{module}.{torch_name}"] = tf_vars[f"{scope}/{tf_name}"]
            continue
        kernel = tf_vars[f"{scope}/kernel"]
        if scope.startswith("dense"):
            weight = kernel.T  # (in, out) -> (out, in)
        elif module.startswith("midend"):
            # (7, C_in, 1, C_out): a conv over time spanning all channels -> Conv1d.
            weight = kernel[:, :, 0, :].transpose(2, 1, 0)
        else:
            weight = kernel.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        out[f"{module}.weight"] = np.ascontiguousarray(weight)
        out[f"{module}.bias"] = tf_vars[f"{scope}/bias"]
    unused = set(tf_vars) - expected_variables()
    if unused:
        raise ValueError(f"unconverted variables: {sorted(unused)}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("wheel", type=Path, help="musicnn-0.1.0-py3-none-any.whl")
    parser.add_argument("outdir", type=Path, help="where to write the safetensors files")
    args = parser.parse_args(argv)

    import torch

    from deepsim.models import musicnn
    from deepsim.models.checkpoint import save_checkpoint

    wheel_sha = hashlib.sha256(args.wheel.read_bytes()).hexdigest()
    wanted = expected_variables()
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(args.wheel) as wheel:
        wheel.extractall(tmp)
        root = Path(tmp) / "musicnn"
        for directory, (network, filename) in NETWORKS.items():
            tf_vars = read_tf_checkpoint(root / directory, names=wanted)
            if set(tf_vars) != wanted:
                raise SystemExit(f"{directory}: missing {sorted(wanted - set(tf_vars))}")
            state = {k: torch.from_numpy(v) for k, v in convert(tf_vars).items()}
            model = musicnn.MusicnnModel(network=network)
            model.net.load_state_dict(state, strict=True)  # checks names and shapes
            n_values = sum(v.numel() for v in state.values())
            config = musicnn.checkpoint_config(network)
            config["source"] = {
                "package": "musicnn 0.1.0 (PyPI), ISC licence, (c) MTG-UPF 2019",
                "checkpoint": f"musicnn/{directory}",
                "wheel_sha256": wheel_sha,
            }
            path = save_checkpoint(
                args.outdir / filename,
                state,
                kind="musicnn",
                model_id=musicnn.NETWORK_IDS[network],
                config=config,
            )
            path.chmod(0o644)  # package data, readable by all
            print(f"{directory}: {len(state)} tensors, {n_values} values -> {path}")
        licence = (root.parent / "musicnn-0.1.0.dist-info" / "LICENSE.md").read_text()
    (args.outdir / "LICENSE-musicnn").write_text(
        "The files msd-musicnn.safetensors and mtt-musicnn.safetensors in this directory\n"
        "are the weights of the MSD_musicnn and MTT_musicnn models of the musicnn package\n"
        "(version 0.1.0, https://github.com/jordipons/musicnn, by Jordi Pons and Xavier\n"
        "Serra, Music Technology Group, Universitat Pompeu Fabra), converted from\n"
        "TensorFlow checkpoints to safetensors (renamed and transposed, values unchanged).\n"
        "They are distributed under the package's ISC licence, reproduced below.\n\n"
        + licence.strip()
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
