"""Write a Last.fm-style CSV of simulated listening sessions over the corpus excerpts.

Usage: python tools/make_corpus_listens.py ../shared/corpus/excerpts corpus-listens.csv

Used to show `beet deepsim-train --listens` and `python -m deepsim.pretrain` on the
development corpus (docs/training.md); the file is not shipped.

Each simulated listener prefers two albums (= Debian packages); each session plays
3-6 tracks of one album, plus, with probability 0.15 per session, one track of
another album.  Sessions are 2 h apart, tracks 4 min apart, so deepsim.listening
cuts them into one pseudo-user per session (gap 30 min).
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from mediafile import MediaFile

if len(sys.argv) != 3:
    raise SystemExit(__doc__)
corpus = Path(sys.argv[1])
out = Path(sys.argv[2])
rng = np.random.default_rng(7)
albums: dict[str, list[tuple[str, str]]] = defaultdict(list)
for path in sorted(corpus.iterdir()):
    tags = MediaFile(str(path))
    albums[tags.album].append((tags.artist, tags.title))
names = sorted(albums)
t = 1_600_000_000
with open(out, "w", newline="", encoding="utf-8") as fh:
    w = csv.writer(fh)
    w.writerow(["user", "artist", "album", "track", "uts"])
    for user in range(40):
        liked = rng.choice(len(names), size=2, replace=False)
        for _session in range(6):
            album = names[liked[rng.integers(2)]]
            tracks = albums[album]
            picks = [
                tracks[i]
                for i in rng.choice(len(tracks), size=int(rng.integers(3, 7)), replace=False)
            ]
            plays = [(album, a, ti) for a, ti in picks]
            if rng.random() < 0.15:
                other = names[rng.integers(len(names))]
                a, ti = albums[other][rng.integers(len(albums[other]))]
                plays.insert(int(rng.integers(len(plays) + 1)), (other, a, ti))
            for alb, a, ti in plays:
                w.writerow([f"listener{user:02d}", a, alb, ti, t])
                t += 240
            t += 7200
lines = out.read_text(encoding="utf-8").count("\n") - 1
print(f"{out}: {lines} listens, {len(names)} albums")
