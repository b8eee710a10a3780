"""musicnn throughput: tracks/s of ``Model.embed`` for batches of 30-s tracks.

Usage::

    python benchmarks/bench_musicnn.py [--tracks 8] [--reps 3]

Decodes ``--tracks`` excerpts of ``../shared/corpus`` (middle 30 s; decoding is
not timed), then times ``model.embed(batch)`` (log-mel + 10 patches per track
+ network) for each configuration and prints tracks/s (best of ``--reps``) and
the ratio to a naive baseline measured in the same run: the literal TF graph
(conv -> ReLU -> batch norm -> max-pool over frequency), one patch at a time,
float32.  Also prints how far bf16 moves vectors and tags from fp32.  Nothing is
asserted: figures go to docs/model-card.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import deepsim.models.musicnn as mm
from deepsim.audio import decode_middle

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "excerpts"


def naive_forward(net: mm.MusicnnNetwork, patches: torch.Tensor) -> dict[str, torch.Tensor]:
    """Literal transcription of the TF graph, one patch at a time."""
    outs = []
    for patch in patches.split(1):
        x = net.input_norm(patch.unsqueeze(1))
        feats = []
        xp = F.pad(x, (0, 0, 3, 3))
        for conv, norm in zip(net.timbral, net.timbral_norm, strict=True):
            feats.append(norm(torch.relu(conv(xp))).amax(3))
        for conv, norm in zip(net.temporal, net.temporal_norm, strict=True):
            k = conv.kernel_size[0]
            feats.append(norm(torch.relu(conv(F.pad(x, (0, 0, (k - 1) // 2, k // 2))))).amax(3))
        h = torch.cat(feats, 1)
        layers = [h]
        for i, (conv, norm) in enumerate(zip(net.midend, net.midend_norm, strict=True)):
            o = norm(torch.relu(conv(F.pad(h, (3, 3)))))
            h = o if i == 0 else o + h
            layers.append(h)
        f = torch.cat(layers, 1)
        pooled = torch.stack([f.amax(2), f.mean(2)], 2).flatten(1)
        emb = net.dense_norm(torch.relu(net.dense(net.pool_norm(pooled))))
        outs.append((emb, torch.sigmoid(net.classifier(emb))))
    return {"embedding": torch.cat([o[0] for o in outs]), "tags": torch.cat([o[1] for o in outs])}


class NaiveMusicnn(mm.MusicnnModel):
    """The baseline: same weights, literal graph, patch by patch."""

    def embed_patches(self, patches: torch.Tensor) -> dict[str, torch.Tensor]:
        return naive_forward(self.net, patches)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tracks", type=int, default=8, help="tracks per batch")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per configuration")
    args = parser.parse_args()
    files = sorted(CORPUS.glob("*.mp3"))[: args.tracks]
    if not files:
        print(f"no corpus at {CORPUS}: nothing to measure", file=sys.stderr)
        return 1
    waves = [decode_middle(f, sample_rate=16000, seconds=30.0) for f in files]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"native bf16: {mm.cpu_has_native_bf16()}, {len(waves)} tracks of "
        f"{len(waves[0]) / 16000:.0f} s, load average {os.getloadavg()[0]:.1f}"
    )
    naive = NaiveMusicnn(network="msd")
    naive.net.load_state_dict(mm.load_builtin("msd-musicnn").net.state_dict())
    configs = {"naive msd fp32 (baseline)": naive}
    for precision in mm.PRECISIONS:
        for name, label in (("msd-musicnn", "msd"), ("mtt-musicnn", "mtt"), ("default", "both")):
            configs[f"{label} {precision}"] = mm.load_builtin(name, precision=precision)
    best: dict[str, float] = {}
    with torch.inference_mode():
        for model in configs.values():
            model.embed(waves[:1])  # warm-up
        for _ in range(args.reps):
            for name, model in configs.items():
                start = time.perf_counter()
                model.embed(waves)
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    base = best["naive msd fp32 (baseline)"]
    for name, seconds in best.items():
        print(f"{name:28s} {len(waves) / seconds:6.2f} tracks/s  {base / seconds:5.2f}x baseline")
    fp32 = configs["both fp32"].embed(waves)
    bf16 = configs["both bf16"].embed(waves)
    assert fp32.tags is not None and bf16.tags is not None
    cosine = (fp32.vectors * bf16.vectors).sum(1)
    print(
        f"bf16 vs fp32 ({len(waves)} tracks, 400-d): cosine min {cosine.min():.6f}, "
        f"max |tag difference| {np.abs(fp32.tags - bf16.tags).max():.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
