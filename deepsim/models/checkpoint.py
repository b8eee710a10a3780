"""The checkpoint format: one safetensors file with deepsim metadata.

safetensors holds tensors only, so loading a checkpoint can never run code.
The header's metadata carries ``deepsim_kind`` (which :class:`Model`
implementation reads it), ``deepsim_model_id`` and ``deepsim_config`` (JSON
keyword arguments of that implementation).  :func:`read_metadata` needs neither
torch nor the tensors, so ``beet similar`` can learn a model's id cheaply.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepsim.errors import ModelError
from deepsim.util import atomic_temp_path

if TYPE_CHECKING:
    import torch

SUFFIX = ".safetensors"


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read kind, model id and config of a checkpoint without loading tensors.

    Returns
    -------
    dict
        ``{"kind": str, "model_id": str, "config": dict}``.

    Raises
    ------
    ModelError
        If the file is missing, not a safetensors file or not a deepsim
        checkpoint.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) != 8:
                raise ModelError(f"{path}: not a safetensors checkpoint (file too short)")
            size = int.from_bytes(head, "little")
            if size <= 0 or size > 100_000_000:
                raise ModelError(f"{path}: not a safetensors checkpoint (bad header size)")
            header = json.loads(fh.read(size))
    except OSError as exc:
        raise ModelError(f"{path}: cannot read model file ({exc.strerror})") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: not a safetensors checkpoint (bad header)") from exc
    meta = header.get("__metadata__") or {}
    try:
        return {
            "kind": meta["deepsim_kind"],
            "model_id": meta["deepsim_model_id"],
            "config": json.loads(meta.get("deepsim_config", "{}")),
        }
    except (KeyError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: not a deepsim checkpoint (missing {exc})") from exc


def save_checkpoint(
    path: str | os.PathLike[str],
    tensors: dict[str, torch.Tensor],
    *,
    kind: str,
    model_id: str,
    config: dict[str, Any],
) -> Path:
    """Write a checkpoint atomically (temporary file, then rename).

    A crash or Ctrl-C while saving leaves any previous file at ``path`` intact.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "deepsim_kind": kind,
        "deepsim_model_id": model_id,
        "deepsim_config": json.dumps(config, sort_keys=True),
    }
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    tmp = atomic_temp_path(path)
    try:
        save_file(contiguous, os.fspath(tmp), metadata=metadata)
        os.chmod(tmp, 0o644 & ~_umask())  # a model file is not a secret
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def weights_id(kind: str, arch: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    """``<kind>-<12 hex digits>``: a hash of the architecture and the weights.

    The one id scheme of every trainable model: the same architecture and
    weights give the same id, on any machine and in any process.
    """
    import hashlib

    digest = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode())
    for name, tensor in sorted(tensors.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().float().contiguous().numpy().tobytes())
    return f"{kind}-{digest.hexdigest()[:12]}"


def load_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load the tensors of a checkpoint on the CPU (no code is executed)."""
    from safetensors.torch import load_file

    try:
        return load_file(os.fspath(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise ModelError(f"{path}: cannot load checkpoint ({exc})") from exc
