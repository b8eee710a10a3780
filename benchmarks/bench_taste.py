"""Does `beet deepsim-train` help?  Same-album P@5 of `beet similar` before and after
training, the held-out table with its baselines, and `beet recommend` for one listener.

Usage: python benchmarks/bench_taste.py [--corpus ../shared/corpus] [--workdir DIR]

The library is the 56 real excerpts of ``../shared/corpus`` (7 albums, each
a game soundtrack).  Planted listening: 300 listeners, each fond of 2 or 3
soundtracks, listen to them in sessions on different days; a third of each
album's tracks is never played by anyone.  So the "truth" the training can
find is the album, and the never-played tracks can only be placed from their
audio.

Steps (all through the real beets commands, in this process):

1. ``beet deepsim-embed`` with the shipped musicnn model (cached in
   ``--workdir``; the first run decodes and embeds the 56 excerpts);
2. same-album P@5 of ``beet similar -c 5`` for every track (played and
   never-played tracks reported apart): the untrained figures;
3. ``beet deepsim-train --listens listens.csv``: the metrics table;
4. the same P@5 with the trained model (activated with ``--activate`` if the
   evidence rule refused it), at its chosen taste weight and at
   ``--taste-weight`` 0 (sound only: must equal step 2), 0.3, 0.5 and 1
   (taste only);
5. ``beet recommend --listens <one new listener's file> --unplayed -c 10``.

Figures depend on the seed (``--seed``) and the corpus; the load of the
machine changes only the timings.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def beet(workdir: Path, *args: str) -> str:
    """Run ``beet ARGS`` (a separate process, as a user would); return its stdout."""
    import subprocess

    env = {**os.environ, "BEETSDIR": str(workdir), "HOME": str(workdir)}
    done = subprocess.run(
        [sys.executable, "-m", "beets", *args], capture_output=True, text=True, env=env, check=False
    )
    if done.returncode:
        raise SystemExit(f"beet {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def build_library(workdir: Path, corpus: Path) -> None:
    import beets
    from beets.library import Item, Library

    beets.config["create_backup_before_migrations"] = False
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(
        f"library: {workdir / 'library.db'}\ndirectory: {workdir / 'music'}\n"
        "plugins: deepsim\ncreate_backup_before_migrations: no\n"
        "deepsim:\n  device: cpu\n  train:\n    min_tracks: 10\n    factors: 20\n",
        encoding="utf-8",
    )
    if (workdir / "library.db").exists():
        return
    lib = Library(str(workdir / "library.db"), str(workdir / "music"))
    for path in sorted((corpus / "excerpts").iterdir()):
        lib.add(Item.from_path(str(path)))
    lib._close()


def albums_of(workdir: Path) -> tuple[dict[int, str], dict[int, tuple[str, str]]]:
    from beets.library import Library

    lib = Library(str(workdir / "library.db"))
    album = {item.id: item.album for item in lib.items()}
    names = {item.id: (item.artist, item.title) for item in lib.items()}
    lib._close()
    return album, names


def plant_listening(
    workdir: Path, album: dict[int, str], names: dict[int, tuple[str, str]], seed: int
) -> tuple[set[int], dict[str, list[int]]]:
    """Write listens.csv; return the never-played ids and each listener's albums."""
    rng = np.random.default_rng(seed)
    by_album: dict[str, list[int]] = defaultdict(list)
    for item_id, name in sorted(album.items()):
        by_album[name].append(item_id)
    never: set[int] = set()
    for ids in by_album.values():
        never.update(rng.choice(ids, size=len(ids) // 3, replace=False).tolist())
    titles = sorted(by_album)
    lines = ["user,artist,album,track,uts"]
    t0 = 1_700_000_000
    for u in range(300):
        liked = rng.choice(len(titles), size=int(rng.integers(2, 4)), replace=False)
        t = t0 + u * 3600
        for _day in range(4):
            name = titles[int(rng.choice(liked))]
            pool = [i for i in by_album[name] if i not in never]
            picks = rng.choice(pool, size=int(rng.integers(2, len(pool) + 1)), replace=False)
            for item_id in picks.tolist():
                artist, title = names[item_id]
                lines.append(f'user{u:03d},"{artist}","{name}","{title}",{t}')
                t += 240
            t += 86400
    (workdir / "listens.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    # a new listener (not in the training data) who loves two soundtracks
    fan = [titles[1], titles[4]]
    rows = ["user,artist,album,track,uts"]
    t = t0 + 400 * 86400
    for name in fan:
        for item_id in [i for i in by_album[name] if i not in never][:3]:
            artist, title = names[item_id]
            rows.append(f'fan,"{artist}","{name}","{title}",{t}')
            t += 240
    (workdir / "fan.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return never, {"fan": fan}


def p_at_5(
    workdir: Path, album: dict[int, str], never: set[int], taste_weight: float | None = None
) -> dict[str, float]:
    """Same-album P@5 of what `beet similar -c 5 [--taste-weight W] id:N` returns, per track.

    Calls :func:`deepsim.similar.find_similar` as the plugin does (one process
    instead of 56 ``beet`` start-ups), with the plugin's query factors for ``W``.
    """
    from beets.library import Library

    from deepsim.models import active_model, model_id
    from deepsim.similar import find_similar
    from deepsim.taste import layout_of, query_scale

    state = workdir / "deepsim"
    name = active_model("auto", state_dir=state)
    scale = None
    if taste_weight is not None:
        layout = layout_of(name)
        assert layout is not None, "--taste-weight needs a trained model"
        scale = query_scale(layout, taste_weight)
    lib = Library(str(workdir / "library.db"))
    hits: dict[str, list[float]] = {"all": [], "played": [], "never played": []}
    for item_id in sorted(album):
        seed = lib.get_item(item_id)
        found = find_similar(
            lib, [seed], model_id=model_id(name), index_dir=state, count=5, query_scale=scale
        )
        p = sum(item.album == seed.album for item in found.items) / 5
        hits["all"].append(p)
        hits["never played" if item_id in never else "played"].append(p)
    lib._close()
    return {k: float(np.mean(v)) for k, v in hits.items()}


def p_at_5_observed(
    workdir: Path, album: dict[int, str], never: set[int], weights: list[float]
) -> dict[str, dict[float, dict[str, float]]]:
    """Same-album P@5 by exact cosine on the stored vectors, the taste part two ways.

    ``predicted``: every track's taste part is the head's prediction (what
    the model stores, so this must equal :func:`p_at_5`); ``observed``: tracks
    with plays use their observed WMF factor (stored with the model) instead.
    """
    from beets.library import Library
    from safetensors.numpy import load_file

    from deepsim import store
    from deepsim.models import active_model, model_id
    from deepsim.taste import combine, layout_of, split_parts

    name = active_model("auto", state_dir=workdir / "deepsim")
    layout = layout_of(name)
    assert layout is not None
    lib = Library(str(workdir / "library.db"))
    ids, matrix = store.read_vectors(lib, model_id(name))
    lib._close()
    sound, taste = split_parts(matrix, layout)
    tensors = load_file(name)
    row = {int(i): r for r, i in enumerate(ids.tolist())}
    observed = taste.copy()
    cf = zip(tensors["extra.cf_item_ids"].tolist(), tensors["extra.cf_item_factors"], strict=True)
    for i, f in cf:
        observed[row[int(i)]] = f / max(float(np.linalg.norm(f)), 1e-12)
    groups = np.asarray([album[int(i)] for i in ids.tolist()])
    is_never = np.asarray([int(i) in never for i in ids.tolist()])
    out: dict[str, dict[float, dict[str, float]]] = {}
    for kind, t in (("predicted", taste), ("observed", observed)):
        out[kind] = {}
        for w in weights:
            v = combine(sound, t, w)
            sim = v @ v.T
            np.fill_diagonal(sim, -np.inf)
            top = np.argsort(-sim, axis=1, kind="stable")[:, :5]
            p = (groups[top] == groups[:, None]).mean(axis=1)
            out[kind][w] = {
                "all": float(p.mean()),
                "played": float(p[~is_never].mean()),
                "never played": float(p[is_never].mean()),
            }
    return out


def show(name: str, p: dict[str, float]) -> None:
    print(
        f"  {name:<34} all {p['all']:.3f}   played {p['played']:.3f}   "
        f"never played {p['never played']:.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/deepsim-bench-taste"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not (args.corpus / "excerpts").is_dir():
        raise SystemExit(f"no corpus at {args.corpus}")
    workdir = args.workdir.resolve()
    from deepsim.models import set_active_model

    # start untrained: forget models of an earlier run (the backbone vectors stay)
    shutil.rmtree(workdir / "deepsim" / "models", ignore_errors=True)
    if (workdir / "deepsim").is_dir():
        set_active_model(None, state_dir=workdir / "deepsim")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    build_library(workdir, args.corpus)
    started = time.perf_counter()
    print(beet(workdir, "deepsim-embed").strip().splitlines()[-1])
    print(f"embedding: {time.perf_counter() - started:.1f} s")
    album, names = albums_of(workdir)
    never, fans = plant_listening(workdir, album, names, args.seed)
    print(
        f"library: {len(album)} tracks, {len(set(album.values()))} albums; "
        f"{len(never)} never played; 300 listeners"
    )

    print("\nsame-album P@5 of `beet similar -c 5`, every track as the query")
    before = p_at_5(workdir, album, never)
    show("untrained (musicnn-msd-mtt-1)", before)

    print("\n$ beet deepsim-train --listens listens.csv")
    started = time.perf_counter()
    out = beet(workdir, "deepsim-train", "--listens", str(workdir / "listens.csv"))
    print(out.rstrip())
    print(f"(training: {time.perf_counter() - started:.1f} s)")
    if "(not active)" in out:
        print(
            "\n$ beet deepsim-train --listens listens.csv --activate   (the same model, measured)"
        )
        out = beet(
            workdir, "deepsim-train", "--listens", str(workdir / "listens.csv"), "--activate"
        )
        print("\n".join(out.rstrip().splitlines()[-2:]))

    print("\nsame-album P@5 of `beet similar -c 5` after training")
    after = p_at_5(workdir, album, never)
    show("trained, chosen taste weight", after)
    for w, what in ((0.0, " (sound)"), (0.3, ""), (0.5, ""), (1.0, " (taste)")):
        show(f"trained, --taste-weight {w:g}{what}", p_at_5(workdir, album, never, w))
    gains = ", ".join(f"{k} {after[k] - before[k]:+.3f}" for k in before)
    print(f"  trained at its chosen weight minus untrained: {gains}")
    print(
        "\nplayed tracks: taste part predicted from audio vs their observed WMF factor "
        "(exact cosine on the stored vectors)"
    )
    weights = [0.1, 0.3, 0.5, 0.7, 0.9, 1.0]
    both = p_at_5_observed(workdir, album, never, weights)
    for w in weights:
        for kind in ("predicted", "observed"):
            show(f"w={w:g}, {kind} taste for played", both[kind][w])
    first = min(album)
    print(f"\n$ beet similar -c 5 id:{first}   ({album[first]})")
    print(
        beet(
            workdir,
            "similar",
            "-c",
            "5",
            "-f",
            "$deepsim_similarity  $album - $title",
            f"id:{first}",
        ).rstrip()
    )

    fan = workdir / "fan.csv"
    liked_names = " and ".join(fans["fan"])
    print(f"\n$ beet recommend --listens fan.csv --unplayed -c 10   (fan of {liked_names})")
    out = beet(
        workdir,
        "recommend",
        "--listens",
        str(fan),
        "--unplayed",
        "-c",
        "10",
        "-f",
        "$deepsim_similarity  $album - $title  [$id]",
    )
    print(out.rstrip())
    ids = [int(line.rsplit("[", 1)[1].rstrip("]")) for line in out.splitlines()]
    liked = sum(album[i] in fans["fan"] for i in ids)
    unheard = sum(i in never for i in ids)
    print(f"of these 10: {liked} from the fan's two soundtracks, {unheard} never played by anyone")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
