"""deepsim against bliss-audio on the same files, in one run: quiet, then under load.

Usage::

    pip install -e '.[bench]'           # bliss-audio 0.2.0, a benchmark-only dependency
    python benchmarks/bench_peers.py [--copies 6] [--models default msd-musicnn]
    python benchmarks/bench_peers.py --against /tmp/old --models default   # deepsim vs deepsim

The files are the real full-length songs of ``../shared/corpus/full`` (4 songs in
opus, ogg, m4a and mp3), each copied ``--copies`` times under a temporary
directory (distinct paths, so nothing is cached by path).  Each tool runs in a
fresh child process, one after the other, on the same list:

* **deepsim**: ``beet deepsim-embed`` on a throwaway beets library holding the
  files (start-up, model loading and writing the vectors included), with its
  defaults (``workers: auto``, ``precision: auto``);
* **bliss**: ``bliss_audio.Song(path)`` (decode and analyse the whole song, as
  bliss does), in a pool of one process per usable core, as bliss-rs does.

For each it prints tracks/s (wall, start-up included), CPU-seconds per track
(user + system of the child and every process under it, the decoding workers
included), the peak RSS of the largest process, and the ratio deepsim/bliss;
for deepsim also the steady rate after start-up (``beet -v``'s "N tracks in S s":
the embedding loop, from the model loaded to the last track).  Then it starts
two busy-loop processes (``while True``, each ending by itself after
``--load-seconds`` and stopped by the benchmark),
runs both tools again, and prints the loaded figures and each tool's loaded
/ quiet ratio (a fair share with two busy loops on two cores is 0.5).
``--repeat N`` runs each tool N times per round, taking turns (the machine's
speed moves between minutes; each repetition's ratio shares its minute), and
prints the median ratio and the range; loaded / quiet is then the ratio of the
median wall times.  Where bliss-audio cannot run (its 0.2.0 wheel uses AVX-512: a CPU
without it kills the analysis with SIGILL), one line says so, deepsim's figures follow
alone and the exit status is 1.  Nothing is asserted: figures go to docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FULL = ROOT.parent / "shared" / "corpus" / "full"

# A process pool of concurrent.futures, not multiprocessing.Pool: a worker that dies (as
# bliss-audio 0.2.0's wheel does on a CPU without AVX-512: SIGILL) breaks the pool at once
# instead of leaving map() waiting for good; the child then names the signal.
BLISS_CHILD = r"""
import concurrent.futures, json, multiprocessing, os, resource, signal, sys, time

def analyse(path):
    import bliss_audio
    return len(bliss_audio.Song(path).analysis)

if __name__ == "__main__":
    paths = json.loads(sys.argv[1])
    procs = int(sys.argv[2])
    started = time.perf_counter()
    fork = multiprocessing.get_context("fork")
    try:
        with concurrent.futures.ProcessPoolExecutor(procs, mp_context=fork) as pool:
            sizes = list(pool.map(analyse, paths))
    except concurrent.futures.process.BrokenProcessPool:
        one = fork.Process(target=analyse, args=(paths[0],))
        one.start()
        one.join()
        code = one.exitcode or 0
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        print(json.dumps({"error": f"a bliss-audio worker died ({how} on {paths[0]})"}))
        sys.exit(3)
    wall = time.perf_counter() - started
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"tracks": len(sizes), "dims": sizes[0], "wall": wall,
                      "cpu": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
                      "rss_mb": max(me.ru_maxrss, kids.ru_maxrss) / 1024}))
