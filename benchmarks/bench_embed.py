"""Embedding throughput: decoding floor vs. the whole `beet deepsim-embed` pipeline.

Usage::

    python benchmarks/bench_embed.py [--tracks 24] [--models default msd-musicnn]

For N generated 4-minute stereo mp3 files (cached under ``--cache``), and for
``../shared/corpus/full`` when present, it prints:

(a) tracks/s for decoding the middle 30 s only (PyAV, same worker pool as the
    pipeline): the floor on this machine;
(b) tracks/s of ``beet deepsim-embed`` itself, run as a subprocess on a
    throwaway beets library (wall time including start-up and model loading,
    and the steady rate the command reports);
their ratio, and the peak RSS of the largest process.
Nothing is asserted: figures go to docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import beets  # noqa: E402
from audiogen import write_audio  # noqa: E402

from deepsim.decoders import decoded  # noqa: E402
from deepsim.embed import default_workers  # noqa: E402

beets.config["create_backup_before_migrations"] = False


def music_like(seconds: float, rate: int, seed: int) -> np.ndarray:
    """Chords changing every 2 s, a kick on each beat and some noise (stereo)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    out = np.zeros(n, np.float32)
    base = 110 * 2 ** (rng.integers(0, 12) / 12)
    for start in range(0, n, 2 * rate):
        seg = slice(start, min(n, start + 2 * rate))
        chord = base * 2 ** (rng.choice([0, 3, 4, 7, 10, 12], size=3) / 12)
        out[seg] = sum(np.sin(2 * np.pi * f * t[seg]) for f in chord) / 6
    beat = (t * 2) % 1.0
    out += 0.4 * np.exp(-beat * 30) * np.sin(2 * np.pi * 60 * t)
    out += 0.02 * rng.standard_normal(n).astype(np.float32)
    return np.stack([out, np.roll(out, 50)]).astype(np.float32)


def make_tracks(cache: Path, count: int) -> list[Path]:
    cache.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = cache / f"track-{i:03d}.mp3"
        if not path.exists():
            write_audio(path, music_like(240.0, 44100, i), rate=44100)
        paths.append(path)
    return paths


def bench_decode(paths: list[Path], workers: int) -> float:
    started = time.perf_counter()
    results = [
        r for r, _ in decoded(paths, sample_rate=16000, seconds=30.0, workers=workers, window=16)
    ]
    elapsed = time.perf_counter() - started
    failed = sum(isinstance(r[0], Exception) for r in results)
    if failed:
        print(f"  warning: {failed} decode failures")
    return len(paths) / elapsed


def bench_beet(
    paths: list[Path], model: str, workers: str, extra: dict[str, str]
) -> dict[str, float]:
    from beets.library import Item, Library

    with tempfile.TemporaryDirectory(prefix="deepsim-bench-") as tmp:
        root = Path(tmp)
        lib = Library(str(root / "library.db"), str(root))
        for path in paths:
            lib.add(Item(path=os.fsencode(path), title=path.stem, artist="bench"))
        lib._close()
        lines = [
            f"library: {root / 'library.db'}",
            f"directory: {root}",
            "plugins: [deepsim]",
            "create_backup_before_migrations: no",
            "deepsim:",
            f"  model: {model}",
            f"  workers: {workers}",
            f"  device: {extra.get('device', 'cpu')}",
        ] + [f"  {k}: {v}" for k, v in extra.items() if k != "device"]
        (root / "config.yaml").write_text("\n".join(lines) + "\n")
        env = dict(os.environ, BEETSDIR=str(root))
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "beets", "deepsim-embed"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        wall = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if proc.returncode != 0:
            print(proc.stdout, proc.stderr)
            raise SystemExit(f"beet deepsim-embed failed ({proc.returncode})")
        match = re.search(r"embedded (\d+).*?([\d.]+) tracks/s", proc.stdout)
        steady = float(match.group(2)) if match else float("nan")
        embedded = int(match.group(1)) if match else 0
        return {
            "wall_rate": embedded / wall,
            "steady_rate": steady,
            "wall": wall,
            "peak_rss_mb": max(peak, before) / 1024,
        }


