"""``beet similar``: the seeds of a query, the search, what is said about it, where results go.

Tracks (:func:`deepsim.similar.find_similar`, one list per seed with
``--each``), albums (``-a``, :func:`deepsim.similar.find_similar_albums`) or a
path to other tracks (``--to``, :func:`deepsim.paths.find_path`); printed in a
beets format, written as a playlist (``-o``) or queued in MPD (``--mpd``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from deepsim import store
from deepsim.commands import (
    Context,
    Outcome,
    caps,
    expand,
    outlier_ids,
    result_format,
    seed_items,
    version_folder,
)
from deepsim.errors import DeepsimError
from deepsim.util import get_logger

if TYPE_CHECKING:
    from beets.library import Item, Library

    from deepsim.radio import Mpd
    from deepsim.similar import SimilarResult

log = get_logger(__name__)

#: Connects to MPD as beets' ``mpd:`` section says (the plugin reads that section).
Connect = Callable[[], "Mpd"]


def similar(
    lib: Library, args: Sequence[str], opts: Any, ctx: Context, connect: Connect
) -> Outcome:
    """``beet similar [options] QUERY`` (``opts``: the command's options)."""
    if not args:
        raise DeepsimError(
            "which tracks? give a beets query for the seed track(s), "
            "e.g. `beet similar title:Blue` (or -a and an album query; see beet similar -h)"
        )
    if opts.each and opts.output:
        raise DeepsimError("--each prints one list per seed; it cannot write -o/--output")
    if opts.album:
        return _albums(lib, args, opts, ctx)
    from deepsim.similar import find_similar, find_similar_each

    seeds = seed_items(lib, args)
    options = search_options(opts, ctx)
    if opts.mpd and (opts.output or opts.each):
        raise DeepsimError("--mpd queues one list; it cannot go with -o or --each")
    options["fold"] = version_folder(lib, ctx, keep=opts.keep_duplicates)
    options["exclude_ids"] = outlier_ids(lib, ctx, wanted=opts.no_outliers)
    if opts.to is not None:
        return _path(lib, opts, seeds, options, ctx, connect)
    if opts.each:
        results = find_similar_each(lib, seeds, **options)
    else:
        results = [find_similar(lib, seeds, **options)]
    _say_about_seeds(ctx, seeds, results, each=opts.each)
    _say_left_out(results)
    outcome = Outcome()
    for result in results:
        log.debug(
            "%s search (%s index: %s)", result.backend, result.index_state, result.index_reason
        )
        if result.index_state in ("stale", "corrupt", "missing"):
            outcome.vectors_changed = True  # rebuilt once this command is done
    if not any(result.items for result in results):
        raise DeepsimError(
            "no track passes the filters"
            if opts.where or options["max_per_artist"] or options["max_per_album"]
            else f"no other track has a usable {ctx.model_id} vector yet"
        )
    if opts.output or opts.mpd:
        _deliver(results[0].items, opts, ctx, connect, outcome)
        return outcome
    fmt = result_format(ctx, opts.format, album=False)
    for result in results:
        if opts.each and result.seeds:
            seed = result.seeds[0]
            outcome.lines.append(f"== {seed.evaluate_template('$artist - $album - $title')}")
        outcome.lines.extend(format(item, fmt) for item in result.items)
    return outcome


def search_options(opts: Any, ctx: Context) -> dict[str, Any]:
    """The keyword arguments of :func:`deepsim.similar.find_similar` from options and keys."""
    from deepsim.settings import positive_int

    count = positive_int("count", ctx.option_or(opts.count, "count"))
    return {
        "model_id": ctx.model_id,
        "index_dir": ctx.state_dir,
        "count": count,
        "exclude_seeds": not opts.include_seeds,
        "where": opts.where,
        "backend": "exact" if opts.exact else "auto",
        "exact_below": ctx.get("index.exact_below"),
        "query_scale": query_scale(ctx, opts.taste_weight),
        **caps(ctx, opts),
    }


def query_scale(ctx: Context, option: float | None) -> Any:
    """Query factors for another taste weight (``--taste-weight``, else the key)."""
    from deepsim.taste import layout_of
    from deepsim.taste import query_scale as scale

    weight = ctx.option_or(option, "taste_weight")
    if weight is None:
        return None
    try:
        layout = layout_of(ctx.model_name)
        if layout is not None:
            return None if weight == layout.weight else scale(layout, weight)
    except DeepsimError as exc:
        raise DeepsimError(f"deepsim.taste_weight: {exc}") from exc
    if option is None:  # a config default does not apply to sound-only models
        return None
    raise DeepsimError(
        "--taste-weight needs a model trained by `beet deepsim-train`; "
        f"{ctx.model_id} has sound vectors only"
    )


def _say_about_seeds(
    ctx: Context, seeds: Sequence[Item], results: Sequence[SimilarResult], *, each: bool
) -> None:
    """Lines on the seeds that cannot be used, with their real reason, and on the mean."""
    n = len(seeds)
    noun = "track has" if n == 1 else "tracks have"
    missing = [s for r in results for s in r.missing]
    stale_seeds = [(s, why) for r in results for s, why in r.stale]
    # a seed whose new audio failed to embed: its real reason, not "run deepsim-embed"
    failed = [s for s in missing if s.get(store.FAILED_FIELD)]
    failed += [s for s, why in stale_seeds if why == "changed" and s.get(store.FAILED_FIELD)]
    not_yet = len(missing) - len([s for s in failed if s in missing])
    stale = [why for s, why in stale_seeds if s not in failed]
    lines = [
        f"seed {os.fsdecode(s.path)} could not be embedded: "
        + str(s.get(store.FAILED_FIELD)).split(":", 2)[-1]
        for s in failed
    ]
    if not_yet:
        lines.append(
            f"{not_yet} of {n} seed {noun} no {ctx.model_id} vector yet; run `beet deepsim-embed`"
        )
    if stale.count("changed"):
        lines.append(
            f"{stale.count('changed')} of {n} seed {noun} changed audio since embedding; "
            "run `beet deepsim-embed`"
        )
    if stale.count("missing"):
        lines.append(f"{stale.count('missing')} of {n} seed {noun} no file on disk")
    used = sum(len(r.seeds) for r in results)
    if lines and used == 0:
        raise DeepsimError("; ".join(lines))
    for line in lines:
        log.warning("%s", line)
    if not each and used > 1:
        log.info("the mean of %d seed tracks is the query (--each: one list per seed)", used)


def _say_left_out(results: Sequence[SimilarResult]) -> None:
    missing = sum(r.left_out.get("missing", 0) for r in results)
    changed = sum(r.left_out.get("changed", 0) for r in results)
    if missing:
        log.warning("%d track(s) left out: file missing on disk", missing)
    if changed:
        log.warning(
            "%d track(s) left out: audio changed since embedding; run `beet deepsim-embed`",
            changed,
        )


def _albums(lib: Library, args: Sequence[str], opts: Any, ctx: Context) -> Outcome:
    from deepsim.similar import find_similar_albums

    seeds = list(lib.albums(list(args)))
    if not seeds:
        raise DeepsimError(f"no albums match query {' '.join(args)!r}")
    options = search_options(opts, ctx)
    result = find_similar_albums(
        lib,
        seeds,
        model_id=ctx.model_id,
        count=options["count"],
        exclude_seeds=options["exclude_seeds"],
        where=opts.where,
    )
    if not result.seeds:
        raise DeepsimError(
            f"no track of the matched album(s) has a usable {ctx.model_id} "
            "vector; run `beet deepsim-embed`"
        )
    if len(result.seeds) > 1:
        log.info("the mean of %d seed albums is the query", len(result.seeds))
    if result.left_out:
        log.warning("%d album(s) left out: files missing on disk", result.left_out)
    if not result.albums:
        raise DeepsimError("no other album has a usable vector")
    outcome = Outcome()
    if opts.output:
        tracks = [item for album in result.albums for item in album.items()]
        outcome.lines.append(write_playlist(tracks, opts, ctx))
        return outcome
    fmt = result_format(ctx, opts.format, album=True)
    outcome.lines.extend(format(album, fmt) for album in result.albums)
    return outcome


def _path(
    lib: Library,
    opts: Any,
    seeds: list[Item],
    options: dict[str, Any],
    ctx: Context,
    connect: Connect,
) -> Outcome:
    """``--to QUERY``: a path of tracks leading from the seeds to QUERY's tracks."""
    from deepsim.paths import find_path

    if opts.each:
        raise DeepsimError("--to makes one path; it cannot go with --each")
    seed_ids = {s.id for s in seeds}
    targets = [t for t in seed_items(lib, opts.to, "--to query") if t.id not in seed_ids]
    if not targets:
        raise DeepsimError("the --to tracks are all seeds too")
    path = find_path(
        lib,
        seeds,
        targets,
        model_id=ctx.model_id,
        count=options["count"],
        where=options["where"],
        max_per_artist=options["max_per_artist"],
        max_per_album=options["max_per_album"],
        exclude_ids=options["exclude_ids"],
        fold=options["fold"],
    )
    if path.missing:
        log.warning(
            "%d seed/target track(s) have no %s vector yet; run `beet deepsim-embed`",
            len(path.missing),
            ctx.model_id,
        )
    if path.exhausted:
        log.warning("only %d track(s) between the ends pass the filters", len(path.steps) - 2)
    outcome = Outcome()
    if opts.output or opts.mpd:
        _deliver(path.items, opts, ctx, connect, outcome)
        return outcome
    fmt = opts.format or ctx.get("format") or ctx.item_format
    outcome.lines.extend(path.lines(fmt, verbose=opts.verbose))
    return outcome


def _deliver(
    items: Sequence[Item], opts: Any, ctx: Context, connect: Connect, outcome: Outcome
) -> None:
    """``-o``: a playlist; ``--mpd``: MPD's queue."""
    if opts.output:
        outcome.lines.append(write_playlist(items, opts, ctx))
        return
    mpd = connect()
    try:
        result = mpd.enqueue(items)
    finally:
        mpd.close()
    for item, reason in result.skipped:
        log.warning("not queued: %s (%s)", item.filepath, reason)
    outcome.lines.append(
        f"similar: added {len(result.added)} track(s) to MPD's queue at {mpd.where}"
        + (f"; {len(result.skipped)} skipped" if result.skipped else "")
    )
    if not result.added:
        outcome.error = "no track could be queued"


def write_playlist(items: Sequence[Item], opts: Any, ctx: Context) -> str:
    """Write ``-o FILE`` (``--extm3u``, ``--relative``/``--absolute``); the line saying so.

    Tracks whose file is missing on disk are left out (one warning).
    """
    from deepsim.playlist import present
    from deepsim.playlist import write_playlist as write

    relative = bool(ctx.option_or(opts.relative, "relative"))
    kept, gone = present(items)
    if gone:
        log.warning("%d track(s) left out of the playlist: file missing on disk", gone)
    written = write(
        expand(opts.output), kept, format="extm3u" if opts.extm3u else "m3u", relative=relative
    )
    return f"similar: wrote {len(kept)} track(s) to {written}"
