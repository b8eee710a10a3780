"""Run the ORIGINAL musicnn TensorFlow graphs on fixed patches: the port's golden file.

This is a maintenance tool, not part of deepsim.  It needs TensorFlow (any 2.x;
checked with tensorflow-cpu 2.21 on Python 3.11) and numpy, in a separate
environment, and the musicnn 0.1.0 wheel::

    python3.11 -m venv scratch/tfvenv
    scratch/tfvenv/bin/pip install tensorflow-cpu numpy
    pip download --no-deps musicnn==0.1.0 -d /tmp/dl
    scratch/tfvenv/bin/python tools/make_musicnn_golden.py \\
        /tmp/dl/musicnn-0.1.0-py3-none-any.whl tests/data/musicnn_golden.npz

The graphs are imported from the checkpoints' own ``.meta`` files (the graph
the authors trained and shipped), so the golden numbers do not depend on
anyone's re-implementation of the architecture.  Inputs are six log-mel
patches of 187 frames x 96 bands: three seeded random log-mel-like patches and
three cut from :func:`synthetic_signal` (the last one a full-scale square wave,
to check loud input stays finite).  The log-mel of the signal is computed here
in float64 numpy (Slaney mel filterbank, Hann window, centred reflect-padded
STFT, ``log10(10000 * mel + 1)``), so it does not use musicnn's float16
extractor.  ``tests/test_musicnn.py`` regenerates the signal with
:func:`synthetic_signal` (this module imports TensorFlow only in :func:`main`).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
N_FFT = 512
HOP = 256
N_MELS = 96
PATCH_FRAMES = 187
#: Samples per synthetic sound: one patch of frames, so that deepsim's
#: ``Model.patchify`` cuts the signal's log-mel exactly at the sound boundaries.
PATCH_SAMPLES = PATCH_FRAMES * HOP
SEED = 20190801

#: Network name in the wheel -> key prefix in the golden file.
NETWORKS = {"MSD_musicnn": "msd", "MTT_musicnn": "mtt"}
INPUT = "model/Placeholder:0"
IS_TRAINING = "model/Placeholder_2:0"
TAGS = "model/Sigmoid:0"
PENULTIMATE = "model/batch_normalization_10/batchnorm/add_1:0"


def synthetic_signal(sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Three patch-long synthetic sounds, back to back (float32, 3 * PATCH_SAMPLES).

    1. A harmonic chord (A3, C#4, E4 with 6 partials each) under a 2 Hz
       amplitude pulse, at moderate level.
    2. A noise-burst "drum" pattern at 4 beats per second over a low sine.
    3. A full-scale (+-1) 220 Hz square wave: loud enough that musicnn's own
       float16 extractor overflows to inf.

    Deterministic (fixed seed), needs only numpy.
    """
    n = PATCH_SAMPLES
    t = np.arange(n, dtype=np.float64) / sample_rate
    chord = np.zeros(n)
    for f0 in (220.0, 277.18, 329.63):
        for k in range(1, 7):
            chord += np.sin(2 * np.pi * f0 * k * t + 0.3 * k) / k
    chord *= 0.08 * (0.6 + 0.4 * np.cos(2 * np.pi * 2.0 * t))
    rng = np.random.default_rng(SEED)
    beat_phase = (t * 4.0) % 1.0
    drums = rng.standard_normal(n) * np.exp(-beat_phase * 25.0) * 0.3
    drums += 0.2 * np.sin(2 * np.pi * 55.0 * t)
    square = np.where(np.sin(2 * np.pi * 220.0 * t) >= 0.0, 1.0, -1.0)
    return np.concatenate([chord, drums, square]).astype(np.float32)


