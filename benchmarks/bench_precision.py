"""Network-only speed of each precision: one musicnn network, one 30-s track (10 patches).

Usage::

    python benchmarks/bench_precision.py [--threads 1] [--network msd]

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
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--network", choices=["msd", "mtt"], default="msd")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    patches = torch.randn(10, 187, 96) * 0.5 + 1.0
    models = {
        p: load_builtin(f"{args.network}-musicnn", precision=p) for p in ("fp32", "int8", "bf16")
    }
    for model in models.values():
        model.embed_patches(patches)
    times: dict[str, list[float]] = {p: [] for p in models}
    for _ in range(3):
        for precision, model in models.items():
            started = time.perf_counter()
            model.embed_patches(patches)
            times[precision].append(time.perf_counter() - started)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"{args.network}, 10 patches, {args.threads} thread(s), load average {load}")
    for precision, seconds in times.items():
        print(
            f"{precision}: {min(seconds) * 1000:.0f} ms, "
            f"{min(times['fp32']) / min(seconds):.2f}x fp32"
        )


if __name__ == "__main__":
    main()
