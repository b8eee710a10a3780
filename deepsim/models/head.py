"""A regression head trained by ``beet deepsim-train`` on top of another model.

Following the seed (van den Oord, Dieleman & Schrauwen, NIPS 2013), the head
regresses unit-normalised WMF track factors, here from the vectors of a
*backbone* model (by default the shipped musicnn ensemble) rather than from
raw log-mels:

    audio → backbone (frozen, or fine-tuned) → unit vector → MLP → unit vector

The MLP standardises its input (mean and scale of the training vectors,
stored with it), then ``Linear(in, hidden) → ReLU → Dropout → Linear(hidden,
factors)`` (or a single ``Linear(in, factors)`` with ``hidden = 0``).  Because the
backbone's vectors are already in the library, a head with a frozen backbone
can re-embed a whole collection from the stored vectors without decoding any
audio (:meth:`HeadModel.apply_to_vectors`).

A head trained by today's ``deepsim-train`` gives *combined* vectors: with the
stored taste weight ``w`` (``config["taste_weight"]``) a track's vector is

    [ sqrt(1 - w) · unit(backbone vector),  sqrt(w) · unit(head output) ]

(``in_dim + out_dim`` dimensions, unit norm), so the cosine of two tracks is
``(1 - w) · cos_sound + w · cos_taste``.  Another weight can be used at query
time without re-embedding: scaling a query's two parts is enough
(:func:`deepsim.taste.query_scale`).  A head without ``taste_weight`` gives the
taste vector alone, as before.

Checkpoint kind ``"head"``: tensors ``head.*`` (and ``backbone.*`` for a
fine-tuned backbone); the config names the backbone (a built-in model name or
a checkpoint path) and the id of its weights.  A frozen backbone is loaded by
name when first needed, so applying the head to stored vectors never loads it.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from deepsim.errors import ModelError, ParameterError
from deepsim.frontend import FrontendParams
from deepsim.models.base import Model
from deepsim.models.checkpoint import load_tensors

KIND = "head"

#: Config keys that define the network (and enter the weights id).
_ARCH_KEYS = ("backbone", "backbone_id", "in_dim", "hidden", "out_dim", "dropout", "finetune")
#: Added to the id only when set, so ids of older taste-only heads stay the same.
_COMBINED_KEYS = ("taste_weight",)


class Standardise(nn.Module):
    """Fixed affine input scaling ``(x - mean) / scale`` (buffers, saved with the head).

    Backbone vectors are unit vectors whose components are small and often
    share a sign; centring and scaling them per dimension lets the MLP's
    default initialisation and Adam's step size work as intended.
    """

    mean: torch.Tensor
    scale: torch.Tensor

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    def fit(self, x: np.ndarray) -> Standardise:
        """Set mean and scale from training inputs ``(n, dim)``."""
        array = np.asarray(x, dtype=np.float64)
        std = array.std(axis=0) if len(array) > 1 else np.ones(array.shape[1])
        scale = np.where(std > 1e-8, std, 1.0)
        self.mean.copy_(torch.from_numpy(array.mean(axis=0)).float())
        self.scale.copy_(torch.from_numpy(scale).float())
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


def make_head(
    in_dim: int, out_dim: int, *, hidden: int = 512, dropout: float = 0.3
) -> nn.Sequential:
    """The regression MLP (its outputs are not normalised).

    ``Standardise → Linear(in, hidden) → ReLU → Dropout → Linear(hidden, out)``,
    or ``Standardise → Linear(in, out)`` for ``hidden = 0``.

    Parameters
    ----------
    in_dim, out_dim
        Input (backbone) and output (factor) dimensions.
    hidden
        Hidden units; ``0`` gives a linear map.
    dropout
        Dropout probability after the hidden layer.
    """
    for name, value in (("in_dim", in_dim), ("out_dim", out_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelError(f"head: {name} must be a positive integer, got {value!r}")
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 0:
        raise ModelError(f"head: hidden must be a non-negative integer, got {hidden!r}")
    if (
        isinstance(dropout, bool)
        or not isinstance(dropout, (int, float))
        or not 0.0 <= float(dropout) < 1.0
    ):
        raise ModelError(f"head: dropout must be in [0, 1), got {dropout!r}")
    if hidden == 0:
        return nn.Sequential(Standardise(in_dim), nn.Linear(in_dim, out_dim))
    return nn.Sequential(
        Standardise(in_dim),
        nn.Linear(in_dim, hidden),
        nn.ReLU(),
        nn.Dropout(float(dropout)),
        nn.Linear(hidden, out_dim),
    )


class HeadModel(Model):
    """A backbone :class:`Model` followed by a regression MLP.

    Parameters
    ----------
    backbone
        The backbone's name: a built-in model name or a checkpoint path
        (stored in the checkpoint and used to load the backbone).
    in_dim
        The backbone's output dimension.
    out_dim
        The head's output dimension (the WMF factors).
    hidden, dropout
        See :func:`make_head`.
    finetune
        Whether the backbone's weights were trained too; they are then saved
        in (and loaded from) this model's checkpoint.
    backbone_id
        Id of the backbone weights the head was trained on.  When the
        backbone is loaded by name its id must match (for a frozen
        backbone), so a head never runs on weights it was not trained for.
    backbone_model
        An already loaded backbone (otherwise it is loaded on first use).
    model_id
        Id of the weights; :meth:`~deepsim.models.base.Model.save` sets it
        from a hash of the architecture and the head's weights (and the
        backbone's, when fine-tuned): ``head-<12 hex digits>``.
    info
        Free-form training summary stored in the checkpoint config (not part
        of the id).
    taste_weight
        ``w`` in ``[0, 1]``: the vectors combine sound and predicted taste (see
        the module); ``None``: the taste vector alone.
    extra
        Named numpy arrays saved in the checkpoint beside the weights (not part
        of the id), e.g. the WMF item factors ``beet recommend`` folds
        listeners in with (stored as ``extra.<name>`` tensors, readable without torch).
    """

    kind: ClassVar[str] = KIND

    def __init__(
        self,
        *,
        backbone: str,
        in_dim: int,
        out_dim: int,
        hidden: int = 512,
        dropout: float = 0.3,
        finetune: bool = False,
        backbone_id: str | None = None,
        backbone_model: Model | None = None,
        model_id: str = "head-untrained",
        info: dict[str, Any] | None = None,
        taste_weight: float | None = None,
        extra: dict[str, np.ndarray] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, str) or not backbone:
            raise ModelError(f"head: backbone must be a model name or path, got {backbone!r}")
        if backbone_model is not None:
            if backbone_id is None:
                backbone_id = backbone_model.model_id
            if backbone_model.dim != in_dim:
                raise ModelError(
                    f"head: backbone {backbone!r} gives {backbone_model.dim}-d vectors, "
                    f"the head expects {in_dim}"
                )
        self.head = make_head(in_dim, out_dim, hidden=hidden, dropout=dropout)
        self.config: dict[str, Any] = {
            "backbone": backbone,
            "backbone_id": backbone_id,
            "in_dim": in_dim,
            "hidden": hidden,
            "out_dim": out_dim,
            "dropout": float(dropout),
            "finetune": bool(finetune),
            "info": dict(info or {}),
        }
        if taste_weight is not None:
            w = float(taste_weight)
            if not 0.0 <= w <= 1.0:
                raise ModelError(f"head: taste_weight must be in [0, 1], got {taste_weight!r}")
            self.config["taste_weight"] = w
        self.extra: dict[str, np.ndarray] = dict(extra or {})
        self.model_id = model_id
        self.dim = out_dim if taste_weight is None else in_dim + out_dim
        self._backbone: Model | None = None
        self._pending_backbone_state: dict[str, torch.Tensor] | None = None
        if backbone_model is not None:
            self._backbone = backbone_model

    # -- the backbone ------------------------------------------------------------

    @property
    def finetune(self) -> bool:
        return bool(self.config["finetune"])

    @property
    def backbone(self) -> Model:
        """The backbone model, loaded (by name) on first use."""
        if self._backbone is None:
            from deepsim.models import load_model

            name = self.config["backbone"]
            model = load_model(name, device=str(self.device))
            if self._pending_backbone_state is not None:
                try:
                    model.load_state_dict(self._pending_backbone_state, strict=True)
                except RuntimeError as exc:
                    first = str(exc).strip().splitlines()[0]
                    raise ModelError(
                        f"head: the fine-tuned backbone weights do not fit {name!r} ({first})"
                    ) from exc
                self._pending_backbone_state = None
            elif self.config["backbone_id"] and model.model_id != self.config["backbone_id"]:
                raise ModelError(
                    f"head: backbone {name!r} now has weights {model.model_id!r}, but this "
                    f"head was trained on {self.config['backbone_id']!r}"
                )
            if model.dim != self.config["in_dim"]:
                raise ModelError(
                    f"head: backbone {name!r} gives {model.dim}-d vectors, the head expects "
                    f"{self.config['in_dim']}"
                )
            model.train(self.training)
            self._backbone = model
        return self._backbone

    @property
    def frontend(self) -> FrontendParams:  # type: ignore[override]
        return self.backbone.frontend

    @property
    def patch_frames(self) -> int:  # type: ignore[override]
        return self.backbone.patch_frames

    @property
    def tag_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(self.backbone.tag_names)

    # -- network -------------------------------------------------------------------

    def embed_patches(self, patches: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.backbone.embed_patches(patches)

    @property
    def taste_weight(self) -> float | None:
        """The stored weight of the taste part (``None``: taste-only vectors)."""
        value = self.config.get("taste_weight")
        return None if value is None else float(value)

    @property
    def taste_dim(self) -> int:
        return int(self.config["out_dim"])

    def combine(self, sound: torch.Tensor, taste: torch.Tensor) -> torch.Tensor:
        """Unit sound and raw taste rows → this model's vectors (see the module)."""
        taste = nn.functional.normalize(taste.float(), dim=1)
        w = self.taste_weight
        if w is None:
            return taste
        sound = nn.functional.normalize(sound.float(), dim=1)
        return torch.cat([sound * (1.0 - w) ** 0.5, taste * w**0.5], dim=1)

    def taste_pool(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Raw (not normalised) head outputs: the predicted taste factors."""
        base = nn.functional.normalize(self.backbone.pool(outputs).float(), dim=1)
        return self.head(base)

    def pool(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        base = nn.functional.normalize(self.backbone.pool(outputs).float(), dim=1)
        return self.combine(base, self.head(base))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """Raw (not normalised) head outputs for one log-mel patch per track.

        ``patches`` is ``(n_tracks, patch_frames, n_mels)``; used to fine-tune
        the backbone and the head together.
        """
        return self.taste_pool(self.embed_patches(patches))

    def apply_to_vectors(self, vectors: np.ndarray, *, batch_size: int = 8192) -> np.ndarray:
        """Re-embed stored backbone vectors without audio.

        Parameters
        ----------
        vectors
            ``(n, in_dim)`` backbone vectors (normalised here).
        batch_size
            Rows per forward pass.

        Returns
        -------
        numpy.ndarray
            float32 ``(n, dim)`` unit vectors, equal (up to rounding) to
            what :meth:`embed` gives for the same audio.

        Raises
        ------
        ModelError
            For a fine-tuned backbone, whose vectors differ from the stored
            ones (its tracks must be embedded from audio).
        """
        if self.finetune:
            raise ModelError(
                f"{self.model_id}: the backbone was fine-tuned, so stored "
                f"{self.config['backbone_id']} vectors cannot be reused; embed from audio"
            )
        array = np.asarray(vectors, dtype=np.float32)
        if array.ndim != 2 or array.shape[1] != self.config["in_dim"]:
            raise ParameterError(
                f"expected (n, {self.config['in_dim']}) backbone vectors, got shape {array.shape}"
            )
        if batch_size <= 0:
            raise ParameterError(f"batch_size must be positive, got {batch_size!r}")
        was_training = self.head.training
        self.head.eval()
        out = np.empty((len(array), self.dim), np.float32)
        try:
            with torch.inference_mode():
                for start in range(0, len(array), batch_size):
                    chunk = torch.from_numpy(array[start : start + batch_size]).to(self.device)
                    chunk = nn.functional.normalize(chunk, dim=1)
                    result = self.combine(chunk, self.head(chunk))
                    out[start : start + len(chunk)] = result.cpu().numpy()
        finally:
            self.head.train(was_training)
        return out

    # -- persistence (saved by Model.save) -------------------------------------------

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"head.{k}": v for k, v in self.head.state_dict().items()}
        if self.finetune:
            tensors.update({f"backbone.{k}": v for k, v in self.backbone.state_dict().items()})
        return tensors

    def id_config(self) -> dict[str, Any]:
        arch = {key: self.config[key] for key in _ARCH_KEYS}
        arch.update({key: self.config[key] for key in _COMBINED_KEYS if key in self.config})
        return arch

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return {
            f"extra.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.extra.items()
        }


def from_checkpoint(
    path: str | os.PathLike[str],
    meta: dict[str, Any],
    *,
    backbone_model: Model | None = None,
) -> HeadModel:
    """Load a checkpoint written by :meth:`HeadModel.save` (used by ``load_model``).

    Parameters
    ----------
    path, meta
        The checkpoint and its metadata (:func:`~deepsim.models.checkpoint.read_metadata`).
    backbone_model
        An already loaded backbone to use instead of loading it by name
        (for a fine-tuned head its weights are replaced by the stored ones).
    """
    if meta.get("kind") != KIND:
        raise ModelError(f"{path}: a {meta.get('kind')!r} checkpoint, not {KIND!r}")
    config = dict(meta.get("config") or {})
    try:
        model = HeadModel(
            backbone=config["backbone"],
            in_dim=config["in_dim"],
            out_dim=config["out_dim"],
            hidden=config["hidden"],
            dropout=config["dropout"],
            finetune=config["finetune"],
            backbone_id=config.get("backbone_id"),
            model_id=meta["model_id"],
            info=config.get("info"),
            taste_weight=config.get("taste_weight"),
        )
    except KeyError as exc:
        raise ModelError(f"{path}: head config lacks {exc}") from exc
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from exc
    # Anything else stored (e.g. deepsim-train's "cf" settings) is kept as it was.
    model.config.update({k: v for k, v in config.items() if k not in model.config})
    tensors = load_tensors(path)
    head_state = {k[5:]: v for k, v in tensors.items() if k.startswith("head.")}
    backbone_state = {k[9:]: v for k, v in tensors.items() if k.startswith("backbone.")}
    model.extra = {k[6:]: v.numpy() for k, v in tensors.items() if k.startswith("extra.")}
    try:
        model.head.load_state_dict(head_state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelError(f"{path}: weights do not fit the stored config ({first})") from exc
    if model.finetune:
        if not backbone_state:
            raise ModelError(f"{path}: a fine-tuned head without backbone weights")
        model._pending_backbone_state = backbone_state
    if backbone_model is not None:
        if backbone_model.dim != model.config["in_dim"]:
            raise ModelError(
                f"{path}: the given backbone gives {backbone_model.dim}-d vectors, the head "
                f"expects {model.config['in_dim']}"
            )
        if model.finetune:
            try:
                backbone_model.load_state_dict(backbone_state, strict=True)
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()[0]
                raise ModelError(
                    f"{path}: the fine-tuned backbone weights do not fit the given backbone "
                    f"({first})"
                ) from exc
            model._pending_backbone_state = None
        model._backbone = backbone_model
    return model
