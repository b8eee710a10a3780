"""2-D projection for ``beet deepsim-map``: openTSNE vs. UMAP at library scale.

Usage::

    python benchmarks/bench_projection.py [--n 100000] [--dim 400] [--clusters 50]
        [--methods opentsne umap] [--threads 2] [--timeout 1200]

Generates ``n`` unit vectors in ``clusters`` Gaussian clusters (the shape of a
real library: genres and albums), then runs each method once in its own
subprocess and prints its wall time, peak RSS and a quality figure: the share
of each point's 10 nearest 2-D neighbours that come from its own cluster
(1.0: clusters perfectly separated).  A baseline is timed in the same run —
one exact 10-NN query of every point of a 20,000-vector sample against the others in the 400-d space
(a BLAS matrix product) — and each method's time is also given as a ratio to
it, so figures from a loaded machine stay comparable.  Nothing is asserted:
figures go to docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np


def make_vectors(n: int, dim: int, clusters: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    labels = rng.integers(0, clusters, size=n)
    x = centres[labels] + 1.0 * rng.normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels


def cluster_agreement(points: np.ndarray, labels: np.ndarray, sample: int = 2000) -> float:
    rng = np.random.default_rng(1)
    pick = rng.choice(len(points), size=min(sample, len(points)), replace=False)
    hits = 0.0
    for part in np.array_split(pick, max(1, len(pick) // 100)):
        d = ((points[part, None, :] - points[None, :, :]) ** 2).sum(-1)
        d[np.arange(len(part)), part] = np.inf
        nn = np.argpartition(d, 10, axis=1)[:, :10]
        hits += float((labels[nn] == labels[part, None]).sum())
    return hits / (len(pick) * 10)


def run_one(method: str, n: int, dim: int, clusters: int, threads: int) -> dict[str, float]:
    from deepsim.projection import project

    x, labels = make_vectors(n, dim, clusters)
    before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    points = project(x, method=method, n_jobs=threads, seed=0)
    seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if peak_kib <= before_kib:
        peak_kib = before_kib  # the method stayed below the input's own peak
    return {
        "seconds": seconds,
        "peak_rss_mib": peak_kib / 1024,
        "input_rss_mib": before_kib / 1024,
        "agreement": cluster_agreement(points, labels),
    }


def baseline(n: int, dim: int, clusters: int) -> float:
    x, _ = make_vectors(n, dim, clusters)
    started = time.perf_counter()
    for start in range(0, n, 4096):
        sims = x[start : start + 4096] @ x.T
        np.argpartition(-sims, 10, axis=1)[:, :10]
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=400)
    parser.add_argument("--clusters", type=int, default=50)
    parser.add_argument("--methods", nargs="+", default=["opentsne", "umap"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1200.0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = run_one(args.child, args.n, args.dim, args.clusters, args.threads)
        print(json.dumps(result))
        return
    print(
        f"{args.n} vectors, {args.dim}-d, {args.clusters} clusters, {args.threads} threads; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    base = baseline(min(args.n, 20_000), args.dim, args.clusters)
    print(f"baseline (exact 10-NN of {min(args.n, 20_000)} points, numpy): {base:.1f} s")
    for method in args.methods:
        command = [
            sys.executable,
            __file__,
            "--child",
            method,
            "--n",
            str(args.n),
            "--dim",
            str(args.dim),
            "--clusters",
            str(args.clusters),
            "--threads",
            str(args.threads),
        ]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"{method:9s} did not finish within {args.timeout:.0f} s")
            continue
        if done.returncode:
            print(f"{method:9s} failed: {done.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"{method:9s} {r['seconds']:7.1f} s  ({r['seconds'] / base:5.1f}× baseline)  "
            f"peak RSS {r['peak_rss_mib']:6.0f} MiB (input alone {r['input_rss_mib']:.0f})  "
            f"10-NN cluster agreement {r['agreement']:.3f}"
        )


if __name__ == "__main__":
    main()
