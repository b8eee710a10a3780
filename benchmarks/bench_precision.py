"""Network-only speed of each precision: one musicnn network, one 30-s track (10 patches).

Usage::

    python benchmarks/bench_precision.py [--threads 1 [2 ...]] [--network msd]

Times ``embed_patches`` for fp32, int8 and bf16 interleaved in one process (best
of 3 after a warm-up), so the ratios share the machine's load.  Decoding and the
log-mel are excluded (``bench_musicnn.py`` and ``check_precision.py`` include them).
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from deepsim.models.musicnn import load_builtin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1], help="torch threads (several: interleaved)"
    )
    parser.add_argument("--network", choices=["msd", "mtt"], default="msd")
    args = parser.parse_args()
    torch.manual_seed(0)
    patches = torch.randn(10, 187, 96) * 0.5 + 1.0
    models = {
        p: load_builtin(f"{args.network}-musicnn", precision=p) for p in ("fp32", "int8", "bf16")
    }
    for threads in args.threads:
        torch.set_num_threads(threads)
        for model in models.values():
            model.embed_patches(patches)
    times: dict[tuple[int, str], list[float]] = {}
    for _ in range(3):
        for threads in args.threads:
            torch.set_num_threads(threads)
            for precision, model in models.items():
                started = time.perf_counter()
                model.embed_patches(patches)
                times.setdefault((threads, precision), []).append(time.perf_counter() - started)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"{args.network}, 10 patches, load average {load}")
    for (threads, precision), seconds in times.items():
        print(
            f"{threads} thread(s) {precision}: {min(seconds) * 1000:.0f} ms, "
            f"{min(times[(threads, 'fp32')]) / min(seconds):.2f}x fp32"
        )


if __name__ == "__main__":
    main()