"""

BUSY = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def run_child(
    argv: list[str], env: dict[str, str] | None = None
) -> tuple[float, float, float, str, str]:
    """Wall, CPU (child and its descendants) and peak RSS (MB) of one command, its stdout and
    its stderr."""
    # The wrapper is a child subreaper (Linux prctl): a descendant its parent leaves
    # behind (multiprocessing's forkserver, with the decoding workers it reaped) is
    # reparented to it and waited for, so its CPU time and peak RSS are counted too.
    wrapper = (
        "import ctypes, os, resource, subprocess, sys, time, json\n"
        "ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)\n"
        "t = time.perf_counter()\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "wall = time.perf_counter() - t\n"
        "while True:\n"
        "    try:\n"
        "        os.waitpid(-1, 0)\n"
        "    except ChildProcessError:\n"
        "        break\n"
        "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "sys.stderr.write(p.stderr)\n"
        "print(json.dumps({'rc': p.returncode, 'wall': wall, 'cpu': u.ru_utime + u.ru_stime,"
        " 'rss_mb': u.ru_maxrss / 1024, 'out': p.stdout}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", wrapper, *argv], capture_output=True, text=True, env=env, check=False
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise ChildFailed(
            f"{' '.join(argv[:4])} failed ({result['rc']}): {done.stderr[-500:]}", result["out"]
        )
    return result["wall"], result["cpu"], result["rss_mb"], result["out"], done.stderr


class ChildFailed(SystemExit):
    """A measured command that failed: its message, and its standard output."""

    def __init__(self, message: str, out: str) -> None:
        super().__init__(message)
        self.out = out


def compile_tree(tree: str | Path) -> None:
    """Byte-compile a checkout's ``deepsim`` and ``beetsplug`` (``__pycache__``, git-ignored),
    as ``pip install`` does for a user: otherwise, where ``PYTHONDONTWRITEBYTECODE`` is set
    (as on our machines), every ``beet`` run would compile them from source first (0.1 s of
    the plugin's import, more for the models)."""
    import compileall

    for package in ("deepsim", "beetsplug"):
        folder = Path(tree) / package
        if folder.is_dir() and not compileall.compile_dir(folder, quiet=1):
            raise SystemExit(f"{folder}: does not byte-compile")


def beet_argv(tree: str | None) -> list[str]:
    """``beet`` as a command line: this environment's, or with the deepsim of checkout
    ``tree`` first on the path (``python -S``: an editable install's import hook, which
    ``PYTHONPATH`` cannot override, is not loaded; site-packages come after the tree)."""
    if tree is None:
        return [sys.executable, "-m", "beets"]
    import sysconfig

    site = sysconfig.get_paths()["purelib"]
    code = (
        f"import sys; sys.path[:0] = [{os.path.abspath(tree)!r}]; sys.path.append({site!r}); "
        "sys.argv[0] = 'beet'; import runpy; runpy.run_module('beets', run_name='__main__')"
    )
    return [sys.executable, "-S", "-c", code]


def bench_deepsim(
    paths: list[Path], model: str, work: Path, tree: str | None = None
) -> dict[str, float]:
    from beets import config
    from beets.library import Item, Library

    config["create_backup_before_migrations"] = False  # no migration backups in the output
    root = work / f"beets-{model}-{time.monotonic_ns()}"
    root.mkdir()
    lib = Library(str(root / "library.db"), str(root))
    for path in paths:
        lib.add(Item(path=os.fsencode(path), title=path.stem, artist="bench"))
    lib._close()
    (root / "config.yaml").write_text(
        f"library: {root / 'library.db'}\ndirectory: {root}\nplugins: [deepsim]\n"
        f"create_backup_before_migrations: no\ndeepsim:\n  model: {model}\n  device: cpu\n"
    )
    env = dict(os.environ, BEETSDIR=str(root))
    wall, cpu, rss, out, err = run_child([*beet_argv(tree), "-v", "deepsim-embed"], env)
    match = re.search(r"embedded (\d+)", out)
    if not match or int(match.group(1)) != len(paths):
        raise SystemExit(f"deepsim-embed embedded {match.group(1) if match else 0} of {len(paths)}")
    result = {"tracks": len(paths), "wall": wall, "cpu": cpu, "rss_mb": rss}
    # the steady rate, after model loading: the embedding loop's own time (``beet -v``'s
    # "N tracks in S s"), else the rate the command prints (whole numbers above 10)
    loop = re.search(r"(\d+) tracks in ([\d.]+) s", err)
    steady = re.search(r"([\d.]+) tracks/s", out)
    if loop and float(loop.group(2)) > 0:
        result["steady"] = int(loop.group(1)) / float(loop.group(2))
    elif steady:
        result["steady"] = float(steady.group(1))
    return result


#: Why bliss could not be measured here (set by the first failed run); empty while it can.
BLISS_FAILED: list[str] = []


def bench_bliss(paths: list[Path], procs: int) -> dict[str, float] | None:
    """bliss on ``paths`` in ``procs`` processes; None (after one line saying why, the
    first time) where bliss-audio cannot run here, and every later call."""
    if BLISS_FAILED:
        return None
    argv = [sys.executable, "-c", BLISS_CHILD, json.dumps([os.fspath(p) for p in paths])]
    try:
        wall, cpu, rss, out, _ = run_child([*argv, str(procs)])
    except ChildFailed as failed:
        lines = failed.out.strip().splitlines()
        why = json.loads(lines[-1]).get("error") if lines and lines[-1].startswith("{") else None
        reason = why or str(failed.code)
        if "SIGILL" in reason:
            reason += (
                ": an instruction this CPU lacks (the manylinux wheel of bliss-audio 0.2.0 uses "
                "AVX-512, e.g. vrndscalesd)"
            )
        BLISS_FAILED.append(reason)
        print(f"bliss: not measured here: {reason}; deepsim's figures follow alone", flush=True)
        return None
    inner = json.loads(out.strip().splitlines()[-1])
    return {"tracks": inner["tracks"], "wall": wall, "cpu": cpu, "rss_mb": rss}


def line(name: str, r: dict[str, float], base: dict[str, float] | None) -> str:
    rate = r["tracks"] / r["wall"]
    text = (
        f"{name:<22} {rate:6.2f} tracks/s  {r['cpu'] / r['tracks']:5.2f} CPU-s/track  "
        f"peak RSS {r['rss_mb']:5.0f} MB"
    )
    if base is not None:
        text += f"  {rate / (base['tracks'] / base['wall']):4.2f}x bliss"
    if "steady" in r:
        text += f"  (steady {r['steady']:.1f} tracks/s after start-up)"
    return text


def round_of(
    label: str, paths: list[Path], models: list[str], work: Path, procs: int, repeat: int = 1
) -> list[dict]:
    """Each tool on the files, ``repeat`` times, taking turns (bliss first, then the models;
    the other way round every second time): the ratios of one repetition share its minute."""
    print(f"\n== {label} (load average {loadavg()})")
    runs = []
    for r in range(repeat):
        if repeat > 1:
            print(f"-- {r + 1} of {repeat}")
        order = ["bliss", *models] if r % 2 == 0 else [*models[::-1], "bliss"]
        results: dict[str, dict[str, float]] = {}
        for name in order:
            if name == "bliss":
                bliss = bench_bliss(paths, procs)
                if bliss is not None:
                    results[name] = bliss
            else:
                results[name] = bench_deepsim(paths, name, work)
        base = results.get("bliss")
        if base is not None:
            print(line(f"bliss ({procs} processes)", base, None), flush=True)
        for model in models:
            print(line(f"deepsim {model}", results[model], base), flush=True)
        runs.append(results)
    if repeat > 1:
        print(f"-- median of {repeat} (the ratio of each repetition, then their median)")
        for model in models:
            steady = sorted(run[model].get("steady", float("nan")) for run in runs)
            text = f"deepsim {model:<14} "
            if all("bliss" in run for run in runs):
                ratios = sorted(_rate(run[model]) / _rate(run["bliss"]) for run in runs)
                text += f"{_median(ratios):4.2f}x bliss ({ratios[0]:.2f}-{ratios[-1]:.2f}), "
            spread = f"({steady[0]:.1f}-{steady[-1]:.1f})"
            print(text + f"steady {_median(steady):.1f} tracks/s {spread}")
    return runs


def _rate(result: dict[str, float]) -> float:
    return result["tracks"] / result["wall"]


def _median(values: list[float]) -> float:
    return statistics.median(values)


def against(paths: list[Path], models: list[str], work: Path, tree: str, rounds: int) -> None:
    """This checkout's ``beet deepsim-embed`` and checkout ``tree``'s, taking turns."""
    for model in models:
        print(f"\n== {model}: this checkout against {tree}, {rounds} rounds each, taking turns")
        rates: dict[str, list[float]] = {"this": [], "other": []}
        for r in range(rounds):
            for who in ("this", "other") if r % 2 == 0 else ("other", "this"):
                res = bench_deepsim(paths, model, work, ROOT.as_posix() if who == "this" else tree)
                rates[who].append(res["tracks"] / res["wall"])
                print(
                    f"{who:5} round {r + 1}: {rates[who][-1]:.2f} tracks/s "
                    f"(steady {res.get('steady', float('nan')):.1f}), "
                    f"{res['cpu'] / res['tracks']:.2f} CPU-s/track, "
                    f"peak RSS {res['rss_mb']:.0f} MB, load {loadavg()}",
                    flush=True,
                )
        a, b = max(rates["this"]), max(rates["other"])
        print(f"best of {rounds}: this {a:.2f} tracks/s, {tree} {b:.2f} -> {a / b:.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=6, help="copies of each real song")
    parser.add_argument("--models", nargs="+", default=["default", "msd-musicnn"])
    parser.add_argument("--busy", type=int, default=2, help="busy-loop processes for the load")
    parser.add_argument("--load-seconds", type=int, default=900, help="each busy loop's limit")
    parser.add_argument("--no-load", action="store_true", help="quiet round only")
    parser.add_argument(
        "--against",
        metavar="DIR",
        help="instead: this checkout's deepsim against the checkout DIR's (e.g. made by "
        "`git worktree add /tmp/old main~3`), taking turns, no bliss",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of --against")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run each tool this many times per round, taking turns; print the median ratio",
    )
    args = parser.parse_args()
    try:
        import bliss_audio  # noqa: F401
    except ImportError:
        print("bliss-audio is not installed: pip install -e '.[bench]' (bliss-audio==0.2.0)")
        return 1
    if not FULL.is_dir():
        print(f"no real songs at {FULL}")
        return 1
    procs = usable_cores()
    songs = sorted(FULL.iterdir())
    for tree in (ROOT, *([args.against] if args.against else [])):
        compile_tree(tree)
    print(
        f"{len(songs)} real songs × {args.copies} = {len(songs) * args.copies} files, "
        f"{procs} usable cores, {os.cpu_count()} CPUs"
    )
    with tempfile.TemporaryDirectory(prefix="deepsim-peers-") as tmp:
        work = Path(tmp)
        paths = []
        for rep in range(args.copies):
            for song in songs:
                copy = work / f"{rep}-{song.name}"
                shutil.copy(song, copy)
                paths.append(copy)
        if args.against:
            against(paths, args.models, work, args.against, args.rounds)
            return 0
        quiet = round_of("quiet", paths, args.models, work, procs, args.repeat)
        if args.no_load:
            return 1 if BLISS_FAILED else 0
        busy = [
            subprocess.Popen([sys.executable, "-c", BUSY.format(seconds=args.load_seconds)])
            for _ in range(args.busy)
        ]
        try:
            time.sleep(2)
            loaded = round_of(
                f"{args.busy} busy loops", paths, args.models, work, procs, args.repeat
            )
        finally:
            for proc in busy:
                proc.kill()
                proc.wait()
        print(
            "\n== loaded / quiet throughput (fair share with the busy loops on every core: "
            f"{procs / (procs + args.busy):.2f})"
        )
        for name in quiet[0]:
            if not all(name in run for run in loaded):
                continue
            # the median wall time of each round (one run each without --repeat)
            ratio = _median([run[name]["wall"] for run in quiet]) / _median(
                [run[name]["wall"] for run in loaded]
            )
            print(f"{name:<22} {ratio:.2f}")
    return 1 if BLISS_FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
