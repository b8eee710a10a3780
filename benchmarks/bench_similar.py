"""``beet similar`` benchmark on a synthetic 100k-item beets library.

Builds (once, cached under ``--dir``) a beets library of ``--items`` items
whose ``deepsim_vector`` fields hold clustered, anisotropic, non-negative
400-d vectors in the store's encoding (base64 float16), inserted with bulk
SQL in one transaction.  Artists are the clusters, so per-artist caps bite.
Then prints:

* store read (all vectors, one query) and fingerprint times;
* Annoy build time (``--n-trees``, several values allowed) and file size;
* query latency p50/p95 of Annoy (the saved index, memory-mapped) and exact
  search (numpy matrix product), and the per-run fixed costs of each
  (fingerprint + index check + mmap vs. reading every vector);
* recall@10 of Annoy against exact search (seed items and means of 3 seeds);
* :func:`deepsim.similar.find_similar` end to end (with filters);
* the exact/Annoy crossover on smaller prefixes of the library
  (``--crossover``), which sets :data:`deepsim.index.EXACT_THRESHOLD`;
* the wall time of ``beet similar id:<n> -c 20`` against ``beet ls id:<n>``
  (the floor: beets start-up, config, plugin load) with a temporary
  config.yaml; skipped with a note when ``beet similar --help`` fails.

Run::

    .venv/bin/python benchmarks/bench_similar.py                 # 100k × 400-d
    .venv/bin/python benchmarks/bench_similar.py --n-trees 10 20 50 --crossover 5000 10000 20000

Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
from beets.library import Library

from deepsim import store
from deepsim.index import (
    DEFAULT_N_TREES,
    EXACT_THRESHOLD,
    AnnoyIndex,
    ExactIndex,
    load_index,
    save_index,
)
from deepsim.models import BUILTIN_MODELS

T = TypeVar("T")
MODEL_ID = BUILTIN_MODELS["default"]  # what `beet similar` looks for by default


# --------------------------------------------------------------------------- data


def clustered_vectors(
    n: int, dim: int, *, clusters: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors from a mixture of anisotropic gaussians, softplus'd (ReLU-like features).

    Cluster sizes follow a Zipf law; each cluster has a rank-8 principal
    subspace and per-dimension gamma-distributed noise scales; all clusters
    share a global offset, so cosines are high everywhere (mean ≈ 0.65,
    mean of the 10 nearest ≈ 0.93), the hard case for angular hashing.
    """
    rng = np.random.default_rng(seed)
    base = rng.normal(size=dim).astype(np.float32) * 0.5
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    sizes = rng.zipf(1.6, size=clusters).astype(np.float64)
    labels = rng.choice(clusters, size=n, p=sizes / sizes.sum())
    out = np.empty((n, dim), np.float32)
    for c in range(clusters):
        rows = np.flatnonzero(labels == c)
        if not rows.size:
            continue
        scales = rng.gamma(0.5, 1.0, size=dim).astype(np.float32) * 0.6
        basis = rng.normal(size=(8, dim)).astype(np.float32)
        spread = rng.normal(size=(rows.size, 8)).astype(np.float32) @ basis * 0.4
        noise = rng.normal(size=(rows.size, dim)).astype(np.float32) * scales
        out[rows] = base + centres[c] + spread + noise
    out = np.logaddexp(0.0, out).astype(np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out, labels


def _item_row_template() -> tuple[list[str], list[object]]:
    """Column names and SQL values of a plain item (every fixed field set)."""
    from beets.library import Item

    item = Item(title="t", artist="a", album="al", format="MP3", length=200.0, path=b"/x.mp3")
    columns = [k for k in Item._fields if k != "id"]
    return columns, [Item._type(k).to_sql(item[k]) for k in columns]


def build_library(path: Path, music_dir: Path, vectors: np.ndarray, labels: np.ndarray) -> None:
    """A beets library holding one item per vector (ids 1..n), bulk-inserted."""
    import beets
    from beets.library import Library

    beets.config["create_backup_before_migrations"] = False
    if path.exists():
        path.unlink()
    lib = Library(os.fspath(path), os.fspath(music_dir))
    columns, template = _item_row_template()
    pos = {name: k for k, name in enumerate(columns)}
    rows = []
    for k in range(len(vectors)):
        row = list(template)
        row[pos["title"]] = f"Track {k + 1}"
        row[pos["artist"]] = f"Artist {labels[k]}"
        row[pos["album"]] = f"Album {labels[k]}-{k % 5}"
        row[pos["format"]] = "FLAC" if k % 10 == 0 else "MP3"
        row[pos["length"]] = 120.0 + (k % 300)
        row[pos["path"]] = os.fsencode(music_dir / f"{k + 1}.mp3")
        rows.append((k + 1, *row))
    attrs = []
    for k in range(len(vectors)):
        attrs.append((k + 1, store.VECTOR_FIELD, store.encode_vector(vectors[k])))
        attrs.append((k + 1, store.MODEL_FIELD, MODEL_ID))
    marks = ",".join("?" * (len(columns) + 1))
    with lib.transaction() as tx:
        tx.mutate_many(f"INSERT INTO items (id, {', '.join(columns)}) VALUES ({marks})", rows)
        tx.mutate_many(
            "INSERT INTO item_attributes (entity_id, key, value) VALUES (?, ?, ?)", attrs
        )
    lib._close()


def cached_library(
    directory: Path, *, items: int, dim: int, clusters: int, seed: int
) -> tuple[Path, np.ndarray]:
    """The benchmark library under ``directory`` (built if missing) and its labels."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"items": items, "dim": dim, "clusters": clusters, "seed": seed, "model": MODEL_ID}
    stem = f"library-{items}-d{dim}-c{clusters}-s{seed}"
    db = directory / f"{stem}.db"
    meta_path = directory / f"{stem}.json"
    labels_path = directory / f"{stem}-labels.npy"
    cached = db.exists() and labels_path.exists() and meta_path.exists()
    if cached and json.loads(meta_path.read_text()) == meta:
        return db, np.load(labels_path)
    started = time.perf_counter()
    vectors, labels = clustered_vectors(items, dim, clusters=clusters, seed=seed)
    build_library(db, directory / "music", vectors, labels)
    np.save(labels_path, labels)
    meta_path.write_text(json.dumps(meta))
    print(f"built library {db} ({items} items) in {time.perf_counter() - started:.1f} s")
    return db, labels


def open_library(db: Path) -> Library:
    import beets

    beets.config["create_backup_before_migrations"] = False
    return Library(os.fspath(db), os.fspath(db.parent / "music"))


# --------------------------------------------------------------------------- measures


def timed(fn: Callable[[], T], repeat: int = 1) -> tuple[float, T]:
    """Best wall time of ``repeat`` calls, and the last result."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - started)
    return best, value


def percentiles(seconds: list[float]) -> str:
    ms = np.asarray(seconds) * 1000
    return f"p50 {np.percentile(ms, 50):.2f} ms, p95 {np.percentile(ms, 95):.2f} ms"


def query_set(
    matrix: np.ndarray, labels_of_rows: np.ndarray, n: int, seed: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Query vectors: n/2 single items, n/2 normalised means of 3 items of one cluster."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(matrix), size=n, replace=False)
    queries = matrix[rows].copy()
    excludes = [np.asarray([r]) for r in rows]
    for j in range(n // 2, n):
        same = np.flatnonzero(labels_of_rows == labels_of_rows[rows[j]])
        pick = rng.choice(same, size=min(3, same.size), replace=False)
        mean = matrix[pick].mean(axis=0)
        queries[j] = mean / np.linalg.norm(mean)
        excludes[j] = pick
    return queries, excludes


def recall_and_latency(
    annoy: AnnoyIndex, exact: ExactIndex, ids: np.ndarray, queries: np.ndarray, excludes: list
) -> tuple[float, list[float], list[float]]:
    hits, t_annoy, t_exact = [], [], []
    for q, ex in zip(queries, excludes, strict=True):
        ex_ids = ids[ex]
        started = time.perf_counter()
        truth, _ = exact.query(q, 10, exclude=ex_ids)
        t_exact.append(time.perf_counter() - started)
        started = time.perf_counter()
        found, _ = annoy.query(q, 10, exclude=ex_ids)
        t_annoy.append(time.perf_counter() - started)
        hits.append(len(set(truth.tolist()) & set(found.tolist())) / 10)
    return float(np.mean(hits)), t_annoy, t_exact


def crossover(directory: Path, sizes: list[int], args: argparse.Namespace) -> None:
    """Per-run cost of exact search vs. saved Annoy index, by library size."""
    print("\n== exact vs Annoy, one search per run (fixed costs included), by library size")
    print(f"{'items':>8} {'exact: read+build+query':>26} {'annoy: check+load+query':>26}")
    for size in sizes:
        db, _ = cached_library(
            directory, items=size, dim=args.dim, clusters=args.clusters, seed=args.seed
        )
        lib = open_library(db)
        index_dir = directory / f"index-{size}-c{args.clusters}" / f"trees-{args.n_trees[0]}"
        ids, matrix = store.read_vectors(lib, MODEL_ID)
        check = load_index(
            index_dir, model_id=MODEL_ID, fingerprint=store.fingerprint(lib, MODEL_ID)
        )
        if not check.fresh:
            index = AnnoyIndex(n_trees=args.n_trees[0]).build(ids, matrix)
            save_index(
                index,
                index_dir,
                model_id=MODEL_ID,
                fingerprint=store.fingerprint(lib, MODEL_ID),
                max_id=int(ids.max()),
            )
        q = matrix[len(matrix) // 2]

        def exact_run(lib: Library = lib, q: np.ndarray = q) -> object:
            i, m = store.read_vectors(lib, MODEL_ID)
            return ExactIndex().build(i, m).query(q, 20)

        def annoy_run(lib: Library = lib, q: np.ndarray = q, index_dir: Path = index_dir) -> object:
            check = load_index(
                index_dir, model_id=MODEL_ID, fingerprint=lambda: store.fingerprint(lib, MODEL_ID)
            )
            assert check.index is not None, check.reason
            store.read_vectors(lib, MODEL_ID, ids=[1])  # the seed's vector
            return check.index.query(q, 20)

        t_exact, _ = timed(exact_run, repeat=3)
        t_annoy, _ = timed(annoy_run, repeat=3)
        print(
            f"{size:>8} {t_exact * 1000:>23.1f} ms {t_annoy * 1000:>23.1f} ms"
            f"   exact/annoy {t_exact / t_annoy:.1f}x"
        )
        lib._close()


# --------------------------------------------------------------------------- beet


def beet_times(directory: Path, db: Path, seed_id: int, runs: int, n_trees: int) -> None:
    """``beet similar`` against the ``beet ls`` floor, in fresh processes."""
    print("\n== beet similar vs beet ls (fresh processes, median of runs)")
    beet = shutil.which("beet", path=os.path.dirname(sys.executable)) or shutil.which("beet")
    if beet is None:
        print("skipped: no `beet` executable")
        return
    config_dir = Path(tempfile.mkdtemp(prefix="deepsim-bench-beets-"))
    try:
        (config_dir / "config.yaml").write_text(
            f"library: {db}\ndirectory: {db.parent / 'music'}\nplugins: deepsim\n"
            f"deepsim:\n  index:\n    n_trees: {n_trees}\n"
        )
        env = {**os.environ, "BEETSDIR": os.fspath(config_dir)}
        probe = subprocess.run(
            [beet, "similar", "--help"], env=env, capture_output=True, text=True, check=False
        )
        if probe.returncode != 0 or "similar" not in probe.stdout:
            tail = (probe.stderr or probe.stdout).strip().splitlines()[-1:] or [""]
            print(f"skipped: `beet similar --help` failed ({tail[0]})")
            return
        # The plugin's index lives in <config dir>/deepsim; build it as the plugin would.
        from deepsim.index import refresh_index

        lib = open_library(db)
        refreshed = refresh_index(lib, MODEL_ID, config_dir / "deepsim", n_trees=n_trees)
        lib._close()
        print(f"index: {refreshed.action} in {refreshed.seconds:.2f} s")

        def run(*args: str) -> float:
            started = time.perf_counter()
            done = subprocess.run([beet, *args], env=env, capture_output=True, check=False)
            elapsed = time.perf_counter() - started
            if done.returncode != 0:
                raise SystemExit(f"`beet {' '.join(args)}` failed: {done.stderr.decode()[-500:]}")
            return elapsed

        query = f"id:{seed_id}"
        run("ls", query)  # warm the page cache
        run("similar", query, "-c", "20")
        floor = sorted(run("ls", query) for _ in range(runs))[runs // 2]
        similar = sorted(run("similar", query, "-c", "20") for _ in range(runs))[runs // 2]
        print(f"beet ls {query}:              {floor:.3f} s (floor)")
        print(f"beet similar {query} -c 20:   {similar:.3f} s  (floor + {similar - floor:.3f} s)")
        filtered = sorted(
            run("similar", query, "-c", "20", "--where", "format:FLAC") for _ in range(runs)
        )[runs // 2]
        print(
            f"beet similar {query} -c 20 --where format:FLAC: {filtered:.3f} s "
            f"(floor + {filtered - floor:.3f} s)"
        )
        shutil.rmtree(config_dir / "deepsim")
        exact = sorted(run("similar", query, "-c", "20") for _ in range(max(1, runs // 2)))
        median = exact[len(exact) // 2]
        print(f"beet similar {query} -c 20, no index (exact search): {median:.3f} s")
    finally:
        shutil.rmtree(config_dir, ignore_errors=True)


# --------------------------------------------------------------------------- main


PARTS = ("store", "annoy", "find", "crossover", "beet")


def bench_annoy(lib: Library, args: argparse.Namespace, labels: np.ndarray) -> None:
    """Build time, recall@10 and query latency of Annoy against exact search."""
    ids, matrix = store.read_vectors(lib, MODEL_ID)
    exact = ExactIndex().build(ids, matrix)
    queries, excludes = query_set(matrix, labels[ids - 1], args.queries, args.seed + 1)
    fingerprint = store.fingerprint(lib, MODEL_ID)
    print("\n== Annoy build, recall@10 vs exact, query latency (count 10)")
    for n_trees in args.n_trees:
        started, cpu_started = time.perf_counter(), time.process_time()
        annoy = AnnoyIndex(n_trees=n_trees).build(ids, matrix)
        t_build = time.perf_counter() - started
        cpu_build = time.process_time() - cpu_started
        directory = index_dir_for(args, n_trees)
        started = time.perf_counter()
        path = save_index(annoy, directory, model_id=MODEL_ID, fingerprint=fingerprint)
        t_save = time.perf_counter() - started
        started = time.perf_counter()
        check = load_index(directory, model_id=MODEL_ID, fingerprint=fingerprint)
        t_load = time.perf_counter() - started
        assert check.index is not None, check.reason
        recall, t_annoy, t_exact = recall_and_latency(check.index, exact, ids, queries, excludes)
        print(
            f"n_trees {n_trees:>3}: build {t_build:.2f} s wall, {cpu_build:.2f} s CPU "
            f"(+ save {t_save:.2f} s, "
            f"{path.stat().st_size / 1e6:.0f} MB); check+load {t_load * 1000:.1f} ms; "
            f"recall@10 {recall:.4f}"
        )
        print(f"   Annoy query {percentiles(t_annoy)};  exact query {percentiles(t_exact)}")


def index_dir_for(args: argparse.Namespace, n_trees: int) -> Path:
    return args.dir / f"index-{args.items}-c{args.clusters}" / f"trees-{n_trees}"


def bench_find(lib: Library, args: argparse.Namespace, seed_id: int) -> None:
    """find_similar end to end, in process, with several filters."""
    from deepsim.index import refresh_index
    from deepsim.similar import find_similar

    directory = index_dir_for(args, args.n_trees[0])
    refreshed = refresh_index(lib, MODEL_ID, directory, n_trees=args.n_trees[0])
    print(f"\n== find_similar end to end (index {refreshed.action}; checked and mapped per call)")
    seeds = list(lib.items(f"id:{seed_id}"))
    for label, options in [
        ("plain", {}),
        ("max_per_artist 2", {"max_per_artist": 2}),
        ("where format:FLAC (10%)", {"where": "format:FLAC"}),
        ("where ^format:FLAC (90%)", {"where": "^format:FLAC"}),
        ("where artist (1 cluster)", {"where": f"artist:'{seeds[0].artist}'"}),
        ("exact backend", {"backend": "exact"}),
    ]:
        t, result = timed(
            lambda options=options: find_similar(
                lib, seeds, model_id=MODEL_ID, index_dir=directory, count=20, **options
            ),
            repeat=3,
        )
        print(
            f"{label:<26} {t * 1000:7.1f} ms  backend {result.backend:<5} "
            f"matches {len(result.matches)}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dir", type=Path, default=Path.home() / ".cache" / "deepsim-bench" / "similar"
    )
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=400)
    parser.add_argument("--clusters", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--n-trees", type=int, nargs="+", default=[DEFAULT_N_TREES])
    parser.add_argument(
        "--crossover", type=int, nargs="+", default=[1_000, 2_000, 5_000, 10_000, 20_000]
    )
    parser.add_argument("--beet-runs", type=int, default=5)
    parser.add_argument(
        "--only", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run"
    )
    args = parser.parse_args()

    print(f"cpus: {os.cpu_count()}, items: {args.items}, dim: {args.dim}, model: {MODEL_ID}")
    print("load average at start: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    db, labels = cached_library(
        args.dir, items=args.items, dim=args.dim, clusters=args.clusters, seed=args.seed
    )
    seed_id = args.items // 3
    lib = open_library(db)
    if "store" in args.only:
        print("\n== store")
        t_read, (ids, _) = timed(lambda: store.read_vectors(lib, MODEL_ID), repeat=3)
        t_fp, _ = timed(lambda: store.fingerprint(lib, MODEL_ID), repeat=3)
        print(f"read_vectors (all {len(ids)}): {t_read:.3f} s;  fingerprint: {t_fp * 1000:.1f} ms")
    if "annoy" in args.only:
        bench_annoy(lib, args, labels)
    if "find" in args.only:
        bench_find(lib, args, seed_id)
    lib._close()
    if "crossover" in args.only:
        crossover(args.dir, sorted(set(args.crossover)), args)
        print(f"(deepsim.index.EXACT_THRESHOLD = {EXACT_THRESHOLD})")
    if "beet" in args.only:
        beet_times(args.dir, db, seed_id, args.beet_runs, args.n_trees[0])


if __name__ == "__main__":
    main()
