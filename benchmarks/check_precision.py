"""Accuracy contract of the lower precisions against the exact fp32 port, on real music.

Decodes every file of ``../shared/corpus/excerpts`` (the middle 30 s, as
``beet deepsim-embed`` does), embeds it with the default model (both networks)
in fp32 with every front-end filter convolved (the reference: what the
TensorFlow graphs compute, ``MusicnnNetwork.prune = False``) and in each
``--precision`` as deepsim runs it (the dead filters left out, see
``deepsim.models.musicnn.DEAD_TOLERANCE``; ``fp32`` there is ``precision:
fp32``), and prints per precision:

* the cosine between each track's fp32 and lower-precision vector (min, mean):
  the contract is ≥ 0.995 for every track;
* the share of tracks whose nearest neighbour (over the corpus, by cosine) is
  unchanged, and the mean overlap of the 5 nearest: the contract is ≥ 95 %;
* the largest tag probability difference;
* ``Model.embed`` time on the same tracks (log-mel + both networks, decoding
  excluded) against fp32 in the same run.

``--calibrate`` prints the largest output of each timbral convolution of each
shipped network over the corpus: :data:`deepsim.models.musicnn.INT8_RANGES` is
1.5 times these.

Run::

    .venv/bin/python benchmarks/check_precision.py                # fp32, int8 and bf16
    .venv/bin/python benchmarks/check_precision.py --calibrate

Figures are printed, never asserted (``tests/test_musicnn.py`` pins the contract).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from deepsim.audio import decode_middle
from deepsim.errors import DeepsimError
from deepsim.models.musicnn import FRONTEND, MusicnnNetwork, conv_output_max, load_builtin

CORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpus" / "excerpts"


def load_corpus(directory: Path) -> tuple[list[str], list[np.ndarray]]:
    names, waves = [], []
    for path in sorted(directory.iterdir()):
        try:
            wave = decode_middle(path, sample_rate=FRONTEND.sample_rate, seconds=30.0)
        except DeepsimError as exc:
            print(f"skipped: {exc}")
            continue
        names.append(path.name)
        waves.append(wave)
    return names, waves


def embed(model, waves: list[np.ndarray], batch: int = 4) -> tuple[np.ndarray, np.ndarray, float]:
    started = time.perf_counter()
    vectors, tags = [], []
    for start in range(0, len(waves), batch):
        result = model.embed(waves[start : start + batch])
        vectors.append(result.vectors)
        tags.append(result.tags)
    return np.concatenate(vectors), np.concatenate(tags), time.perf_counter() - started


def neighbours(vectors: np.ndarray, k: int) -> np.ndarray:
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1)[:, :k]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--precision", nargs="+", default=["fp32", "int8", "bf16"])
    # one thread, as the pipeline runs inference on 2 cores (two collapse under load)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calibrate", action="store_true")
    args = parser.parse_args()
    if not args.corpus.is_dir():
        print(f"no corpus at {args.corpus}")
        return 1
    torch.set_num_threads(args.threads)
    names, waves = load_corpus(args.corpus)
    print(
        f"{len(waves)} tracks from {args.corpus.resolve()}, {args.threads} threads, "
        f"load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}"
    )
    if args.calibrate:
        model = load_builtin("default")
        patches, _ = model.patchify(model.compute_logmels(waves))
        for net in (model.msd, model.mtt):
            tops = conv_output_max(net.net, patches)
            print(
                f"{net.model_id}: output max, timbral then temporal: "
                + ", ".join(f"{top:.4f}" for top in tops)
            )
        return 0
    reference = load_builtin("default", precision="fp32")
    for net in reference.modules():
        if isinstance(net, MusicnnNetwork):
            net.prune = False  # every filter convolved: the port as converted
    embed(reference, waves[:2])  # warm-up
    ref_vectors, ref_tags, ref_seconds = embed(reference, waves)
    ref_nn = neighbours(ref_vectors, 5)
    print(
        f"fp32, every filter: {len(waves) / ref_seconds:.2f} tracks/s (Model.embed, both "
        "networks; the reference below)"
    )
    for precision in args.precision:
        model = load_builtin("default", precision=precision)
        embed(model, waves[:2])
        vectors, tags, seconds = embed(model, waves)
        cosines = np.sum(vectors * ref_vectors, axis=1)
        nn = neighbours(vectors, 5)
        same_first = float(np.mean(nn[:, 0] == ref_nn[:, 0]))
        overlap5 = float(
            np.mean([len(set(a) & set(b)) / 5 for a, b in zip(nn, ref_nn, strict=True)])
        )
        worst = int(np.argmin(cosines))
        print(
            f"{precision}: cosine to fp32 min {cosines.min():.5f} ({names[worst]}), mean "
            f"{cosines.mean():.5f}; nearest neighbour unchanged {same_first:.1%}, 5-NN overlap "
            f"{overlap5:.1%}; tags max |diff| {np.abs(tags - ref_tags).max():.4f}; vectors max "
            f"|diff| {np.abs(vectors - ref_vectors).max():.1e}; "
            f"{len(waves) / seconds:.2f} tracks/s = {ref_seconds / seconds:.2f}x fp32"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
