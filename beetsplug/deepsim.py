"""Find music that sounds alike, from the audio alone.

Commands: ``deepsim-embed`` (store a vector per track), ``similar`` (nearest
tracks, printed or as a playlist), ``deepsim-index`` (rebuild the ANN index)
and ``deepsim-train`` (learn a collaborative-filtering space from listening
data).  The algorithms live in the :mod:`deepsim` library; this module holds
configuration, commands and events only.  torch is imported only by the
commands that run a network, never by ``beet similar``.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import confuse
from beets import ui
from beets.exceptions import UserError
from beets.plugins import BeetsPlugin
from beets.util.units import human_seconds_short

from deepsim import store
from deepsim.errors import DeepsimError

if TYPE_CHECKING:
    from beets.importer import ImportSession, ImportTask
    from beets.library import Item, Library

    from deepsim.models.base import Model


class EmbedOpts(Protocol):
    force: bool
    pretend: bool


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


class DeepsimPlugin(BeetsPlugin):
    def __init__(self) -> None:
        super().__init__()
        self.config.add(
            {
                "auto": True,
                "model": "auto",
                "device": "auto",
                "workers": "auto",
                "batch_size": 8,
                "commit_every": 32,
                "store_tags": True,
                "state_dir": "deepsim",
                # beet similar
                "count": 20,
                "format": None,
                "max_per_artist": 0,
                "max_per_album": 0,
                "relative_to": None,
                "index": {"n_trees": 50, "search_k": -1, "exact_below": 20000},
                # beet deepsim-train
                "train": {
                    "listens": [],
                    "format": "auto",
                    "playlists": [],
                    "min_plays": 5,
                    "factors": 40,
                    "alpha": 2.0,
                    "epsilon": 1.0,
                    "regularization": 0.01,
                    "iterations": 15,
                    "heldout": 0.2,
                    "epochs": 200,
                },
            }
        )
        self.item_types = {store.VECTOR_FIELD: store.VectorType()}
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
        """``<beets config dir>/deepsim``: index, trained models, active-model record."""
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

    def _positive_int(self, key: str, value: Any = None) -> int:
        value = self.config[key].get() if value is None else value
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise UserError(f"deepsim: {key} must be a positive integer, got {value!r}") from None
        if number <= 0:
            raise UserError(f"deepsim: {key} must be a positive integer, got {value!r}")
        return number

    @property
    def workers(self) -> int:
        value = self.config["workers"].get()
        if value in (None, "auto"):
            from deepsim.embed import default_workers

            return default_workers()
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = -1
        if number < 0:
            raise UserError(f"deepsim: workers must be 'auto' or an integer >= 0, got {value!r}")
        return number

    def load_model(self) -> Model:
        """Load the active model on the configured device (imports torch)."""
        from deepsim.embed import resolve_device
        from deepsim.models import load_model

        device_name = self.config["device"].as_str()
        try:
            device = resolve_device(device_name)
        except ValueError as exc:
            raise UserError(f"deepsim: {exc}") from exc
        try:
            model = load_model(self.model_name, device=device)
        except DeepsimError as exc:
            raise UserError(f"deepsim: {exc}") from exc
        self._log.debug("model {} on {}", model.model_id, device)
        return model

    # -- commands --------------------------------------------------------------------

    def commands(self) -> list[ui.Subcommand]:
        embed = ui.Subcommand(
            "deepsim-embed", help="compute and store a similarity vector per track"
        )
        embed.parser.add_option(
            "-f",
            "--force",
            action="store_true",
            default=False,
            help="re-embed tracks that already have a vector of the active model",
        )
        embed.parser.add_option(
            "-p",
            "--pretend",
            action="store_true",
            default=False,
            help="list the tracks that would be embedded, and do nothing",
        )
        embed.parser.usage += "\nExample: %prog -f 'album:Blue Train'"
        embed.func = self.embed_command
        return [embed]

    def embed_command(self, lib: Library, opts: EmbedOpts, args: list[str]) -> None:
        items = list(lib.items(args))
        if not items:
            raise UserError(f"deepsim-embed: no tracks match query {' '.join(args)!r}")
        done = set() if opts.force else store.ids_with_vectors(lib, self.model_id)
        todo = [item for item in items if item.id not in done]
        skipped = len(items) - len(todo)
        if opts.pretend:
            for item in todo:
                ui.print_(format(item))
            ui.print_(
                f"deepsim-embed: would embed {len(todo)} track(s) with {self.model_id}; "
                f"{skipped} already have a vector"
            )
            return
        if not todo:
            ui.print_(
                f"deepsim-embed: all {len(items)} matching tracks already have a {self.model_id} "
                "vector (use -f to recompute)"
            )
            return
        self.embed_items(lib, todo, skipped=skipped, progress=True)

    def embed_items(
        self, lib: Library, items: Sequence[Item], *, skipped: int = 0, progress: bool = False
    ) -> None:
        """Embed ``items`` and store their vectors, reporting failures per file."""
        from deepsim.embed import embed_files

        model = self.load_model()
        batch_size = self._positive_int("batch_size")
        commit_every = self._positive_int("commit_every")
        store_tags = self.config["store_tags"].get(bool) and bool(model.tag_names)
        paths = [item.filepath for item in items]  # resolved here, in the main thread
        ids = [item.id for item in items]
        failures: list[str] = []
        reporter = _Progress(len(items), self._log, enabled=progress)
        interrupted = False

        def rows() -> Iterator[tuple[int, Any, str | None]]:
            nonlocal interrupted
            outcomes = embed_files(paths, model, workers=self.workers, batch_size=batch_size)
            try:
                for outcome in outcomes:
                    reporter.advance()
                    if outcome.error is not None:
                        failures.append(outcome.error.reason)
                        self._log.error("{}", outcome.error)
                        continue
                    tags = None
                    if store_tags and outcome.tags is not None:
                        tags = _top_tags(model.tag_names, outcome.tags)
                    yield ids[outcome.index], outcome.vector, tags
            except KeyboardInterrupt:
                interrupted = True
            finally:
                outcomes.close()

        started = time.monotonic()
        try:
            written = store.write_vectors(lib, rows(), model.model_id, batch_size=commit_every)
        finally:
            reporter.close()
            self._vectors_changed = True
        elapsed = time.monotonic() - started
        rate = written / elapsed if elapsed > 0 else 0.0
        summary = (
            f"deepsim-embed: embedded {written}, skipped {skipped} (already embedded), "
            f"failed {len(failures)} — {model.model_id}, {rate:.1f} tracks/s"
        )
        ui.print_(summary)
        for reason, count in Counter(failures).most_common():
            ui.print_(f"  {count} × {reason}")
        if interrupted:
            remaining = len(items) - written - len(failures)
            ui.print_(
                f"deepsim-embed: interrupted; {written} vector(s) saved, {remaining} left. "
                "Run `beet deepsim-embed` again to resume."
            )
            raise UserError("deepsim-embed: interrupted")

    # -- events ------------------------------------------------------------------------

    def _collect_imported(self, session: ImportSession, task: ImportTask) -> None:
        self._imported_ids.extend(item.id for item in task.imported_items() if item.id)

    def _embed_imported(self, lib: Library, paths: Sequence[bytes]) -> None:
        if not self._imported_ids:
            return
        wanted = sorted(set(self._imported_ids))
        self._imported_ids.clear()
        done = store.ids_with_vectors(lib, self.model_id)
        wanted = [i for i in wanted if i not in done]
        if not wanted:
            return
        items = items_by_ids(lib, wanted)
        self._log.info("embedding {} imported track(s)", len(items))
        try:
            self.embed_items(lib, items)
        except UserError as exc:
            self._log.warning("{}", exc)

    def _item_removed(self, item: Item) -> None:
        self._vectors_changed = True

    def _cli_exit(self, lib: Library) -> None:
        if not self._vectors_changed:
            return
        self._vectors_changed = False
        self.refresh_index(lib)

    def refresh_index(self, lib: Library, *, force: bool = False) -> None:
        """Rebuild the ANN index of the active model if it is stale."""
        # Filled in by the `similar` work.
        return None


def items_by_ids(lib: Library, ids: Sequence[int]) -> list[Item]:
    """Load the items with these ids (that still exist), a few queries in all."""
    from beets.dbcore.query import NumericQuery, OrQuery

    items: list[Item] = []
    ids = list(ids)
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        items.extend(lib.items(OrQuery([NumericQuery("id", str(i)) for i in chunk])))
    return items


class _Progress:
    """A tqdm bar on a terminal; plain log lines (every 10 s) otherwise."""

    def __init__(self, total: int, log: Any, *, enabled: bool) -> None:
        self.total = total
        self.done = 0
        self.log = log
        self.started = time.monotonic()
        self.last_log = self.started
        self.bar = None
        self.enabled = enabled
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="track", dynamic_ncols=True, leave=False)

    def advance(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            return
        now = time.monotonic()
        if self.enabled and (now - self.last_log >= 10 or self.done == self.total):
            self.last_log = now
            rate = self.done / max(now - self.started, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            self.log.info(
                "{}/{} tracks, {:.1f} tracks/s, ETA {}",
                self.done,
                self.total,
                rate,
                human_seconds_short(eta),
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
