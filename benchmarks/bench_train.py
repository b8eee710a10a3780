"""Head-training benchmark: the core of ``beet deepsim-train`` on synthetic data.

Listening data comes from :func:`bench_wmf.synthesise` (power-law popularity
and activity, users drawing most plays from one of ``--clusters`` taste
clusters).  Each track gets a 400-d "backbone vector": its cluster's mean plus
Gaussian noise (``--noise``), unit-normalised, so audio features carry the
taste structure only partly, as real ones do.

The run follows :func:`deepsim.train.run_training` without a library:
data-size filter → held-out split → WMF on the training tracks (timed) →
held-out factors solved against the users → :func:`deepsim.train.train_head`
(timed; the goal is ≤ 60 s for 10 000 training tracks on a 2-core machine) →
held-out metrics (timed).  A closed-form ridge regression from features to
factors is trained and scored in the same run as a baseline.

Run::

    .venv/bin/python benchmarks/bench_train.py                # 12 500 tracks, 10 000 trained on
    .venv/bin/python benchmarks/bench_train.py --tracks 50000 --users 100000 --plays 5000000
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_wmf import add_synthesis_options, count_matrix, synthesise_from

from deepsim.cf import factorise_split, filter_counts, split_tracks
from deepsim.metrics import HeldoutMetrics, evaluate_heldout
from deepsim.train import train_head


def features_for(cluster: np.ndarray, *, dim: int, noise: float, seed: int) -> np.ndarray:
    """Unit vectors: the track's cluster mean plus isotropic noise."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((int(cluster.max()) + 1, dim)) / np.sqrt(dim)
    x = means[cluster] + noise * rng.standard_normal((len(cluster), dim)) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def ridge(x: np.ndarray, y: np.ndarray, *, lam: float = 1.0) -> np.ndarray:
    """Closed-form ridge regression weights (with a bias column)."""
    xb = np.hstack([x, np.ones((len(x), 1), x.dtype)]).astype(np.float64)
    a = xb.T @ xb + lam * np.eye(xb.shape[1])
    return np.linalg.solve(a, xb.T @ y.astype(np.float64))


def show(name: str, m: HeldoutMetrics) -> None:
    print(f"  {name}")
    print(m.format_table(indent="    "))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_synthesis_options(ap, users=20_000, tracks=12_500, plays=1_000_000)
    ap.add_argument("--dim", type=int, default=400)
    ap.add_argument("--noise", type=float, default=1.0)
    ap.add_argument("--factors", type=int, default=40)
    ap.add_argument("--iterations", type=int, default=15, help="WMF iterations")
    ap.add_argument("--heldout", type=float, default=0.2)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, 0],
        help="torch threads for head training, one run each (0 = torch's default)",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    print(
        f"cpu cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}, "
        f"load average: {os.getloadavg()[0]:.2f}"
    )
    user, track, cluster = synthesise_from(args)
    counts = count_matrix(user, track, shape=(args.users, args.tracks))
    features = features_for(cluster, dim=args.dim, noise=args.noise, seed=args.seed + 1)
    users, tracks = filter_counts(counts)
    counts, features = counts[users][:, tracks].tocsr(), features[tracks]
    train, held = split_tracks(len(tracks), heldout_fraction=args.heldout, seed=args.seed)
    print(
        f"data: {counts.shape[0]} users × {counts.shape[1]} tracks kept, nnz {counts.nnz}; "
        f"{len(train)} training tracks, {len(held)} held out; features {args.dim}-d"
    )

    t0 = time.perf_counter()
    split = factorise_split(
        counts, train, held, factors=args.factors, seed=args.seed, iterations=args.iterations
    )
    t_wmf = time.perf_counter() - t0
    print(
        f"WMF ({args.factors} factors, {args.iterations} iterations) on the training tracks "
        f"+ held-out solve: {t_wmf:.2f} s"
    )

    fits = []
    for threads in args.threads:
        fit = train_head(
            features[train],
            split.train_factors,
            hidden=args.hidden,
            batch_size=args.batch_size,
            epochs=args.epochs,
            patience=args.patience,
            seed=args.seed,
            threads=threads or None,
        )
        fits.append(fit)
        n_threads = threads or torch.get_num_threads()
        print(
            f"head training ({n_threads} thread{'s' if n_threads > 1 else ''}): {fit.n_train} "
            f"tracks (+{fit.n_val} validation), {fit.epochs} epochs (best {fit.best_epoch}, "
            f"validation MSE {fit.best_val_loss:.5f}) in {fit.seconds:.2f} s "
            f"({fit.seconds / fit.epochs * 1000:.0f} ms/epoch; load average "
            f"{os.getloadavg()[0]:.2f})"
        )
    if len(fits) > 1:
        base = fits[0].seconds / fits[0].epochs
        ratios = ", ".join(
            f"{t or torch.get_num_threads()} threads {f.seconds / f.epochs / base:.2f}×"
            for t, f in zip(args.threads[1:], fits[1:], strict=True)
        )
        print(f"time per epoch relative to {args.threads[0] or 'default'} thread(s): {ratios}")
    fit = fits[0]

    t0 = time.perf_counter()
    with torch.no_grad():
        raw = fit.head(torch.from_numpy(features[held]))  # type: ignore[misc]
    predicted = torch.nn.functional.normalize(raw, dim=1).numpy()
    metrics = evaluate_heldout(
        split.user_factors, counts[:, held], predicted, split.heldout_factors, seed=args.seed
    )
    t_eval = time.perf_counter() - t0
    print(
        f"held-out metrics: {metrics.n_tracks} tracks × {metrics.n_users} users "
        f"({metrics.n_plays} plays) in {t_eval:.2f} s"
    )

    t0 = time.perf_counter()
    weights = ridge(features[train], split.train_factors)
    t_ridge = time.perf_counter() - t0
    xh = np.hstack([features[held], np.ones((len(held), 1), np.float32)])
    ridge_pred = (xh @ weights).astype(np.float32)
    ridge_metrics = evaluate_heldout(
        split.user_factors, counts[:, held], ridge_pred, split.heldout_factors, seed=args.seed
    )
    print(
        f"baseline ridge regression: {t_ridge:.2f} s "
        f"(head / ridge time: {fit.seconds / max(t_ridge, 1e-9):.0f}×)"
    )
    show("MLP head", metrics)
    show("ridge baseline", ridge_metrics)


if __name__ == "__main__":
    main()
