"""Is the map page responsive at 100k tracks?  Headless Chromium on a generated page.

Usage::

    python benchmarks/bench_mapview.py [--n 100000] [--k 10]

Builds the page of ``deepsim-map`` for ``n`` generated tracks (clustered 2-D
points, random titles, ``k`` neighbours each; no projection is run), opens
it in Debian's Chromium through Playwright, and prints the file size, the time
until the page is ready, the time of one full redraw, of a hover hit test, of
a search and of a click.  Nothing is asserted: figures go to docs/performance.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from browser import chromium_executable, headless_chromium

from deepsim.mapview import PALETTE, render_html


def page_data(n: int, k: int) -> dict:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 2)) * 30
    groups = rng.integers(0, 40, size=n)
    xy = centres[groups] + rng.normal(size=(n, 2))
    words = ["blue", "train", "night", "river", "song", "dance", "theme", "battle", "rain", "sun"]
    titles = [" ".join(rng.choice(words, size=3)) + f" {i}" for i in range(n)]
    return {
        "color_by": "album", "k": k, "ids": list(range(1, n + 1)),
        "x": np.round(xy[:, 0], 3).tolist(), "y": np.round(xy[:, 1], 3).tolist(),
        "title": titles, "artist": (groups % 25).tolist(), "album": groups.tolist(),
        "artists": [f"Artist {a}" for a in range(25)], "albums": [f"Album {g}" for g in range(40)],
        "color": np.minimum(groups, len(PALETTE)).tolist(),
        "colors": [*PALETTE, "#7f7f7f"],
        "names": [f"Album {g}" for g in range(len(PALETTE))] + ["others"],
        "nn": rng.integers(0, n, size=n * k).tolist(),
        "nns": np.round(np.sort(rng.uniform(0.5, 1, size=(n, k)))[:, ::-1].ravel(), 3).tolist(),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    html = render_html(page_data(args.n, args.k))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "map.html"
        path.write_text(html, encoding="utf-8")
        print(f"{args.n} tracks: {path.stat().st_size / 2**20:.1f} MiB page")
        with headless_chromium(chromium_executable() or "/usr/bin/chromium") as browser:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            started = time.perf_counter()
            page.goto(path.as_uri())
            page.wait_for_selector("body[data-ready='1']", timeout=120_000)
            print(f"ready after {time.perf_counter() - started:.2f} s "
                  f"({page.evaluate('deepsimMap.drawn')} points drawn)")  # fmt: skip
            timings = page.evaluate(
                """() => {
                const t = performance.now, m = window.deepsimMap, out = {};
                let s = t.call(performance); m.select(-1); m.redrawNow();
                out.redraw = t.call(performance) - s;
                const [x, y] = m.screen(12345 % m.count);
                s = t.call(performance);
                for (let i = 0; i < 100; i++) m.hit(x + (i % 5), y);
                out.hover = (t.call(performance) - s) / 100;
                s = t.call(performance); m.search('river dance');
                out.search = t.call(performance) - s;
                s = t.call(performance); m.select(777); m.redrawNow();
                out.click = t.call(performance) - s;
                return out; }"""
            )
            print(
                f"full redraw {timings['redraw']:.0f} ms, hover hit test "
                f"{timings['hover']:.2f} ms, search {timings['search']:.0f} ms, "
                f"click (neighbours + redraw) {timings['click']:.0f} ms"
            )


if __name__ == "__main__":
    main()
