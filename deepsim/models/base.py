"""The :class:`Model` interface shared by every network deepsim can run.

A model turns a batch of mono waveforms (already decoded at
``model.frontend.sample_rate``) into L2-normalised float32 vectors.  It owns
its front end (:mod:`deepsim.frontend`), so the log-mel parameters always match
the weights.  Implementations: :mod:`deepsim.models.musicnn` (the shipped
default), :mod:`deepsim.models.dieleman` (the seed's CF-regression network) and
:mod:`deepsim.models.head` (a head trained by ``beet deepsim-train`` on top of
another model).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from deepsim.frontend import FrontendParams, make_logmel


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

    Subclasses set :attr:`model_id`, :attr:`frontend`, :attr:`dim`,
    :attr:`tag_names` and :attr:`patch_frames`, and implement
    :meth:`embed_patches` and :meth:`pool`.
    """

    #: Names the exact weights; vectors of different ids never mix.
    model_id: str
    #: Front-end parameters the network was trained with.
    frontend: FrontendParams
    #: Output dimension.
    dim: int
    #: Tag vocabulary (empty when the model predicts no tags).
    tag_names: tuple[str, ...] = ()
    #: Frames per network input patch.
    patch_frames: int

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

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
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
            if mel.shape[0] < n:
                reps = -(-n // mel.shape[0])
                mel = mel.repeat(reps, 1)[:n]
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
                raise ValueError("cannot embed an empty waveform")
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
