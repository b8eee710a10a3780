"""Where a track's time goes, stage by stage, now and at another revision, interleaved.

Usage::

    python benchmarks/bench_pipeline.py [--against REV] [--threads 1] [--rounds 5]

On the real full-length songs of ``../shared/corpus/full`` (opus, ogg, m4a,
mp3), in one process and one thread, it times per track:

* decoding the middle 30 s to 16 kHz mono (``deepsim.audio.decode_middle``),
  per file;
* the log-mel of the window;
* each musicnn network (``embed_patches`` on the track's 10 patches) in fp32
  and in the precision ``auto`` picks here.

With ``--against REV`` the same stages of ``deepsim/audio.py`` and
``deepsim/models/musicnn.py`` as they were at git revision ``REV`` run
alternately with the current ones (best of ``--rounds``; the ratio shares the
machine's load), and the decoded windows of both are compared.  Nothing is
asserted: figures go to docs/performance.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
FULL = ROOT.parent / "shared" / "corpus" / "full"


def module_at(rev: str, relpath: str, name: str, tmp: Path, repo: Path = ROOT) -> ModuleType:
    """``relpath`` as it was at git revision ``rev``, imported as module ``name``."""
    source = subprocess.run(
        ["git", "-C", str(repo), "show", f"{rev}:{relpath}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = tmp / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def best_ms(fn: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1000 * min(times)


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Best time of each, the candidates taking turns (so they share the load)."""
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], best_ms(fn, 1))
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", help="git revision to compare with (e.g. main, HEAD~1)")
    parser.add_argument("--repo", type=Path, default=ROOT, help="git checkout REV is read from")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not FULL.is_dir():
        print(f"no real songs at {FULL}")
        return 1
    torch.set_num_threads(args.threads)
    from deepsim import audio
    from deepsim.models import musicnn

    songs = sorted(FULL.iterdir())
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"{len(songs)} real songs, {args.threads} thread(s), load average {load}")
    with tempfile.TemporaryDirectory() as tmp:
        old_audio = old_musicnn = None
        if args.against:
            then = (args.against, "audio_then", Path(tmp), args.repo)
            old_audio = module_at(then[0], "deepsim/audio.py", *then[1:])
            old_musicnn = module_at(then[0], "deepsim/models/musicnn.py", "musicnn_then", *then[2:])
            old_musicnn.WEIGHTS_DIR = musicnn.WEIGHTS_DIR  # the weights did not move
        print("\n== decoding the middle 30 s to 16 kHz mono, ms per file (best of rounds)")
        for song in songs:
            fns: dict[str, Callable[[], object]] = {
                "now": lambda s=song: audio.decode_middle(s, sample_rate=16000)
            }
            if old_audio is not None:
                fns["then"] = lambda s=song: old_audio.decode_middle(s, sample_rate=16000)
            times = interleaved(fns, args.rounds)
            text = f"{song.name:<32} now {times['now']:6.1f}"
            if old_audio is not None:
                now = audio.decode_middle(song, sample_rate=16000)
                then = old_audio.decode_middle(song, sample_rate=16000)
                same = len(now) == len(then) and float(np.abs(now - then).max()) < 1e-5
                text += (
                    f"   {args.against} {times['then']:6.1f}   "
                    f"{times['then'] / times['now']:4.2f}x"
                    f"   windows {'equal' if same else 'differ'}"
                )
            print(text)
        wave = audio.decode_middle(songs[-1], sample_rate=16000)
        auto = musicnn.resolve_precision("auto", "cpu")
        model = musicnn.load_builtin("msd-musicnn", precision=auto)
        with torch.inference_mode():
            mel = model.compute_logmels([wave])
            patches, _ = model.patchify(mel)
        print("\n== one track's log-mel and networks, ms (best of rounds)")
        print(
            f"log-mel of 30 s: "
            f"{interleaved({'x': lambda: model.compute_logmels([wave])}, args.rounds)['x']:.1f}"
        )
        for network in ("msd", "mtt"):
            fns = {}
            for precision in dict.fromkeys(("fp32", auto)):
                net = musicnn.load_builtin(f"{network}-musicnn", precision=precision)
                fns[f"{precision} now"] = lambda n=net: n.embed_patches(patches)
                if old_musicnn is not None:
                    then = old_musicnn.load_builtin(f"{network}-musicnn", precision=precision)
                    fns[f"{precision} {args.against}"] = lambda n=then: n.embed_patches(patches)
            with torch.inference_mode():
                for fn in fns.values():
                    fn()  # warm-up (int8 modules are built on first use)
                times = interleaved(fns, args.rounds)
            shown = "   ".join(f"{k} {v:6.1f}" for k, v in times.items())
            print(f"{network} network, 10 patches: {shown}")
    print(f"\n(load average {' '.join(str(round(x, 2)) for x in os.getloadavg())} at the end)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
