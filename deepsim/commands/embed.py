"""``deepsim-embed``, the import hook's embedding, and ``deepsim-index``.

Embedding goes through the library's one routine
(:func:`deepsim.embed.plan_embedding` + :func:`deepsim.embed.embed_items`)
under the embedding lock (:mod:`deepsim.lock`); this module adds what the
commands say about it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from deepsim import store
from deepsim.commands import Context, Outcome, expand, query_ids
from deepsim.errors import DeepsimError
from deepsim.util import get_logger

if TYPE_CHECKING:
    from beets.library import Library

    from deepsim.embed import EmbedPlan, EmbedSummary
    from deepsim.index import RefreshResult
    from deepsim.models.base import Model

log = get_logger(__name__)

#: ``(done, total, tracks per second)`` after each track embedded from audio.
Progress = Callable[[int, int, "float | None"], None]


def load_active_model(ctx: Context) -> Model:
    """The active model on the configured ``device`` and ``precision`` (imports torch)."""
    from deepsim.models import load_model
    from deepsim.util import resolve_device

    device = resolve_device(ctx.get("device"))
    model = load_model(ctx.model_name, device=device, precision=ctx.get("precision"))
    log.debug("model %s on %s", model.model_id, device)
    return model


def workers(ctx: Context) -> int:
    """Decoding processes: the ``workers`` key (``auto``: :func:`deepsim.embed.default_workers`)."""
    value = ctx.get("workers")
    if value == "auto":
        from deepsim.embed import default_workers

        return default_workers()
    return int(value)


def kept_models(ctx: Context) -> set[str]:
    """The active model and, for a trained head, its backbone (no torch)."""
    from deepsim.models import BUILTIN_MODELS
    from deepsim.models.checkpoint import read_metadata

    keep = {ctx.model_id}
    if ctx.model_name not in BUILTIN_MODELS:
        config = read_metadata(expand(ctx.model_name))["config"]
        if config.get("backbone_id"):
            keep.add(str(config["backbone_id"]))
    return keep


def top_tags(names: Sequence[str], probs: Any, per_group: int = 3) -> str:
    """Top tags per vocabulary (``msd:``/``mtt:`` prefixes), as ``"a, b, c"``."""
    groups: dict[str, list[tuple[float, str]]] = {}
    for name, prob in zip(names, probs, strict=True):
        prefix = name.split(":", 1)[0] if ":" in name else ""
        groups.setdefault(prefix, []).append((float(prob), name))
    best: list[str] = []
    for entries in groups.values():
        entries.sort(reverse=True)
        best.extend(name for _, name in entries[:per_group])
    return ", ".join(best)


def rate(value: float) -> str:
    """A rate with two significant digits below 10 (``0.04``, ``3.1``), whole above."""
    return f"{value:.2g}" if value < 10 else f"{value:.0f}"


def plan_notes(plan: EmbedPlan) -> str:
    """``; 2 with changed audio, 1 missing on disk`` (empty when there is nothing to note)."""
    notes = []
    if plan.stale:
        notes.append(f"{plan.stale} with changed audio")
    if plan.missing:
        notes.append(f"{len(plan.missing)} missing on disk")
    if plan.failed_before:
        notes.append(f"{plan.failed_before} failed before (--retry-failed)")
    return f"; {', '.join(notes)}" if notes else ""


def embed(
    lib: Library,
    args: Sequence[str],
    opts: Any,
    ctx: Context,
    *,
    say: Callable[[str], None],
    on_progress: Progress | None = None,
) -> Outcome:
    """``beet deepsim-embed [-f] [-p] [--retry-failed] [--prune] [QUERY]``.

    ``say`` prints, at once, that the run waits for another one holding the lock.
    """
    from deepsim.embed import plan_embedding
    from deepsim.lock import EMBED_LOCK, hold

    ids = query_ids(lib, args)
    if ids is not None and not ids:
        raise DeepsimError(f"no tracks match query {' '.join(args)!r}")

    def waiting(holder: str) -> None:
        say(
            f"deepsim-embed: another deepsim-embed is running ({holder or 'no pid'}); "
            "waiting for it, then doing what it left"
        )

    outcome = Outcome()
    with hold(ctx.state_dir / EMBED_LOCK, on_wait=waiting, label="deepsim-embed"):
        if opts.prune:
            outcome = prune(lib, ctx, pretend=opts.pretend)
        plan = plan_embedding(
            lib, ctx.model_id, ids, force=opts.force, retry_failed=opts.retry_failed
        )
        if opts.pretend:
            outcome.lines.extend(format(i) for i in store.items_by_ids(lib, plan.todo).values())
            outcome.lines.append(
                f"deepsim-embed: would embed {len(plan.todo)} track(s) with "
                f"{ctx.model_id}; {plan.done} already have a vector{plan_notes(plan)}"
            )
            return outcome
        if not plan.todo:
            run_plan(lib, plan, ctx)  # records new identities of retagged files
            outcome.lines.append(
                f"deepsim-embed: nothing to do: all {plan.done} matching tracks already "
                f"have a current {ctx.model_id} vector{plan_notes(plan)} (-f recomputes them)"
            )
            return outcome
        summary = run_plan(lib, plan, ctx, force=opts.force, on_progress=on_progress)
    done = report(summary)
    done.lines[:0] = outcome.lines
    done.vectors_changed = True
    return done


def prune(lib: Library, ctx: Context, *, pretend: bool) -> Outcome:
    """``--prune``: remove (``pretend``: count) the vectors of models no longer wanted."""
    keep = kept_models(ctx)
    if pretend:
        counts = {m: n for m, n in store.model_counts(lib).items() if m not in keep}
    else:
        counts = dict(store.prune(lib, keep))
    outcome = Outcome(vectors_changed=bool(counts) and not pretend)
    verb = "would remove" if pretend else "removed"
    if not counts:
        outcome.lines.append(
            f"deepsim-embed: no vectors of other models than {', '.join(sorted(keep))}"
        )
    for model, count in sorted(counts.items()):
        outcome.lines.append(f"deepsim-embed: {verb} {count} {model} vector(s)")
    return outcome


def run_plan(
    lib: Library,
    plan: EmbedPlan,
    ctx: Context,
    *,
    force: bool = False,
    on_progress: Progress | None = None,
) -> EmbedSummary:
    """:func:`deepsim.embed.embed_items` with the settings' workers, batch sizes and tags."""
    from deepsim.embed import embed_items
    from deepsim.models import BUILTIN_MODELS

    frontend = None
    if plan.todo and ctx.model_name in BUILTIN_MODELS:
        from deepsim.frontend import FrontendParams

        frontend = FrontendParams()  # a built-in's, known before loading: decoding starts first
    return embed_items(
        lib,
        plan,
        lambda: load_active_model(ctx),
        force=force,
        workers=workers(ctx),
        frontend=frontend,
        batch_size=int(ctx.get("batch_size")),
        commit_every=int(ctx.get("commit_every")),
        tag_text=top_tags if ctx.get("store_tags") else None,
        on_progress=on_progress,
    )


