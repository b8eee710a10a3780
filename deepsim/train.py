"""Learning from listening data: the training behind ``beet deepsim-train``.

The recipe of van den Oord, Dieleman & Schrauwen (NIPS 2013), on top of a
backbone model whose vectors are already in the library:

1. match the listened tracks to library items and merge them
   (:mod:`deepsim.matching`); keep tracks and users with enough data, hold out
   a random ``heldout`` share of the tracks and factorise the *training* tracks
   with WMF, folding the held-out ones in afterwards (:mod:`deepsim.cf`);
2. regress the unit-normalised training-track factors from the tracks'
   backbone vectors.  The head is chosen by validation (:func:`choose_head`):
   closed-form ridge regression with its ``λ`` picked by k-fold
   cross-validation is the baseline; an MLP is used only where its
   cross-validated error is lower; both errors are reported.  Optionally the
   backbone is fine-tuned on log-mel patches too (:func:`finetune_head`);
3. score the held-out tracks against honest baselines (:mod:`deepsim.metrics`):
   the WMF upper bound, the untrained backbone as a content-based
   recommender, popularity and random;
4. pick the taste weight ``w`` of the combined "sound + taste" vector on the
   held-out tracks (:func:`evaluate_split`);
5. save the :class:`~deepsim.models.head.HeadModel` atomically under
   ``<state_dir>/models/<model_id>.safetensors``, and make it the active
   (``auto``) model only if it beats the untrained backbone on held-out AUC
   *and* mAP@500 (:func:`activation_decision`), unless forced.

The model that is saved is the one that was evaluated (trained on the training
tracks only), so the printed figures describe it.  Nothing is written before
step 5 except backbone vectors computed for items that had no vector at all,
so an interruption (Ctrl-C) at any point leaves the previous model active.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import scipy.sparse as sp

from deepsim.cf import factorise_split, filter_counts, random_split, split_tracks
from deepsim.errors import ParameterError, TrainingError
from deepsim.metrics import (
    MAP_K,
    PREDICTED_ROW,
    Comparison,
    HeldoutMetrics,
    MetricRow,
    NeighbourScores,
    co_listening,
    compare,
    evaluate_heldout,
    neighbour_scores,
    profile_scores,
)
from deepsim.util import check_choice, check_float, check_int, get_logger, loop_to_length

if TYPE_CHECKING:
    import torch
    from beets.library import Library

    from deepsim.listening import Listens
    from deepsim.models.head import HeadModel, Standardise

__all__ = [
    "TrainConfig",
    "TrainReport",
    "activation_decision",
    "choose_head",
    "choose_taste_weight",
    "evaluate_split",
    "finetune_head",
    "fit_ridge",
    "reembed_from_store",
    "run_training",
    "train_head",
]

log = get_logger(__name__)

#: Called after every epoch with (epoch, training loss, validation loss or nan).
EpochCallback = Callable[[int, float, float], None]
#: Receives finished log lines.
LogFunction = Callable[[str], None]

#: Row names the training adds to the held-out table.
UNTRAINED_ROW = "untrained: sound profile"
COMBINED_ROW = "trained: sound+taste profile"
#: Taste weights tried for the combined vector.  The ends are left out so that
#: both parts are always stored and any weight can be used at query time.
TASTE_WEIGHTS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: Smallest lower bound of the AP gain over sound alone that counts as a gain.
MIN_GAIN = 1e-3
#: Ridge penalties tried, as multiples of the number of training tracks.
RIDGE_LAMBDAS = tuple(float(x) for x in np.logspace(-3, 2, 11))


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    """Everything :func:`run_training` can be told (defaults are the library's).

    Attributes
    ----------
    backbone
        Built-in model name or checkpoint path whose vectors the head reads.
    min_plays, min_listeners, min_user_tracks
        The data-size rules of :func:`deepsim.cf.filter_counts`.
    min_tracks
        Fewest tracks (after those rules) worth training on.
    factors
        WMF dimension.
    alpha, epsilon, regularization, iterations, use_gpu
        WMF options (``None``: :func:`deepsim.wmf.fit_wmf`'s default).
    heldout
        Share of the tracks kept out of the factorisation and of training for
        evaluation (``0``: no evaluation, and no activation unless forced).
    head
        ``"auto"`` (ridge unless the MLP validates better), ``"ridge"`` or
        ``"mlp"``.
    folds
        k of the k-fold cross-validation that picks ridge's ``λ`` and compares
        the heads.
    hidden, dropout, lr, weight_decay, epochs, batch_size, patience
        The MLP and its Adam training (:func:`train_head`).
    finetune, finetune_epochs, finetune_lr, finetune_batch_size
        Also train the backbone on log-mels of the tracks' audio (decoded once
        into a cache under ``<state_dir>/cache``); GPU-oriented.
    taste_weight
        Weight of the taste part of the combined vector; ``None`` picks it on
        the held-out tracks (0.5 without held-out tracks).
    activate
        ``None``: activate only on evidence (:func:`activation_decision`);
        ``True``: always; ``False``: never.
    device
        ``auto``, ``cpu``, ``cuda``... for embedding and training.
    threads
        torch CPU threads while training (``None``: torch's setting).
    workers, embed_batch_size
        Decoding processes and tracks per inference batch when backbone
        vectors must be computed from audio.
    seed
        Seeds the split, WMF, the folds and the networks.
    """

    backbone: str = "default"
    min_plays: float = 2
    min_listeners: int = 2
    min_user_tracks: int = 2
    min_tracks: int = 50
    factors: int = 40
    alpha: float | None = None
    epsilon: float | None = None
    regularization: float | None = None
    iterations: int | None = None
    use_gpu: bool | None = None
    heldout: float = 0.2
    head: str = "auto"
    folds: int = 5
    hidden: int = 512
    dropout: float = 0.3
    lr: float = 1e-3
    weight_decay: float = 1e-5
    epochs: int = 200
    batch_size: int = 256
    patience: int = 10
    finetune: bool = False
    finetune_epochs: int = 20
    finetune_lr: float = 1e-4
    finetune_batch_size: int = 32
    taste_weight: float | None = None
    activate: bool | None = None
    device: str = "cpu"
    threads: int | None = None
    workers: int | None = None
    embed_batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        check_float("min_plays", self.min_plays, low=0.0)
        check_int("min_listeners", self.min_listeners, minimum=1)
        check_int("min_user_tracks", self.min_user_tracks, minimum=1)
        check_int("min_tracks", self.min_tracks, minimum=2)
        check_int("factors", self.factors, minimum=1)
        check_float("heldout", self.heldout, low=0.0, high=1.0, high_open=True)
        check_choice("head", self.head, ("auto", "ridge", "mlp"))
        check_int("folds", self.folds, minimum=2)
        check_int("epochs", self.epochs, minimum=1)
        check_int("finetune_epochs", self.finetune_epochs, minimum=1)
        check_int("embed_batch_size", self.embed_batch_size, minimum=1)
        if self.taste_weight is not None:
            check_float(
                "taste_weight", self.taste_weight, low=0.0, high=1.0, low_open=True, high_open=True
            )
        if self.threads is not None:
            check_int("threads", self.threads, minimum=1)
        if self.activate not in (None, True, False):
            raise ParameterError(f"activate must be None, True or False, got {self.activate!r}")

    def wmf_options(self) -> dict[str, Any]:
        """The WMF options that were set (the others take fit_wmf's defaults)."""
        names = ("alpha", "epsilon", "regularization", "iterations", "use_gpu")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


# --------------------------------------------------------------------------------------------
# Parameter checks and the shared training loop


def _check_pairs(features: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(features, dtype=np.float32)
    y = np.asarray(targets, dtype=np.float32)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise ParameterError(
            f"features and targets must be 2-D with one row per track, got {x.shape} and {y.shape}"
        )
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ParameterError("features or targets contain NaN or infinite values")
    return x, y


@dataclass
class HeadFit:
    """Outcome of :func:`train_head` (and of :func:`finetune_head`).

    Attributes
    ----------
    head
        The trained network (weights of the best validation epoch), in eval
        mode.  ``None`` after :func:`finetune_head`, which trains a whole model.
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


@dataclass
class _LoopResult:
    epochs: int
    best_epoch: int
    train_loss: list[float]
    val_loss: list[float]
    stopped_early: bool
    seconds: float

    def fit(
        self, head: torch.nn.Module | None, *, n_train: int, n_val: int, params: dict[str, Any]
    ) -> HeadFit:
        """This loop's outcome as a :class:`HeadFit` of ``head``."""
        return HeadFit(
            head=head,
            epochs=self.epochs,
            best_epoch=self.best_epoch,
            train_loss=self.train_loss,
            val_loss=self.val_loss,
            stopped_early=self.stopped_early,
            seconds=self.seconds,
            n_train=n_train,
            n_val=n_val,
            params=params,
        )


def _training_loop(
    module: torch.nn.Module,
    *,
    epochs: int,
    run_epoch: Callable[[int], float],
    validate: Callable[[], float] | None,
    patience: int,
    min_delta: float,
    callback: EpochCallback | None,
) -> _LoopResult:
    """The one epoch loop of the head and of fine-tuning.

    ``run_epoch(epoch)`` trains one pass and returns its mean loss;
    ``validate()`` returns the validation MSE (``None``: no validation, all
    ``epochs`` run).  Keeps the weights of the best validation epoch and stops
    after ``patience`` epochs without an improvement of more than
    ``min_delta``; an exception in the callback propagates.
    """
    best, best_epoch, bad = float("inf"), 0, 0
    best_state: dict[str, Any] | None = None
    train_losses: list[float] = []
    val_losses: list[float] = []
    stopped = False
    epoch = 0
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        train_losses.append(run_epoch(epoch))
        val = float("nan")
        if validate is not None:
            val = validate()
            val_losses.append(val)
        if callback is not None:
            callback(epoch, train_losses[-1], val)
        if validate is None:
            continue
        if val < best - min_delta:
            best, best_epoch, bad = val, epoch, 0
            best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        else:
            bad += 1
            if bad >= patience:
                stopped = epoch < epochs
                break
    if best_state is not None:
        module.load_state_dict(best_state)
    return _LoopResult(
        epochs=epoch,
        best_epoch=best_epoch if validate is not None else epoch,
        train_loss=train_losses,
        val_loss=val_losses,
        stopped_early=stopped,
        seconds=time.perf_counter() - started,
    )


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


# --------------------------------------------------------------------------------------------
# Heads on fixed features: the MLP, ridge, and the choice between them


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
    patience, min_delta
        Stop after ``patience`` epochs without a validation-MSE improvement
        of more than ``min_delta``; the best epoch's weights are kept.
    seed
        Seeds the split, the initial weights, shuffling and dropout (the
        global torch random state is left untouched).
    device
        torch device.
    threads
        CPU threads for torch during training (``None``: torch's setting).
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
        raise ParameterError("cannot train a head on zero tracks")
    epochs = check_int("epochs", epochs, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    patience = check_int("patience", patience, minimum=1)
    val_fraction = check_float("val_fraction", val_fraction, low=0.0, high=1.0, high_open=True)
    lr = check_float("lr", lr, low=0.0, low_open=True)
    weight_decay = check_float("weight_decay", weight_decay, low=0.0)
    if threads is not None:
        threads = check_int("threads", threads, minimum=1)
    rng = np.random.default_rng(seed)
    if validation is not None:
        xv, yv = _check_pairs(*validation)
        if xv.shape[1] != x.shape[1] or yv.shape[1] != y.shape[1]:
            raise ParameterError(
                f"validation set has shapes {xv.shape}, {yv.shape}; training {x.shape}, {y.shape}"
            )
        xt, yt = x, y
    else:
        train_idx, val_idx = random_split(len(x), val_fraction, rng)
        xt, yt, xv, yv = x[train_idx], y[train_idx], x[val_idx], y[val_idx]

    params = {
        "kind": "mlp",
        "hidden": hidden,
        "dropout": float(dropout),
        "lr": lr,
        "weight_decay": weight_decay,
        "epochs": epochs,
        "batch_size": batch_size,
        "patience": patience,
        "seed": seed,
    }
    with torch.random.fork_rng(devices=[]), _torch_threads(threads):
        torch.manual_seed(seed)
        head = make_head(x.shape[1], y.shape[1], hidden=hidden, dropout=dropout)
        cast("Standardise", head[0]).fit(xt)  # the standardising layer
        head = head.to(device)
        xt_t = torch.from_numpy(xt).to(device)
        yt_t = torch.from_numpy(yt).to(device)
        xv_t = torch.from_numpy(xv).to(device)
        yv_t = torch.from_numpy(yv).to(device)
        optimiser = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
        generator = torch.Generator().manual_seed(seed)

        def run_epoch(_epoch: int) -> float:
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
            head.eval()
            return float(total) / len(xt_t)

        def validate() -> float:
            return _mse_batched(head, xv_t, yv_t, 8192)

        loop = _training_loop(
            head,
            epochs=epochs,
            run_epoch=run_epoch,
            validate=validate if len(xv_t) else None,
            patience=patience,
            min_delta=min_delta,
            callback=callback,
        )
        head.eval()
    return loop.fit(head.cpu(), n_train=len(xt), n_val=len(xv), params=params)


@dataclass
class RidgeFit:
    """Closed-form ridge regression from standardised features (:func:`fit_ridge`).

    ``prediction = ((x - mean) / scale) @ weight + bias``.

    Attributes
    ----------
    weight, bias, mean, scale
        ``(in, out)``, ``(out,)``, ``(in,)``, ``(in,)``.
    lam
        The penalty chosen (absolute, on the scaled features).
    cv_mse
        Cross-validated MSE of each penalty tried (``lambdas`` order).
    lambdas
        The penalties tried.
    standardised
        Whether the inputs were scaled to unit variance (else only centred).
    """

    weight: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    lam: float
    cv_mse: np.ndarray
    lambdas: np.ndarray
    standardised: bool = False

    @property
    def best_cv_mse(self) -> float:
        return float(self.cv_mse.min())

    def predict(self, x: np.ndarray) -> np.ndarray:
        z = (np.asarray(x, np.float64) - self.mean) / self.scale
        return (z @ self.weight + self.bias).astype(np.float32)

    def module(self) -> torch.nn.Module:
        """The same map as a ``Standardise → Linear`` head (``make_head(hidden=0)``)."""
        import torch

        from deepsim.models.head import make_head

        head = make_head(len(self.mean), self.weight.shape[1], hidden=0)
        scaling, linear = head[0], cast("torch.nn.Linear", head[1])
        with torch.no_grad():
            scaling.get_buffer("mean").copy_(torch.from_numpy(self.mean).float())
            scaling.get_buffer("scale").copy_(torch.from_numpy(self.scale).float())
            linear.weight.copy_(torch.from_numpy(self.weight.T).float())
            linear.bias.copy_(torch.from_numpy(self.bias).float())
        return head.eval()


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and scale as :class:`~deepsim.models.head.Standardise` computes them."""
    mean = x.mean(axis=0)
    std = x.std(axis=0) if len(x) > 1 else np.ones(x.shape[1])
    return mean, np.where(std > 1e-8, std, 1.0)


def _folds(n: int, k: int, seed: int) -> list[np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(perm, min(k, n)) if len(part)]


def _ridge_solve(
    x: np.ndarray, y: np.ndarray, lambdas: Sequence[float], *, standardise: bool
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Weights for each penalty from one SVD of the centred (and maybe scaled) ``x``."""
    mean, scale = _standardise(x)
    if not standardise:
        scale = np.ones_like(scale)
    z = (x - mean) / scale
    bias = y.mean(axis=0)
    u, sv, vt = np.linalg.svd(z, full_matrices=False)
    uty = u.T @ (y - bias)
    weights = [vt.T @ ((sv / (sv**2 + lam))[:, None] * uty) for lam in lambdas]
    return weights, bias, mean, scale


def fit_ridge(
    features: np.ndarray,
    targets: np.ndarray,
    *,
    lambdas: Sequence[float] | None = None,
    folds: int = 5,
    seed: int = 0,
) -> RidgeFit:
    """Ridge regression with its penalty (and input scaling) chosen by k-fold cross-validation.

    Two input scalings are tried: centred only (the penalty then favours the
    directions in which the backbone vectors vary most, as their cosine does)
    and standardised per dimension; with each, the penalties ``lambdas``.

    Parameters
    ----------
    features, targets
        ``(n, in)`` and ``(n, out)``.
    lambdas
        Relative penalties to try; default :data:`RIDGE_LAMBDAS`.  Each is
        multiplied by the mean squared norm per dimension of the scaled
        training features (``n`` for standardised features), so ``1`` weighs
        the penalty like one dimension's whole signal.
    folds
        k (at most ``n``).
    seed
        Seeds the fold assignment.
    """
    x, y = _check_pairs(features, targets)
    if len(x) < 2:
        raise ParameterError(f"ridge needs at least 2 tracks, got {len(x)}")
    folds = check_int("folds", folds, minimum=2)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    relative = np.asarray(RIDGE_LAMBDAS if lambdas is None else list(lambdas), np.float64)
    if relative.size == 0 or np.any(relative < 0):
        raise ParameterError(f"lambdas must be non-negative numbers, got {lambdas!r}")
    parts = _folds(len(x), folds, seed)
    best: RidgeFit | None = None
    for standardise in (False, True):
        mean, scale = _standardise(x64)
        z_all = (x64 - mean) / (scale if standardise else 1.0)
        grid = relative * float(np.square(z_all).sum()) / x.shape[1]
        errors = np.zeros(len(grid))
        for part in parts:
            rest = np.setdiff1d(np.arange(len(x)), part)
            weights, bias, m, sc = _ridge_solve(x64[rest], y64[rest], grid, standardise=standardise)
            z = (x64[part] - m) / sc
            for i, w in enumerate(weights):
                errors[i] += float(np.square(z @ w + bias - y64[part]).mean(axis=1).sum())
        errors /= len(x)
        i = int(np.argmin(errors))
        if best is None or errors[i] < best.best_cv_mse:
            weights, bias, m, sc = _ridge_solve(x64, y64, [grid[i]], standardise=standardise)
            best = RidgeFit(weights[0], bias, m, sc, float(grid[i]), errors, grid, standardise)
    assert best is not None
    return best


@dataclass
class HeadChoice:
    """Which head :func:`choose_head` picked, and the validation errors behind it.

    Attributes
    ----------
    kind
        ``"ridge"`` or ``"mlp"``.
    head
        The chosen network fitted on all training tracks
        (``make_head``-compatible).
    ridge
        The ridge fit (its ``best_cv_mse`` is the ridge's k-fold MSE).
    mlp_cv_mse
        k-fold MSE of the MLP (``nan`` when it was not tried).
    fit
        The MLP's training history on all tracks (``None`` for ridge).
    folds
        k.
    """

    kind: str
    head: torch.nn.Module
    ridge: RidgeFit
    mlp_cv_mse: float
    fit: HeadFit | None
    folds: int

    @property
    def hidden(self) -> int:
        return 0 if self.kind == "ridge" else int(self.fit.params["hidden"]) if self.fit else 0

    def line(self) -> str:
        """One line for the report."""
        how = "standardised" if self.ridge.standardised else "centred"
        ridge = f"ridge ({how}, λ={self.ridge.lam:.3g}) {self.ridge.best_cv_mse:.4f}"
        mlp = "not tried" if math.isnan(self.mlp_cv_mse) else f"{self.mlp_cv_mse:.4f}"
        return f"head: {self.kind}; {self.folds}-fold validation MSE: {ridge}, mlp {mlp}"


def choose_head(
    features: np.ndarray,
    targets: np.ndarray,
    config: TrainConfig,
    *,
    callback: EpochCallback | None = None,
) -> HeadChoice:
    """Fit ridge (λ by k-fold CV) and, unless ``config.head == "ridge"``, the MLP.

    The MLP is cross-validated on the same folds (each fold's MLP early-stops
    on a tenth of its own training tracks) and used only where its error is
    lower than ridge's (``head="auto"``), or always (``head="mlp"``).
    """
    x, y = _check_pairs(features, targets)
    folds = min(config.folds, len(x))
    ridge = fit_ridge(x, y, folds=folds, seed=config.seed)
    mlp_options: dict[str, Any] = {
        "hidden": config.hidden,
        "dropout": config.dropout,
        "lr": config.lr,
        "weight_decay": config.weight_decay,
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "patience": config.patience,
        "seed": config.seed,
        "device": config.device,
        "threads": config.threads,
    }
    mlp_cv = float("nan")
    if config.head != "ridge" and len(x) >= 4:
        import torch

        total = 0.0
        for part in _folds(len(x), folds, config.seed):
            rest = np.setdiff1d(np.arange(len(x)), part)
            fit = train_head(x[rest], y[rest], callback=callback, **mlp_options)
            assert fit.head is not None
            with torch.no_grad():
                pred = fit.head(torch.from_numpy(x[part])).numpy()
            total += float(np.square(pred - y[part]).mean(axis=1).sum())
        mlp_cv = total / len(x)
    use_mlp = config.head == "mlp" or (config.head == "auto" and mlp_cv < ridge.best_cv_mse)
    if use_mlp:
        fit = train_head(x, y, callback=callback, **mlp_options)
        assert fit.head is not None
        return HeadChoice("mlp", fit.head, ridge, mlp_cv, fit, folds)
    return HeadChoice("ridge", ridge.module(), ridge, mlp_cv, None, folds)


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
    part: str = "taste",
) -> np.ndarray:
    """Predicted taste (head outputs) for whole log-mels, averaged over patches.

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
    part
        ``"taste"`` (the head) or ``"sound"`` (the backbone's own vector).
    """
    import torch

    rows = np.asarray(rows, dtype=np.int64)
    check_choice("part", part, ("taste", "sound"))
    width = model.taste_dim if part == "taste" else int(model.config["in_dim"])
    out = np.zeros((len(rows), width), np.float32)
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
            if part == "taste":
                result = model.taste_pool(means).float()
            else:
                result = model.backbone.pool(means).float()
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
    if y.ndim != 2 or len(y) != len(rows_arr) or y.shape[1] != model.taste_dim:
        raise ParameterError(
            f"targets must be ({len(rows_arr)}, {model.taste_dim}) for the given rows, "
            f"got {y.shape}"
        )
    if len(rows_arr) == 0:
        raise ParameterError("cannot fine-tune on zero tracks")
    epochs = check_int("epochs", epochs, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    patience = check_int("patience", patience, minimum=1)
    val_fraction = check_float("val_fraction", val_fraction, low=0.0, high=1.0, high_open=True)
    rng = np.random.default_rng(seed)
    train_pos, val_pos = random_split(len(rows_arr), val_fraction, rng)
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

    def crop(row: int) -> np.ndarray:
        mel = np.asarray(mels[row], dtype=np.float32)
        if frames > patch:
            s = int(rng.integers(0, frames - patch + 1))
            return mel[s : s + patch]
        return loop_to_length(mel, patch)

    def run_epoch(_epoch: int) -> float:
        model.train()
        if freeze_batchnorm:
            _freeze_batchnorm(backbone)
        order = rng.permutation(train_pos)
        total = 0.0
        for start in range(0, len(order), batch_size):
            pos = order[start : start + batch_size]
            batch = torch.from_numpy(np.stack([crop(int(rows_arr[p])) for p in pos])).to(device)
            target = y_t[pos].to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                pred = model(batch)
            loss = torch.nn.functional.mse_loss(pred.float(), target)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(pos)
        model.eval()
        return total / len(order)

    def validate() -> float:
        pred_v = predict_from_mels(
            model, mels, rows_arr[val_pos], batch_size=batch_size, normalise=False
        )
        return float(np.mean(np.square(pred_v - y[val_pos]).mean(axis=1)))

    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            loop = _training_loop(
                model,
                epochs=epochs,
                run_epoch=run_epoch,
                validate=validate if len(val_pos) else None,
                patience=patience,
                min_delta=min_delta,
                callback=callback,
            )
    finally:
        model.eval()
        model.cpu()
    return loop.fit(
        None,
        n_train=len(train_pos),
        n_val=len(val_pos),
        params={
            "kind": "finetune",
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
# Evaluation: baselines, the taste weight, the activation rule


@dataclass
class WeightChoice:
    """The taste weight and the item-to-item evidence behind it (:func:`choose_taste_weight`).

    Attributes
    ----------
    weight
        The weight of the combined vector.
    scan
        ``{w: NeighbourScores}`` for ``w = 0`` (sound only: the untrained
        vectors), every weight tried, and ``1`` (taste only).
    gain
        ``{w: (mean, standard error)}`` of the per-query AP gain over ``w = 0``
        for the weights tried.
    rule
        One line: what was chosen and why.
    """

    weight: float
    scan: dict[float, NeighbourScores]
    gain: dict[float, tuple[float, float]]
    rule: str


def choose_taste_weight(
    sound: np.ndarray,
    taste: np.ndarray,
    queries: np.ndarray,
    relevance: sp.csr_matrix,
    *,
    weights: Sequence[float] = TASTE_WEIGHTS,
    fixed: float | None = None,
) -> WeightChoice:
    """Choose the taste weight the way ``beet similar`` uses it: item to item, cold start.

    Every track (row of ``sound`` and ``taste``) is a candidate; the
    ``queries`` (row indices: the held-out tracks, which neither the
    factorisation nor the head has seen, so their taste vector comes from
    their audio alone) are each ranked against all other tracks by the cosine
    of the combined vectors at weight ``w``, and scored by AP against
    ``relevance`` (``(n_queries, n_tracks)``: the tracks the query's listeners
    also played, :func:`deepsim.metrics.co_listening`).

    The rule (noise-aware): for each weight, the per-query gain in AP over
    sound alone (``w = 0``, the untrained vectors); the weight whose mean gain
    minus one standard error is largest (the smaller weight on a tie).  When
    no weight's lower bound is above :data:`MIN_GAIN`, the smallest weight is kept (the
    taste part does not surely help, so keep it small); without any query
    that has a relevant track, ``0.5``.  ``fixed`` skips the choice (the scan
    is still computed, for the report).
    """
    from deepsim.taste import combine

    queries = np.asarray(queries, np.int64)
    scan: dict[float, NeighbourScores] = {}
    for w in (0.0, *weights, 1.0):
        v = combine(sound, taste, w)
        scan[w] = neighbour_scores(v[queries], v, relevance, exclude=queries)
    base = scan[0.0].ap_per_query
    gain: dict[float, tuple[float, float]] = {}
    for w in weights:
        d = scan[w].ap_per_query - base
        d = d[np.isfinite(d)]
        se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("inf")
        gain[w] = (float(d.mean()) if len(d) else float("nan"), se)
    n = scan[0.0].n_queries
    what = f"`similar` on {n} held-out track(s)"
    if fixed is not None:
        return WeightChoice(float(fixed), scan, gain, f"taste weight {fixed:g}: as given")
    if n == 0:
        return WeightChoice(
            0.5,
            scan,
            gain,
            "taste weight 0.5: no held-out track has co-listened tracks to judge by",
        )
    lower = {w: m - se for w, (m, se) in gain.items()}
    best = max(weights, key=lambda w: (lower[w], -w))
    if not lower[best] > MIN_GAIN:
        w = min(weights)
        m, se = gain[w]
        return WeightChoice(
            w,
            scan,
            gain,
            f"taste weight {w:g}: no weight surely improves {what} "
            f"(best lower bound {lower[best]:+.3f} at {best:g}); the smallest kept",
        )
    m, se = gain[best]
    return WeightChoice(
        best,
        scan,
        gain,
        f"taste weight {best:g}: the surest gain in mAP of {what} over sound alone "
        f"({m:+.3f} ± {se:.3f}, P@{scan[best].k} {scan[0.0].p_at_k:.3f} → {scan[best].p_at_k:.3f})",
    )


@dataclass
class Evaluation:
    """The held-out table and what was decided from it.

    Attributes
    ----------
    metrics
        Every row (:mod:`deepsim.metrics`), including :data:`UNTRAINED_ROW` and
        :data:`COMBINED_ROW`.
    weight
        The taste weight and its item-to-item evidence.
    taste_scan
        ``{w: (AUC, mAP)}`` of the combined *profile* for each weight tried (a
        report only: it rewards taste, it does not choose).
    comparison
        The sound+taste profile against the untrained sound profile, per
        listener (the activation rule).
    """

    metrics: HeldoutMetrics
    weight: WeightChoice
    taste_scan: dict[float, tuple[float, float]]
    comparison: Comparison

    @property
    def taste_weight(self) -> float:
        return self.weight.weight


def evaluate_split(
    user_factors: np.ndarray,
    train_plays: sp.csr_matrix,
    heldout_plays: sp.csr_matrix,
    *,
    features_train: np.ndarray,
    features_heldout: np.ndarray,
    predicted_train: np.ndarray,
    predicted_heldout: np.ndarray,
    heldout_factors: np.ndarray,
    untrained_train: np.ndarray | None = None,
    untrained_heldout: np.ndarray | None = None,
    taste_weight: float | None = None,
    seed: int = 0,
) -> Evaluation:
    """Score the held-out tracks every way the table shows; choose the taste weight.

    The weight is chosen item to item (:func:`choose_taste_weight`): each
    held-out track against every kept track, relevance from co-listening in
    the held-out plays.  The table's rows are per user: only users with at
    least one training play take part (the others have no factor and no
    profile), so every row ranks for the same users and rows can be compared
    user by user.  ``untrained_train``/``untrained_heldout`` are the original
    backbone's vectors for :data:`UNTRAINED_ROW` when they differ from the
    sound part (a fine-tuned backbone); by default the ``features_*``.
    """
    from deepsim.taste import combine

    train_plays = sp.csr_matrix(train_plays)
    heldout_plays = sp.csr_matrix(heldout_plays)
    n_train = train_plays.shape[1]
    sound = np.concatenate([features_train, features_heldout])
    taste = np.concatenate([predicted_train, predicted_heldout])
    queries = n_train + np.arange(heldout_plays.shape[1])
    relevance = co_listening(heldout_plays, sp.hstack([train_plays, heldout_plays]).tocsr())
    choice = choose_taste_weight(sound, taste, queries, relevance, fixed=taste_weight)

    keep = np.flatnonzero((np.diff(train_plays.indptr) > 0) & np.any(user_factors != 0, axis=1))
    train_plays, heldout_plays = train_plays[keep], heldout_plays[keep]
    metrics = evaluate_heldout(
        user_factors[keep], heldout_plays, predicted_heldout, heldout_factors, seed=seed
    )
    untrained = profile_scores(
        train_plays,
        features_train if untrained_train is None else untrained_train,
        heldout_plays,
        features_heldout if untrained_heldout is None else untrained_heldout,
    )
    scan: dict[float, tuple[float, float]] = {}
    chosen_scores = None
    for w in sorted({*choice.scan, choice.weight}):
        scores = profile_scores(
            train_plays,
            combine(features_train, predicted_train, w),
            heldout_plays,
            combine(features_heldout, predicted_heldout, w),
        )
        scan[w] = (scores.auc, scores.map_at_k)
        if w == choice.weight:
            chosen_scores = scores
    assert chosen_scores is not None
    metrics = metrics.with_row(
        MetricRow(f"{COMBINED_ROW} (w={choice.weight:g})", chosen_scores), after=PREDICTED_ROW
    )
    metrics = metrics.with_row(MetricRow(UNTRAINED_ROW, untrained), after=metrics.rows[2].name)
    return Evaluation(metrics, choice, scan, compare(chosen_scores, untrained))


def activation_decision(evaluation: Evaluation | None, *, force: bool | None) -> tuple[bool, str]:
    """Whether to activate a new model, and why (one line).

    The rule: the new model's vectors (sound + taste, :data:`COMBINED_ROW`)
    must beat the untrained backbone's vectors (:data:`UNTRAINED_ROW`) as a
    content-based recommender of the held-out tracks, on AUC *and* mAP@500,
    each by a paired per-listener difference at least 1.645 standard errors
    above zero (one-sided 95 %), over every listener of the table (the taste
    weight was chosen item to item, not on these rankings).
    ``force=True``/``False`` overrides.
    """
    if evaluation is None:
        if force:
            return True, "activated as asked (--activate); no held-out tracks to judge it on"
        return False, "not activated: no held-out tracks to show it beats the untrained model"
    c = evaluation.comparison
    figures = (
        f"AUC {c.auc[0]:.3f} vs {c.auc[1]:.3f} ({c.d_auc:+.3f}, z={c.z_auc:.1f}), "
        f"mAP@{MAP_K} {c.map_at_k[0]:.3f} vs {c.map_at_k[1]:.3f} ({c.d_map:+.3f}, "
        f"z={c.z_map:.1f}) over {c.n_users} listeners"
    )
    if force is True:
        return True, f"activated as asked (--activate): {figures}"
    if force is False:
        return False, f"not activated (as asked): {figures}"
    if c.beats:
        return True, f"activated: it beats the untrained model: {figures}"
    return False, (
        f"not activated: it does not clearly beat the untrained model ({figures}; both "
        "differences must be positive with z >= 1.645); use --activate to use it anyway"
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
    activated, activation
        Whether it was made the active (``auto``) model, and why (one line).
    config
        The :class:`TrainConfig` used.
    backbone_id
        The backbone's weights id.
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
    head
        The head choice (ridge/MLP and their validation errors).
    fit
        The fine-tuning history (``None`` without fine-tuning).
    evaluation
        Held-out table and decisions (``None`` when ``heldout`` was 0).
    taste_weight
        The weight stored with the model (its vectors' default).
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
    activation: str
    config: TrainConfig
    backbone_id: str
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
    head: HeadChoice
    fit: HeadFit | None
    evaluation: Evaluation | None
    taste_weight: float
    wmf_params: dict[str, Any]
    seconds: dict[str, float]
    model: HeadModel | None = None

    @property
    def metrics(self) -> HeldoutMetrics | None:
        return None if self.evaluation is None else self.evaluation.metrics

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable facts (stored in the checkpoint's config)."""
        out: dict[str, Any] = {
            "factors": self.config.factors,
            "tracks": self.n_tracks,
            "users": self.n_users,
            "train_tracks": self.n_train,
            "heldout_tracks": self.n_heldout,
            "head": self.head.kind,
            "ridge_lambda": round(self.head.ridge.lam, 6),
            "ridge_cv_mse": round(self.head.ridge.best_cv_mse, 6),
            "mlp_cv_mse": None
            if math.isnan(self.head.mlp_cv_mse)
            else round(self.head.mlp_cv_mse, 6),
            "taste_weight": self.taste_weight,
            "wmf": self.wmf_params,
        }
        if self.evaluation is not None:
            choice = self.evaluation.weight
            out["taste_weight_rule"] = choice.rule
            out["similar_heldout"] = {
                f"{w:g}": {"p_at_k": round(s.p_at_k, 4), "map": round(s.map_at_k, 4)}
                for w, s in choice.scan.items()
                if s.n_queries
            }
            out["heldout"] = {
                row.name: {
                    "auc": round(row.scores.auc, 4),
                    "map_at_500": round(row.scores.map_at_k, 4),
                }
                for row in self.evaluation.metrics.rows
            }
        return out

    def format_table(self) -> str:
        """Plain text: data, head choice, the held-out table with baselines, the decision."""
        what = "fine-tuned " if self.config.finetune else ""
        lines = [
            f"model {self.model_id}: {what}{self.backbone_id} + {self.head.kind} head → "
            f"{self.config.factors} factors; vectors = sound + taste, taste weight "
            f"{self.taste_weight:g}" + (" (now active)" if self.activated else " (not active)"),
            f"  saved to {self.path}",
            f"listening data: {self.n_listened_tracks} tracks, {self.n_listeners} listeners; "
            f"{self.n_matched} tracks matched the library ({100 * self.match_rate:.1f} %), "
            f"{self.n_items} items",
            f"training data: {self.n_tracks} tracks × {self.n_users} users "
            f"({self.n_train} to train on, {self.n_heldout} held out)"
            + (f"; {self.n_embedded} embedded from audio" if self.n_embedded else "")
            + (f"; {self.n_failed} dropped (audio failed)" if self.n_failed else ""),
            self.head.line(),
        ]
        if self.fit is not None:
            fit = self.fit
            val = (
                "" if math.isnan(fit.best_val_loss) else f", validation MSE {fit.best_val_loss:.4f}"
            )
            lines.append(
                f"fine-tuning: {fit.epochs} epochs (best {fit.best_epoch}{val}"
                f"{', stopped early' if fit.stopped_early else ''}) in {fit.seconds:.1f} s"
            )
        ev = self.evaluation
        if ev is None:
            lines.append("no held-out tracks: no evaluation")
        else:
            m = ev.metrics
            lines.append(
                f"held-out evaluation: {m.n_tracks} tracks, {m.n_users} users with "
                f"{m.n_plays} plays on them"
            )
            lines.append(m.format_table())
            lines.extend(_weight_table(ev))
        lines.append(self.activation)
        return "\n".join(lines)


def _weight_table(ev: Evaluation) -> list[str]:
    """The taste-weight scan: item-to-item P@k and mAP, and the profile's mAP, per weight."""
    choice = ev.weight
    scan = choice.scan
    if not scan:
        return [choice.rule]
    weights = sorted(scan)
    k = scan[weights[0]].k
    n = scan[weights[0]].n_queries
    cells = [f"{w:g}" + ("*" if w == choice.weight else "") for w in weights]
    width = max(6, *(len(c) for c in cells))

    def row(name: str, values: list[str]) -> str:
        return f"  {name:<26}" + "".join(f"{v:>{width + 1}}" for v in values)

    profile = [f"{ev.taste_scan[w][1]:.3f}" if w in ev.taste_scan else "-" for w in weights]
    return [
        f"taste weight (0 = the untrained sound vectors; * = chosen), `similar` item to item "
        f"on {n} held-out tracks:",
        row("weight", cells),
        row(f"similar: P@{k}", [f"{scan[w].p_at_k:.3f}" for w in weights]),
        row("similar: mAP", [f"{scan[w].map_at_k:.3f}" for w in weights]),
        row(f"profile: mAP@{MAP_K}", profile),
        choice.rule,
    ]


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
    log: LogFunction | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Backbone vectors of ``item_ids``: from the store, else embedded from audio.

    The missing ones go through the library's one embedding routine
    (:func:`deepsim.embed.plan_embedding` + :func:`deepsim.embed.embed_items`),
    which stores them in the backbone's own slot (an item holding another
    model's vector keeps it untouched, so an interrupted or failed run changes
    nothing the active model relies on).  Items whose file is missing or whose
    audio fails are left out (one log line each); Ctrl-C raises
    ``KeyboardInterrupt`` after the vectors finished so far are stored.

    Returns
    -------
    ids, matrix, n_embedded
        The item ids that have a vector (in the order of ``item_ids``), their
        ``(n, dim)`` vectors, and how many were embedded from audio.
    """
    from deepsim import store
    from deepsim.embed import embed_items, plan_embedding
    from deepsim.models import load_model
    from deepsim.models import model_id as model_id_of
    from deepsim.util import resolve_device

    wanted = np.asarray(item_ids, dtype=np.int64)
    backbone_id = model_id_of(backbone)
    ids, matrix = store.read_vectors(lib, backbone_id, ids=wanted.tolist())
    have = {int(i): row for i, row in zip(ids.tolist(), matrix, strict=True)}
    missing = [int(i) for i in wanted.tolist() if int(i) not in have]
    n_embedded = 0
    if missing:
        say: LogFunction = log or (lambda _line: None)
        plan = plan_embedding(lib, backbone_id, missing, retry_failed=True)
        gone = {item_id: path for item_id, path in plan.missing}
        for item_id in missing:
            if item_id in gone:
                say(f"{gone[item_id] or f'item {item_id}'}: file missing on disk; left out")
            elif item_id not in plan.paths:
                say(f"item {item_id}: no such item or no file; left out")
        if plan.todo:
            say(f"embedding {len(plan.todo)} tracks with {backbone_id} (no stored vector)")
            summary = embed_items(
                lib,
                plan,
                lambda: load_model(backbone, device=resolve_device(device)),
                workers=workers,
                batch_size=batch_size,
            )
            for _item_id, path, reason in summary.failures:
                say(f"{path}: {reason}; left out")
            if summary.interrupted:
                raise KeyboardInterrupt
            n_embedded = summary.embedded
            ids, matrix = store.read_vectors(lib, backbone_id, ids=plan.todo)
            have.update(zip(ids.tolist(), matrix, strict=True))
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

    all_ids = np.asarray(store.all_item_ids(lib), np.int64)
    done = np.asarray(sorted(store.ids_with_vectors(lib, head_model.model_id)), np.int64)
    todo = np.setdiff1d(all_ids, done)
    if head_model.finetune or len(todo) == 0:
        return todo
    backbone_id = head_model.config["backbone_id"]
    stored = store.read_stored(lib, backbone_id, ids=todo.tolist())
    if len(stored.ids):
        # The backbone vectors stay in their own slot, so that training again or
        # going back to the backbone model needs no audio; the head's vectors
        # carry the audio identity of the backbone vector they come from.
        vectors = head_model.apply_to_vectors(stored.matrix)
        store.write_records(
            lib,
            (
                store.VectorRecord(item_id, head_model.model_id, vector, audio=audio)
                for item_id, vector, audio in zip(
                    stored.ids.tolist(), vectors, stored.audio, strict=True
                )
            ),
            batch_size=batch_size,
        )
    return np.setdiff1d(todo, stored.ids)


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
    listens: Listens,
    config: TrainConfig | None = None,
    *,
    state_dir: str | os.PathLike[str],
    on_epoch: EpochCallback | None = None,
) -> TrainReport:
    """Train a head on the library's listening data; activate it if it earns it.

    See the module docstring for the steps.  Progress lines go to the
    ``deepsim.train`` logger (INFO); the result is the returned report.

    Parameters
    ----------
    lib
        The beets library.
    listens
        Listening data (:func:`deepsim.listening.read_listens` /
        :func:`~deepsim.listening.read_library`).
    config
        What to do (:class:`TrainConfig`; default: its defaults).
    state_dir
        deepsim's state directory; the model goes to ``<state_dir>/models``.
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
    from deepsim.matching import collapse, match_tracks
    from deepsim.models import BUILTIN_MODELS
    from deepsim.models import model_id as model_id_of
    from deepsim.models.head import HeadModel
    from deepsim.util import resolve_device

    cfg = config or TrainConfig()
    say = functools.partial(log.info, "%s")  # progress goes to the `deepsim` logger
    clock = _StageClock()
    state = Path(state_dir)
    device = resolve_device(cfg.device)

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
        min_plays=cfg.min_plays,
        min_listeners=cfg.min_listeners,
        min_user_tracks=cfg.min_user_tracks,
    )
    rule = (
        f"at least {cfg.min_plays:g} plays from {cfg.min_listeners} listeners, "
        f"and listeners with at least {cfg.min_user_tracks} such tracks"
    )
    if len(tracks_kept) < cfg.min_tracks:
        raise TrainingError(
            f"only {len(tracks_kept)} of the {items.n_tracks} matched library tracks have "
            f"enough listening data ({rule}); training needs at least {cfg.min_tracks}"
        )
    clock.lap("match")

    # 2. Features of the kept tracks.
    item_ids = np.asarray([items.tracks[j].item_id for j in tracks_kept], np.int64)
    backbone = cfg.backbone
    if backbone not in BUILTIN_MODELS:  # a checkpoint: keep an absolute path in the head
        backbone = os.fspath(Path(os.path.expanduser(backbone)).resolve())
    backbone_id = model_id_of(backbone)
    feat_ids, features, n_embedded = backbone_features(
        lib,
        item_ids,
        backbone=backbone,
        device=device,
        workers=cfg.workers,
        batch_size=cfg.embed_batch_size,
        log=say,
    )
    n_failed = len(item_ids) - len(feat_ids)
    if n_failed:
        keep = np.isin(item_ids, feat_ids)
        tracks_kept = tracks_kept[keep]
        item_ids = item_ids[keep]
    if len(tracks_kept) < cfg.min_tracks:
        raise TrainingError(
            f"only {len(tracks_kept)} tracks with enough listening data have a {backbone_id} "
            f"vector ({n_failed} could not be embedded); training needs at least {cfg.min_tracks}"
        )
    clock.lap("features")

    # 3. Split and factorise.
    counts = items.counts[users_kept][:, tracks_kept].tocsr()
    train_idx, held_idx = split_tracks(
        len(tracks_kept), heldout_fraction=cfg.heldout, seed=cfg.seed
    )
    say(
        f"factorising {counts.shape[0]} users × {len(train_idx)} training tracks "
        f"({cfg.factors} factors; {len(held_idx)} tracks held out)"
    )
    split = factorise_split(
        counts, train_idx, held_idx, factors=cfg.factors, seed=cfg.seed, **cfg.wmf_options()
    )
    has_target = np.any(split.train_factors != 0, axis=1)
    clock.lap("wmf")

    # 4. Train: choose the head by validation, optionally fine-tune.
    train_rows = train_idx[has_target]
    say(f"choosing and training the head on {len(train_rows)} tracks")
    with _torch_threads(cfg.threads):
        choice = choose_head(
            features[train_rows], split.train_factors[has_target], cfg, callback=on_epoch
        )
    say(choice.line())
    model = HeadModel(
        backbone=backbone,
        backbone_id=backbone_id,
        in_dim=features.shape[1],
        out_dim=cfg.factors,
        hidden=0 if choice.kind == "ridge" else cfg.hidden,
        dropout=cfg.dropout,
    )
    model.head.load_state_dict(choice.head.state_dict())
    model.eval()
    mels = None
    decoded: np.ndarray | None = None  # per kept track, whether its audio decoded
    finetune_fit = None
    if cfg.finetune:
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
            workers=2 if cfg.workers is None else cfg.workers,
        )
        mels, decoded = cache.mels, cache.ok
        ok_rows = train_rows[decoded[train_rows]]
        say(f"fine-tuning {backbone_id} and the head on {len(ok_rows)} tracks")
        target_of = {int(r): i for i, r in enumerate(train_idx)}
        finetune_fit = finetune_head(
            model,
            mels,
            split.train_factors[[target_of[int(r)] for r in ok_rows]],
            rows=ok_rows,
            epochs=cfg.finetune_epochs,
            lr=cfg.finetune_lr,
            batch_size=cfg.finetune_batch_size,
            seed=cfg.seed,
            device=device,
            callback=on_epoch,
        )
    clock.lap("train")

    # 5. Evaluate on the held-out tracks; pick the taste weight.
    evaluation = None
    if len(held_idx):
        if mels is not None and decoded is not None:
            keep_t = decoded[train_idx]
            keep_h = decoded[held_idx]
            sound = predict_from_mels(model, mels, np.arange(len(tracks_kept)), part="sound")
            taste = predict_from_mels(model, mels, np.arange(len(tracks_kept)))
        else:
            keep_t = np.ones(len(train_idx), bool)
            keep_h = np.ones(len(held_idx), bool)
            sound = features
            taste = _predict_taste(model, features)
        evaluation = evaluate_split(
            split.user_factors,
            counts[:, train_idx[keep_t]],
            counts[:, held_idx[keep_h]],
            features_train=sound[train_idx[keep_t]],
            features_heldout=sound[held_idx[keep_h]],
            predicted_train=taste[train_idx[keep_t]],
            predicted_heldout=taste[held_idx[keep_h]],
            heldout_factors=split.heldout_factors[keep_h],
            untrained_train=features[train_idx[keep_t]],
            untrained_heldout=features[held_idx[keep_h]],
            taste_weight=cfg.taste_weight,
            seed=cfg.seed,
        )
    clock.lap("evaluate")
    taste_weight = (
        evaluation.taste_weight
        if evaluation is not None
        else (0.5 if cfg.taste_weight is None else cfg.taste_weight)
    )
    activate, activation = activation_decision(evaluation, force=cfg.activate)

    # The model's vectors combine sound and taste; its WMF item factors go with it,
    # so that `beet recommend` can fold a listener in without the listening data.
    model.config["taste_weight"] = float(taste_weight)
    model.dim = model.config["in_dim"] + model.config["out_dim"]
    model.config["cf"] = {k: split.params[k] for k in ("alpha", "epsilon", "regularization")}
    model.extra = {
        "cf_item_ids": np.concatenate([item_ids[train_idx], item_ids[held_idx]]).astype(np.int64),
        "cf_item_factors": np.concatenate([split.wmf.item_factors, split.heldout_factors]).astype(
            np.float32
        ),
    }

    report = TrainReport(
        model_id="",
        path=Path(),
        activated=False,
        activation=activation,
        config=cfg,
        backbone_id=backbone_id,
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
        head=choice,
        fit=finetune_fit,
        evaluation=evaluation,
        taste_weight=float(taste_weight),
        wmf_params=split.params,
        seconds=clock.seconds,
        model=model,
    )

    # 6. Save, then (on evidence) activate.
    model.config["info"] = report.summary()
    path, activated = _save_and_activate(model, state_dir=state, activate=activate)
    report.model_id, report.path, report.activated = model.model_id, path, activated
    say(f"saved {model.model_id} to {path}")
    return report


class _StageClock:
    """Seconds per stage of a run: :meth:`lap` ends a stage and starts the next."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = now - self._start
        self._start = now


def _predict_taste(model: HeadModel, features: np.ndarray) -> np.ndarray:
    """Unit predicted taste vectors from backbone vectors."""
    import torch

    with torch.inference_mode():
        x = torch.nn.functional.normalize(torch.from_numpy(np.asarray(features, np.float32)), dim=1)
        return torch.nn.functional.normalize(model.head(x).float(), dim=1).numpy()
