"""Write other-format versions of corpus excerpts: "the same recording in another format".

Usage::

    python tools/corpus_versions.py OUT_DIR [--corpus ../shared/corpus/excerpts] [--per-album 3]
    python tools/corpus_versions.py --measure LIBRARY.db [--model musicnn-msd-mtt-1]

For the first ``--per-album`` excerpts of each album (Debian package), the
whole excerpt is decoded with PyAV and re-encoded as mp3, flac, m4a (AAC) and
opus — every one of these that is not the excerpt's own format — into
``OUT_DIR/<excerpt stem>.<ext>`` with the excerpt's title, artist, album and
genre tags.  Imported next to the excerpts (``beet import -A -C``), these are
the known duplicate groups from which docs/usage.md measures the version
threshold of ``beet deepsim-dupes``: ``--measure`` reads the vectors of a
beets library holding the excerpts and these versions, takes files with the
same name stem for one recording, and prints the cosines within and between
recordings (:func:`deepsim.dupes.measure_threshold`).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import av

FORMATS = {  # extension -> (container format, codec, sample format)
    "mp3": ("mp3", "libmp3lame", "s16p"),
    "flac": ("flac", "flac", "s16"),
    "m4a": ("ipod", "aac", "fltp"),
    "opus": ("ogg", "libopus", "s16"),
}
TAGS = ("title", "artist", "album", "genre")


def transcode(source: Path, target: Path, ext: str) -> None:
    container_format, codec, sample_format = FORMATS[ext]
    with av.open(str(source)) as inp:
        stream = inp.streams.audio[0]
        tags = {k: v for k, v in {**inp.metadata, **stream.metadata}.items() if k.lower() in TAGS}
        rate = 48000 if codec == "libopus" else stream.codec_context.sample_rate
        with av.open(str(target), "w", format=container_format) as out:
            for key, value in tags.items():
                out.metadata[key.lower()] = value
            ostream = out.add_stream(codec, rate=rate)
            ostream.layout = "stereo" if stream.codec_context.channels > 1 else "mono"
            if codec == "libmp3lame":
                ostream.bit_rate = 192_000
            resampler = av.AudioResampler(format=sample_format, layout=ostream.layout, rate=rate)
            for frame in inp.decode(stream):
                frame.pts = None
                for converted in resampler.resample(frame):
                    out.mux(ostream.encode(converted))
            for converted in resampler.resample(None):
                out.mux(ostream.encode(converted))
            out.mux(ostream.encode(None))


def measure(db: Path, model_id: str) -> None:
    import os

    from beets.library import Library

    from deepsim import store
    from deepsim.dupes import measure_threshold

    lib = Library(str(db))
    ids, matrix = store.read_vectors(lib, model_id)
    paths = {item.id: os.fsdecode(item.path) for item in lib.items()}
    stems = [Path(paths[i]).stem for i in ids.tolist()]
    r = measure_threshold(matrix, stems)
    print(f"{len(ids)} tracks, {len(set(stems))} recordings ({model_id})")
    print(
        f"same recording, other format: {r.same_pairs} pairs, cosine min {r.same_min:.4f}, "
        f"mean {r.same_mean:.4f}"
    )
    print(
        f"different recordings: {r.other_pairs} pairs, cosine max {r.other_max:.4f}, "
        f"99.9th percentile {r.other_p999:.4f}"
    )
    print(f"midpoint of the gap: {r.suggested}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?")
    parser.add_argument("--measure", type=Path, metavar="LIBRARY_DB")
    parser.add_argument("--model", default="musicnn-msd-mtt-1")
    default = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "excerpts"
    parser.add_argument("--corpus", type=Path, default=default)
    parser.add_argument("--per-album", type=int, default=3)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure, args.model)
        return
    if args.out is None:
        parser.error("give OUT_DIR (or --measure LIBRARY_DB)")
    args.out.mkdir(parents=True, exist_ok=True)
    by_album: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(args.corpus.iterdir()):
        by_album[path.stem.rsplit("-", 1)[0]].append(path)
    written = 0
    for paths in by_album.values():
        for source in paths[: args.per_album]:
            for ext in FORMATS:
                if ext == source.suffix[1:]:
                    continue
                transcode(source, args.out / f"{source.stem}.{ext}", ext)
                written += 1
    print(f"wrote {written} files to {args.out}")


if __name__ == "__main__":
    main()