def db_growth(count: int = 10_000, dim: int = 400) -> None:
    """Bytes the beets database grows by when ``count`` items get a vector."""
    from beets.library import Item, Library

    from deepsim import store

    with tempfile.TemporaryDirectory(prefix="deepsim-bench-db-") as tmp:
        path = Path(tmp) / "library.db"
        lib = Library(str(path), tmp)
        with lib.transaction():
            for i in range(count):
                lib.add(Item(path=f"/m/{i}.mp3".encode(), title=f"t{i}", artist="a"))
        before = path.stat().st_size
        rng = np.random.default_rng(0)
        tags = "msd:rock, msd:pop, msd:indie, mtt:guitar, mtt:rock, mtt:drums"
        rows = ((i + 1, rng.standard_normal(dim).astype(np.float32), tags) for i in range(count))
        store.write_vectors(lib, rows, "musicnn-msd-mtt-1", batch_size=500)
        lib._close()
        after = path.stat().st_size
    print(
        f"\n== database growth: {count} items × {dim}-d vectors "
        "(float16 base64 + model id + tags): "
        f"{(after - before) / 1e6:.1f} MB ({(after - before) / count:.0f} bytes/item)"
    )


def report(
    label: str, paths: list[Path], models: list[str], workers: int, extra: dict[str, str]
) -> None:
    print(f"\n== {label}: {len(paths)} tracks, {workers} decoding workers, {os.cpu_count()} cores")
    floor = bench_decode(paths, workers)
    print(f"(a) decode middle 30 s only      : {floor:6.2f} tracks/s  (floor)")
    for model in models:
        result = bench_beet(paths, model, str(workers), extra)
        print(
            f"(b) beet deepsim-embed {model:<11}: {result['steady_rate']:6.2f} tracks/s steady, "
            f"{result['wall_rate']:5.2f} tracks/s incl. start-up ({result['wall']:.1f} s); "
            f"pipeline/floor = {result['steady_rate'] / floor:.2f}; "
            f"peak RSS {result['peak_rss_mb']:.0f} MB"
        )


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def torch_version() -> str:
    import torch

    return str(torch.__version__)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracks", type=int, default=24, help="generated 4-minute mp3 files")
    parser.add_argument("--models", nargs="+", default=["default", "msd-musicnn"])
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument(
        "--device", default="cpu", help="cpu, cuda, cuda:N or auto (the GPU path is untested here)"
    )
    parser.add_argument(
        "--cache", type=Path, default=Path.home() / ".cache" / "deepsim-bench" / "mp3"
    )
    args = parser.parse_args()
    if args.device.startswith("cuda") and not cuda_available():
        print(f"--device {args.device}: CUDA is not available here (torch {torch_version()})")
        return 1
    db_growth()
    extra = {} if args.batch_size is None else {"batch_size": str(args.batch_size)}
    extra["device"] = args.device
    report(
        "generated 4-min mp3",
        make_tracks(args.cache, args.tracks),
        args.models,
        args.workers,
        extra,
    )
    full = ROOT.parent / "shared" / "corpus" / "full"
    if full.is_dir():
        tracks = sorted(full.iterdir())
        # repeat the 4 real full-length tracks so the rate is not dominated by start-up
        with tempfile.TemporaryDirectory() as tmp:
            copies = []
            for rep in range(max(1, args.tracks // len(tracks))):
                for path in tracks:
                    copy = Path(tmp) / f"{rep}-{path.name}"
                    shutil.copy(path, copy)
                    copies.append(copy)
            report("../shared/corpus/full (real songs)", copies, args.models, args.workers, extra)
    else:
        print("\n../shared/corpus/full not present: real-song figures skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
