"""Find music that sounds alike, from the audio alone.

Commands: ``deepsim-embed`` (store a vector per track), ``similar`` (nearest
tracks or albums, printed or as a playlist), ``deepsim-index`` (rebuild the
ANN index) and ``deepsim-train`` (learn a collaborative-filtering space from
listening data).  The algorithms live in the :mod:`deepsim` library; this
module reads configuration (checked when the plugin loads), calls one
library function per command and prints.  torch is imported only by the
commands that run a network, never by ``beet similar``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import confuse
from beets import config as beets_config
from beets import ui
from beets.dbcore import types
from beets.exceptions import UserError
from beets.plugins import BeetsPlugin
from beets.util.units import human_seconds_short

from deepsim import settings, store
from deepsim.errors import DeepsimError, ParameterError
from deepsim.util import LOGGER_NAME, check_int

if TYPE_CHECKING:
    from beets.importer import ImportSession, ImportTask
    from beets.library import Item, Library

    from deepsim.embed import EmbedPlan, EmbedSummary
    from deepsim.models.base import Model

#: In-memory result fields of `beet similar` (named so no other plugin types them).
SIMILARITY_FIELD = "deepsim_similarity"
DISTANCE_FIELD = "deepsim_distance"


class EmbedOpts(Protocol):
    force: bool
    pretend: bool
    retry_failed: bool
    prune: bool


class SimilarOpts(Protocol):
    count: int | None
    format: str | None
    output: str | None
    extm3u: bool
    relative: bool | None
    each: bool
    include_seeds: bool
    max_per_artist: int | None
    max_per_album: int | None
    where: list[str] | None
    exact: bool
    taste_weight: float | None
    to: str | None
    verbose: bool
    keep_duplicates: bool
    no_outliers: bool
    mpd: bool
    album: bool


class IndexOpts(Protocol):
    force: bool


class TrainOpts(Protocol):
    listens: list[str] | None
    listens_format: str | None
    song_table: str | None
    playlists: list[str] | None
    library: bool
    min_plays: float | None
    factors: int | None
    epochs: int | None
    heldout: float | None
    finetune: bool
    no_embed: bool
    activate: bool
    head: str | None
    taste_weight: float | None


def _top_tags(names: Sequence[str], probs: Any, per_group: int = 3) -> str:
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


class _ToBeetsLog(logging.Handler):
    """Routes the library's ``deepsim`` logger into the plugin's beets logger."""

    def __init__(self, log: Any) -> None:
        super().__init__(logging.DEBUG)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        self.log.log(record.levelno, "{}", record.getMessage())


class DeepsimPlugin(BeetsPlugin):
    def __init__(self) -> None:
        super().__init__()
        self.config.add(settings.DEFAULTS)
        try:
            settings.check(self.config.flatten())
        except (ParameterError, confuse.ConfigError) as exc:
            # Raised here, an exception would only disable the plugin (beets logs
            # it with a traceback and goes on): one line, and stop.
            self._log.error("{}", exc)
            raise SystemExit(1) from None
        self.item_types = {
            store.VECTOR_FIELD: store.VectorType(),
            # set in memory on the results of `beet similar`
            SIMILARITY_FIELD: types.Float(3),
            DISTANCE_FIELD: types.Float(3),
        }
        self.album_types = {SIMILARITY_FIELD: types.Float(3), DISTANCE_FIELD: types.Float(3)}
        library_log = logging.getLogger(LOGGER_NAME)
        for handler in [h for h in library_log.handlers if isinstance(h, _ToBeetsLog)]:
            library_log.removeHandler(handler)
        library_log.addHandler(_ToBeetsLog(self._log))
        library_log.setLevel(logging.DEBUG)
        library_log.propagate = False
        self._vectors_changed = False
        self._imported_ids: list[int] = []
        if self.config["auto"].get(bool):
            self.register_listener("import_task_files", self._collect_imported)
            self.register_listener("import", self._embed_imported)
        self.register_listener("item_removed", self._item_removed)
        self.register_listener("cli_exit", self._cli_exit)

    # -- configuration ------------------------------------------------------------

    @cached_property
    def state_dir(self) -> Path:
        """``<beets config dir>/deepsim``: index, trained models, active-model record, lock."""
        return Path(self.config["state_dir"].get(confuse.Filename(in_app_dir=True)))

    @cached_property
    def model_name(self) -> str:
        from deepsim.models import active_model

        name = self.config["model"].as_str()
        try:
            return active_model(os.path.expanduser(name), state_dir=self.state_dir)
        except DeepsimError as exc:
            raise UserError(f"deepsim: model {name!r}: {exc}") from exc

    @cached_property
    def model_id(self) -> str:
        from deepsim.models import model_id

        try:
            return model_id(self.model_name)
        except DeepsimError as exc:
            raise UserError(f"deepsim: {exc}") from exc

    def kept_model_ids(self) -> set[str]:
        """The active model and, for a trained head, its backbone (no torch)."""
        from deepsim.models import BUILTIN_MODELS
        from deepsim.models.checkpoint import read_metadata

        keep = {self.model_id}
        if self.model_name not in BUILTIN_MODELS:
            with_backbone = read_metadata(os.path.expanduser(self.model_name))["config"]
            if with_backbone.get("backbone_id"):
                keep.add(str(with_backbone["backbone_id"]))
        return keep

    def _int(self, key: str, value: Any = None) -> int:
        return int(self.config[key].get() if value is None else value)

    def _positive_int(self, key: str, value: Any = None) -> int:
        value = self.config[key].get() if value is None else value
        try:
            return check_int(key, value, minimum=1)
        except ParameterError:
            raise UserError(f"deepsim: {key} must be a positive integer, got {value!r}") from None

    @property
    def workers(self) -> int:
        value = self.config["workers"].get()
        if value == "auto":
            from deepsim.embed import default_workers

            return default_workers()
        return int(value)

    def load_model(self) -> Model:
        """Load the active model on the configured device (imports torch)."""
        from deepsim.embed import resolve_device
        from deepsim.models import load_model

        device_name = self.config["device"].as_str()
        try:
            device = resolve_device(device_name)
            model = load_model(
                self.model_name, device=device, precision=self.config["precision"].as_str()
            )
        except (DeepsimError, ValueError) as exc:
            raise UserError(f"deepsim: {exc}") from exc
        self._log.debug("model {} on {}", model.model_id, device)
        return model

    # -- commands --------------------------------------------------------------------

    def commands(self) -> list[ui.Subcommand]:
        return [
            self._embed_subcommand(),
            self._similar_subcommand(),
            self._index_subcommand(),
            self._train_subcommand(),
            self._recommend_subcommand(),
            *self._extra_commands(),
        ]

    def _embed_subcommand(self) -> ui.Subcommand:
        embed = ui.Subcommand(
            "deepsim-embed", help="compute and store a similarity vector per track"
        )
        p = embed.parser
        p.add_option(
            "-f",
            "--force",
            action="store_true",
            default=False,
            help="recompute vectors that are current too",
        )
        p.add_option(
            "-p",
            "--pretend",
            action="store_true",
            default=False,
            help="list the tracks that would be embedded, and do nothing",
        )
        p.add_option(
            "--retry-failed",
            action="store_true",
            default=False,
            help="try again the unchanged files that failed before",
        )
        p.add_option(
            "--prune",
            action="store_true",
            default=False,
            help="remove the vectors of models other than the active one (and its backbone)",
        )
        p.usage = "%prog [options] [QUERY]\nExample: %prog -f 'album:Blue Train'"
        embed.func = self.embed_command
        return embed

    def _similar_subcommand(self) -> ui.Subcommand:
        similar = ui.Subcommand(
            "similar", help="list the tracks (or albums) that sound most like the matched ones"
        )
        p = similar.parser
        p.add_option(
            "-c",
            "--count",
            type="int",
            metavar="N",
            help=f"how many tracks or albums (default: {self.config['count'].get()})",
        )
        p.add_album_option()
        p.add_format_option(target="item")
        p.add_option(
            "-o",
            "--output",
            metavar="FILE",
            help="write an m3u/m3u8 playlist to FILE instead of printing",
        )
        p.add_option(
            "--extm3u",
            action="store_true",
            default=False,
            help="extended m3u (#EXTM3U, #EXTINF with duration and artist - title)",
        )
        p.add_option(
            "--relative",
            action="store_true",
            default=None,
            help="playlist paths relative to the playlist's directory",
        )
        p.add_option(
            "--absolute",
            dest="relative",
            action="store_false",
            help="absolute playlist paths (the default)",
        )
        p.add_option(
            "--each",
            action="store_true",
            default=False,
            help="one list per matched track instead of one for their mean",
        )
        p.add_option(
            "--include-seeds",
            action="store_true",
            default=False,
            help="allow the matched tracks themselves in the results",
        )
        p.add_option(
            "--max-per-artist",
            type="int",
            metavar="N",
            help="at most N tracks per artist (0: no limit)",
        )
        p.add_option(
            "--max-per-album",
            type="int",
            metavar="N",
            help="at most N tracks per album (0: no limit)",
        )
        p.add_option(
            "-w",
            "--where",
            action="append",
            metavar="QUERY",
            help="only return tracks matching this beets query, e.g. 'format:FLAC' "
            "(repeat: all must match)",
        )
        p.add_option(
            "--exact",
            action="store_true",
            default=False,
            help="exact search over all vectors instead of the ANN index",
        )
        p.add_option(
            "--taste-weight",
            type="float",
            metavar="W",
            help="with a trained model: 0 = sounds alike only, 1 = same listeners only "
            "(default: deepsim.taste_weight, else the weight chosen in training)",
        )
        self._add_similar_extras(p)
        p.usage = (
            "%prog [options] QUERY\n"
            "Examples: %prog 'title:Blue in Green'\n"
            "          %prog -c 30 --extm3u -o ~/like-this.m3u album:'Kind of Blue'\n"
            "          %prog -a 'album:Kind of Blue'"
        )
        similar.func = self.similar_command
        self._similar_parser = p
        return similar

    def _index_subcommand(self) -> ui.Subcommand:
        index = ui.Subcommand("deepsim-index", help="rebuild the similarity index now")
        index.parser.add_option(
            "-f",
            "--force",
            action="store_true",
            default=False,
            help="rebuild even when the index is up to date",
        )
        index.func = self.index_command
        return index

    def _train_subcommand(self) -> ui.Subcommand:
        train = ui.Subcommand(
            "deepsim-train", help="learn a listening-data (CF) space and a model that predicts it"
        )
        p = train.parser
        p.add_option(
            "-l",
            "--listens",
            action="append",
            metavar="PATH",
            help="listening history (repeatable): a file, folder or zip export — Spotify, "
            "Last.fm, Libre.fm, ListenBrainz, Maloja, Koito, Pano Scrobbler, .scrobbler.log, "
            "TIDAL, MSD Taste Profile (see docs/training.md)",
        )
        p.add_option(
            "--listens-format",
            metavar="FORMAT",
            help="auto (default), spotify-extended, spotify-account, lastfm-csv, lastfm-tsv, "
            "lastfm-json, lastfm-backup, lastfm-1k, librefm, listenbrainz, listenbrainz-api, "
            "maloja, koito, pano-scrobbler, scrobbler-log, tidal, taste-profile",
        )
        p.add_option(
            "--song-table",
            metavar="FILE",
            help="MSD Taste Profile: the song names (unique_tracks.txt, or song_id TAB artist "
            "TAB title)",
        )
        p.add_option(
            "--playlist",
            dest="playlists",
            action="append",
            metavar="PATH",
            help="m3u playlist file or directory of them; each playlist is a listener",
        )
        p.add_option(
            "--library",
            action="store_true",
            default=False,
            help="also use play counts stored in the library (mpdstats, lastimport...)",
        )
        p.add_option(
            "--min-plays",
            type="float",
            metavar="N",
            help="fewest plays for a track to be a training target",
        )
        p.add_option("--factors", type="int", metavar="N", help="WMF dimensions")
        p.add_option("--epochs", type="int", metavar="N", help="most training epochs")
        p.add_option(
            "--heldout",
            type="float",
            metavar="F",
            help="share of tracks held out for evaluation (default 0.2)",
        )
        p.add_option(
            "--finetune",
            action="store_true",
            default=False,
            help="also train the backbone network (slow without a GPU)",
        )
        p.add_option(
            "--no-embed",
            action="store_true",
            default=False,
            help="do not re-embed the library with the new model",
        )
        p.add_option("--head", metavar="KIND", help="auto (default), ridge or mlp")
        p.add_option(
            "--taste-weight",
            type="float",
            metavar="W",
            help="weight of predicted taste in the model's vectors (default: chosen on "
            "the held-out tracks)",
        )
        p.add_option(
            "--activate",
            action="store_true",
            default=False,
            help="make the new model active even if it does not beat the untrained one",
        )
        p.usage = "%prog [options]\nExample: %prog --listens ~/scrobbles.csv --playlist ~/Playlists"
        train.func = self.train_command
        return train

    # -- deepsim-embed ------------------------------------------------------------------

    @property
    def lock_path(self) -> Path:
        from deepsim.lock import EMBED_LOCK

        return self.state_dir / EMBED_LOCK

    def embed_command(self, lib: Library, opts: EmbedOpts, args: list[str]) -> None:
        from deepsim.embed import plan_embedding
        from deepsim.lock import hold

        ids = _query_ids(lib, args)
        if ids is not None and not ids:
            raise UserError(f"deepsim-embed: no tracks match query {' '.join(args)!r}")

        def waiting(holder: str) -> None:
            ui.print_(
                f"deepsim-embed: another deepsim-embed is running ({holder or 'no pid'}); "
                "waiting for it, then doing what it left"
            )

        with hold(self.lock_path, on_wait=waiting, label="deepsim-embed"):
            if opts.prune:
                self._prune(lib, pretend=opts.pretend)
            plan = plan_embedding(
                lib, self.model_id, ids, force=opts.force, retry_failed=opts.retry_failed
            )
            if opts.pretend:
                for item in store.items_by_ids(lib, plan.todo).values():
                    ui.print_(format(item))
                ui.print_(
                    f"deepsim-embed: would embed {len(plan.todo)} track(s) with "
                    f"{self.model_id}; {plan.done} already have a vector{_plan_notes(plan)}"
                )
                return
            if not plan.todo:
                self._run_plan(lib, plan)  # records new identities of retagged files
                ui.print_(
                    f"deepsim-embed: nothing to do: all {plan.done} matching tracks already "
                    f"have a current {self.model_id} vector{_plan_notes(plan)} "
                    "(-f recomputes them)"
                )
                return
            summary = self._run_plan(lib, plan, force=opts.force, progress=True)
        self._report(summary)

    def _prune(self, lib: Library, *, pretend: bool) -> None:
        keep = self.kept_model_ids()
        if pretend:
            counts = {m: n for m, n in store.model_counts(lib).items() if m not in keep}
        else:
            counts = dict(store.prune(lib, keep))
            self._vectors_changed = self._vectors_changed or bool(counts)
        verb = "would remove" if pretend else "removed"
        if not counts:
            ui.print_(f"deepsim-embed: no vectors of other models than {', '.join(sorted(keep))}")
        for model, count in sorted(counts.items()):
            ui.print_(f"deepsim-embed: {verb} {count} {model} vector(s)")

    def _run_plan(
        self, lib: Library, plan: EmbedPlan, *, force: bool = False, progress: bool = False
    ) -> EmbedSummary:
        from deepsim.embed import embed_items

        reporter = _Progress(len(plan.todo), self._log, enabled=progress)
        try:
            summary = embed_items(
                lib,
                plan,
                self.load_model,
                force=force,
                workers=self.workers,
                batch_size=self._int("batch_size"),
                commit_every=self._int("commit_every"),
                tag_text=_top_tags if self.config["store_tags"].get(bool) else None,
                on_progress=reporter.advance,
            )
        finally:
            reporter.close()
        if plan.todo:
            self._vectors_changed = True
        return summary

    def _embed(self, lib: Library, ids: Sequence[int], *, progress: bool = True) -> None:
        """Embed what these items need (import hook, training), reporting as the command does."""
        from deepsim.embed import plan_embedding

        plan = plan_embedding(lib, self.model_id, ids)
        if plan.todo:
            self._report(self._run_plan(lib, plan, progress=progress))

    def _report(self, summary: EmbedSummary) -> None:
        plan = summary.plan
        rate = f", {_rate(summary.rate)} tracks/s" if summary.rate is not None else ""
        stored = f", {summary.from_stored} from stored vectors" if summary.from_stored else ""
        ui.print_(
            f"deepsim-embed: embedded {summary.embedded}{stored}, skipped {plan.done} "
            f"(already embedded), failed {len(summary.failures)}{_plan_notes(plan)} "
            f"— {summary.model_id}{rate}"
        )
        for reason, count in Counter(r for _, _, r in summary.failures).most_common():
            ui.print_(f"  {count} × {reason}")
        if summary.interrupted:
            raise UserError(
                f"deepsim-embed: interrupted; {summary.embedded + summary.from_stored} vector(s) "
                f"saved, {summary.remaining} left — run `beet deepsim-embed` again to resume"
            )
        if summary.failures:
            raise UserError(
                f"deepsim-embed: {len(summary.failures)} track(s) could not be embedded (see "
                "above); they are not tried again until their file changes (--retry-failed)"
            )

    # -- events ------------------------------------------------------------------------

    def _collect_imported(self, session: ImportSession, task: ImportTask) -> None:
        self._imported_ids.extend(item.id for item in task.imported_items() if item.id)

    def _embed_imported(self, lib: Library, paths: Sequence[bytes]) -> None:
        from deepsim.lock import Busy, hold

        if not self._imported_ids:
            return
        wanted = sorted(set(self._imported_ids))
        self._imported_ids.clear()
        try:
            with hold(self.lock_path, wait=False, label="import auto-embed"):
                self._log.info("embedding {} imported track(s)", len(wanted))
                self._embed(lib, wanted)
        except Busy as exc:
            self._log.warning(
                "another deepsim-embed is running ({}); the {} imported track(s) are left "
                "for the next `beet deepsim-embed`",
                exc.holder or "no pid",
                len(wanted),
            )
        except UserError as exc:
            self._log.warning("{}", str(exc).removeprefix("deepsim-embed: "))

    def _item_removed(self, item: Item) -> None:
        self._vectors_changed = True

    def _cli_exit(self, lib: Library) -> None:
        if not self._vectors_changed:
            return
        self._vectors_changed = False
        self.refresh_index(lib)

    # -- the index ----------------------------------------------------------------------

    def refresh_index(self, lib: Library, *, force: bool = False) -> Any:
        """Bring the ANN index of the active model up to date (no torch)."""
        from deepsim.index import refresh_index

        try:
            result = refresh_index(
                lib,
                self.model_id,
                self.state_dir,
                force=force,
                exact_below=self.config["index"]["exact_below"].get(int),
                n_trees=self.config["index"]["n_trees"].get(int),
            )
        except DeepsimError as exc:
            self._log.warning("index not updated: {}", exc)
            return None
        if result.action == "built":
            self._log.info("index of {} vectors built in {:.1f} s", result.count, result.seconds)
        elif result.action == "updated":
            self._log.debug("index updated in {:.2f} s: {}", result.seconds, result.reason)
        return result

    def index_command(self, lib: Library, opts: IndexOpts, args: list[str]) -> None:
        result = self.refresh_index(lib, force=opts.force)
        if result is None:
            raise UserError("deepsim-index: the index could not be written (see above)")
        messages = {
            "fresh": f"the {self.model_id} index of {result.count} vectors is up to date",
            "built": f"built the {self.model_id} index of {result.count} vectors "
            f"in {result.seconds:.1f} s",
            "updated": f"the {self.model_id} index of {result.count} vectors is up to date "
            f"({result.changed} changed vectors searched exactly beside it)",
            "small": f"{result.count} vectors: small enough for exact search, no index kept",
            "empty": f"no {self.model_id} vectors yet; run `beet deepsim-embed`",
        }
        ui.print_(f"deepsim-index: {messages[result.action]}")

    # -- beet similar -------------------------------------------------------------------

    def _similar_options(self, opts: SimilarOpts) -> dict[str, Any]:
        count = self._positive_int("count", opts.count)
        caps = {}
        for key in ("max_per_artist", "max_per_album"):
            value = getattr(opts, key)
            value = self.config[key].get() if value is None else value
            if not isinstance(value, int) or value < 0:
                raise UserError(f"similar: {key.replace('_', '-')} must be >= 0, got {value!r}")
            caps[key] = value
        return {
            "model_id": self.model_id,
            "index_dir": self.state_dir,
            "count": count,
            "exclude_seeds": not opts.include_seeds,
            "where": opts.where,
            "backend": "exact" if opts.exact else "auto",
            "exact_below": self.config["index"]["exact_below"].get(int),
            "query_scale": self._query_scale(opts.taste_weight),
            **caps,
        }

    def similar_command(self, lib: Library, opts: SimilarOpts, args: list[str]) -> None:
        if not args:
            raise UserError(
                "similar: which tracks? give a beets query for the seed track(s), "
                "e.g. `beet similar title:Blue` (or -a and an album query; see beet similar -h)"
            )
        if opts.each and opts.output:
            raise UserError("similar: --each prints one list per seed; it cannot write -o/--output")
        if opts.album:
            self._similar_albums(lib, opts, args)
            return
        from deepsim.similar import find_similar, find_similar_each

        seeds = list(lib.items(args))
        if not seeds and any(" " in arg for arg in args):
            # `beet similar 'album:X track:1'`: a quoted argument that matches
            # nothing as one phrase is read as a query string of several terms.
            seeds = list(lib.items(" ".join(args)))
        if not seeds:
            raise UserError(f"similar: no tracks match query {' '.join(args)!r}")
        options = {**self._similar_options(opts), **self._filter_options(lib, opts)}
        if opts.to is not None:
            self._path_command(lib, opts, seeds, options)
            return
        try:
            if opts.each:
                results = find_similar_each(lib, seeds, **options)
            else:
                results = [find_similar(lib, seeds, **options)]
        except DeepsimError as exc:
            raise UserError(f"similar: {exc}") from exc
        self._say_about_seeds(seeds, results, each=opts.each)
        self._say_left_out(results)
        for result in results:
            self._log.debug(
                "{} search ({} index: {})", result.backend, result.index_state, result.index_reason
            )
            if result.index_state in ("stale", "corrupt", "missing"):
                self._vectors_changed = True  # rebuilt once this command is done (cli_exit)
        if not any(result.items for result in results):
            raise UserError(
                "similar: no track passes the filters"
                if opts.where or options["max_per_artist"] or options["max_per_album"]
                else f"similar: no other track has a usable {self.model_id} vector yet"
            )
        if opts.output:
            self._write_playlist(opts, results[0].items)
            return
        if opts.mpd:
            self._enqueue(results[0].items)
            return
        fmt = self._result_format(opts.format, album=False)
        for result in results:
            if opts.each and result.seeds:
                seed = result.seeds[0]
                ui.print_(f"== {seed.evaluate_template('$artist - $album - $title')}")
            for item in result.items:
                ui.print_(format(item, fmt))

    def _say_about_seeds(
        self, seeds: Sequence[Item], results: Sequence[Any], *, each: bool
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
                f"{not_yet} of {n} seed {noun} no {self.model_id} vector yet; "
                "run `beet deepsim-embed`"
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
            raise UserError(f"similar: {'; '.join(lines)}")
        for line in lines:
            self._log.warning("{}", line)
        if not each and used > 1:
            self._log.info(
                "the mean of {} seed tracks is the query (--each: one list per seed)", used
            )

    def _say_left_out(self, results: Sequence[Any]) -> None:
        missing = sum(r.left_out.get("missing", 0) for r in results)
        changed = sum(r.left_out.get("changed", 0) for r in results)
        if missing:
            self._log.warning("{} track(s) left out: file missing on disk", missing)
        if changed:
            self._log.warning(
                "{} track(s) left out: audio changed since embedding; run `beet deepsim-embed`",
                changed,
            )

    def _similar_albums(self, lib: Library, opts: SimilarOpts, args: list[str]) -> None:
        from deepsim.similar import find_similar_albums

        seeds = list(lib.albums(args))
        if not seeds:
            raise UserError(f"similar: no albums match query {' '.join(args)!r}")
        options = self._similar_options(opts)
        try:
            result = find_similar_albums(
                lib,
                seeds,
                model_id=self.model_id,
                count=options["count"],
                exclude_seeds=options["exclude_seeds"],
                where=opts.where,
            )
        except DeepsimError as exc:
            raise UserError(f"similar: {exc}") from exc
        if not result.seeds:
            raise UserError(
                f"similar: no track of the matched album(s) has a usable {self.model_id} "
                "vector; run `beet deepsim-embed`"
            )
        if len(result.seeds) > 1:
            self._log.info("the mean of {} seed albums is the query", len(result.seeds))
        if result.left_out:
            self._log.warning("{} album(s) left out: files missing on disk", result.left_out)
        if not result.albums:
            raise UserError("similar: no other album has a usable vector")
        if opts.output:
            tracks = [item for album in result.albums for item in album.items()]
            self._write_playlist(opts, tracks)
            return
        fmt = self._result_format(opts.format, album=True)
        for album in result.albums:
            ui.print_(format(album, fmt))

    def train_command(self, lib: Library, opts: TrainOpts, args: list[str]) -> None:
        from deepsim.errors import ListeningDataError
        from deepsim.listening import read_library, read_listens

        cfg = self.config["train"]
        listens_paths = opts.listens or cfg["listens"].as_str_seq()
        playlists = opts.playlists or cfg["playlists"].as_str_seq()
        use_library = opts.library or cfg["library"].get(bool)
        if not (listens_paths or playlists or use_library):
            raise UserError(
                "deepsim-train: no listening data; give --listens FILE, --playlist PATH or "
                "--library (or set deepsim.train.listens)"
            )
        try:
            sources = []
            if listens_paths:
                fmt = opts.listens_format or cfg["format"].as_str()
                table = opts.song_table and os.path.expanduser(opts.song_table)
                sources.append(
                    read_listens(
                        [os.path.expanduser(p) for p in listens_paths],
                        format=fmt,
                        song_table=table,
                    )
                )
            if playlists or use_library:
                sources.append(
                    read_library(lib, playlist_paths=[os.path.expanduser(p) for p in playlists])
                )
        except (ListeningDataError, ValueError) as exc:
            raise UserError(f"deepsim-train: {exc}") from exc
        listens = sources[0]
        for other in sources[1:]:
            listens = listens.merge(other)
        self._log.info(
            "{} plays of {} tracks by {} listeners/sessions",
            listens.n_plays,
            listens.n_tracks,
            listens.n_users,
        )
        from deepsim.train import TrainConfig, reembed_from_store, run_training
        from deepsim.util import resolve_device

        def pick(option: Any, key: str) -> Any:
            return cfg[key].get() if option is None else option

        try:
            config = TrainConfig(
                backbone=cfg["backbone"].as_str(),
                min_plays=pick(opts.min_plays, "min_plays"),
                min_tracks=self._positive_int("min_tracks", cfg["min_tracks"].get()),
                factors=self._positive_int("factors", pick(opts.factors, "factors")),
                alpha=cfg["alpha"].get(),
                epsilon=cfg["epsilon"].get(),
                regularization=cfg["regularization"].get(),
                iterations=cfg["iterations"].get(),
                heldout=pick(opts.heldout, "heldout"),
                head=pick(opts.head, "head"),
                taste_weight=pick(opts.taste_weight, "taste_weight"),
                epochs=self._positive_int("epochs", pick(opts.epochs, "epochs")),
                finetune=opts.finetune,
                activate=True if opts.activate else None,
                device=resolve_device(self.config["device"].as_str()),
                threads=cfg["threads"].get(),
                workers=self.workers,
                embed_batch_size=self._positive_int("batch_size"),
            )
            report = run_training(
                lib,
                listens,
                config,
                state_dir=self.state_dir,
                log=lambda line: self._log.info("{}", line),
            )
        except DeepsimError as exc:
            raise UserError(f"deepsim-train: {exc}") from exc
        except KeyboardInterrupt:
            raise UserError(
                "deepsim-train: interrupted; nothing was saved and the previous model stays active"
            ) from None
        ui.print_(report.format_table())
        if not report.activated:
            ui.print_("deepsim-train: the previous model stays active; nothing re-embedded")
            return
        if self.config["model"].as_str() != "auto":
            ui.print_(
                f"deepsim-train: deepsim.model is {self.config['model'].as_str()!r}, so the new "
                f"model is not used; set it to auto (or to {report.path}) to use it"
            )
            return
        # The new model is active now: forget the cached name and id.
        for key in ("model_name", "model_id"):
            self.__dict__.pop(key, None)
        if opts.no_embed:
            ui.print_("deepsim-train: run `beet deepsim-embed` to embed the library with it")
            return
        todo = reembed_from_store(lib, report.model)
        self._vectors_changed = True
        if len(todo):
            self._log.info("{} track(s) need their audio decoded", len(todo))
            self._embed(lib, todo.tolist())
        else:
            ui.print_(f"deepsim-train: re-embedded the library with {report.model_id}")

    def _query_scale(self, option: float | None) -> Any:
        """Query factors for another taste weight (``--taste-weight``, else the config)."""
        from deepsim.taste import layout_of, query_scale

        value = self.config["taste_weight"].get() if option is None else option
        if value is None:
            return None
        try:
            layout = layout_of(self.model_name)
            if layout is None:
                if option is None:  # a config default does not apply to sound-only models
                    return None
                raise UserError(
                    f"similar: --taste-weight needs a model trained by `beet deepsim-train`; "
                    f"{self.model_id} has sound vectors only"
                )
            return None if value == layout.weight else query_scale(layout, value)
        except DeepsimError as exc:
            raise UserError(f"similar: deepsim.taste_weight: {exc}") from exc

    def _recommend_subcommand(self) -> ui.Subcommand:
        cmd = ui.Subcommand("recommend", help="tracks a listener will like, never-played ones too")
        p = cmd.parser
        p.add_option(
            "-l",
            "--listens",
            action="append",
            metavar="FILE",
            help="the listener's history (repeatable; any format deepsim-train reads)",
        )
        p.add_option("--listens-format", metavar="FORMAT", help="as for deepsim-train")
        p.add_option(
            "--library",
            action="store_true",
            default=False,
            help="use the play counts stored in the library (mpdstats, lastimport...)",
        )
        p.add_option("-u", "--user", metavar="NAME", help="the listener, when the data has several")
        p.add_option(
            "--unplayed",
            action="store_true",
            default=False,
            help="only tracks the listener never played",
        )
        p.add_option(
            "--half-life",
            type="float",
            metavar="DAYS",
            help="a play this many days older than the newest weighs half (default 90)",
        )
        p.add_option("-c", "--count", type="int", metavar="N", help="how many tracks")
        p.add_format_option(target="item")
        p.add_option("-o", "--output", metavar="FILE", help="write an m3u/m3u8 playlist")
        p.add_option("--extm3u", action="store_true", default=False, help="extended m3u")
        p.add_option("--relative", action="store_true", default=None, help="relative paths")
        p.add_option("--absolute", dest="relative", action="store_false", help="absolute paths")
        p.add_option("--max-per-artist", type="int", metavar="N", help="at most N per artist")
        p.add_option("--max-per-album", type="int", metavar="N", help="at most N per album")
        p.add_option("-w", "--where", metavar="QUERY", help="only tracks matching this query")
        p.add_option("--keep-duplicates", action="store_true", default=False,
                     help="keep other versions (formats, masters) of one recording")  # fmt: skip
        p.usage = "%prog [options]\nExample: %prog --listens ~/scrobbles.csv --unplayed -c 30"
        cmd.func = self.recommend_command
        return cmd

    def recommend_command(self, lib: Library, opts: Any, args: list[str]) -> None:
        from deepsim.listening import read_library, read_listens
        from deepsim.recommend import listener_history, recommend

        if args:
            raise UserError("recommend: takes no query; use --where to filter the results")
        if not (opts.listens or opts.library):
            raise UserError(
                "recommend: give the listener's history with --listens FILE or --library"
            )
        caps = {}
        for key in ("max_per_artist", "max_per_album"):
            value = getattr(opts, key)
            caps[key] = self.config[key].get() if value is None else value
        half_life = (
            self.config["recommend"]["half_life"].get()
            if opts.half_life is None
            else opts.half_life
        )
        try:
            if opts.listens:
                fmt = opts.listens_format or self.config["train"]["format"].as_str()
                listens = read_listens([os.path.expanduser(p) for p in opts.listens], format=fmt)
                if opts.library:
                    listens = listens.merge(read_library(lib))
            else:
                listens = read_library(lib)
            history = listener_history(lib, listens, user=opts.user, half_life=half_life)
            found = recommend(
                lib,
                history,
                model_name=self.model_name,
                model_id=self.model_id,
                count=self._positive_int("count", opts.count),
                unplayed=opts.unplayed,
                where=opts.where,
                fold=self._folder(lib, opts.keep_duplicates),
                **caps,
            )
        except DeepsimError as exc:
            raise UserError(f"recommend: {exc}") from exc
        self._log.info(
            "recommend: {} ({} of {} tracks matched the library); {}",
            history.user,
            history.n_matched,
            history.n_listened,
            found.reason,
        )
        if not found.matches:
            raise UserError("recommend: no track passes the filters")
        if opts.output:
            from deepsim.playlist import write_playlist

            relative = self.config["relative"].get(bool) if opts.relative is None else opts.relative
            try:
                written = write_playlist(
                    os.path.expanduser(opts.output),
                    found.items,
                    format="extm3u" if opts.extm3u else "m3u",
                    relative=relative,
                )
            except DeepsimError as exc:
                raise UserError(f"recommend: {exc}") from exc
            n = len(found.items)
            ui.print_(f"recommend: wrote {n} track(s) to {written} ({found.profile} profile)")
            return
        fmt = self._result_format(opts.format, album=False)
        for item in found.items:
            ui.print_(format(item, fmt))

    def _result_format(self, option: str | None, *, album: bool) -> str:
        """``-f``, else the deepsim format key, else beets' format led by the similarity."""
        key, beets_key = ("album_format", "format_album") if album else ("format", "format_item")
        return (
            option
            or self.config[key].get()
            or f"${SIMILARITY_FIELD}  " + beets_config[beets_key].as_str()
        )

    def _write_playlist(self, opts: SimilarOpts, items: Sequence[Item]) -> None:
        from deepsim.playlist import present, write_playlist

        relative = self.config["relative"].get(bool) if opts.relative is None else opts.relative
        path = os.path.expanduser(opts.output or "")
        items, gone = present(items)
        if gone:
            self._log.warning("{} track(s) left out of the playlist: file missing on disk", gone)
        try:
            written = write_playlist(
                path, items, format="extm3u" if opts.extm3u else "m3u", relative=relative
            )
        except DeepsimError as exc:
            raise UserError(f"similar: {exc}") from exc
        ui.print_(f"similar: wrote {len(items)} track(s) to {written}")

    # -- paths, versions, outliers, map, MPD radio (issue 13) --------------------------------

    def _add_similar_extras(self, p: Any) -> None:
        p.add_option(
            "--to",
            metavar="QUERY",
            help="a path: COUNT tracks leading from the matched tracks to QUERY's",
        )
        p.add_option(
            "-v",
            "--verbose",
            action="store_true",
            default=False,
            help="with --to: print each track's similarity to the start and the end",
        )
        p.add_option(
            "--keep-duplicates",
            action="store_true",
            default=False,
            help="keep other versions (formats, masters) of one recording",
        )
        p.add_option(
            "--no-outliers",
            action="store_true",
            default=False,
            help="leave out album outliers (see deepsim-outliers)",
        )
        p.add_option(
            "--mpd",
            action="store_true",
            default=False,
            help="append the results to MPD's queue instead of printing",
        )

    def _extra_commands(self) -> list[ui.Subcommand]:
        dupes = ui.Subcommand("deepsim-dupes", help="list versions of one recording")
        dupes.parser.add_option(
            "-t",
            "--threshold",
            type="float",
            metavar="COS",
            help="cosine at or above which tracks are versions",
        )
        dupes.parser.add_option(
            "--no-tags",
            action="store_true",
            default=False,
            help="compare vectors only, not artist + title",
        )
        dupes.parser.add_format_option(target="item")
        dupes.parser.usage = "%prog [options] [QUERY]"
        dupes.func = self.dupes_command
        outliers = ui.Subcommand(
            "deepsim-outliers", help="tracks that sound least like the rest of their album"
        )
        outliers.parser.add_option(
            "-t",
            "--threshold",
            type="float",
            metavar="Z",
            help="list tracks whose score is at most -Z",
        )
        outliers.parser.add_option(
            "-a",
            "--all",
            action="store_true",
            default=False,
            help="list every scored track, worst fit first",
        )
        outliers.parser.add_format_option(target="item")
        outliers.parser.usage = "%prog [options] [QUERY]"
        outliers.func = self.outliers_command
        radio = ui.Subcommand("deepsim-radio", help="keep MPD's queue filled with similar tracks")
        radio.parser.add_option(
            "-n",
            "--ahead",
            type="int",
            metavar="K",
            help="refill when fewer than K tracks follow the current one",
        )
        radio.parser.add_option(
            "-w", "--where", metavar="QUERY", help="only queue tracks matching this beets query"
        )
        radio.parser.add_option("--keep-duplicates", action="store_true", default=False)
        radio.parser.add_option("--no-outliers", action="store_true", default=False)
        radio.parser.usage = "%prog [options] [QUERY]   (QUERY: seeds while nothing plays)"
        radio.func = self.radio_command
        mapcmd = ui.Subcommand("deepsim-map", help="write a 2-D map of the library (HTML or PNG)")
        mapcmd.parser.add_option(
            "-o", "--output", metavar="FILE", help="map.html (interactive) or map.png (picture)"
        )
        mapcmd.parser.add_option(
            "--color-by", metavar="FIELD", help="genre, album, artist, year or cluster"
        )
        mapcmd.parser.add_option("--method", metavar="NAME", help="opentsne (default) or umap")
        mapcmd.parser.add_option(
            "-f",
            "--force",
            action="store_true",
            default=False,
            help="recompute the projection instead of updating the cache",
        )
        mapcmd.parser.usage = "%prog [options] [QUERY] -o map.html"
        mapcmd.func = self.map_command
        return [dupes, outliers, radio, mapcmd]

    def _folder(self, lib: Library, keep: bool) -> Any:
        from deepsim.dupes import VersionFolder

        if keep:
            return None
        cfg = self.config["dupes"]
        try:
            return VersionFolder(
                lib, self.model_id, threshold=cfg["threshold"].get(), use_tags=cfg["tags"].get(bool)
            )
        except DeepsimError as exc:
            raise UserError(f"deepsim: dupes.threshold: {exc}") from exc

    def _outlier_ids(self, lib: Library, wanted: bool) -> set[int]:
        from deepsim.outliers import outlier_ids

        if not wanted:
            return set()
        cfg = self.config["outliers"]
        try:
            return outlier_ids(
                lib,
                self.model_id,
                threshold=cfg["threshold"].get(),
                min_tracks=cfg["min_tracks"].get(),
            )
        except DeepsimError as exc:
            raise UserError(f"deepsim: outliers: {exc}") from exc

    def _filter_options(self, lib: Library, opts: Any) -> dict[str, Any]:
        if opts.mpd and (opts.output or opts.each):
            raise UserError("similar: --mpd queues one list; it cannot go with -o or --each")
        return {
            "fold": self._folder(lib, opts.keep_duplicates),
            "exclude_ids": self._outlier_ids(lib, opts.no_outliers),
        }

    def _path_command(
        self, lib: Library, opts: SimilarOpts, seeds: list[Item], options: dict[str, Any]
    ) -> None:
        from deepsim.paths import find_path

        if opts.each:
            raise UserError("similar: --to makes one path; it cannot go with --each")
        targets = list(lib.items(opts.to))
        if not targets and " " in (opts.to or ""):
            targets = list(lib.items(opts.to.split()))
        if not targets:
            raise UserError(f"similar: no tracks match --to query {opts.to!r}")
        seed_ids = {s.id for s in seeds}
        targets = [t for t in targets if t.id not in seed_ids]
        if not targets:
            raise UserError("similar: the --to tracks are all seeds too")
        try:
            path = find_path(
                lib,
                seeds,
                targets,
                model_id=self.model_id,
                count=options["count"],
                where=options["where"],
                max_per_artist=options["max_per_artist"],
                max_per_album=options["max_per_album"],
                exclude_ids=options["exclude_ids"],
                fold=options["fold"],
            )
        except DeepsimError as exc:
            raise UserError(f"similar: {exc}") from exc
        if path.missing:
            self._log.warning(
                "{} seed/target track(s) have no {} vector yet; run `beet deepsim-embed`",
                len(path.missing),
                self.model_id,
            )
        if path.exhausted:
            self._log.warning(
                "only {} track(s) between the ends pass the filters", len(path.steps) - 2
            )
        if opts.output:
            self._write_playlist(opts, path.items)
            return
        if opts.mpd:
            self._enqueue(path.items)
            return
        fmt = opts.format or self.config["format"].get() or beets_config["format_item"].as_str()
        if opts.verbose:
            ui.print_("start    end  track")
        for step in path.steps:
            line = format(step.item, fmt)
            ui.print_(f"{step.to_start:5.3f}  {step.to_end:5.3f}  {line}" if opts.verbose else line)

    def _mpd(self) -> Any:
        from deepsim.radio import Mpd, MpdSettings

        cfg = beets_config["mpd"]
        cfg.add(
            {
                "host": os.environ.get("MPD_HOST", "localhost"),
                "port": int(os.environ.get("MPD_PORT", 6600)),
                "password": "",
                "music_directory": beets_config["directory"].as_filename(),
                "strip_path": "",
            }
        )
        cfg["password"].redact = True
        try:
            settings = MpdSettings(
                host=cfg["host"].as_str(),
                port=cfg["port"].get(int),
                password=cfg["password"].as_str() or "",
                music_directory=cfg["music_directory"].as_filename(),
                strip_path=cfg["strip_path"].as_str() or "",
            )
            return Mpd(settings).connect()
        except confuse.ConfigError as exc:
            raise UserError(f"deepsim: mpd config: {exc}") from exc
        except DeepsimError as exc:
            raise UserError(f"deepsim: {exc}") from exc

    def _enqueue(self, items: Sequence[Item]) -> None:
        mpd = self._mpd()
        try:
            result = mpd.enqueue(items)
        except DeepsimError as exc:
            raise UserError(f"similar: {exc}") from exc
        finally:
            mpd.close()
        for item, reason in result.skipped:
            self._log.warning("not queued: {} ({})", item.filepath, reason)
        ui.print_(
            f"similar: added {len(result.added)} track(s) to MPD's queue at {mpd.where}"
            + (f"; {len(result.skipped)} skipped" if result.skipped else "")
        )
        if not result.added:
            raise UserError("similar: no track could be queued")

    def dupes_command(self, lib: Library, opts: Any, args: list[str]) -> None:
        from deepsim.dupes import find_versions

        ids = [item.id for item in lib.items(args)] if args else None
        if ids is not None and not ids:
            raise UserError(f"deepsim-dupes: no tracks match query {' '.join(args)!r}")
        threshold = (
            self.config["dupes"]["threshold"].get() if opts.threshold is None else opts.threshold
        )
        try:
            groups = find_versions(
                lib,
                self.model_id,
                ids=ids,
                threshold=threshold,
                use_tags=self.config["dupes"]["tags"].get(bool) and not opts.no_tags,
            )
        except DeepsimError as exc:
            raise UserError(f"deepsim-dupes: {exc}") from exc
        items = store.items_by_ids(lib, [i for g in groups for i, _ in g])
        fmt = opts.format or beets_config["format_item"].as_str()
        for group in groups:
            ui.print_(f"== {len(group)} versions")
            for item_id, sim in group:
                if item_id in items:
                    ui.print_(
                        f"{sim:5.3f}  {format(items[item_id], fmt)}  [{items[item_id].format}]"
                    )
        total = sum(len(g) for g in groups)
        ui.print_(
            f"deepsim-dupes: {len(groups)} group(s), {total} tracks, "
            f"{total - len(groups)} would be folded"
        )

    def outliers_command(self, lib: Library, opts: Any, args: list[str]) -> None:
        from deepsim.outliers import score_albums

        ids = [item.id for item in lib.items(args)] if args else None
        if ids is not None and not ids:
            raise UserError(f"deepsim-outliers: no tracks match query {' '.join(args)!r}")
        cfg = self.config["outliers"]
        threshold = cfg["threshold"].get() if opts.threshold is None else opts.threshold
        try:
            fits = score_albums(lib, self.model_id, ids=ids, min_tracks=cfg["min_tracks"].get())
        except DeepsimError as exc:
            raise UserError(f"deepsim-outliers: {exc}") from exc
        shown = fits if opts.all else [f for f in fits if f.is_outlier(threshold)]
        items = store.items_by_ids(lib, [f.item_id for f in shown])
        fmt = opts.format or beets_config["format_item"].as_str()
        if shown:
            ui.print_("score    fit  track")
        for fit in shown:
            if fit.item_id in items:
                ui.print_(f"{fit.score:5.1f}  {fit.fit:5.3f}  {format(items[fit.item_id], fmt)}")
        albums = len({f.album for f in fits})
        outliers = sum(f.is_outlier(threshold) for f in fits)
        ui.print_(
            f"deepsim-outliers: {outliers} outlier(s) (score <= -{threshold:g}) among "
            f"{len(fits)} tracks of {albums} album(s)"
        )

    def radio_command(self, lib: Library, opts: Any, args: list[str]) -> None:
        from deepsim.radio import Radio
        from deepsim.similar import find_similar

        seeds = list(lib.items(args)) if args else []
        if args and not seeds:
            raise UserError(f"deepsim-radio: no tracks match query {' '.join(args)!r}")
        cfg = self.config["radio"]
        fold = self._folder(lib, opts.keep_duplicates)
        outliers = self._outlier_ids(lib, opts.no_outliers)
        caps = {key: self.config[key].get(int) for key in ("max_per_artist", "max_per_album")}

        def search(seed_items: Sequence[Item], count: int, exclude: set[int]) -> list[Item]:
            return find_similar(
                lib,
                seed_items,
                model_id=self.model_id,
                index_dir=self.state_dir,
                count=count,
                where=opts.where,
                exclude_ids=exclude | outliers,
                fold=fold,
                **caps,
            ).items

        mpd = self._mpd()
        try:
            radio = Radio(
                lib,
                mpd,
                search,
                seeds=seeds,
                ahead=self._positive_int("ahead", opts.ahead or cfg["ahead"].get()),
                batch=self._positive_int("batch", cfg["batch"].get()),
                history=self._positive_int("history", cfg["history"].get()),
                avoid_seconds=float(cfg["avoid"].get()),
            )
        except DeepsimError as exc:
            mpd.close()
            raise UserError(f"deepsim-radio: {exc}") from exc
        last_wait = ""

        def report(step: Any) -> None:
            nonlocal last_wait
            if step.added:
                last_wait = ""
                after = ", ".join(s.evaluate_template("$artist - $title") for s in step.seeds)
                ui.print_(f"deepsim-radio: queued {len(step.added)} track(s) like {after}:")
                for item in step.added:
                    ui.print_(f"  {format(item)}")
            elif step.waiting != last_wait:
                last_wait = step.waiting
                ui.print_(f"deepsim-radio: waiting: {step.waiting}")

        ui.print_(f"deepsim-radio: following MPD at {mpd.where} (Ctrl-C to stop)")
        started = time.monotonic()
        try:
            radio.run(interval=float(cfg["interval"].get()), report=report)
        except KeyboardInterrupt:
            pass
        except DeepsimError as exc:
            raise UserError(f"deepsim-radio: {exc}") from exc
        finally:
            mpd.close()
        ui.print_(
            f"deepsim-radio: stopped; queued {radio.added_total} track(s) in "
            f"{human_seconds_short(time.monotonic() - started)}"
        )

    def map_command(self, lib: Library, opts: Any, args: list[str]) -> None:
        from deepsim.mapview import write_map

        if not opts.output:
            raise UserError("deepsim-map: give -o map.html or -o map.png")
        ids = [item.id for item in lib.items(args)] if args else None
        if ids is not None and not ids:
            raise UserError(f"deepsim-map: no tracks match query {' '.join(args)!r}")
        cfg = self.config["map"]
        try:
            written = write_map(
                lib,
                os.path.expanduser(opts.output),
                model_id=self.model_id,
                state_dir=self.state_dir,
                ids=ids,
                color_by=opts.color_by or cfg["color_by"].as_str(),
                method=opts.method or cfg["method"].as_str(),
                neighbours=self._positive_int("neighbours", cfg["neighbours"].get()),
                force=opts.force,
            )
        except DeepsimError as exc:
            raise UserError(f"deepsim-map: {exc}") from exc
        ui.print_(
            f"deepsim-map: {written.count} tracks ({written.action} projection, "
            f"coloured by {written.color_by}) written to {written.path}"
        )


