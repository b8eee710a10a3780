"""WMF benchmark on synthetic listening data with planted taste clusters.

Generates ``--plays`` play events of ``--users`` users on ``--tracks`` tracks
(power-law track popularity and user activity; each user draws most plays
from one of ``--clusters`` taste clusters), builds the CSR matrix the way
:mod:`deepsim.listening` does (COO arrays → CSR), fits
:func:`deepsim.wmf.fit_wmf` and prints build time, fit time, peak RSS and a
sanity figure: the share of each sampled track's 10 nearest tracks (cosine of
item factors) that come from its own cluster (chance ≈ 1 / clusters).

Run::

    .venv/bin/python benchmarks/bench_wmf.py                      # defaults: 100k × 200k × 5M
    .venv/bin/python benchmarks/bench_wmf.py --iterations 8 15    # several fits, same matrix
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np
import scipy.sparse as sp

from deepsim.wmf import fit_wmf, unit_normalise


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux: ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthesise(
    *, users: int, tracks: int, plays: int, clusters: int, in_cluster: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Play events as (user, track) arrays, plus each track's cluster."""
    rng = np.random.default_rng(seed)
    # Track popularity: Zipf-like, exponent 0.9, in random order.
    pop = 1.0 / np.arange(1, tracks + 1) ** 0.9
    pop = pop[rng.permutation(tracks)]
    track_cluster = rng.integers(0, clusters, tracks)
    order = np.argsort(track_cluster, kind="stable")
    cum = np.cumsum(pop[order])
    bounds = np.searchsorted(track_cluster[order], np.arange(clusters + 1))
    start_mass = np.concatenate([[0.0], cum])[bounds[:-1]]
    end_mass = np.concatenate([[0.0], cum])[bounds[1:]]
    # User activity: log-normal, at least one play each.
    activity = rng.lognormal(0.0, 1.2, users)
    per_user = np.maximum(1, np.round(activity / activity.sum() * plays)).astype(np.int64)
    user = np.repeat(np.arange(users, dtype=np.int32), per_user)[:plays]
    n = len(user)
    user_cluster = rng.integers(0, clusters, users)
    home = rng.random(n) < in_cluster
    k = user_cluster[user]
    r = rng.random(n)
    target = np.where(
        home,
        start_mass[k] + r * (end_mass[k] - start_mass[k]),
        r * cum[-1],
    )
    pos = np.minimum(np.searchsorted(cum, target), tracks - 1)
    track = order[pos].astype(np.int32)
    return user, track, track_cluster


def add_synthesis_options(
    ap: argparse.ArgumentParser, *, users: int, tracks: int, plays: int
) -> None:
    """The command-line options of :func:`synthesise_from` (its world's size as defaults)."""
    ap.add_argument("--users", type=int, default=users)
    ap.add_argument("--tracks", type=int, default=tracks)
    ap.add_argument("--plays", type=int, default=plays)
    ap.add_argument("--clusters", type=int, default=50)
    ap.add_argument("--in-cluster", type=float, default=0.8)


