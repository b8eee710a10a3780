"""The store at scale: database growth per model, and the cost of a no-op `deepsim-embed`.

Usage::

    python benchmarks/bench_store.py [--items 10000] [--dir /tmp/deepsim-bench-store]

Builds a throwaway beets library of N items whose files exist (empty files),
stores a 400-d vector (with audio identity and tags) for each, then a 200-d
vector of a second model, and prints:

(a) the database growth per 10k items for the main slot and for a second
    model's slot;
(b) the time and Python peak memory of planning a ``beet deepsim-embed``
    that has nothing to do (:func:`deepsim.embed.plan_embedding`: SQL over ids,
    paths and identities, one ``stat`` per file), against loading every
    ``Item`` object (``list(lib.items())``, what the command did before) in
    the same run, and their ratio.
Nothing is asserted: figures go to docs/performance.md and docs/usage.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from beets.library import Item, Library

from deepsim import store
from deepsim.embed import plan_embedding
from deepsim.identity import stat_identity

TAGS = "msd:rock, msd:pop, msd:indie, mtt:guitar, mtt:rock, mtt:drums"


def measured(func: Callable[[], Any]) -> tuple[Any, float, float]:
    tracemalloc.start()
    started = time.perf_counter()
    result = func()
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return result, seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--dir", default="/tmp/deepsim-bench-store")
    args = parser.parse_args()
    n = args.items
    shutil.rmtree(args.dir, ignore_errors=True)
    music = os.path.join(args.dir, "music")
    os.makedirs(music)
    db = os.path.join(args.dir, "library.db")
    lib = Library(db, music)
    with lib.transaction():
        for i in range(n):
            path = os.path.join(music, f"{i}.mp3")
            open(path, "wb").close()
            lib.add(Item(path=path.encode(), title=f"t{i}", artist="a"))
    rng = np.random.default_rng(0)

    def records(model: str, dim: int) -> Iterator[store.VectorRecord]:
        for i in range(n):
            ident = stat_identity(os.path.join(music, f"{i}.mp3"))
            assert ident is not None
            vector = rng.standard_normal(dim).astype(np.float32)
            audio = ident.text + "0123456789abcdef"
            yield store.VectorRecord(i + 1, model, vector, audio=audio, tags=TAGS)

    size0 = os.path.getsize(db)
    store.write_records(lib, records("musicnn-msd-mtt-1", 400), batch_size=1000)
    size1 = os.path.getsize(db)
    store.write_records(lib, records("musicnn-msd-1", 200), batch_size=1000)
    size2 = os.path.getsize(db)
    per10k = 1e4 / n / 2**20
    print(
        f"database growth per 10k items: 400-d main slot {(size1 - size0) * per10k:.1f} MiB, "
        f"a second model's 200-d slot {(size2 - size1) * per10k:.1f} MiB"
    )
    lib._close()
    lib = Library(db, music)
    plan, plan_s, plan_mb = measured(lambda: plan_embedding(lib, "musicnn-msd-mtt-1"))
    assert not plan.todo and plan.done == n
    _, items_s, items_mb = measured(lambda: len(list(lib.items())))
    print(f"{n} items, no-op plan: {plan_s:.2f} s, Python peak {plan_mb:.0f} MiB")
    print(f"{n} items, list(lib.items()): {items_s:.2f} s, Python peak {items_mb:.0f} MiB")
    ratio_t, ratio_m = plan_s / items_s, plan_mb / items_mb
    print(f"ratio plan / load-every-item: time {ratio_t:.2f}, memory {ratio_m:.2f}")
    print(f"load average: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
