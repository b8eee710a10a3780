"""``deepsim-train`` and ``recommend``: the commands that read listening data."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from deepsim.commands import Context, Outcome, caps, expand, result_format, version_folder
from deepsim.errors import DeepsimError
from deepsim.settings import positive_int
from deepsim.util import get_logger

if TYPE_CHECKING:
    from beets.library import Library

    from deepsim.listening import Listens
    from deepsim.train import TrainConfig

log = get_logger(__name__)


def _as_list(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def read_sources(
    lib: Library,
    *,
    listens: Sequence[str] = (),
    format: str = "auto",
    song_table: str | None = None,
    playlists: Sequence[str] = (),
    library: bool = False,
) -> Listens:
    """Listening files, playlists and the library's play counts, merged into one."""
    from deepsim.listening import read_library, read_listens

    sources = []
    if listens:
        table = song_table and expand(song_table)
        sources.append(read_listens([expand(p) for p in listens], format=format, song_table=table))
    if playlists or library:
        sources.append(read_library(lib, playlist_paths=[expand(p) for p in playlists]))
    merged = sources[0]
    for other in sources[1:]:
        merged = merged.merge(other)
    return merged


def train_config(opts: Any, ctx: Context) -> TrainConfig:
    """:class:`deepsim.train.TrainConfig` from the options, else the ``train`` keys."""
    from deepsim.embed import default_workers
    from deepsim.train import TrainConfig
    from deepsim.util import resolve_device

    def pick(option: Any, key: str) -> Any:
        return ctx.option_or(option, f"train.{key}")

    workers = ctx.get("workers")
    return TrainConfig(
        backbone=ctx.get("train.backbone"),
        min_plays=pick(opts.min_plays, "min_plays"),
        min_tracks=positive_int("min_tracks", ctx.get("train.min_tracks")),
        factors=positive_int("factors", pick(opts.factors, "factors")),
        alpha=ctx.get("train.alpha"),
        epsilon=ctx.get("train.epsilon"),
        regularization=ctx.get("train.regularization"),
        iterations=ctx.get("train.iterations"),
        heldout=pick(opts.heldout, "heldout"),
        head=pick(opts.head, "head"),
        taste_weight=pick(opts.taste_weight, "taste_weight"),
        epochs=positive_int("epochs", pick(opts.epochs, "epochs")),
        finetune=opts.finetune,
        activate=True if opts.activate else None,
        device=resolve_device(ctx.get("device")),
        threads=ctx.get("train.threads"),
        workers=default_workers() if workers == "auto" else int(workers),
        embed_batch_size=positive_int("batch_size", ctx.get("batch_size")),
    )


def train(
    lib: Library,
    opts: Any,
    ctx: Context,
    *,
    activated: Callable[[], None],
    on_progress: Callable[[int, int, float | None], None] | None = None,
) -> Outcome:
    """``beet deepsim-train``: read, train, activate if it earns it, re-embed the library.

    ``activated`` is called when the new model became the active one (the
    plugin forgets the model it had resolved).
    """
    from deepsim.commands.embed import embed_ids
    from deepsim.train import reembed_from_store, run_training

    listens_paths = opts.listens or _as_list(ctx.get("train.listens"))
    playlists = opts.playlists or _as_list(ctx.get("train.playlists"))
    use_library = opts.library or bool(ctx.get("train.library"))
    if not (listens_paths or playlists or use_library):
        raise DeepsimError(
            "no listening data; give --listens FILE, --playlist PATH or "
            "--library (or set deepsim.train.listens)"
        )
    listens = read_sources(
        lib,
        listens=listens_paths,
        format=opts.listens_format or ctx.get("train.format"),
        song_table=opts.song_table,
        playlists=playlists,
        library=use_library,
    )
    log.info(
        "%d plays of %d tracks by %d listeners/sessions",
        listens.n_plays,
        listens.n_tracks,
        listens.n_users,
    )
    config = train_config(opts, ctx)
    try:
        report = run_training(lib, listens, config, state_dir=ctx.state_dir)
    except KeyboardInterrupt:
        raise DeepsimError(
            "interrupted; nothing was saved and the previous model stays active"
        ) from None
    outcome = Outcome([report.format_table()])
    if not report.activated:
        outcome.lines.append("deepsim-train: the previous model stays active; nothing re-embedded")
        return outcome
    if ctx.get("model") != "auto":
        outcome.lines.append(
            f"deepsim-train: deepsim.model is {ctx.get('model')!r}, so the new "
            f"model is not used; set it to auto (or to {report.path}) to use it"
        )
        return outcome
    activated()
    if opts.no_embed:
        outcome.lines.append("deepsim-train: run `beet deepsim-embed` to embed the library with it")
        return outcome
    assert report.model is not None  # an activated report holds its model
    todo = reembed_from_store(lib, report.model)
    outcome.vectors_changed = True
    if len(todo):
        log.info("%d track(s) need their audio decoded", len(todo))
        embedded = embed_ids(lib, todo.tolist(), ctx, on_progress=on_progress)
        outcome.lines += embedded.lines
        outcome.error = embedded.error
    else:
        outcome.lines.append(f"deepsim-train: re-embedded the library with {report.model_id}")
    return outcome


def recommend(lib: Library, args: Sequence[str], opts: Any, ctx: Context) -> Outcome:
    """``beet recommend``: tracks one listener will like, never-played ones too."""
    from deepsim.recommend import listener_history
    from deepsim.recommend import recommend as rank

    if args:
        raise DeepsimError("takes no query; use --where to filter the results")
    if not (opts.listens or opts.library):
        raise DeepsimError("give the listener's history with --listens FILE or --library")
    listens = read_sources(
        lib,
        listens=opts.listens or (),
        format=opts.listens_format or ctx.get("train.format"),
        library=opts.library,
    )
    history = listener_history(
        lib, listens, user=opts.user, half_life=ctx.option_or(opts.half_life, "recommend.half_life")
    )
    found = rank(
        lib,
        history,
        model_name=ctx.model_name,
        model_id=ctx.model_id,
        count=positive_int("count", ctx.option_or(opts.count, "count")),
        unplayed=opts.unplayed,
        where=opts.where,
        fold=version_folder(lib, ctx, keep=opts.keep_duplicates),
        **caps(ctx, opts),
    )
    log.info(
        "recommend: %s (%d of %d tracks matched the library); %s",
        history.user,
        history.n_matched,
        history.n_listened,
        found.reason,
    )
    if not found.matches:
        raise DeepsimError("no track passes the filters")
    if opts.output:
        from deepsim.playlist import write_playlist

        written = write_playlist(
            expand(opts.output),
            found.items,
            format="extm3u" if opts.extm3u else "m3u",
            relative=bool(ctx.option_or(opts.relative, "relative")),
        )
        n = len(found.items)
        return Outcome([f"recommend: wrote {n} track(s) to {written} ({found.profile} profile)"])
    fmt = result_format(ctx, opts.format, album=False)
    return Outcome([format(item, fmt) for item in found.items])