def synthesise_from(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`synthesise` with the options of :func:`add_synthesis_options` (and ``--seed``)."""
    return synthesise(
        users=args.users,
        tracks=args.tracks,
        plays=args.plays,
        clusters=args.clusters,
        in_cluster=args.in_cluster,
        seed=args.seed,
    )


def count_matrix(user: np.ndarray, track: np.ndarray, *, shape: tuple[int, int]) -> sp.csr_matrix:
    """Play events as a ``users × tracks`` CSR matrix of counts (COO → CSR, summed)."""
    counts = sp.coo_matrix((np.ones(len(user), np.float32), (user, track)), shape=shape).tocsr()
    counts.sum_duplicates()
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_synthesis_options(ap, users=100_000, tracks=200_000, plays=5_000_000)
    ap.add_argument("--factors", type=int, default=40)
    ap.add_argument("--iterations", type=int, nargs="+", default=[15])
    ap.add_argument("--threads", type=int, default=0, help="implicit threads (0 = all cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--reader-lines",
        type=int,
        default=0,
        help="also time read_listens on generated files of this many lines (0 = skip)",
    )
    args = ap.parse_args()

    print(f"cpu cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.2f}")
    t0 = time.perf_counter()
    user, track, track_cluster = synthesise_from(args)
    t_gen = time.perf_counter() - t0

    t0 = time.perf_counter()
    counts = count_matrix(user, track, shape=(args.users, args.tracks))
    t_build = time.perf_counter() - t0
    del user, track
    played = np.bincount(counts.indices, minlength=args.tracks) > 0
    print(
        f"data: {args.users} users x {args.tracks} tracks, {int(counts.sum())} plays, "
        f"nnz {counts.nnz}, tracks with plays {int(played.sum())}"
    )
    print(f"synthesis: {t_gen:.2f} s")
    print(f"matrix build (COO -> CSR, duplicates summed): {t_build:.2f} s")
    print(f"peak RSS before fit: {peak_rss_mib():.0f} MiB")

    rng = np.random.default_rng(args.seed + 1)
    popular = np.flatnonzero(np.bincount(counts.indices, minlength=args.tracks) >= 5)
    sample = rng.choice(popular, size=min(500, len(popular)), replace=False)
    for iterations in args.iterations:
        t0 = time.perf_counter()
        c0 = time.process_time()
        res = fit_wmf(
            counts,
            factors=args.factors,
            iterations=iterations,
            num_threads=args.threads,
            use_gpu=False,
        )
        t_fit = time.perf_counter() - t0
        cpu = time.process_time() - c0
        rss = peak_rss_mib()
        purity = cluster_purity(unit_normalise(res.item_factors), sample, track_cluster)
        print(
            f"fit: factors={args.factors} iterations={iterations}: {t_fit:.2f} s "
            f"({t_fit / iterations:.2f} s/iteration; CPU {cpu:.2f} s), peak RSS {rss:.0f} MiB; "
            f"same-cluster share of 10 nearest tracks (tracks played >= 5 times): {purity:.3f} "
            f"(chance {1 / args.clusters:.3f})"
        )
    if args.reader_lines:
        bench_reader(args.reader_lines, seed=args.seed)


def cluster_purity(items: np.ndarray, sample: np.ndarray, cluster: np.ndarray) -> float:
    """Share of each sampled track's 10 nearest tracks that are in its cluster."""
    hits = []
    for chunk in np.array_split(sample, max(1, len(sample) // 50)):
        sims = items[chunk] @ items.T
        sims[np.arange(len(chunk)), chunk] = -np.inf
        top = np.argpartition(-sims, 10, axis=1)[:, :10]
        hits.append(cluster[top] == cluster[chunk][:, None])
    return float(np.mean(np.concatenate(hits)))


def bench_reader(lines: int, *, seed: int) -> None:
    """Time read_listens on generated Taste Profile and Last.fm-1K files."""
    import tempfile
    from pathlib import Path

    from deepsim.listening import read_listens

    rng = np.random.default_rng(seed)
    users = rng.integers(0, max(1, lines // 50), lines)
    users.sort()
    songs = rng.integers(0, max(1, lines // 5), lines)
    with tempfile.TemporaryDirectory() as tmp:
        taste = Path(tmp) / "triplets.txt"
        with open(taste, "w") as f:
            for u, s, c in zip(users, songs, rng.integers(1, 20, lines), strict=True):
                f.write(f"u{u:08x}\tSO{s:016X}\t{c}\n")
        onek = Path(tmp) / "lastfm1k.tsv"
        times = 1_240_000_000 - np.cumsum(rng.exponential(600, lines)).astype(np.int64)
        with open(onek, "w") as f:
            for u, s, t in zip(users, songs, times, strict=True):
                stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(t)))
                f.write(f"user_{u:06d}\t{stamp}\t\tArtist {s % 997}\t\tTitle {s}\n")
        for fmt, path in (("taste-profile", taste), ("lastfm-1k", onek)):
            size = path.stat().st_size / 2**20
            t0 = time.perf_counter()
            listens = read_listens(path, format=fmt)
            dt = time.perf_counter() - t0
            print(
                f"read_listens {fmt}: {lines} lines ({size:.0f} MiB) in {dt:.2f} s "
                f"({lines / dt / 1e6:.2f} M lines/s) -> {listens.n_users} rows x "
                f"{listens.n_tracks} tracks, nnz {listens.nnz}; peak RSS {peak_rss_mib():.0f} MiB"
            )


if __name__ == "__main__":
    main()
