"""Learning from listening data: the training behind ``beet deepsim-train``.

The recipe of van den Oord, Dieleman & Schrauwen (NIPS 2013), on top of a
backbone model whose vectors are already in the library:

1. match the listened tracks to library items and merge them
   (:mod:`deepsim.matching`); drop tracks and users with too little data;
2. hold out a random ``heldout_fraction`` of the tracks;
3. factorise the play counts of the *training* tracks with WMF
   (:mod:`deepsim.wmf`); the held-out tracks take no part, so for the
   factorisation they are truly cold-start;
4. give each held-out track its "true" factor by solving the WMF item
   equation against the fixed user factors of step 3 (one exact ALS
   half-step, :func:`solve_item_factors`): it lives in the same space as the
   user factors, as the predictions do, so cosines and rankings compare;
5. regress the unit-normalised training-track factors from the tracks'
   backbone vectors with an MLP (:func:`train_head`, MSE, Adam, early
   stopping on a validation split of the training tracks), optionally
   fine-tuning the backbone on log-mel patches too (:func:`finetune_head`);
6. score the held-out tracks (:mod:`deepsim.metrics`: mean cosine, AUC,
   mAP@500, against the WMF upper bound and random vectors);
7. save the :class:`~deepsim.models.head.HeadModel` atomically under
   ``<state_dir>/models/<model_id>.safetensors`` and only then make it the
   active (``auto``) model.

The model that is saved is the one that was evaluated (trained on the training
tracks only), so the printed figures describe it.  Nothing is written before
step 7 except backbone vectors computed for items that had no vector at all,
so an interruption (Ctrl-C) at any point leaves the previous model active.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from deepsim.errors import TrainingError
from deepsim.metrics import HeldoutMetrics, evaluate_heldout

if TYPE_CHECKING:
    import torch
    from beets.library import Library

    from deepsim.listening import Listens
    from deepsim.models.head import HeadModel

#: Called after every epoch with (epoch, training loss, validation loss or nan).
EpochCallback = Callable[[int, float, float], None]
#: Receives finished log lines.
LogFunction = Callable[[str], None]


# --------------------------------------------------------------------------------------------
# Parameter checks


def _check_int(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_float(name: str, value: Any, *, low: float, high: float, closed_high: bool) -> float:
    ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
    v = float(value) if ok else float("nan")
    inside = low <= v <= high if closed_high else low <= v < high
    if not (ok and math.isfinite(v) and inside):
        bracket = "]" if closed_high else ")"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value!r}")
    return v


def _check_pairs(features: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(features, dtype=np.float32)
    y = np.asarray(targets, dtype=np.float32)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise ValueError(
            f"features and targets must be 2-D with one row per track, got {x.shape} and {y.shape}"
        )
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("features or targets contain NaN or infinite values")
    return x, y


def _split_validation(
    n: int, val_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    if val_fraction <= 0 or n < 2:
        return np.arange(n), np.zeros(0, np.int64)
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    perm = rng.permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


# --------------------------------------------------------------------------------------------
# The head on fixed features


@dataclass
class HeadFit:
    """Outcome of :func:`train_head` (and of :func:`finetune_head`).

    Attributes
    ----------
    head
        The trained MLP (weights of the best validation epoch), in eval mode.
        ``None`` after :func:`finetune_head`, which trains a whole model.
    epochs
        Epochs run.
    best_epoch
        The (1-based) epoch whose weights were kept.
    train_loss, val_loss
        Mean MSE per epoch (``val_loss`` empty without a validation set).
    stopped_early
        Whether training stopped on the patience rule before ``epochs``.
    seconds
        Wall time of the training loop.
    n_train, n_val
        Tracks trained on and validated on.
    params
        The hyper-parameters used.
    """

    head: torch.nn.Module | None
    epochs: int
    best_epoch: int
    train_loss: list[float]
    val_loss: list[float]
    stopped_early: bool
    seconds: float
    n_train: int
    n_val: int
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def best_val_loss(self) -> float:
        """Validation MSE of the kept weights (``nan`` without validation)."""
        return self.val_loss[self.best_epoch - 1] if self.val_loss else float("nan")


class _EarlyStopping:
    """Keeps the best weights; says when ``patience`` epochs brought nothing."""

    def __init__(self, module: torch.nn.Module, patience: int, min_delta: float) -> None:
        self.module = module
        self.patience = patience
        self.min_delta = min_delta
        self.best = float("inf")
        self.best_epoch = 0
        self.best_state: dict[str, Any] | None = None
        self.bad = 0

    def update(self, epoch: int, loss: float) -> bool:
        """Record an epoch; ``True`` when training should stop."""
        if loss < self.best - self.min_delta:
            self.best, self.best_epoch, self.bad = loss, epoch, 0
            self.best_state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
            return False
        self.bad += 1
        return self.bad >= self.patience

    def restore(self) -> None:
        if self.best_state is not None:
            self.module.load_state_dict(self.best_state)


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` torch CPU threads (``None``: unchanged), then restore."""
    import torch

    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _mse_batched(
    module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> float:
    import torch

    total = 0.0
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            pred = module(x[start : start + batch_size])
            diff = pred.float() - y[start : start + batch_size]
            total += float(diff.square().mean(dim=1).sum())
    return total / max(1, len(x))


def train_head(
    features: np.ndarray,
    targets: np.ndarray,
    *,
    hidden: int = 512,
    dropout: float = 0.3,
    lr: float = 1e-3,
    weight_decay: float = 1e-5,
    epochs: int = 200,
    batch_size: int = 256,
    val_fraction: float = 0.1,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    patience: int = 10,
    min_delta: float = 1e-5,
    seed: int = 0,
    device: str = "cpu",
    threads: int | None = None,
    callback: EpochCallback | None = None,
) -> HeadFit:
    """Regress ``targets`` from ``features`` with an MLP (:func:`~deepsim.models.head.make_head`).

    The loss is the mean squared error between the raw head output and the
    (unit) targets, as in the seed; the model L2-normalises its output at
    inference.  The head's first layer standardises the inputs with the
    training features' mean and standard deviation (stored in the head).

    Parameters
    ----------
    features
        ``(n, in_dim)`` backbone vectors.
    targets
        ``(n, out_dim)`` unit-normalised WMF factors.
    hidden, dropout
        MLP shape (see :func:`~deepsim.models.head.make_head`).
    lr, weight_decay
        Adam's learning rate and L2 weight decay.
    epochs
        Maximum number of passes over the training tracks.
    batch_size
        Tracks per step.
    val_fraction
        Share of the tracks held out for early stopping when ``validation``
        is not given; ``0`` trains for exactly ``epochs`` epochs.
    validation
        An explicit ``(features, targets)`` validation set; all of
        ``features`` is then trained on.
    patience
        Stop after this many epochs without a validation-MSE improvement of
        more than ``min_delta``; the best epoch's weights are kept.
    seed
        Seeds the split, the initial weights, shuffling and dropout (the
        global torch random state is left untouched).
    device
        torch device.
    threads
        CPU threads for torch during training (``None``: torch's setting).
        The matrices are small, so on a busy machine one thread can be much
        faster than several (see docs/training.md).
    callback
        Called as ``callback(epoch, train_mse, val_mse)`` after each epoch; an
        exception raised there (e.g. ``KeyboardInterrupt``) stops training
        and propagates.

    Returns
    -------
    HeadFit
    """
    import torch

    from deepsim.models.head import make_head

    x, y = _check_pairs(features, targets)
    if len(x) == 0:
        raise ValueError("cannot train a head on zero tracks")
    epochs = _check_int("epochs", epochs, minimum=1)
    batch_size = _check_int("batch_size", batch_size, minimum=1)
    patience = _check_int("patience", patience, minimum=1)
    val_fraction = _check_float("val_fraction", val_fraction, low=0.0, high=1.0, closed_high=False)
    lr = _check_float("lr", lr, low=0.0, high=float("inf"), closed_high=False)
    if lr == 0:
        raise ValueError("lr must be positive, got 0")
    weight_decay = _check_float(
        "weight_decay", weight_decay, low=0.0, high=float("inf"), closed_high=False
    )
    rng = np.random.default_rng(seed)
    if validation is not None:
        xv, yv = _check_pairs(*validation)
        if xv.shape[1] != x.shape[1] or yv.shape[1] != y.shape[1]:
            raise ValueError(
                f"validation set has shapes {xv.shape}, {yv.shape}; training {x.shape}, {y.shape}"
            )
        xt, yt = x, y
    else:
        train_idx, val_idx = _split_validation(len(x), val_fraction, rng)
        xt, yt, xv, yv = x[train_idx], y[train_idx], x[val_idx], y[val_idx]

    params = {
        "hidden": hidden,
        "dropout": float(dropout),
        "lr": lr,
        "weight_decay": weight_decay,
        "epochs": epochs,
        "batch_size": batch_size,
        "patience": patience,
        "seed": seed,
    }
    if threads is not None:
        threads = _check_int("threads", threads, minimum=1)
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]), _torch_threads(threads):
        torch.manual_seed(seed)
        head = make_head(x.shape[1], y.shape[1], hidden=hidden, dropout=dropout)
        head[0].fit(xt)  # the standardising layer
        head = head.to(device)
        xt_t = torch.from_numpy(xt).to(device)
        yt_t = torch.from_numpy(yt).to(device)
        xv_t = torch.from_numpy(xv).to(device)
        yv_t = torch.from_numpy(yv).to(device)
        optimiser = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
        generator = torch.Generator().manual_seed(seed)
        stopper = _EarlyStopping(head, patience, min_delta)
        train_losses: list[float] = []
        val_losses: list[float] = []
        stopped = False
        epoch = 0
        for epoch in range(1, epochs + 1):
            head.train()
            order = torch.randperm(len(xt_t), generator=generator).to(device)
            total = torch.zeros((), device=device)
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                loss = torch.nn.functional.mse_loss(head(xt_t[idx]), yt_t[idx])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                total += loss.detach() * len(idx)
            train_losses.append(float(total) / len(xt_t))
            head.eval()
            val = _mse_batched(head, xv_t, yv_t, 8192) if len(xv_t) else float("nan")
            if len(xv_t):
                val_losses.append(val)
            if callback is not None:
                callback(epoch, train_losses[-1], val)
            if len(xv_t) and stopper.update(epoch, val):
                stopped = epoch < epochs
                break
        if len(xv_t):
            stopper.restore()
        head.eval()
    return HeadFit(
        head=head.cpu(),
        epochs=epoch,
        best_epoch=stopper.best_epoch if len(xv_t) else epoch,
        train_loss=train_losses,
        val_loss=val_losses,
        stopped_early=stopped,
        seconds=time.perf_counter() - started,
        n_train=len(xt),
        n_val=len(xv),
        params=params,
    )


