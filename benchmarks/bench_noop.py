"""What a ``beet deepsim-embed`` with nothing to do costs at library scale.

Builds a synthetic beets library of ``--items`` tracks that are all embedded
already (the vectors of ``bench_similar.py``'s cached library, ``--dir``; the
library is copied first) and whose files exist: one tiny file per track,
with the audio identity (size and mtime) of each recorded beside its vector,
as ``beet deepsim-embed`` records it.  Then runs, as a user does, in fresh
processes, interleaved, ``--runs`` times each:

* ``beet version`` — the start-up floor (Python, beets, config, plugins);
* ``beet ls -f '$id'`` (output discarded, first round only; ``--no-ls`` skips it) — what loading
  every item costs;
* ``beet deepsim-embed`` — must answer "nothing to do";
* with ``--against DIR``, the checkout DIR's ``beet deepsim-embed`` as well, taking turns;

and prints the median wall time and the peak RSS of each (``wait4``), and the
embed run over the floor.  Then, in this process, what ``deepsim-train``'s
matching reads of the library (``deepsim.matching.library_keys``) against its
own SQL read (``store.read_all_item_fields``), best of 3.  ``--stats`` also
prints a ``cProfile`` summary of one in-process plan
(``deepsim.embed.plan_embedding``).

Run::

    .venv/bin/python benchmarks/bench_noop.py                 # 100k tracks
    .venv/bin/python benchmarks/bench_noop.py --items 30000
    .venv/bin/python benchmarks/bench_noop.py --workdir /tmp/noop --no-ls   # build once, reuse

Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_peers import ROOT, beet_argv, compile_tree, run_child
from bench_similar import MODEL_ID, cached_library, open_library

from deepsim import store


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def prepare(db: Path, music: Path) -> int:
    """Give every item of ``db`` a real tiny file and its recorded audio identity."""
    music.mkdir(parents=True, exist_ok=True)
    lib = open_library(db)
    ids = store.all_item_ids(lib)
    paths, audio = [], []
    for item_id in ids:
        path = music / f"{item_id}.mp3"
        path.write_bytes(b"\xff\xfb" + item_id.to_bytes(4, "little"))
        st = os.stat(path)
        paths.append((f"{item_id}.mp3".encode(), item_id))  # relative, as beets 2 stores it
        audio.append(
            (item_id, store.AUDIO_FIELD, f"{st.st_size}:{st.st_mtime_ns}:0123456789abcdef")
        )
    with lib.transaction() as tx:
        tx.mutate_many("UPDATE items SET path = ? WHERE id = ?", paths)
        tx.mutate_many(
            "INSERT INTO item_attributes (entity_id, key, value) VALUES (?, ?, ?)", audio
        )
    lib._close()
    return len(ids)


def timed_runs(
    beet: list[str],
    env: dict[str, str],
    runs: int,
    *,
    ls: bool = True,
    against: dict[str, list[str]] | None = None,
) -> dict[str, list[tuple[float, float, float]]]:
    commands = {
        "beet version": [*beet, "version"],
        "beet ls -f '$id'": [*beet, "ls", "-f", "$id"],
        "beet deepsim-embed": [*beet, "deepsim-embed"],
    }
    for label, other in (against or {}).items():
        commands[f"beet deepsim-embed ({label})"] = [*other, "deepsim-embed"]
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in commands}
    for run in range(runs):
        names = list(commands) if run % 2 == 0 else [*list(commands)[:2], *list(commands)[:1:-1]]
        for name in names:
            args = commands[name]
            if (run or not ls) and name.startswith("beet ls"):
                continue  # tens of seconds at 100k: once is enough to show what loading costs
            wall, cpu, rss, out = run_rusage(args, env)
            if name.startswith("beet deepsim-embed") and b"nothing to do" not in out:
                raise SystemExit(f"deepsim-embed had work to do: {out.decode()[-400:]}")
            results[name].append((wall, cpu, rss))
    return results


def run_rusage(argv: list[str], env: dict[str, str]) -> tuple[float, float, float, bytes]:
    """Wall seconds, CPU seconds (its children's included), peak RSS (MB) and stdout of one
    ``beet`` command line.

    Through ``bench_peers.run_child``'s small wrapper process, not forked from this one:
    Linux carries a process's high-water mark of resident memory into a forked child across
    ``exec``, so a child of this process (hundreds of MB once it has built a library) would
    report this process's peak as its own."""
    wall, cpu, rss, out, _ = run_child(argv, env)
    return wall, cpu, rss, out.encode()


def profile_plan(db: Path) -> None:
    import cProfile
    import pstats

    from deepsim.embed import plan_embedding

    lib = open_library(db)
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    plan = plan_embedding(lib, MODEL_ID)
    profiler.disable()
    print(
        f"plan_embedding in process: {time.perf_counter() - started:.3f} s "
        f"(done {plan.done}, todo {len(plan.todo)}, missing {len(plan.missing)})"
    )
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(12)
    lib._close()


def matching_cost(db: Path) -> str:
    from deepsim.matching import library_keys

    lib = open_library(db)
    fields = ("artist", "title", "mb_trackid")
    sql = min(_timed(lambda: store.read_all_item_fields(lib, fields)) for _ in range(3))
    keys = min(_timed(lambda: library_keys(lib)) for _ in range(3))
    lib._close()
    return (
        f"deepsim-train matching, library_keys: {keys:.2f} s, of which its SQL read "
        f"{sql:.2f} s (best of 3, in process)"
    )


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dir", type=Path, default=Path.home() / ".cache" / "deepsim-bench" / "similar"
    )
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--stats", action="store_true", help="profile one in-process plan")
    parser.add_argument("--no-ls", action="store_true", help="skip the `beet ls` baseline")
    parser.add_argument(
        "--against",
        metavar="DIR",
        help="also time the checkout DIR's `beet deepsim-embed` (e.g. `git archive REV | tar -x "
        "-C DIR`), taking turns; then both run as `python -S` with their tree first on the path",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="build the library, files and config here once and reuse them (kept afterwards)",
    )
    args = parser.parse_args()

    beet = shutil.which("beet", path=os.path.dirname(sys.executable)) or shutil.which("beet")
    if beet is None:
        raise SystemExit("no `beet` executable next to this Python")
    print(f"load average at start: {loadavg()} ({os.cpu_count()} cores)")
    cached, _ = cached_library(args.dir, items=args.items, dim=400, clusters=300, seed=0)
    keep = args.workdir is not None
    work = args.workdir or Path(tempfile.mkdtemp(prefix="deepsim-bench-noop-", dir=args.dir))
    try:
        db = work / "library.db"
        config = work / "config"
        if (work / "ready").exists():
            print(f"reusing {work}")
        else:
            work.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cached, db)
            started = time.perf_counter()
            count = prepare(db, work / "music")
            print(f"{count} tracks, files and identities in {time.perf_counter() - started:.1f} s")
            config.mkdir(exist_ok=True)
            (config / "config.yaml").write_text(
                f"library: {db}\ndirectory: {work / 'music'}\nplugins: deepsim\n"
            )
            (work / "ready").touch()
        env = {**os.environ, "BEETSDIR": os.fspath(config)}
        if args.stats:
            profile_plan(db)
        for tree in (ROOT, *([args.against] if args.against else [])):
            compile_tree(tree)  # as installed: no compiling from source in the timed runs
        command = [beet]
        against = None
        if args.against:
            command = beet_argv(str(ROOT))
            against = {args.against: beet_argv(args.against)}
        results = timed_runs(command, env, args.runs, ls=not args.no_ls, against=against)
        floor = statistics.median(w for w, _, _ in results["beet version"])
        for name, values in results.items():
            if not values:
                continue
            wall = statistics.median(w for w, _, _ in values)
            cpu = statistics.median(c for _, c, _ in values)
            rss = max(r for _, _, r in values)
            over = f" (floor + {wall - floor:.2f} s)" if name != "beet version" else ""
            print(
                f"{name}: {wall:.2f} s{over}, {cpu:.2f} CPU-s, peak RSS {rss:.0f} MB, "
                f"median of {len(values)}"
            )
        print(matching_cost(db))
        print(f"load average at end: {loadavg()}")
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
