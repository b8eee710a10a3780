"""Index upkeep benchmark: what a beets command spends on the index after a small change.

On the synthetic library of ``bench_similar.py`` (``--items`` clustered 400-d
vectors, cached under ``--dir``; the library is copied first, so the cache is
never changed), prints:

* the full build (``refresh_index`` on a library without an index), in a child
  process: wall and CPU time, file sizes, the child's peak RSS;
* a no-op ``refresh_index`` (index fresh);
* after ``--changes`` vectors added (new items) and as many items removed:
  the upkeep at the end of the command (``refresh_index``: changes kept beside
  the index), then what the next ``beet similar`` pays for the index
  (``open_index``: change-log position, sidecar, mmap, delta) and per query;
* recall@10 of the updated index against exact search over the current
  vectors (queries: new items, random items, means of 3 items of a cluster);
* recall@10 and query time for other ``--search-fractions`` (Annoy's ``search_k`` as a share
  of the index), on the same index;
* the same change handled by a full rebuild, the baseline of the same run;
* the change log's cost on writes: ``store.write_vectors`` of ``--write-items`` vectors with
  the log's triggers and without them (dropped on the copy), interleaved, best of 3;
* ``beet similar id:N -c 20`` against ``beet ls id:N`` in fresh processes
  (``--beet-runs``; 0 skips).

Run::

    .venv/bin/python benchmarks/bench_index.py                  # 100k
    .venv/bin/python benchmarks/bench_index.py --items 1000000 --beet-runs 1 --queries 100 \
        --no-rebuild                                            # 1M: ≈ 4 GB of disk, minutes

Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_similar import MODEL_ID, cached_library, open_library

from deepsim import store
from deepsim.index import (
    DEFAULT_N_TREES,
    SEARCH_FRACTION,
    ExactIndex,
    load_index,
    open_index,
    refresh_index,
)

BUILD_CHILD = """
import resource, sys, time, json
from bench_similar import MODEL_ID, open_library
from pathlib import Path
from deepsim.index import refresh_index
lib = open_library(Path(sys.argv[1]))
cpu = time.process_time(); wall = time.perf_counter()
result = refresh_index(lib, MODEL_ID, sys.argv[2], n_trees=int(sys.argv[3]))
print(json.dumps({"action": result.action, "count": result.count,
                  "wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def best(fn, repeat: int = 3) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - started)
    return min(times), out


def build_in_child(db: Path, index_dir: Path, n_trees: int) -> dict:
    import json

    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.abspath(__file__))}
    done = subprocess.run(
        [sys.executable, "-c", BUILD_CHILD, os.fspath(db), os.fspath(index_dir), str(n_trees)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def file_sizes(index_dir: Path) -> str:
    parts = []
    for path in sorted(index_dir.glob("index-*")):
        if path.suffix != ".lock":
            parts.append(f"{path.name.split('.', 1)[1]} {path.stat().st_size / 1e6:.1f} MB")
    return ", ".join(parts)


def change_library(lib, changes: int, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """``changes`` new items with vectors near existing ones, and ``changes`` items removed."""
    from beets.library import Item

    ids, _ = store.read_vectors(lib, MODEL_ID, ids=range(1, 2 * changes + 1))
    near = store.read_vectors(lib, MODEL_ID, ids=rng.choice(1000, changes, replace=False) + 1)[1]
    added = []
    for k in range(changes):
        item = Item(title=f"Bench new {k}", artist="Bench", path=f"/bench/{k}.mp3".encode())
        lib.add(item)
        added.append(item.id)
    rows = [(i, v + 0.02 * rng.normal(size=v.shape)) for i, v in zip(added, near, strict=True)]
    store.write_vectors(lib, rows, MODEL_ID)
    removed = [int(i) for i in rng.choice(ids, changes, replace=False)]
    for item_id in removed:
        lib.get_item(item_id).remove()
    return added, removed


def recall(lib, index, added: list[int], rng: np.random.Generator, queries: int) -> float:
    ids, matrix = store.read_vectors(lib, MODEL_ID)
    exact = ExactIndex().build(ids, matrix)
    rows = list(np.searchsorted(ids, added)) + list(rng.choice(len(ids), queries, replace=False))
    vectors = [(matrix[r], [int(ids[r])]) for r in rows]
    for _ in range(queries // 2):
        r = int(rng.integers(len(ids)))
        sims = matrix @ matrix[r]
        three = np.argsort(-sims)[:3]
        mean = matrix[three].mean(axis=0)
        vectors.append((mean / np.linalg.norm(mean), ids[three].tolist()))
    hits = []
    for vector, exclude in vectors:
        truth, _ = exact.query(vector, 10, exclude=exclude)
        found, _ = index.query(vector, 10, exclude=exclude)
        hits.append(len(set(truth.tolist()) & set(found.tolist())) / 10)
    return float(np.mean(hits))


def write_cost(lib, items: int, rng: np.random.Generator) -> str:
    """``write_vectors`` of ``items`` rewritten vectors with the change log and without it."""
    found, matrix = store.read_vectors(lib, MODEL_ID, ids=range(1, 2 * items + 100))
    ids, dim = found[:items].tolist(), matrix.shape[1]

    def write() -> tuple[float, float]:
        rows = [(i, rng.normal(size=dim)) for i in ids]
        started, cpu = time.perf_counter(), time.process_time()
        store.write_vectors(lib, rows, MODEL_ID, batch_size=64)
        return time.perf_counter() - started, time.process_time() - cpu

    def without_log() -> tuple[float, float]:
        with lib.transaction() as tx:
            for name in store._TRIGGERS:
                tx.mutate(f"DROP TRIGGER IF EXISTS {name}")
        try:
            return write()
        finally:
            store.change_state(lib)  # reinstalls the triggers (a new epoch)

    logged, bare = [], []
    for _ in range(5):
        logged.append(write())
        bare.append(without_log())
    (w1, c1), (w0, c0) = (
        (min(r) for r in zip(*logged, strict=True)),
        (min(r) for r in zip(*bare, strict=True)),
    )
    return (
        f"write_vectors of {items} vectors (batches of 64), best of 5 interleaved: with the "
        f"change log {w1 * 1000:.0f} ms wall, {c1 * 1000:.0f} ms CPU; without "
        f"{w0 * 1000:.0f} ms wall, {c0 * 1000:.0f} ms CPU ({w1 / w0:.2f}x wall, "
        f"{c1 / c0:.2f}x CPU; commits wait for the disk)"
    )


def give_files(lib, index, seed_id: int, music: Path, count: int = 1000) -> None:
    """Real (tiny) files for the seed and its ``count`` nearest neighbours: ``beet similar``
    leaves out results whose file is missing, and 1M files would not fit the benchmark."""
    vector = store.read_vectors(lib, MODEL_ID, ids=[seed_id])[1][0]
    ids = [seed_id, *index.query(vector, count)[0].tolist()]
    music.mkdir(parents=True, exist_ok=True)
    rows = []
    for item_id in ids:
        path = music / f"{item_id}.mp3"
        path.write_bytes(b"\xff\xfb")
        rows.append((os.fsencode(path), int(item_id)))
    with lib.transaction() as tx:
        tx.mutate_many("UPDATE items SET path = ? WHERE id = ?", rows)


def beet_similar(db: Path, config_dir: Path, seed_id: int, runs: int) -> None:
    beet = shutil.which("beet", path=os.path.dirname(sys.executable)) or shutil.which("beet")
    if beet is None:
        print("beet: skipped (no `beet` executable)")
        return
    (config_dir / "config.yaml").write_text(
        f"library: {db}\ndirectory: {db.parent / 'music'}\nplugins: deepsim\n"
    )
    env = {**os.environ, "BEETSDIR": os.fspath(config_dir)}

    def run(*args: str) -> float:
        started = time.perf_counter()
        done = subprocess.run([beet, *args], env=env, capture_output=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"beet {' '.join(args)} failed: {done.stderr.decode()[-300:]}")
        return time.perf_counter() - started

    floor = statistics.median(run("ls", f"id:{seed_id}") for _ in range(runs))
    similar = statistics.median(run("similar", f"id:{seed_id}", "-c", "20") for _ in range(runs))
    where = statistics.median(
        run("similar", f"id:{seed_id}", "-c", "20", "--where", "format:FLAC") for _ in range(runs)
    )
    print(
        f"beet ls id:{seed_id}: {floor:.3f} s; beet similar id:{seed_id} -c 20: {similar:.3f} s "
        f"(floor + {similar - floor:.3f} s); with --where format:FLAC (10 % of the items): "
        f"{where:.3f} s (floor + {where - floor:.3f} s); median of {runs}, load {loadavg()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dir", type=Path, default=Path.home() / ".cache" / "deepsim-bench" / "similar"
    )
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--clusters", type=int, default=300)
    parser.add_argument("--changes", type=int, default=10)
    parser.add_argument("--n-trees", type=int, default=DEFAULT_N_TREES)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--beet-runs", type=int, default=3)
    parser.add_argument(
        "--search-fractions",
        type=float,
        nargs="*",
        default=[SEARCH_FRACTION / 5, SEARCH_FRACTION / 25],
    )
    parser.add_argument("--write-items", type=int, default=2000)
    parser.add_argument(
        "--no-rebuild",
        action="store_true",
        help="skip the rebuild baseline (the full build is one; minutes at 1M)",
    )
    args = parser.parse_args()

    print(f"load average at start: {loadavg()} ({os.cpu_count()} cores)")
    cached, _ = cached_library(args.dir, items=args.items, dim=400, clusters=args.clusters, seed=0)
    work = Path(tempfile.mkdtemp(prefix="deepsim-bench-index-", dir=args.dir))
    try:
        db = work / "library.db"
        shutil.copyfile(cached, db)
        config_dir = work / "config"
        index_dir = config_dir / "deepsim"
        build = build_in_child(db, index_dir, args.n_trees)
        print(
            f"full build, {build['count']} × 400-d, {args.n_trees} trees: "
            f"{build['wall']:.2f} s wall, "
            f"{build['cpu']:.2f} s CPU, peak RSS {build['rss_mb']:.0f} MB (child process); "
            f"files: {file_sizes(index_dir)}"
        )
        lib = open_library(db)
        noop, result = best(lambda: refresh_index(lib, MODEL_ID, index_dir, n_trees=args.n_trees))
        print(f"no-op refresh_index (index fresh): {noop * 1000:.0f} ms ({result.action})")
        rng = np.random.default_rng(1)
        added, _ = change_library(lib, args.changes, rng)
        started = time.perf_counter()
        upkeep = refresh_index(lib, MODEL_ID, index_dir, n_trees=args.n_trees)
        upkeep_s = time.perf_counter() - started
        print(
            f"after {args.changes} items added and {args.changes} removed: refresh_index "
            f"{upkeep_s * 1000:.0f} ms ({upkeep.action}: {upkeep.reason})"
        )
        open_s, check = best(lambda: open_index(lib, MODEL_ID, index_dir))
        assert check.fresh and check.index is not None, check.reason
        index = check.index
        vector = store.read_vectors(lib, MODEL_ID, ids=[added[0]])[1][0]
        query_s, _ = best(lambda: index.query(vector, 80), repeat=5)
        print(
            f"next beet similar: open_index {open_s * 1000:.0f} ms (change log, sidecar, mmap, "
            f"delta), one query of 80 {query_s * 1000:.1f} ms; command total on the index "
            f"{(upkeep_s + open_s + query_s) * 1000:.0f} ms; files: {file_sizes(index_dir)}"
        )
        score = recall(lib, index, added, np.random.default_rng(2), args.queries)
        print(
            f"recall@10 of the updated index vs exact search: {score:.4f} "
            f"(search_k {SEARCH_FRACTION} x index)"
        )
        for fraction in args.search_fractions:
            other = load_index(
                index_dir,
                model_id=MODEL_ID,
                fingerprint=store.fingerprint(lib, MODEL_ID),
                search_fraction=fraction,
            ).index
            assert other is not None
            q_s, _ = best(lambda other=other: other.query(vector, 80), repeat=5)
            score = recall(lib, other, added, np.random.default_rng(2), args.queries)
            print(
                f"search_k {fraction} x index: recall@10 {score:.4f}, one query of 80 "
                f"{q_s * 1000:.1f} ms"
            )
        if args.beet_runs:
            give_files(lib, index, 1000, work / "music")
            refresh_index(lib, MODEL_ID, index_dir, n_trees=args.n_trees)  # paths are no change
            beet_similar(db, config_dir, 1000, args.beet_runs)
        if not args.no_rebuild:
            started = time.perf_counter()
            rebuilt = refresh_index(lib, MODEL_ID, index_dir, n_trees=args.n_trees, force=True)
            rebuild_s = time.perf_counter() - started
            print(
                f"baseline, the same change by a full rebuild: {rebuild_s:.2f} s "
                f"({rebuilt.action}); upkeep is {rebuild_s / upkeep_s:.0f}x cheaper"
            )
        if args.write_items:
            print(write_cost(lib, args.write_items, rng))
        lib._close()
        print(f"load average at end: {loadavg()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
