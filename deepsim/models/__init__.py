"""Model registry: names and checkpoint paths → :class:`~deepsim.models.base.Model`.

``model_id`` is torch-free (it reads only a checkpoint header), so the
similarity path can find the active model's id without importing torch.

Built-in names (weights ship in ``deepsim/models/weights``):

``default``
    musicnn MSD + MTT ensemble, 400-d (``musicnn-msd-mtt-1``).
``msd-musicnn`` / ``mtt-musicnn``
    one of the two networks, 200-d.

Anything else is taken as the path of a deepsim checkpoint (``.safetensors``)
written by ``beet deepsim-train`` or ``python -m deepsim.pretrain``.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from deepsim import threads
from deepsim.errors import ModelError
from deepsim.models.checkpoint import read_metadata
from deepsim.util import atomic_write, import_torch

# Before any model module imports torch (and with it the OpenMP runtime).
threads.passive_openmp_wait()

if TYPE_CHECKING:
    from deepsim.models.base import Model

#: Built-in model names and the ids of their weights.
BUILTIN_MODELS: dict[str, str] = {
    "default": "musicnn-msd-mtt-1",
    "msd-musicnn": "musicnn-msd-1",
    "mtt-musicnn": "musicnn-mtt-1",
}

#: Checkpoint kinds and the module whose ``from_checkpoint(path, meta)`` loads them.
KINDS: dict[str, str] = {
    "musicnn": "deepsim.models.musicnn",
    "musicnn-ensemble": "deepsim.models.musicnn",
    "dieleman": "deepsim.models.dieleman",
    "head": "deepsim.models.head",
}


def _as_path(name_or_path: str | os.PathLike[str]) -> Path:
    path = Path(os.path.expanduser(os.fspath(name_or_path)))
    if not path.is_file():
        known = ", ".join(sorted(BUILTIN_MODELS))
        raise ModelError(
            f"unknown model {os.fspath(name_or_path)!r}: not a built-in model ({known}) "
            "and no such checkpoint file"
        )
    return path


def model_id(name_or_path: str | os.PathLike[str]) -> str:
    """The id of the weights a model name or checkpoint path refers to."""
    if isinstance(name_or_path, str) and name_or_path in BUILTIN_MODELS:
        return BUILTIN_MODELS[name_or_path]
    return str(read_metadata(_as_path(name_or_path))["model_id"])


def load_model(
    name_or_path: str | os.PathLike[str], *, device: str = "cpu", precision: str = "fp32"
) -> Model:
    """Load a built-in model or a checkpoint, in eval mode, on ``device``.

    Parameters
    ----------
    precision
        ``"fp32"`` (exact), ``"bf16"`` or ``"int8"`` (musicnn's timbral
        convolutions in bfloat16 / int8 on the CPU, within the accuracy contract
        of docs/performance.md) or ``"auto"`` (int8 on x86 CPUs with VNNI or
        AVX2, else bf16 on CPUs with native bf16, else fp32; see
        :func:`deepsim.models.musicnn.resolve_precision`).  Only musicnn models
        use it.
    """
    if precision not in ("fp32", "bf16", "int8", "auto"):
        raise ModelError(f"precision must be fp32, bf16, int8 or auto, got {precision!r}")
    import_torch()  # the cheap way, before anything imports it
    if isinstance(name_or_path, str) and name_or_path in BUILTIN_MODELS:
        from deepsim.models.musicnn import load_builtin, resolve_precision

        model = load_builtin(name_or_path, precision=resolve_precision(precision, device))
    else:
        path = _as_path(name_or_path)
        meta = read_metadata(path)
        module_name = KINDS.get(meta["kind"])
        if module_name is None:
            raise ModelError(f"{path}: unknown checkpoint kind {meta['kind']!r}")
        module = importlib.import_module(module_name)
        model = module.from_checkpoint(path, meta)
    return model.to(device).eval()


#: File under the deepsim state directory naming the trained model in use.
ACTIVE_FILE = "active-model.json"


def active_model(name: str, *, state_dir: str | os.PathLike[str]) -> str:
    """Resolve the configured model name to a built-in name or a checkpoint path.

    ``"auto"`` means the model most recently trained by ``beet deepsim-train``
    (recorded in ``<state_dir>/active-model.json`` once its checkpoint is
    complete), or ``"default"`` when there is none.  Any other value is
    returned unchanged.
    """
    if name != "auto":
        return name
    pointer = Path(state_dir) / ACTIVE_FILE
    try:
        data = json.loads(pointer.read_text(encoding="utf-8"))
        path = Path(data["path"])
    except FileNotFoundError:
        return "default"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{pointer}: unreadable active-model record ({exc})") from exc
    if not path.is_absolute():
        path = Path(state_dir) / path
    if not path.is_file():
        raise ModelError(f"{pointer}: the active model {path} is missing")
    return os.fspath(path)


def set_active_model(
    path: str | os.PathLike[str] | None, *, state_dir: str | os.PathLike[str]
) -> None:
    """Make a complete checkpoint the ``auto`` model (``None`` reverts to ``default``).

    The record is replaced atomically, so an interrupted call leaves the
    previous model active.
    """
    pointer = Path(state_dir) / ACTIVE_FILE
    if path is None:
        pointer.unlink(missing_ok=True)
        return
    meta = read_metadata(path)  # refuse anything that is not a complete checkpoint
    record = {"path": os.fspath(Path(path).resolve()), "model_id": meta["model_id"]}
    with atomic_write(pointer, "w") as handle:
        handle.write(json.dumps(record))