# --------------------------------------------------------------------------------------------
# Fine-tuning the backbone together with the head


def _freeze_batchnorm(module: torch.nn.Module) -> None:
    import torch

    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def predict_from_mels(
    model: HeadModel,
    mels: Any,
    rows: Sequence[int] | np.ndarray,
    *,
    batch_size: int = 16,
    normalise: bool = True,
) -> np.ndarray:
    """Head outputs for whole log-mels, as :meth:`Model.embed` computes them.

    Each log-mel is cut into non-overlapping patches, the per-patch backbone
    outputs are averaged per track, pooled and passed through the head.

    Parameters
    ----------
    model
        The head model (its current train/eval mode is kept).
    mels
        Array-like ``(n_tracks, frames, n_mels)`` (e.g. a
        :class:`~deepsim.melcache.MelCache`'s memmap).
    rows
        The tracks (rows of ``mels``) to predict.
    batch_size
        Tracks per forward pass.
    normalise
        L2-normalise the outputs (``False`` gives the raw outputs the MSE is
        computed on).
    """
    import torch

    rows = np.asarray(rows, dtype=np.int64)
    out = np.zeros((len(rows), model.dim), np.float32)
    device = model.device
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            batch = [
                torch.from_numpy(np.asarray(mels[int(r)], dtype=np.float32)).to(device)
                for r in chunk
            ]
            patches, owner = model.patchify(batch)
            outputs = model.embed_patches(patches)
            counts = torch.bincount(owner, minlength=len(chunk)).float()
            means: dict[str, torch.Tensor] = {}
            for key, value in outputs.items():
                value = value.float()
                total = torch.zeros((len(chunk), *value.shape[1:]), device=value.device)
                total.index_add_(0, owner, value)
                means[key] = total / counts.view(-1, *([1] * (value.dim() - 1)))
            result = model.pool(means).float()
            if normalise:
                result = torch.nn.functional.normalize(result, dim=1)
            out[start : start + len(chunk)] = result.cpu().numpy()
    return out


