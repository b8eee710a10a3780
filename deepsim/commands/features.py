"""``deepsim-dupes``, ``deepsim-outliers``, ``deepsim-map`` and ``deepsim-radio``."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from deepsim import store
from deepsim.commands import Context, Outcome, expand, matched_ids, outlier_ids, version_folder
from deepsim.errors import DeepsimError
from deepsim.settings import positive_int

if TYPE_CHECKING:
    from beets.library import Item, Library

    from deepsim.commands.similar import Connect
    from deepsim.radio import RadioStep


def dupes(lib: Library, args: Sequence[str], opts: Any, ctx: Context) -> Outcome:
    """``beet deepsim-dupes [-t COS] [--no-tags] [QUERY]``: groups of versions of one recording."""
    from deepsim.dupes import find_versions

    ids = matched_ids(lib, args)
    groups = find_versions(
        lib,
        ctx.model_id,
        ids=ids,
        threshold=ctx.option_or(opts.threshold, "dupes.threshold"),
        use_tags=bool(ctx.get("dupes.tags")) and not opts.no_tags,
    )
    items = store.items_by_ids(lib, [i for g in groups for i, _ in g])
    fmt = opts.format or ctx.item_format
    outcome = Outcome()
    for group in groups:
        outcome.lines.append(f"== {len(group)} versions")
        outcome.lines.extend(
            f"{sim:5.3f}  {format(items[item_id], fmt)}  [{items[item_id].format}]"
            for item_id, sim in group
            if item_id in items
        )
    total = sum(len(g) for g in groups)
    outcome.lines.append(
        f"deepsim-dupes: {len(groups)} group(s), {total} tracks, "
        f"{total - len(groups)} would be folded"
    )
    return outcome


def outliers(lib: Library, args: Sequence[str], opts: Any, ctx: Context) -> Outcome:
    """``beet deepsim-outliers [-t Z] [-a] [QUERY]``: tracks least like the rest of their album."""
    from deepsim.outliers import score_albums

    ids = matched_ids(lib, args)
    threshold = ctx.option_or(opts.threshold, "outliers.threshold")
    fits = score_albums(lib, ctx.model_id, ids=ids, min_tracks=ctx.get("outliers.min_tracks"))
    shown = fits if opts.all else [f for f in fits if f.is_outlier(threshold)]
    items = store.items_by_ids(lib, [f.item_id for f in shown])
    fmt = opts.format or ctx.item_format
    outcome = Outcome(["score    fit  track"] if shown else [])
    outcome.lines.extend(
        f"{fit.score:5.1f}  {fit.fit:5.3f}  {format(items[fit.item_id], fmt)}"
        for fit in shown
        if fit.item_id in items
    )
    albums = len({f.album for f in fits})
    found = sum(f.is_outlier(threshold) for f in fits)
    outcome.lines.append(
        f"deepsim-outliers: {found} outlier(s) (score <= -{threshold:g}) among "
        f"{len(fits)} tracks of {albums} album(s)"
    )
    return outcome


def map_(lib: Library, args: Sequence[str], opts: Any, ctx: Context) -> Outcome:
    """``beet deepsim-map -o map.html|map.png [--color-by F] [--method M] [-f] [QUERY]``."""
    from deepsim.mapview import write_map

    if not opts.output:
        raise DeepsimError("give -o map.html or -o map.png")
    written = write_map(
        lib,
        expand(opts.output),
        model_id=ctx.model_id,
        state_dir=ctx.state_dir,
        ids=matched_ids(lib, args),
        color_by=opts.color_by or ctx.get("map.color_by"),
        method=opts.method or ctx.get("map.method"),
        neighbours=positive_int("neighbours", ctx.get("map.neighbours")),
        force=opts.force,
    )
    return Outcome(
        [
            f"deepsim-map: {written.count} tracks ({written.action} projection, "
            f"coloured by {written.color_by}) written to {written.path}"
        ]
    )


def radio(
    lib: Library,
    args: Sequence[str],
    opts: Any,
    ctx: Context,
    connect: Connect,
    say: Callable[[str], None],
) -> Outcome:
    """``beet deepsim-radio [-n K] [-w QUERY] [QUERY]``: follow MPD until Ctrl-C.

    Lines are given to ``say`` as they happen (the run lasts until Ctrl-C);
    the returned outcome holds the last one.
    """
    from beets.util.units import human_seconds_short

    from deepsim.radio import Radio
    from deepsim.similar import find_similar

    seeds = list(lib.items(list(args))) if args else []
    if args and not seeds:
        raise DeepsimError(f"no tracks match query {' '.join(args)!r}")
    fold = version_folder(lib, ctx, keep=opts.keep_duplicates)
    left_out = outlier_ids(lib, ctx, wanted=opts.no_outliers)

    def search(seed_items: Sequence[Item], count: int, exclude: set[int]) -> list[Item]:
        return find_similar(
            lib,
            seed_items,
            model_id=ctx.model_id,
            index_dir=ctx.state_dir,
            count=count,
            where=opts.where,
            exclude_ids=exclude | left_out,
            fold=fold,
            max_per_artist=int(ctx.get("max_per_artist")),
            max_per_album=int(ctx.get("max_per_album")),
        ).items

    mpd = connect()
    try:
        station = Radio(
            lib,
            mpd,
            search,
            seeds=seeds,
            ahead=positive_int("ahead", opts.ahead or ctx.get("radio.ahead")),
            batch=positive_int("batch", ctx.get("radio.batch")),
            history=positive_int("history", ctx.get("radio.history")),
            avoid_seconds=float(ctx.get("radio.avoid")),
        )
    except DeepsimError:
        mpd.close()
        raise
    last_wait = ""

    def report(step: RadioStep) -> None:
        nonlocal last_wait
        if step.added:
            last_wait = ""
            after = ", ".join(s.evaluate_template("$artist - $title") for s in step.seeds)
            say(f"deepsim-radio: queued {len(step.added)} track(s) like {after}:")
            for item in step.added:
                say(f"  {format(item)}")
        elif step.waiting != last_wait:
            last_wait = step.waiting
            say(f"deepsim-radio: waiting: {step.waiting}")

    say(f"deepsim-radio: following MPD at {mpd.where} (Ctrl-C to stop)")
    started = time.monotonic()
    try:
        station.run(interval=float(ctx.get("radio.interval")), report=report)
    except KeyboardInterrupt:
        pass
    finally:
        mpd.close()
    return Outcome(
        [
            f"deepsim-radio: stopped; queued {station.added_total} track(s) in "
            f"{human_seconds_short(time.monotonic() - started)}"
        ]
    )
