"""Find music that sounds alike, from the audio alone.

Commands: ``deepsim-embed`` (store a vector per track), ``similar`` (nearest
tracks or albums, printed, as a playlist or queued in MPD), ``deepsim-index``
(rebuild the ANN index), ``deepsim-train`` (learn a collaborative-filtering
space from listening data), ``recommend``, ``deepsim-dupes``,
``deepsim-outliers``, ``deepsim-map`` and ``deepsim-radio``.  This module is
beets' face of the :mod:`deepsim` library: it adds the configuration
defaults (:data:`deepsim.settings.DEFAULTS`, checked when the plugin loads),
declares the commands' options, calls one routine of :mod:`deepsim.commands`
per command and prints what it returns.  torch is imported only by the
commands that run a network, never by ``beet similar``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from functools import cached_property
from optparse import Values
from pathlib import Path
from typing import TYPE_CHECKING, Any

import confuse
from beets import config as beets_config
from beets import ui
from beets.dbcore import types
from beets.exceptions import UserError
from beets.plugins import BeetsPlugin
from beets.util.units import human_seconds_short

from deepsim import settings, store
from deepsim.commands import DISTANCE_FIELD, SIMILARITY_FIELD, Context, Outcome
from deepsim.errors import DeepsimError, ParameterError
from deepsim.util import LOGGER_NAME

if TYPE_CHECKING:
    from beets.importer import ImportSession, ImportTask
    from beets.library import Item, Library

    from deepsim.radio import Mpd


class _ToBeetsLog(logging.Handler):
    """Routes the library's ``deepsim`` logger into the plugin's beets logger."""

    def __init__(self, log: Any) -> None:
        super().__init__(logging.DEBUG)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        self.log.log(record.levelno, "{}", record.getMessage())


_KEEP_HELP = "keep other versions (formats, masters) of one recording"


def _flag(parser: Any, *names: str, help: str) -> None:
    """An on/off option (``store_true``, off by default)."""
    dest = names[-1].removeprefix("--").replace("-", "_")
    parser.add_option(*names, dest=dest, action="store_true", default=False, help=help)


def _playlist_options(parser: Any, *, what: str = "") -> None:
    """``-o FILE``, ``--extm3u``, ``--relative`` / ``--absolute``."""
    parser.add_option(
        "-o", "--output", metavar="FILE", help=f"write an m3u/m3u8 playlist to FILE{what}"
    )
    _flag(
        parser, "--extm3u", help="extended m3u (#EXTM3U, #EXTINF with duration and artist - title)"
    )
    parser.add_option(
        "--relative",
        action="store_true",
        default=None,
        help="playlist paths relative to the playlist's directory",
    )
    parser.add_option(
        "--absolute",
        dest="relative",
        action="store_false",
        help="absolute playlist paths (the default)",
    )


def _cap_options(parser: Any) -> None:
    for field in ("artist", "album"):
        parser.add_option(
            f"--max-per-{field}",
            type="int",
            metavar="N",
            help=f"at most N tracks per {field} (0: no limit)",
        )


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

    def context(self) -> Context:
        """The settings as they are now, and the active model (resolved when first used)."""
        return Context(
            settings=self.config.flatten(),
            state_dir=self.state_dir,
            resolve_model=lambda: (self.model_name, self.model_id),
            item_format=beets_config["format_item"].as_str(),
            album_format=beets_config["format_album"].as_str(),
        )

    def _connect_mpd(self) -> Mpd:
        """MPD as beets' ``mpd:`` section (shared with mpdstats/mpdupdate) says."""
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
            mpd_settings = MpdSettings(
                host=cfg["host"].as_str(),
                port=cfg["port"].get(int),
                password=cfg["password"].as_str() or "",
                music_directory=cfg["music_directory"].as_filename(),
                strip_path=cfg["strip_path"].as_str() or "",
            )
        except confuse.ConfigError as exc:
            raise UserError(f"deepsim: mpd config: {exc}") from exc
        return Mpd(mpd_settings).connect()

    def _run(self, name: str, routine: Callable[..., Outcome], *args: Any, **kwargs: Any) -> None:
        """Call one library routine, print its lines; its DeepsimError is the command's error."""
        try:
            outcome = routine(*args, **kwargs)
        except DeepsimError as exc:
            raise UserError(f"{name}: {exc}") from exc
        for line in outcome.lines:
            ui.print_(line)
        self._vectors_changed = self._vectors_changed or outcome.vectors_changed
        if outcome.error:
            raise UserError(f"{name}: {outcome.error}")

    # -- commands --------------------------------------------------------------------

    def commands(self) -> list[ui.Subcommand]:
        return [
            self._embed_subcommand(),
            self._similar_subcommand(),
            self._index_subcommand(),
            self._train_subcommand(),
            self._recommend_subcommand(),
            *self._feature_subcommands(),
        ]

    def _embed_subcommand(self) -> ui.Subcommand:
        cmd = ui.Subcommand("deepsim-embed", help="compute and store a similarity vector per track")
        p = cmd.parser
        _flag(p, "-f", "--force", help="recompute vectors that are current too")
        _flag(p, "-p", "--pretend", help="list the tracks that would be embedded, and do nothing")
        _flag(p, "--retry-failed", help="try again the unchanged files that failed before")
        _flag(
            p,
            "--prune",
            help="remove the vectors of models other than the active one (and its backbone)",
        )
        p.usage = "%prog [options] [QUERY]\nExample: %prog -f 'album:Blue Train'"
        cmd.func = self.embed_command
        return cmd

    def _similar_subcommand(self) -> ui.Subcommand:
        cmd = ui.Subcommand(
            "similar", help="list the tracks (or albums) that sound most like the matched ones"
        )
        p = cmd.parser
        p.add_option(
            "-c",
            "--count",
            type="int",
            metavar="N",
            help=f"how many tracks or albums (default: {self.config['count'].get()})",
        )
        p.add_album_option()
        p.add_format_option(target="item")
        _playlist_options(p, what=" instead of printing")
        _flag(p, "--each", help="one list per matched track instead of one for their mean")
        _flag(p, "--include-seeds", help="allow the matched tracks themselves in the results")
        _cap_options(p)
        p.add_option(
            "-w",
            "--where",
            action="append",
            metavar="QUERY",
            help="only return tracks matching this beets query, e.g. 'format:FLAC' "
            "(repeat: all must match)",
        )
        _flag(p, "--exact", help="exact search over all vectors instead of the ANN index")
        p.add_option(
            "--taste-weight",
            type="float",
            metavar="W",
            help="with a trained model: 0 = sounds alike only, 1 = same listeners only "
            "(default: deepsim.taste_weight, else the weight chosen in training)",
        )
        p.add_option(
            "--to",
            metavar="QUERY",
            help="a path: COUNT tracks leading from the matched tracks to QUERY's",
        )
        _flag(
            p,
            "-v",
            "--verbose",
            help="with --to: print each track's similarity to the start and the end",
        )
        _flag(p, "--keep-duplicates", help=_KEEP_HELP)
        _flag(p, "--no-outliers", help="leave out album outliers (see deepsim-outliers)")
        _flag(p, "--mpd", help="append the results to MPD's queue instead of printing")
        p.usage = (
            "%prog [options] QUERY\n"
            "Examples: %prog 'title:Blue in Green'\n"
            "          %prog -c 30 --extm3u -o ~/like-this.m3u album:'Kind of Blue'\n"
            "          %prog -a 'album:Kind of Blue'"
        )
        cmd.func = self.similar_command
        return cmd

    def _index_subcommand(self) -> ui.Subcommand:
        cmd = ui.Subcommand("deepsim-index", help="rebuild the similarity index now")
        _flag(cmd.parser, "-f", "--force", help="rebuild even when the index is up to date")
        cmd.func = self.index_command
        return cmd

    def _train_subcommand(self) -> ui.Subcommand:
        cmd = ui.Subcommand(
            "deepsim-train", help="learn a listening-data (CF) space and a model that predicts it"
        )
        p = cmd.parser
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
        _flag(
            p,
            "--library",
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
        _flag(p, "--finetune", help="also train the backbone network (slow without a GPU)")
        _flag(p, "--no-embed", help="do not re-embed the library with the new model")
        p.add_option("--head", metavar="KIND", help="auto (default), ridge or mlp")
        p.add_option(
            "--taste-weight",
            type="float",
            metavar="W",
            help="weight of predicted taste in the model's vectors (default: chosen on "
            "the held-out tracks)",
        )
        _flag(
            p,
            "--activate",
            help="make the new model active even if it does not beat the untrained one",
        )
        p.usage = "%prog [options]\nExample: %prog --listens ~/scrobbles.csv --playlist ~/Playlists"
        cmd.func = self.train_command
        return cmd

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
        _flag(
            p,
            "--library",
            help="use the play counts stored in the library (mpdstats, lastimport...)",
        )
        p.add_option("-u", "--user", metavar="NAME", help="the listener, when the data has several")
        _flag(p, "--unplayed", help="only tracks the listener never played")
        p.add_option(
            "--half-life",
            type="float",
            metavar="DAYS",
            help="a play this many days older than the newest weighs half (default 90)",
        )
        p.add_option("-c", "--count", type="int", metavar="N", help="how many tracks")
        p.add_format_option(target="item")
        _playlist_options(p)
        _cap_options(p)
        p.add_option("-w", "--where", metavar="QUERY", help="only tracks matching this query")
        _flag(p, "--keep-duplicates", help=_KEEP_HELP)
        p.usage = "%prog [options]\nExample: %prog --listens ~/scrobbles.csv --unplayed -c 30"
        cmd.func = self.recommend_command
        return cmd

    def _feature_subcommands(self) -> list[ui.Subcommand]:
        dupes = ui.Subcommand("deepsim-dupes", help="list versions of one recording")
        p = dupes.parser
        p.add_option(
            "-t",
            "--threshold",
            type="float",
            metavar="COS",
            help="cosine at or above which tracks are versions",
        )
        _flag(p, "--no-tags", help="compare vectors only, not artist + title")
        p.add_format_option(target="item")
        p.usage = "%prog [options] [QUERY]"
        dupes.func = self.dupes_command
        outliers = ui.Subcommand(
            "deepsim-outliers", help="tracks that sound least like the rest of their album"
        )
        p = outliers.parser
        p.add_option(
            "-t",
            "--threshold",
            type="float",
            metavar="Z",
            help="list tracks whose score is at most -Z",
        )
        _flag(p, "-a", "--all", help="list every scored track, worst fit first")
        p.add_format_option(target="item")
        p.usage = "%prog [options] [QUERY]"
        outliers.func = self.outliers_command
        radio = ui.Subcommand("deepsim-radio", help="keep MPD's queue filled with similar tracks")
        p = radio.parser
        p.add_option(
            "-n",
            "--ahead",
            type="int",
            metavar="K",
            help="refill when fewer than K tracks follow the current one",
        )
        p.add_option(
            "-w", "--where", metavar="QUERY", help="only queue tracks matching this beets query"
        )
        _flag(p, "--keep-duplicates", help=_KEEP_HELP)
        _flag(p, "--no-outliers", help="leave out album outliers")
        p.usage = "%prog [options] [QUERY]   (QUERY: seeds while nothing plays)"
        radio.func = self.radio_command
        mapcmd = ui.Subcommand("deepsim-map", help="write a 2-D map of the library (HTML or PNG)")
        p = mapcmd.parser
        p.add_option(
            "-o", "--output", metavar="FILE", help="map.html (interactive) or map.png (picture)"
        )
        p.add_option("--color-by", metavar="FIELD", help="genre, album, artist, year or cluster")
        p.add_option("--method", metavar="NAME", help="opentsne (default) or umap")
        _flag(p, "-f", "--force", help="recompute the projection instead of updating the cache")
        p.usage = "%prog [options] [QUERY] -o map.html"
        mapcmd.func = self.map_command
        return [dupes, outliers, radio, mapcmd]

    # -- what the commands do ------------------------------------------------------

    def embed_command(self, lib: Library, opts: Values, args: list[str]) -> None:
        from deepsim.commands.embed import embed

        progress = _Progress(self._log)
        try:
            self._run(
                "deepsim-embed",
                embed,
                lib,
                args,
                opts,
                self.context(),
                say=ui.print_,
                on_progress=progress.advance,
            )
        finally:
            progress.close()

    def similar_command(self, lib: Library, opts: Values, args: list[str]) -> None:
        from deepsim.commands.similar import similar

        self._run("similar", similar, lib, args, opts, self.context(), self._connect_mpd)

    def index_command(self, lib: Library, opts: Values, args: list[str]) -> None:
        from deepsim.commands.embed import index

        self._run("deepsim-index", index, lib, self.context(), force=opts.force)

    def train_command(self, lib: Library, opts: Values, args: list[str]) -> None:
        from deepsim.commands.listeners import train

        def activated() -> None:  # the new model is active now: forget the cached name and id
            for key in ("model_name", "model_id"):
                self.__dict__.pop(key, None)

        progress = _Progress(self._log)
        try:
            self._run(
                "deepsim-train",
                train,
                lib,
                opts,
                self.context(),
                activated=activated,
                on_progress=progress.advance,
            )
        finally:
            progress.close()

    def recommend_command(self, lib: Library, opts: Values, args: list[str]) -> None:
        from deepsim.commands.listeners import recommend

        self._run("recommend", recommend, lib, args, opts, self.context())

    def dupes_command(self, lib: Library, opts: Values, args: list[str]) -> None:
        from deepsim.commands.features import dupes

        self._run("deepsim-dupes", dupes, lib, args, opts, self.context())

    def outliers_command(self, lib: Library, opts: Values, args: list[str]) -> None:
        from deepsim.commands.features import outliers

        self._run("deepsim-outliers", outliers, lib, args, opts, self.context())

    def map_command(self, lib: Library, opts: Values, args: list[str]) -> None:
        from deepsim.commands.features import map_

        self._run("deepsim-map", map_, lib, args, opts, self.context())

    def radio_command(self, lib: Library, opts: Values, args: list[str]) -> None:
        from deepsim.commands.features import radio

        ctx = self.context()
        self._run("deepsim-radio", radio, lib, args, opts, ctx, self._connect_mpd, ui.print_)

    # -- events ------------------------------------------------------------------------

    def _collect_imported(self, session: ImportSession, task: ImportTask) -> None:
        self._imported_ids.extend(item.id for item in task.imported_items() if item.id)

    def _embed_imported(self, lib: Library, paths: Sequence[bytes]) -> None:
        from deepsim.commands.embed import embed_imported

        if not self._imported_ids:
            return
        wanted = sorted(set(self._imported_ids))
        self._imported_ids.clear()
        progress = _Progress(self._log)
        try:
            outcome = embed_imported(lib, wanted, self.context(), on_progress=progress.advance)
        except (DeepsimError, UserError) as exc:  # an import goes on whatever happens here
            self._log.warning("{}", exc)
            return
        finally:
            progress.close()
        for line in outcome.lines:
            ui.print_(line)
        self._vectors_changed = self._vectors_changed or outcome.vectors_changed
        if outcome.error:
            self._log.warning("{}", outcome.error)

    def _item_removed(self, item: Item) -> None:
        self._vectors_changed = True

    def _cli_exit(self, lib: Library) -> None:
        from deepsim.commands.embed import refresh

        if self._vectors_changed:
            self._vectors_changed = False
            refresh(lib, self.context())


class _Progress:
    """A tqdm bar on a terminal; plain log lines (every 10 s) otherwise.

    The rate comes from the library (model loading is not in it); no ETA is
    shown before a first track is done.
    """

    def __init__(self, log: Any) -> None:
        self.log = log
        self.last_log = 0.0
        self.bar: Any = None
        self.tty = sys.stdout.isatty()

    def advance(self, done: int, total: int, rate: float | None) -> None:
        import time

        if self.tty:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="track", dynamic_ncols=True, leave=False)
            self.bar.update(1)
            return
        now = time.monotonic()
        if now - self.last_log < 10 and done != total:
            return
        self.last_log = now
        if rate is None:
            self.log.info("{}/{} tracks", done, total)
        else:
            from deepsim.commands.embed import rate as shown

            eta = human_seconds_short((total - done) / rate) if rate > 0 else "?"
            self.log.info("{}/{} tracks, {} tracks/s, ETA {}", done, total, shown(rate), eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