def embed_ids(
    lib: Library, ids: Sequence[int], ctx: Context, *, on_progress: Progress | None = None
) -> Outcome:
    """Embed what these items need (after an import, after training), reported as the
    command reports; the caller holds the embedding lock or needs none."""
    from deepsim.embed import plan_embedding

    plan = plan_embedding(lib, ctx.model_id, ids)
    if not plan.todo:
        return Outcome()
    done = report(run_plan(lib, plan, ctx, on_progress=on_progress))
    done.vectors_changed = True
    return done


def embed_imported(
    lib: Library, ids: Sequence[int], ctx: Context, *, on_progress: Progress | None = None
) -> Outcome:
    """The import hook: embed the imported tracks unless another embedding runs."""
    from deepsim.lock import EMBED_LOCK, Busy, hold

    try:
        with hold(ctx.state_dir / EMBED_LOCK, wait=False, label="import auto-embed"):
            log.info("embedding %d imported track(s)", len(ids))
            return embed_ids(lib, ids, ctx, on_progress=on_progress)
    except Busy as exc:
        log.warning(
            "another deepsim-embed is running (%s); the %d imported track(s) are left "
            "for the next `beet deepsim-embed`",
            exc.holder or "no pid",
            len(ids),
        )
        return Outcome()


def report(summary: EmbedSummary) -> Outcome:
    """The summary line, one line per failure reason, and the error if any."""
    plan = summary.plan
    speed = f", {rate(summary.rate)} tracks/s" if summary.rate is not None else ""
    stored = f", {summary.from_stored} from stored vectors" if summary.from_stored else ""
    outcome = Outcome(
        [
            f"deepsim-embed: embedded {summary.embedded}{stored}, skipped {plan.done} "
            f"(already embedded), failed {len(summary.failures)}{plan_notes(plan)} "
            f"— {summary.model_id}{speed}"
        ]
    )
    for reason, count in Counter(r for _, _, r in summary.failures).most_common():
        outcome.lines.append(f"  {count} × {reason}")
    if summary.interrupted:
        outcome.error = (
            f"interrupted; {summary.embedded + summary.from_stored} vector(s) "
            f"saved, {summary.remaining} left — run `beet deepsim-embed` again to resume"
        )
    elif summary.failures:
        outcome.error = (
            f"{len(summary.failures)} track(s) could not be embedded (see "
            "above); they are not tried again until their file changes (--retry-failed)"
        )
    return outcome


def refresh(lib: Library, ctx: Context, *, force: bool = False) -> RefreshResult | None:
    """Bring the active model's index up to date (no torch); None when it could not be written."""
    from deepsim.index import refresh_index

    try:
        result = refresh_index(
            lib,
            ctx.model_id,
            ctx.state_dir,
            force=force,
            exact_below=ctx.get("index.exact_below"),
            n_trees=ctx.get("index.n_trees"),
        )
    except DeepsimError as exc:
        log.warning("index not updated: %s", exc)
        return None
    if result.action == "built":
        log.info("index of %d vectors built in %.1f s", result.count, result.seconds)
    elif result.action == "updated":
        log.debug("index updated in %.2f s: %s", result.seconds, result.reason)
    return result


def index(lib: Library, ctx: Context, *, force: bool = False) -> Outcome:
    """``beet deepsim-index [-f]``."""
    result = refresh(lib, ctx, force=force)
    if result is None:
        raise DeepsimError("the index could not be written (see above)")
    model_id = ctx.model_id
    messages = {
        "fresh": f"the {model_id} index of {result.count} vectors is up to date",
        "built": f"built the {model_id} index of {result.count} vectors in {result.seconds:.1f} s",
        "updated": f"the {model_id} index of {result.count} vectors is up to date "
        f"({result.changed} changed vectors searched exactly beside it)",
        "small": f"{result.count} vectors: small enough for exact search, no index kept",
        "empty": f"no {model_id} vectors yet; run `beet deepsim-embed`",
    }
    return Outcome([f"deepsim-index: {messages[result.action]}"])