def finetune_head(
    model: HeadModel,
    mels: Any,
    targets: np.ndarray,
    *,
    rows: Sequence[int] | np.ndarray | None = None,
    epochs: int = 20,
    lr: float = 1e-4,
    head_lr: float = 1e-3,
    weight_decay: float = 1e-5,
    batch_size: int = 32,
    val_fraction: float = 0.1,
    patience: int = 3,
    min_delta: float = 1e-5,
    freeze_batchnorm: bool = True,
    seed: int = 0,
    device: str = "cpu",
    callback: EpochCallback | None = None,
) -> HeadFit:
    """Train the backbone and the head of ``model`` together on log-mel patches.

    Each step takes, for every track of the batch, one random crop of
    ``model.patch_frames`` frames of its log-mel (data augmentation, as the
    seed trained on random 3-s windows) and regresses its target with MSE.
    Validation uses whole log-mels, averaged over patches as at inference.
    The model is modified in place (the best validation epoch's weights are
    kept) and its ``finetune`` flag is set, so :meth:`HeadModel.save` stores
    the backbone too.

    Parameters
    ----------
    model
        A :class:`~deepsim.models.head.HeadModel`, usually with a head first
        trained by :func:`train_head`.
    mels
        Array-like ``(n_tracks, frames, n_mels)`` log-mels computed with the
        backbone's front end (a :class:`~deepsim.melcache.MelCache` memmap).
    targets
        ``(len(rows), dim)`` unit targets, one per row in ``rows``.
    rows
        Rows of ``mels`` the targets belong to (default: all, in order).
    epochs, batch_size, patience, min_delta, val_fraction, seed, callback
        As in :func:`train_head`.
    lr, head_lr
        Adam learning rates of the backbone and of the head.
    weight_decay
        Adam's L2 weight decay.
    freeze_batchnorm
        Keep the backbone's batch-norm statistics fixed (small fine-tuning
        batches would otherwise disturb them).
    device
        torch device (the model is moved there, and back to the CPU at the end).

    Returns
    -------
    HeadFit
        With ``head=None`` (the trained network is ``model`` itself).
    """
    import torch

    rows_arr = np.arange(len(mels)) if rows is None else np.asarray(rows, dtype=np.int64)
    y = np.asarray(targets, dtype=np.float32)
    if y.ndim != 2 or len(y) != len(rows_arr) or y.shape[1] != model.dim:
        raise ValueError(
            f"targets must be ({len(rows_arr)}, {model.dim}) for the given rows, got {y.shape}"
        )
    if len(rows_arr) == 0:
        raise ValueError("cannot fine-tune on zero tracks")
    epochs = _check_int("epochs", epochs, minimum=1)
    batch_size = _check_int("batch_size", batch_size, minimum=1)
    patience = _check_int("patience", patience, minimum=1)
    val_fraction = _check_float("val_fraction", val_fraction, low=0.0, high=1.0, closed_high=False)
    rng = np.random.default_rng(seed)
    train_pos, val_pos = _split_validation(len(rows_arr), val_fraction, rng)
    frames = int(np.shape(mels)[1])

    backbone = model.backbone
    model.config["finetune"] = True
    model.to(device)
    patch = model.patch_frames
    optimiser = torch.optim.Adam(
        [
            {"params": backbone.parameters(), "lr": lr},
            {"params": model.head.parameters(), "lr": head_lr},
        ],
        weight_decay=weight_decay,
    )
    use_amp = str(device).startswith("cuda")
    y_t = torch.from_numpy(y)
    stopper = _EarlyStopping(model, patience, min_delta)
    train_losses: list[float] = []
    val_losses: list[float] = []
    stopped = False
    epoch = 0
    started = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for epoch in range(1, epochs + 1):
                model.train()
                if freeze_batchnorm:
                    _freeze_batchnorm(backbone)
                order = rng.permutation(train_pos)
                total = 0.0
                for start in range(0, len(order), batch_size):
                    pos = order[start : start + batch_size]
                    crops = []
                    for p in pos:
                        mel = np.asarray(mels[int(rows_arr[p])], dtype=np.float32)
                        if frames > patch:
                            s = int(rng.integers(0, frames - patch + 1))
                            mel = mel[s : s + patch]
                        elif frames < patch:
                            mel = np.tile(mel, (-(-patch // frames), 1))[:patch]
                        crops.append(mel)
                    batch = torch.from_numpy(np.stack(crops)).to(device)
                    target = y_t[pos].to(device)
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                        pred = model(batch)
                    loss = torch.nn.functional.mse_loss(pred.float(), target)
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
                    total += float(loss.detach()) * len(pos)
                train_losses.append(total / len(order))
                model.eval()
                val = float("nan")
                if len(val_pos):
                    pred_v = predict_from_mels(
                        model, mels, rows_arr[val_pos], batch_size=batch_size, normalise=False
                    )
                    val = float(np.mean(np.square(pred_v - y[val_pos]).mean(axis=1)))
                    val_losses.append(val)
                if callback is not None:
                    callback(epoch, train_losses[-1], val)
                if len(val_pos) and stopper.update(epoch, val):
                    stopped = epoch < epochs
                    break
            if len(val_pos):
                stopper.restore()
    finally:
        model.eval()
        model.cpu()
    return HeadFit(
        head=None,
        epochs=epoch,
        best_epoch=stopper.best_epoch if len(val_pos) else epoch,
        train_loss=train_losses,
        val_loss=val_losses,
        stopped_early=stopped,
        seconds=time.perf_counter() - started,
        n_train=len(train_pos),
        n_val=len(val_pos),
        params={
            "epochs": epochs,
            "lr": lr,
            "head_lr": head_lr,
            "weight_decay": weight_decay,
            "batch_size": batch_size,
            "patience": patience,
            "freeze_batchnorm": freeze_batchnorm,
            "seed": seed,
        },
    )


# --------------------------------------------------------------------------------------------
# Data preparation: filtering, the held-out split, the factorisation


def filter_counts(
    counts: sp.csr_matrix,
    *,
    min_plays: float = 2,
    min_listeners: int = 2,
    min_user_tracks: int = 2,
    max_passes: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Rows (users) and columns (tracks) with enough data, applied until stable.

    A track needs a total play count of at least ``min_plays`` from at least
    ``min_listeners`` distinct users; a user needs at least
    ``min_user_tracks`` distinct kept tracks.  Dropping one side can push the
    other under its threshold, so the rules are re-applied (at most
    ``max_passes`` times).

    Returns
    -------
    users, tracks
        Indices (ascending) of the kept rows and columns.
    """
    csr = sp.csr_matrix(counts, dtype=np.float32)
    csr.eliminate_zeros()
    users = np.arange(csr.shape[0])
    tracks = np.arange(csr.shape[1])
    for _ in range(max_passes):
        sub = csr[users][:, tracks]
        plays = np.asarray(sub.sum(axis=0)).ravel()
        listeners = np.diff(sub.tocsc().indptr)
        keep_t = (plays >= min_plays) & (listeners >= min_listeners)
        sub = sub[:, np.flatnonzero(keep_t)]
        keep_u = np.diff(sub.indptr) >= min_user_tracks
        if keep_t.all() and keep_u.all():
            break
        tracks = tracks[keep_t]
        users = users[keep_u]
        if len(users) == 0 or len(tracks) == 0:
            break
    return users, tracks


def split_tracks(
    n_tracks: int, *, heldout_fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of ``range(n_tracks)`` into (training, held-out) indices."""
    heldout_fraction = _check_float(
        "heldout_fraction", heldout_fraction, low=0.0, high=1.0, closed_high=False
    )
    rng = np.random.default_rng(seed)
    n_held = round(heldout_fraction * n_tracks)
    if heldout_fraction > 0 and n_tracks > 1:
        n_held = min(n_tracks - 1, max(1, n_held))  # both sides non-empty
    perm = rng.permutation(n_tracks)
    return np.sort(perm[n_held:]), np.sort(perm[:n_held])


def solve_item_factors(
    user_factors: np.ndarray,
    confidence: sp.spmatrix,
    *,
    regularization: float,
) -> np.ndarray:
    """Item factors that minimise the WMF loss for fixed user factors (exact ALS half-step).

    For item ``j`` with users ``u`` who played it (confidence ``c_uj``):
    ``y_j = (XᵀX + Σ_u (c_uj − 1) x_u x_uᵀ + λI)⁻¹ Σ_u c_uj x_u``, the
    equation implicit's ALS solves (iteratively) for every item.

    Parameters
    ----------
    user_factors
        ``(n_users, f)`` fixed user factors ``X``.
    confidence
        ``(n_users, n_items)`` confidences of the observed cells (as
        :func:`deepsim.wmf.confidence` gives them).
    regularization
        ``λ``, as passed to :func:`deepsim.wmf.fit_wmf`.

    Returns
    -------
    numpy.ndarray
        float32 ``(n_items, f)``; items nobody played get zero rows.
    """
    x = np.asarray(user_factors, dtype=np.float64)
    csc = sp.csc_matrix(confidence, dtype=np.float64)
    if csc.shape[0] != len(x):
        raise ValueError(f"confidence has {csc.shape[0]} users, user_factors {len(x)}")
    f = x.shape[1]
    gram = x.T @ x + regularization * np.eye(f)
    out = np.zeros((csc.shape[1], f), np.float32)
    for j in range(csc.shape[1]):
        lo, hi = csc.indptr[j], csc.indptr[j + 1]
        if lo == hi:
            continue
        xj = x[csc.indices[lo:hi]]
        c = csc.data[lo:hi]
        a = gram + (xj.T * (c - 1.0)) @ xj
        b = xj.T @ c
        out[j] = np.linalg.solve(a, b)
    return out


@dataclass
class FactorSplit:
    """WMF factors for a training/held-out split of the tracks.

    Attributes
    ----------
    user_factors
        ``(n_users, f)`` from the fit on the training tracks (zero rows for
        users without training plays).
    train_factors
        ``(n_train, f)`` unit-normalised factors of the training tracks: the
        regression targets.
    heldout_factors
        ``(n_heldout, f)`` factors of the held-out tracks solved against the
        fixed user factors (not normalised).
    params
        The WMF hyper-parameters.
    seconds
        Time of the fit and the solve.
    """

    user_factors: np.ndarray
    train_factors: np.ndarray
    heldout_factors: np.ndarray
    params: dict[str, Any]
    seconds: float


def factorise_split(
    counts: sp.csr_matrix,
    train: np.ndarray,
    heldout: np.ndarray,
    *,
    factors: int = 40,
    seed: int = 0,
    **wmf_options: Any,
) -> FactorSplit:
    """Fit WMF on the training columns; solve the held-out columns against its users.

    ``wmf_options`` go to :func:`deepsim.wmf.fit_wmf` (``alpha``,
    ``epsilon``, ``regularization``, ``iterations``, ``use_gpu``...).
    """
    from deepsim.wmf import confidence, fit_wmf, unit_normalise

    started = time.perf_counter()
    csr = sp.csr_matrix(counts, dtype=np.float32)
    result = fit_wmf(csr[:, train], factors=factors, random_state=seed, **wmf_options)
    held = np.zeros((len(heldout), factors), np.float32)
    if len(heldout):
        conf = confidence(
            csr[:, heldout], alpha=result.params["alpha"], epsilon=result.params["epsilon"]
        )
        held = solve_item_factors(
            result.user_factors, conf, regularization=result.params["regularization"]
        )
    return FactorSplit(
        user_factors=result.user_factors,
        train_factors=unit_normalise(result.item_factors),
        heldout_factors=held,
        params=dict(result.params),
        seconds=time.perf_counter() - started,
    )


# --------------------------------------------------------------------------------------------
# The report


@dataclass
class TrainReport:
    """What :func:`run_training` did, for printing and for the model card.

    Attributes
    ----------
    model_id, path
        The saved model and its checkpoint.
    activated
        Whether it was made the active (``auto``) model.
    backbone, backbone_id
        The backbone's name and weights id.
    finetune
        Whether the backbone was fine-tuned.
    n_listened_tracks, n_listeners
        Columns and rows of the listening data as given.
    n_matched, match_rate
        Listened tracks matched to library items, and their share.
    n_items
        Distinct library items with plays after matching.
    n_tracks, n_users
        Items and users kept by the data-size rules (and with features).
    n_train, n_heldout
        The split of those tracks.
    n_embedded, n_failed
        Backbone vectors computed from audio for this run, and tracks dropped
        because their audio could not be embedded.
    factors
        WMF dimension.
    fit
        The head's training history (of fine-tuning when ``finetune``).
    metrics
        Held-out metrics (``None`` when ``heldout_fraction`` was 0).
    wmf_params
        WMF hyper-parameters used.
    seconds
        Wall time per stage.
    model
        The trained model (on the CPU, in eval mode), e.g. for
        :func:`reembed_from_store`.
    """

    model_id: str
    path: Path
    activated: bool
    backbone: str
    backbone_id: str
    finetune: bool
    n_listened_tracks: int
    n_listeners: int
    n_matched: int
    match_rate: float
    n_items: int
    n_tracks: int
    n_users: int
    n_train: int
    n_heldout: int
    n_embedded: int
    n_failed: int
    factors: int
    fit: HeadFit
    metrics: HeldoutMetrics | None
    wmf_params: dict[str, Any]
    seconds: dict[str, float]
    model: HeadModel | None = None

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable facts (stored in the checkpoint's config)."""
        out: dict[str, Any] = {
            "factors": self.factors,
            "tracks": self.n_tracks,
            "users": self.n_users,
            "train_tracks": self.n_train,
            "heldout_tracks": self.n_heldout,
            "epochs": self.fit.epochs,
            "best_epoch": self.fit.best_epoch,
            "wmf": self.wmf_params,
        }
        if self.metrics is not None:
            m = self.metrics
            out["heldout"] = {
                "cosine": round(m.cosine, 4),
                "auc": round(m.predicted.auc, 4),
                "map_at_500": round(m.predicted.map_at_k, 4),
                "auc_wmf": round(m.wmf.auc, 4),
                "map_at_500_wmf": round(m.wmf.map_at_k, 4),
                "auc_random": round(m.random.auc, 4),
                "map_at_500_random": round(m.random.map_at_k, 4),
                "users": m.n_users,
            }
        return out

    def format_table(self) -> str:
        """A few lines of plain text: data, training and the held-out table."""
        what = "fine-tuned " if self.finetune else ""
        lines = [
            f"model {self.model_id}: {what}{self.backbone_id} + head → {self.factors} factors"
            + (" (now active)" if self.activated else ""),
            f"  saved to {self.path}",
            f"listening data: {self.n_listened_tracks} tracks, {self.n_listeners} listeners; "
            f"{self.n_matched} tracks matched the library ({100 * self.match_rate:.1f} %), "
            f"{self.n_items} items",
            f"training data: {self.n_tracks} tracks × {self.n_users} users "
            f"({self.n_train} to train on, {self.n_heldout} held out)"
            + (f"; {self.n_embedded} embedded from audio" if self.n_embedded else "")
            + (f"; {self.n_failed} dropped (audio failed)" if self.n_failed else ""),
        ]
        fit = self.fit
        val = "" if math.isnan(fit.best_val_loss) else f", validation MSE {fit.best_val_loss:.4f}"
        lines.append(
            f"training: {fit.epochs} epochs (best {fit.best_epoch}{val}"
            f"{', stopped early' if fit.stopped_early else ''}) in {fit.seconds:.1f} s"
        )
        m = self.metrics
        if m is None:
            lines.append("no held-out tracks: no evaluation")
            return "\n".join(lines)
        k = m.predicted.k
        lines.append(
            f"held-out evaluation: {m.n_tracks} tracks, {m.n_users} users with "
            f"{m.n_plays} plays on them"
        )
        lines.append(f"  {'method':<20} {'cosine':>7} {'AUC':>7} {f'mAP@{k}':>8}")
        for name, cosine, auc, map_k in m.rows():
            lines.append(f"  {name:<20} {cosine:>7.3f} {auc:>7.3f} {map_k:>8.3f}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Features: stored backbone vectors, embedding the missing ones


def _item_paths(lib: Library, item_ids: Sequence[int]) -> dict[int, bytes]:
    """Absolute paths of the items that exist and have one (a few queries in all)."""
    from deepsim.similar import load_items

    items = load_items(lib, [int(i) for i in item_ids])
    return {int(i): items[int(i)].path for i in item_ids if int(i) in items and items[int(i)].path}


def backbone_features(
    lib: Library,
    item_ids: np.ndarray,
    *,
    backbone: str,
    device: str = "cpu",
    workers: int | None = None,
    batch_size: int = 8,
    cache_vectors: bool = True,
    log: LogFunction | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Backbone vectors of ``item_ids``: from the store, else embedded from audio.

    Items whose audio fails are left out (one log line each).  With
    ``cache_vectors``, vectors computed here are stored for items that hold
    no deepsim vector at all (an item holding another model's vector is not
    touched, so an interrupted or failed run changes nothing the active
    model relies on).

    Returns
    -------
    ids, matrix, n_embedded
        The item ids that have a vector (in the order of ``item_ids``), their
        ``(n, dim)`` vectors, and how many were embedded from audio.
    """
    from deepsim import store
    from deepsim.models import model_id as model_id_of

    wanted = np.asarray(item_ids, dtype=np.int64)
    backbone_id = model_id_of(backbone)
    ids, matrix = store.read_vectors(lib, backbone_id, ids=wanted.tolist())
    have = {int(i): row for i, row in zip(ids.tolist(), matrix, strict=True)}
    missing = [int(i) for i in wanted.tolist() if int(i) not in have]
    n_embedded = 0
    if missing:
        from deepsim.embed import embed_files, resolve_device
        from deepsim.models import load_model

        paths = _item_paths(lib, missing)
        for item_id in missing:
            if item_id not in paths and log is not None:
                log(f"item {item_id}: no such item or no file; left out")
        order = list(paths)
        if log is not None and order:
            log(f"embedding {len(order)} tracks with {backbone_id} (no stored vector)")
        if order:
            model = load_model(backbone, device=resolve_device(device))
            to_store: list[tuple[int, np.ndarray]] = []
            for outcome in embed_files(
                [paths[i] for i in order], model, workers=workers, batch_size=batch_size
            ):
                item_id = order[outcome.index]
                if outcome.vector is None:
                    if log is not None:
                        log(f"{outcome.error}; left out")
                    continue
                have[item_id] = outcome.vector
                n_embedded += 1
                if cache_vectors:
                    to_store.append((item_id, outcome.vector))
            if to_store:
                # Items without any vector get it as their main vector; the
                # others keep theirs and get it in the backbone slot.
                bare = {int(i) for i in missing} - store.ids_with_any_vector(lib)
                store.write_vectors(lib, [r for r in to_store if r[0] in bare], backbone_id)
                store.write_backbone_vectors(
                    lib, [r for r in to_store if r[0] not in bare], backbone_id
                )
    kept = [int(i) for i in wanted.tolist() if int(i) in have]
    if not kept:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32), n_embedded
    return (
        np.asarray(kept, np.int64),
        np.stack([have[i] for i in kept]).astype(np.float32),
        n_embedded,
    )


def reembed_from_store(lib: Library, head_model: HeadModel, *, batch_size: int = 500) -> np.ndarray:
    """Give every item that has a backbone vector the head's vector, without audio.

    Reads the stored vectors of the head's backbone, applies the head
    (:meth:`~deepsim.models.head.HeadModel.apply_to_vectors`) and writes the
    results under the head's id, ``batch_size`` items per transaction.  Items
    that already hold the head's vector are left alone.

    Returns
    -------
    numpy.ndarray
        Ids (int64, ascending) of the items it could not do because they have
        no backbone vector; the caller embeds those from audio.  For a
        fine-tuned head, whose backbone differs from the stored vectors, that
        is every item without the head's vector.
    """
    from deepsim import store

    with lib.transaction() as tx:
        all_ids = np.asarray([int(r[0]) for r in tx.query("SELECT id FROM items")], np.int64)
    done = np.asarray(sorted(store.ids_with_vectors(lib, head_model.model_id)), np.int64)
    todo = np.setdiff1d(all_ids, done)
    if head_model.finetune or len(todo) == 0:
        return todo
    backbone_id = head_model.config["backbone_id"]
    ids, matrix = store.read_vectors(lib, backbone_id, ids=todo.tolist())
    if len(ids):
        vectors = head_model.apply_to_vectors(matrix)
        # The backbone vector moves to the backbone slot, so that training again
        # or going back to the backbone model needs no audio.
        rows = (
            (item_id, vector, None, backbone)
            for item_id, vector, backbone in zip(ids.tolist(), vectors, matrix, strict=True)
        )
        store.write_vectors(
            lib, rows, head_model.model_id, batch_size=batch_size, backbone_id=backbone_id
        )
    return np.setdiff1d(todo, ids)


# --------------------------------------------------------------------------------------------
# Orchestration


def _save_and_activate(model: HeadModel, *, state_dir: Path, activate: bool) -> tuple[Path, bool]:
    """Save under ``<state_dir>/models`` and then (optionally) activate; all or nothing."""
    from deepsim.models import active_model, set_active_model

    model.model_id = model.weights_id()
    path = state_dir / "models" / f"{model.model_id}.safetensors"
    existed = path.exists()
    try:
        model.save(path)
        if activate:
            set_active_model(path, state_dir=state_dir)
    except BaseException:
        # A complete file that did not become active is removed again, unless it was
        # there before (same id = the same weights) or is somehow the active one.
        if not existed and path.exists():
            try:
                active = active_model("auto", state_dir=state_dir)
            except Exception:
                active = ""
            if os.path.realpath(active) != os.path.realpath(path):
                path.unlink(missing_ok=True)
        raise
    return path, activate


def run_training(
    lib: Library,
    *,
    listens: Listens,
    state_dir: str | os.PathLike[str],
    backbone: str = "default",
    min_plays: float = 2,
    min_listeners: int = 2,
    min_user_tracks: int = 2,
    min_tracks: int = 50,
    factors: int = 40,
    alpha: float | None = None,
    epsilon: float | None = None,
    regularization: float | None = None,
    iterations: int | None = None,
    use_gpu: bool | None = None,
    heldout_fraction: float = 0.2,
    hidden: int = 512,
    dropout: float = 0.3,
    lr: float = 1e-3,
    weight_decay: float = 1e-5,
    epochs: int = 200,
    train_batch_size: int = 256,
    patience: int = 10,
    finetune: bool = False,
    finetune_epochs: int = 20,
    finetune_lr: float = 1e-4,
    finetune_batch_size: int = 32,
    device: str = "cpu",
    threads: int | None = None,
    workers: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    activate: bool = True,
    cache_vectors: bool = True,
    log: LogFunction | None = None,
    on_epoch: EpochCallback | None = None,
) -> TrainReport:
    """Train a head on the library's listening data and make it the active model.

    See the module docstring for the steps.  Parameters not listed here are
    those of :func:`filter_counts`, :func:`deepsim.wmf.fit_wmf` (``None``
    takes its default), :func:`train_head` and :func:`finetune_head`.

    Parameters
    ----------
    lib
        The beets library.
    listens
        Listening data (:func:`deepsim.listening.read_listens` /
        :func:`~deepsim.listening.read_library`).
    state_dir
        deepsim's state directory; the model goes to ``<state_dir>/models``.
    backbone
        Built-in model name or checkpoint path whose vectors the head reads.
    min_tracks
        Fewest tracks (after the data-size rules) worth training on.
    heldout_fraction
        Share of the tracks kept out of the factorisation and of training for
        evaluation (``0``: no evaluation).
    finetune
        Also train the backbone on log-mels of the tracks' audio (decoded
        once into a cache under ``<state_dir>/cache``); GPU-oriented.
    device
        ``auto``, ``cpu``, ``cuda``... for embedding and training.
    threads
        torch CPU threads while training the head (``None``: torch's setting).
    workers, batch_size
        Decoding processes and tracks per inference batch when backbone
        vectors must be computed from audio.
    activate
        Make the saved model the ``auto`` model.
    cache_vectors
        Store backbone vectors computed here on items without any vector.
    log
        Receives progress lines.
    on_epoch
        Called after each training epoch (``KeyboardInterrupt`` raised there,
        or anywhere, leaves the previous model active and no new file).

    Returns
    -------
    TrainReport

    Raises
    ------
    TrainingError
        Empty listening data, no track matched, or too few tracks.
    """
    from deepsim.embed import resolve_device
    from deepsim.matching import collapse, match_tracks
    from deepsim.models import BUILTIN_MODELS
    from deepsim.models import model_id as model_id_of
    from deepsim.models.head import HeadModel

    say: LogFunction = log or (lambda _line: None)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    state = Path(state_dir)
    min_tracks = _check_int("min_tracks", min_tracks, minimum=2)
    _check_float("heldout_fraction", heldout_fraction, low=0.0, high=1.0, closed_high=False)
    device = resolve_device(device)

    # 1. Match and filter.
    if listens.n_tracks == 0 or listens.nnz == 0:
        raise TrainingError("the listening data is empty: no plays were read")
    match = match_tracks(listens.tracks, lib)
    if match.n_matched == 0:
        raise TrainingError(
            f"0 of {listens.n_tracks} listened tracks matched the library; check that the "
            "listening data is for this library's music and that artist and title tags (or "
            "MusicBrainz recording ids) agree"
        )
    say(
        f"matched {match.n_matched} of {listens.n_tracks} listened tracks "
        f"({100 * match.rate:.1f} %; {match.by_id} by item, {match.by_mbid} by MBID, "
        f"{match.by_name} by artist and title)"
    )
    items = collapse(listens, match)
    users_kept, tracks_kept = filter_counts(
        items.counts,
        min_plays=min_plays,
        min_listeners=min_listeners,
        min_user_tracks=min_user_tracks,
    )
    rule = (
        f"at least {min_plays:g} plays from {min_listeners} listeners, "
        f"and listeners with at least {min_user_tracks} such tracks"
    )
    if len(tracks_kept) < min_tracks:
        raise TrainingError(
            f"only {len(tracks_kept)} of the {items.n_tracks} matched library tracks have "
            f"enough listening data ({rule}); training needs at least {min_tracks}"
        )
    seconds["match"] = time.perf_counter() - clock

    # 2. Features of the kept tracks.
    clock = time.perf_counter()
    item_ids = np.asarray([items.tracks[j].item_id for j in tracks_kept], np.int64)
    if backbone not in BUILTIN_MODELS:  # a checkpoint: keep an absolute path in the head
        backbone = os.fspath(Path(os.path.expanduser(backbone)).resolve())
    backbone_id = model_id_of(backbone)
    feat_ids, features, n_embedded = backbone_features(
        lib,
        item_ids,
        backbone=backbone,
        device=device,
        workers=workers,
        batch_size=batch_size,
        cache_vectors=cache_vectors,
        log=say,
    )
    n_failed = len(item_ids) - len(feat_ids)
    if n_failed:
        keep = np.isin(item_ids, feat_ids)
        tracks_kept = tracks_kept[keep]
        item_ids = item_ids[keep]
    if len(tracks_kept) < min_tracks:
        raise TrainingError(
            f"only {len(tracks_kept)} tracks with enough listening data have a {backbone_id} "
            f"vector ({n_failed} could not be embedded); training needs at least {min_tracks}"
        )
    seconds["features"] = time.perf_counter() - clock

    # 3. Split and factorise.
    clock = time.perf_counter()
    counts = items.counts[users_kept][:, tracks_kept].tocsr()
    train_idx, held_idx = split_tracks(
        len(tracks_kept), heldout_fraction=heldout_fraction, seed=seed
    )
    wmf_options = {
        key: value
        for key, value in (
            ("alpha", alpha),
            ("epsilon", epsilon),
            ("regularization", regularization),
            ("iterations", iterations),
            ("use_gpu", use_gpu),
        )
        if value is not None
    }
    say(
        f"factorising {counts.shape[0]} users × {len(train_idx)} training tracks "
        f"({factors} factors; {len(held_idx)} tracks held out)"
    )
    split = factorise_split(counts, train_idx, held_idx, factors=factors, seed=seed, **wmf_options)
    targets = split.train_factors
    has_target = np.any(targets != 0, axis=1)
    seconds["wmf"] = time.perf_counter() - clock

    # 4. Train.
    clock = time.perf_counter()
    train_rows = train_idx[has_target]
    say(f"training the head on {len(train_rows)} tracks")
    fit = train_head(
        features[train_rows],
        targets[has_target],
        hidden=hidden,
        dropout=dropout,
        lr=lr,
        weight_decay=weight_decay,
        epochs=epochs,
        batch_size=train_batch_size,
        patience=patience,
        seed=seed,
        device=device,
        threads=threads,
        callback=on_epoch,
    )
    model = HeadModel(
        backbone=backbone,
        backbone_id=backbone_id,
        in_dim=features.shape[1],
        out_dim=factors,
        hidden=hidden,
        dropout=dropout,
    )
    assert fit.head is not None
    model.head.load_state_dict(fit.head.state_dict())
    model.eval()
    mels = None
    decoded: np.ndarray | None = None  # per kept track, whether its audio decoded
    if finetune:
        from deepsim.melcache import build_cache

        paths = _item_paths(lib, item_ids.tolist())
        path_list = [os.fsdecode(paths.get(int(i), b"")) for i in item_ids]
        frontend = model.backbone.frontend
        say(f"decoding {len(path_list)} tracks for fine-tuning")
        cache = build_cache(
            state / "cache" / f"finetune-{backbone_id}",
            path_list,
            frontend=frontend,
            seconds=frontend.clip_seconds,
            workers=2 if workers is None else workers,
        )
        mels, decoded = cache.mels, cache.ok
        ok_rows = train_rows[decoded[train_rows]]
        say(f"fine-tuning {backbone_id} and the head on {len(ok_rows)} tracks")
        target_of = {int(r): i for i, r in enumerate(train_idx)}
        fit = finetune_head(
            model,
            mels,
            targets[[target_of[int(r)] for r in ok_rows]],
            rows=ok_rows,
            epochs=finetune_epochs,
            lr=finetune_lr,
            batch_size=finetune_batch_size,
            seed=seed,
            device=device,
            callback=on_epoch,
        )
    seconds["train"] = time.perf_counter() - clock

    # 5. Evaluate on the held-out tracks.
    clock = time.perf_counter()
    metrics = None
    if len(held_idx):
        held_pos = np.arange(len(held_idx))
        if mels is not None and decoded is not None:
            held_pos = held_pos[decoded[held_idx]]
            predicted = predict_from_mels(model, mels, held_idx[held_pos])
        else:
            predicted = model.apply_to_vectors(features[held_idx])
        metrics = evaluate_heldout(
            split.user_factors,
            counts[:, held_idx[held_pos]],
            predicted,
            split.heldout_factors[held_pos],
            seed=seed,
        )
    seconds["evaluate"] = time.perf_counter() - clock

    report = TrainReport(
        model_id="",
        path=Path(),
        activated=False,
        backbone=backbone,
        backbone_id=backbone_id,
        finetune=finetune,
        n_listened_tracks=listens.n_tracks,
        n_listeners=listens.n_users,
        n_matched=match.n_matched,
        match_rate=match.rate,
        n_items=items.n_tracks,
        n_tracks=len(tracks_kept),
        n_users=counts.shape[0],
        n_train=len(train_idx),
        n_heldout=len(held_idx),
        n_embedded=n_embedded,
        n_failed=n_failed,
        factors=factors,
        fit=fit,
        metrics=metrics,
        wmf_params=split.params,
        seconds=seconds,
        model=model,
    )

    # 6. Save, then activate.
    model.config["info"] = report.summary()
    path, activated = _save_and_activate(model, state_dir=state, activate=activate)
    report.model_id, report.path, report.activated = model.model_id, path, activated
    say(f"saved {model.model_id} to {path}")
    return report