def _query_ids(lib: Library, args: list[str]) -> list[int] | None:
    """Ids matching a beets query (None: no query, every item), without loading every item."""
    if not args:
        return None
    from beets.library import Item
    from beets.library.queries import parse_query_parts

    from deepsim.similar import where_ids

    query, _sort = parse_query_parts(args, Item)
    ids = where_ids(lib, query)
    if ids is None:  # a query SQL cannot evaluate: beets filters the items
        return [item.id for item in lib.items(query)]
    return sorted(int(i) for i in ids.tolist())


def _rate(rate: float) -> str:
    """A rate with two significant digits below 10 (``0.04``, ``3.1``), whole above."""
    return f"{rate:.2g}" if rate < 10 else f"{rate:.0f}"


def _plan_notes(plan: EmbedPlan) -> str:
    notes = []
    if plan.stale:
        notes.append(f"{plan.stale} with changed audio")
    if plan.repaired:
        notes.append(f"{plan.repaired} damaged")
    if plan.missing:
        notes.append(f"{len(plan.missing)} missing on disk")
    if plan.failed_before:
        notes.append(f"{plan.failed_before} failed before (--retry-failed)")
    return f"; {', '.join(notes)}" if notes else ""


class _Progress:
    """A tqdm bar on a terminal; plain log lines (every 10 s) otherwise.

    The rate comes from the library (model loading is not in it); no ETA is
    shown before a first track is done.
    """

    def __init__(self, total: int, log: Any, *, enabled: bool) -> None:
        self.total = total
        self.log = log
        self.last_log = 0.0
        self.bar = None
        self.enabled = enabled
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="track", dynamic_ncols=True, leave=False)

    def advance(self, done: int, total: int, rate: float | None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            return
        import time

        now = time.monotonic()
        if not self.enabled or (now - self.last_log < 10 and done != total):
            return
        self.last_log = now
        if rate is None:
            self.log.info("{}/{} tracks", done, total)
        else:
            eta = human_seconds_short((total - done) / rate) if rate > 0 else "?"
            self.log.info("{}/{} tracks, {} tracks/s, ETA {}", done, total, _rate(rate), eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