def _mel_filterbank() -> np.ndarray:
    """Slaney mel filterbank (= librosa.filters.mel defaults), float64."""

    def hz_to_mel(f: np.ndarray) -> np.ndarray:
        f = np.asarray(f, np.float64)
        m = f / (200.0 / 3)
        above = f >= 1000.0
        m[above] = 15.0 + np.log(f[above] / 1000.0) / (np.log(6.4) / 27.0)
        return m

    def mel_to_hz(m: np.ndarray) -> np.ndarray:
        m = np.asarray(m, np.float64)
        f = m * (200.0 / 3)
        above = m >= 15.0
        f[above] = 1000.0 * np.exp((np.log(6.4) / 27.0) * (m[above] - 15.0))
        return f

    fft_freqs = np.linspace(0, SAMPLE_RATE / 2, 1 + N_FFT // 2)
    mel_pts = mel_to_hz(np.linspace(0.0, hz_to_mel(np.array([SAMPLE_RATE / 2]))[0], N_MELS + 2))
    fdiff = np.diff(mel_pts)
    ramps = mel_pts[:, None] - fft_freqs[None, :]
    weights = np.maximum(0, np.minimum(-ramps[:-2] / fdiff[:-1, None], ramps[2:] / fdiff[1:, None]))
    return weights * (2.0 / (mel_pts[2:] - mel_pts[:-2]))[:, None]


def logmel(signal: np.ndarray) -> np.ndarray:
    """``log10(10000 * mel_power + 1)``, shape (frames, 96), float64."""
    x = np.pad(np.asarray(signal, np.float64), N_FFT // 2, mode="reflect")
    n_frames = 1 + (len(x) - N_FFT) // HOP
    idx = np.arange(N_FFT)[None, :] + HOP * np.arange(n_frames)[:, None]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)
    power = np.abs(np.fft.rfft(x[idx] * window, axis=1)) ** 2
    return np.log10(10000.0 * power @ _mel_filterbank().T + 1.0)


def golden_patches() -> tuple[np.ndarray, list[str]]:
    """The six input patches (6, 187, 96) float32 and a label for each."""
    rng = np.random.default_rng(SEED)
    frames = np.arange(PATCH_FRAMES)[:, None]
    bands = np.arange(N_MELS)[None, :]
    random_patches = []
    for i in range(3):
        # A falling spectral envelope, a slow temporal swell and rough texture,
        # in the 0..4.5 range real music spans after log10(10000 x + 1).
        envelope = 3.2 - 2.2 * bands / N_MELS + 0.4 * np.sin(2 * np.pi * frames / (60 + 20 * i))
        texture = rng.gamma(2.0, 0.35, size=(PATCH_FRAMES, N_MELS))
        random_patches.append(np.clip(envelope + texture - 0.7, 0.0, None))
    mel = logmel(synthetic_signal())
    signal_patches = [mel[k * PATCH_FRAMES : (k + 1) * PATCH_FRAMES] for k in range(3)]
    patches = np.stack(random_patches + signal_patches).astype(np.float32)
    labels = ["random-0", "random-1", "random-2", "chord", "drums", "square-full-scale"]
    return patches, labels


def run_network(checkpoint_dir: Path, patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tags and penultimate of one network's original graph, in inference mode."""
    import tensorflow as tf
    from tensorflow.core.protobuf import meta_graph_pb2

    meta = meta_graph_pb2.MetaGraphDef()
    meta.ParseFromString((checkpoint_dir / ".meta").read_bytes())
    # Shapes recorded by TF 1.12 confuse TF 2's importer; they are redundant.
    for node in meta.graph_def.node:
        if "_output_shapes" in node.attr:
            del node.attr["_output_shapes"]
    graph = tf.Graph()
    with graph.as_default():
        saver = tf.compat.v1.train.import_meta_graph(meta, clear_devices=True)
        with tf.compat.v1.Session(graph=graph) as sess:
            # The checkpoint files have an empty basename: the prefix is the dir.
            saver.restore(sess, str(checkpoint_dir) + os.sep)
            tags, penultimate = sess.run(
                [TAGS, PENULTIMATE], feed_dict={INPUT: patches, IS_TRAINING: False}
            )
    return tags.astype(np.float32), penultimate.astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("wheel", type=Path, help="musicnn-0.1.0-py3-none-any.whl")
    parser.add_argument("output", type=Path, help="golden .npz to write")
    args = parser.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.compat.v1.disable_eager_execution()
    patches, labels = golden_patches()
    result: dict[str, np.ndarray] = {"patches": patches, "labels": np.array(labels)}
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(args.wheel) as wheel:
        wheel.extractall(tmp)
        for name, prefix in NETWORKS.items():
            tags, penultimate = run_network(Path(tmp) / "musicnn" / name, patches)
            if not (np.isfinite(tags).all() and np.isfinite(penultimate).all()):
                raise SystemExit(f"{name}: non-finite output from the TF graph")
            result[f"{prefix}_tags"] = tags
            result[f"{prefix}_penultimate"] = penultimate
    result["wheel_sha256"] = np.array(hashlib.sha256(args.wheel.read_bytes()).hexdigest())
    result["tensorflow_version"] = np.array(tf.__version__)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.output, **result)
    print(f"wrote {args.output} ({args.output.stat().st_size} bytes)")
    for prefix in NETWORKS.values():
        print(
            f"{prefix}: tags range {result[prefix + '_tags'].min():.4f}.."
            f"{result[prefix + '_tags'].max():.4f}, penultimate norm "
            f"{np.linalg.norm(result[prefix + '_penultimate'], axis=1).round(2).tolist()}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
