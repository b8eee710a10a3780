"""The combined "sounds alike, and the same listeners like it" vector (no torch).

A model trained by ``beet deepsim-train`` stores, for every track,

    v = [ sqrt(1 - w0) · s,  sqrt(w0) · t ]

where ``s`` is the unit sound (backbone) vector, ``t`` the unit predicted
taste vector and ``w0`` the taste weight chosen at training time (stored in
the checkpoint config as ``taste_weight``).  The cosine of two such vectors is
``(1 - w0) · cos(s, s') + w0 · cos(t, t')``.

Another weight ``W`` needs neither torch nor re-embedding nor another index:
scaling the *query's* sound part by ``(1 - W) / (1 - w0)`` and its taste part
by ``W / w0`` (:func:`query_scale`) makes ``q' · v = (1 - W) · cos_sound + W ·
cos_taste`` for every stored ``v``, so any index that ranks by cosine ranks by
the new mixture.  ``W = 0`` is sound only, ``W = 1`` taste only.  ``w0`` is
kept strictly inside ``(0, 1)`` so both parts are always present.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from deepsim.errors import ModelError
from deepsim.util import check_float

__all__ = ["VectorLayout", "combine", "layout_of", "query_scale", "split_parts"]


@dataclass(frozen=True)
class VectorLayout:
    """Where the two parts of a combined vector are and how they were weighted."""

    sound_dim: int
    taste_dim: int
    weight: float

    @property
    def dim(self) -> int:
        return self.sound_dim + self.taste_dim


def layout_from_config(config: dict[str, Any]) -> VectorLayout | None:
    """The layout described by a head checkpoint's config (``None``: not combined)."""
    if config.get("taste_weight") is None:
        return None
    return VectorLayout(
        int(config["in_dim"]), int(config["out_dim"]), float(config["taste_weight"])
    )


def layout_of(name_or_path: str | os.PathLike[str]) -> VectorLayout | None:
    """The layout of a model's vectors, from its checkpoint header only.

    ``None`` for built-in models and for heads that give taste vectors alone.
    """
    from deepsim.models import BUILTIN_MODELS
    from deepsim.models.checkpoint import read_metadata

    if isinstance(name_or_path, str) and name_or_path in BUILTIN_MODELS:
        return None
    meta = read_metadata(os.path.expanduser(os.fspath(name_or_path)))
    if meta["kind"] != "head":
        return None
    return layout_from_config(meta["config"])


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def combine(sound: np.ndarray, taste: np.ndarray, weight: float) -> np.ndarray:
    """``[sqrt(1 - w) · unit(sound), sqrt(w) · unit(taste)]`` per row, float32."""
    w = check_float("taste_weight", weight, low=0.0, high=1.0)
    out = np.concatenate([_unit(sound) * np.sqrt(1.0 - w), _unit(taste) * np.sqrt(w)], axis=1)
    return out.astype(np.float32)


def split_parts(matrix: np.ndarray, layout: VectorLayout) -> tuple[np.ndarray, np.ndarray]:
    """The unit sound and unit taste parts of stored combined vectors."""
    m = np.asarray(matrix, dtype=np.float32)
    if m.ndim != 2 or m.shape[1] != layout.dim:
        raise ModelError(
            f"expected {layout.dim}-d combined vectors ({layout.sound_dim} sound + "
            f"{layout.taste_dim} taste), got shape {m.shape}"
        )
    return (
        _unit(m[:, : layout.sound_dim]).astype(np.float32),
        _unit(m[:, layout.sound_dim :]).astype(np.float32),
    )


def query_scale(layout: VectorLayout, weight: float) -> np.ndarray:
    """Per-dimension factors that turn a stored query vector into one for weight ``W``.

    ``q' = q * query_scale(layout, W)`` gives ``q' · v = (1 - W) cos_sound +
    W cos_taste`` for stored vectors ``q`` and ``v`` (see the module).
    """
    w = check_float("taste_weight", weight, low=0.0, high=1.0)
    w0 = layout.weight
    if not 0.0 < w0 < 1.0:
        raise ModelError(f"stored taste weight {w0!r} leaves out one part; cannot re-weight")
    return np.concatenate(
        [
            np.full(layout.sound_dim, (1.0 - w) / (1.0 - w0)),
            np.full(layout.taste_dim, w / w0),
        ]
    ).astype(np.float32)
