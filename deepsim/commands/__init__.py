"""The routines behind the beets commands: one function per command.

The beets face (``beetsplug/deepsim.py``) parses a command line, builds a
:class:`Context` (the ``deepsim`` settings as a plain mapping, the state
directory, the active model, beets' formats), calls one function of this
package and prints the :class:`Outcome` it returns.  Everything a command
decides — which option wins over which key, what to say about seeds that
cannot be used, how a result line reads, when the index must be refreshed —
is here, so it can be read and tested without beets' command line.

One module per command family: :mod:`~deepsim.commands.embed`
(``deepsim-embed``, the import hook, ``deepsim-index``),
:mod:`~deepsim.commands.similar` (``similar``, with ``-a``, ``--to``, ``-o``,
``--mpd``), :mod:`~deepsim.commands.listeners` (``deepsim-train``,
``recommend``) and :mod:`~deepsim.commands.features` (``deepsim-dupes``,
``deepsim-outliers``, ``deepsim-map``, ``deepsim-radio``).

Errors: a routine raises :class:`~deepsim.errors.DeepsimError` for the whole
command (the plugin prefixes the command's name and turns it into beets'
``UserError``), or returns an :class:`Outcome` whose ``error`` says what
failed after its lines were printed.  Messages go through the ``deepsim``
logger, which the plugin routes into beets' log.  No torch is imported here
unless a command runs a network.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepsim import settings, store
from deepsim.errors import DeepsimError
from deepsim.similar import DISTANCE_FIELD as DISTANCE_FIELD
from deepsim.similar import SIMILARITY_FIELD as SIMILARITY_FIELD

if TYPE_CHECKING:
    from beets.library import Item, Library

    from deepsim.dupes import VersionFolder


@dataclass
class Context:
    """What every command needs besides its options.

    ``model_name`` / ``model_id`` are resolved on first use (a command that
    never needs the active model never resolves it).
    """

    settings: Mapping[str, Any]
    state_dir: Path
    resolve_model: Callable[[], tuple[str, str]]
    item_format: str = "$artist - $album - $title"
    album_format: str = "$albumartist - $album"

    @property
    def model_name(self) -> str:
        return self.resolve_model()[0]

    @property
    def model_id(self) -> str:
        return self.resolve_model()[1]

    def get(self, key: str) -> Any:
        """A (dotted) key of the ``deepsim`` block."""
        return settings.value(self.settings, key)

    def option_or(self, option: Any, key: str) -> Any:
        return settings.option_or(self.settings, option, key)


@dataclass
class Outcome:
    """What a command printed and what it leaves the plugin to do.

    ``lines`` go to stdout in order; ``error`` (after them) makes the command
    fail; ``vectors_changed``: the index is refreshed when beets exits.
    """

    lines: list[str] = field(default_factory=list)
    error: str | None = None
    vectors_changed: bool = False


def query_ids(lib: Library, args: Sequence[str]) -> list[int] | None:
    """Ids matching a beets query (None: no query, every item), without loading every item."""
    if not args:
        return None
    from beets.library import Item
    from beets.library.queries import parse_query_parts

    from deepsim.similar import where_ids

    query, _sort = parse_query_parts(list(args), Item)
    ids = where_ids(lib, query)
    if ids is None:  # a query SQL cannot evaluate: beets filters the items
        return [store.item_id(item) for item in lib.items(query)]
    return sorted(int(i) for i in ids.tolist())


def matched_ids(lib: Library, args: Sequence[str]) -> list[int] | None:
    """Ids of ``lib.items(args)`` (None: no query); DeepsimError when nothing matches."""
    if not args:
        return None
    ids = [store.item_id(item) for item in lib.items(list(args))]
    if not ids:
        raise DeepsimError(f"no tracks match query {' '.join(args)!r}")
    return ids


def seed_items(lib: Library, query: str | Sequence[str], what: str = "query") -> list[Item]:
    """The items of a query.  Query words that match nothing are read once more the
    other way: ``'album:X track:1'`` quoted as one argument as several terms, and a
    ``--to`` string that shlex reads as one phrase as words."""
    items = list(lib.items(query if isinstance(query, str) else list(query)))
    text = query if isinstance(query, str) else " ".join(query)
    if not items and any(" " in part for part in ([query] if isinstance(query, str) else query)):
        items = list(lib.items(text.split() if isinstance(query, str) else text))
    if not items:
        raise DeepsimError(f"no tracks match {what} {text!r}")
    return items


def result_format(ctx: Context, option: str | None, *, album: bool) -> str:
    """``-f``, else the deepsim format key, else beets' format led by the similarity."""
    key = "album_format" if album else "format"
    base = ctx.album_format if album else ctx.item_format
    return option or ctx.get(key) or f"${SIMILARITY_FIELD}  {base}"


def caps(ctx: Context, opts: Any) -> dict[str, int]:
    """``--max-per-artist`` / ``--max-per-album``, else their keys (0: no limit)."""
    found = {}
    for key in ("max_per_artist", "max_per_album"):
        value = ctx.option_or(getattr(opts, key, None), key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise DeepsimError(f"{key.replace('_', '-')} must be >= 0, got {value!r}")
        found[key] = value
    return found


def version_folder(lib: Library, ctx: Context, *, keep: bool) -> VersionFolder | None:
    """Versions of one recording folded as the ``dupes`` keys say (None with ``keep``)."""
    if keep:
        return None
    from deepsim.dupes import VersionFolder

    try:
        return VersionFolder(
            lib,
            ctx.model_id,
            threshold=ctx.get("dupes.threshold"),
            use_tags=bool(ctx.get("dupes.tags")),
        )
    except DeepsimError as exc:
        raise DeepsimError(f"dupes.threshold: {exc}") from exc


def outlier_ids(lib: Library, ctx: Context, *, wanted: bool) -> set[int]:
    """The album outliers to leave out (``--no-outliers``), as the ``outliers`` keys say."""
    if not wanted:
        return set()
    from deepsim.outliers import outlier_ids as find

    try:
        return find(
            lib,
            ctx.model_id,
            threshold=ctx.get("outliers.threshold"),
            min_tracks=ctx.get("outliers.min_tracks"),
        )
    except DeepsimError as exc:
        raise DeepsimError(f"outliers: {exc}") from exc


def expand(path: str) -> str:
    """A path from the command line or the config, ``~`` expanded."""
    import os

    return os.path.expanduser(path)
