"""The :class:`Model` interface shared by every network deepsim can run.

A model turns a batch of mono waveforms (already decoded at
``model.frontend.sample_rate``) into L2-normalised float32 vectors.  It owns
its front end (:mod:`deepsim.frontend`), so the log-mel parameters always match
the weights.  Implementations: :mod:`deepsim.models.musicnn` (the shipped
default), :mod:`deepsim.models.dieleman` (the seed's CF-regression network) and
:mod:`deepsim.models.head` (a head trained by ``beet deepsim-train`` on top of
another model).

Persistence is written once, here: :meth:`Model.save` writes
:meth:`~Model.checkpoint_tensors` and :attr:`~Model.config` as a checkpoint of
the model's :attr:`~Model.kind` (:mod:`deepsim.models.checkpoint`),
:meth:`~Model.weights_id` hashes the same tensors with the one id scheme, and
:meth:`Model.load` reads a file back through the loader registered for its kind
(:data:`deepsim.models.KINDS`).  ``tests/test_models.py`` checks this contract
for every model class.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

from deepsim.errors import ModelError, ParameterError
from deepsim.frontend import FrontendParams, make_logmel
from deepsim.models import checkpoint
from deepsim.util import loop_to_length

_M = TypeVar("_M", bound="Model")


@dataclass
class EmbedResult:
    """What :meth:`Model.embed` returns for a batch of tracks.

    Attributes
    ----------
    vectors
        float32 array ``(n_tracks, model.dim)``, each row of unit L2 norm.
    tags
        float32 array ``(n_tracks, len(model.tag_names))`` of mean tag
        probabilities, or ``None`` for models without tags.
    """

    vectors: np.ndarray
    tags: np.ndarray | None = None


class Model(torch.nn.Module, abc.ABC):
    """A network that maps audio to similarity vectors.

    Subclasses set :attr:`kind`, :attr:`model_id`, :attr:`config`,
    :attr:`frontend`, :attr:`dim`, :attr:`tag_names` and :attr:`patch_frames`,
    implement :meth:`embed_patches` and :meth:`pool`, and register a loader
    ``from_checkpoint(path, meta)`` for their kind in
    :data:`deepsim.models.KINDS`.  :meth:`checkpoint_tensors`,
    :meth:`id_config` and :meth:`extra_tensors` may be overridden where a
    checkpoint holds something other than the state dict.
    """

    #: Checkpoint kind (``deepsim_kind``) :meth:`save` writes; names the loader.
    kind: ClassVar[str]
    #: Names the exact weights; vectors of different ids never mix.  Built-in
    #: weights have fixed ids (:data:`deepsim.models.BUILTIN_MODELS`); a saved
    #: model is named by :meth:`weights_id`.
    model_id: str
    #: JSON-serialisable settings that, with the tensors, rebuild the network
    #: (stored in the checkpoint; :meth:`load` gives back an equal dict).
    config: dict[str, Any]
    #: Front-end parameters the network was trained with.
    frontend: FrontendParams
    #: Output dimension.
    dim: int
    #: Tag vocabulary (empty when the model predicts no tags).
    tag_names: tuple[str, ...] = ()
    #: Frames per network input patch.
    patch_frames: int
    #: Independent parts :meth:`embed_patches` can run side by side on the CPU
    #: (:func:`deepsim.threads.parallel`): the default pair's two networks, a
    #: musicnn network's two halves of the patches.
    parallel_parts: ClassVar[int] = 1

    def __init__(self) -> None:
        super().__init__()
        self._logmel: torch.nn.Module | None = None

    @property
    def logmel(self) -> torch.nn.Module:
        """The log-mel module (built on first use, on the model's device)."""
        if self._logmel is None:
            self._logmel = make_logmel(self.frontend).to(self.device)
        return self._logmel

    @property
    def device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        return torch.device("cpu")

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Model:
        # Keep the lazily built front end on the same device as the weights.
        result = super()._apply(fn, recurse)
        self._logmel = None
        return result

    # -- the part each network implements ------------------------------------

    @abc.abstractmethod
    def embed_patches(self, patches: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the network on log-mel patches.

        Parameters
        ----------
        patches
            ``(n_patches, patch_frames, n_mels)`` float32.

        Returns
        -------
        dict
            Per-patch outputs, each ``(n_patches, ...)``; at least
            ``"embedding"``, and ``"tags"`` for tagging models.
        """

    @abc.abstractmethod
    def pool(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Turn the mean of per-patch outputs of one or more tracks into vectors.

        ``outputs`` holds the per-track means of :meth:`embed_patches`'
        outputs, ``(n_tracks, ...)``; the result is ``(n_tracks, dim)`` and
        need not be normalised (:meth:`embed` does that).
        """

    # -- shared machinery ------------------------------------------------------

    def patchify(self, mels: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cut log-mels into non-overlapping patches of :attr:`patch_frames`.

        A log-mel shorter than one patch is looped (tiled) to one patch, so a
        short track is described by its own sound rather than by padding.

        Returns
        -------
        patches, owner
            ``(n_patches, patch_frames, n_mels)`` and, for each patch, the index
            of the track it came from.
        """
        pieces: list[torch.Tensor] = []
        owners: list[int] = []
        n = self.patch_frames
        for index, mel in enumerate(mels):
            mel = loop_to_length(mel, n)
            count = 1 + (mel.shape[0] - n) // n
            pieces.append(mel[: count * n].reshape(count, n, mel.shape[1]))
            owners.extend([index] * count)
        return torch.cat(pieces), torch.tensor(owners, device=pieces[0].device)

    def compute_logmels(self, waves: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Log-mel of each waveform; equal-length waveforms are batched."""
        out: list[torch.Tensor | None] = [None] * len(waves)
        by_length: dict[int, list[int]] = {}
        for i, wave in enumerate(waves):
            by_length.setdefault(len(wave), []).append(i)
        for indices in by_length.values():
            batch = torch.from_numpy(np.stack([np.asarray(waves[i], np.float32) for i in indices]))
            mels = self.logmel(batch.to(self.device))
            for j, i in enumerate(indices):
                out[i] = mels[j]
        return [m for m in out if m is not None]

    @torch.inference_mode()
    def embed(self, waves: Sequence[np.ndarray]) -> EmbedResult:
        """Embed a batch of tracks.

        Parameters
        ----------
        waves
            1-D float32 arrays at ``self.frontend.sample_rate``, each at least
            one sample long.

        Returns
        -------
        EmbedResult
        """
        if len(waves) == 0:
            return EmbedResult(np.zeros((0, self.dim), np.float32))
        for wave in waves:
            if len(wave) == 0:
                raise ParameterError("cannot embed an empty waveform")
        patches, owner = self.patchify(self.compute_logmels(waves))
        outputs = self.embed_patches(patches)
        counts = torch.bincount(owner, minlength=len(waves)).to(patches.dtype)
        means: dict[str, torch.Tensor] = {}
        for key, value in outputs.items():
            value = value.float()
            total = torch.zeros(
                (len(waves), *value.shape[1:]), dtype=value.dtype, device=value.device
            )
            total.index_add_(0, owner, value)
            means[key] = total / counts.view(-1, *([1] * (value.dim() - 1)))
        vectors = torch.nn.functional.normalize(self.pool(means).float(), dim=1)
        tags = means.get("tags")
        return EmbedResult(
            vectors=vectors.cpu().numpy().astype(np.float32),
            tags=None if tags is None else tags.cpu().numpy().astype(np.float32),
        )

    # -- persistence (one implementation for every model) ------------------------

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The weights a checkpoint holds and :meth:`weights_id` hashes (default: state dict)."""
        return self.state_dict()

    def id_config(self) -> dict[str, Any]:
        """The part of :attr:`config` that defines the network and enters the id (default: all)."""
        return self.config

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors saved beside the weights but not part of the id (default: none)."""
        return {}

    def weights_id(self) -> str:
        """``<kind>-<12 hex digits>``: a hash of :meth:`id_config` and the weights.

        The same architecture and weights give the same id on any machine and
        in any process; any change of a weight gives another id
        (:func:`deepsim.models.checkpoint.weights_id`).
        """
        return checkpoint.weights_id(self.kind, self.id_config(), self.checkpoint_tensors())

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the model as a checkpoint, atomically; returns the path.

        Sets :attr:`model_id` to :meth:`weights_id` first, so the id in the file
        names exactly the weights written.
        """
        self.model_id = self.weights_id()
        tensors = {**self.checkpoint_tensors(), **self.extra_tensors()}
        return checkpoint.save_checkpoint(
            path, tensors, kind=self.kind, model_id=self.model_id, config=self.config
        )

    @classmethod
    def load(cls: type[_M], name_or_path: str | os.PathLike[str], *, device: str = "cpu") -> _M:
        """Load a built-in model or a checkpoint that holds a ``cls`` (in eval mode).

        Raises
        ------
        ModelError
            If the file is unusable or holds another kind of model.
        """
        from deepsim.models import load_model

        model = load_model(name_or_path, device=device)
        if not isinstance(model, cls):
            raise ModelError(
                f"{os.fspath(name_or_path)}: holds a {type(model).__name__}, not a {cls.__name__}"
            )
        return model
