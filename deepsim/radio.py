"""A radio for MPD: queue similar tracks, and keep the queue filled as the player goes.

:class:`Mpd` talks to a Music Player Daemon with python-mpd2 (an optional
dependency: ``pip install beets-deepsim[mpd]``).  Library paths become MPD
URIs the way beets' ``mpdstats`` reads them back: relative to
``music_directory`` (beets' ``directory`` by default), with ``strip_path``
put in front; tracks outside ``music_directory`` cannot be queued and are
counted as skipped.

:class:`Radio` follows the player (``beet deepsim-radio``): whenever fewer
than ``ahead`` tracks are queued after the current one, it adds ``batch``
tracks similar to the mean of the last ``history`` tracks played (what it saw
playing; at the start, the current track and those before it in the queue),
or to the seed tracks while nothing has played.  Added tracks pass the
usual filters (``where``, caps, version folding, exclusions) and are never
already in the queue nor played in the last ``avoid_seconds`` (seen by the
radio, or recorded in beets' ``last_played`` by ``mpdstats``).  No torch here.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from deepsim import store
from deepsim.errors import MpdError
from deepsim.util import check_float, check_int, get_logger

if TYPE_CHECKING:
    from beets.library import Item, Library

log = get_logger(__name__)


@dataclass(frozen=True)
class MpdSettings:
    """Where MPD is and where its music lives (beets' ``mpd:`` config section)."""

    host: str = "localhost"
    port: int = 6600
    password: str = ""
    music_directory: str = ""
    strip_path: str = ""
    timeout: float = 10.0


@dataclass
class QueueResult:
    """What :meth:`Mpd.enqueue` did."""

    added: list[Item] = field(default_factory=list)
    skipped: list[tuple[Item, str]] = field(default_factory=list)


def _text(path: Any) -> str:
    return os.fsdecode(path) if isinstance(path, bytes) else str(path)


class Mpd:
    """A connection to MPD, with library path ↔ MPD URI mapping."""

    def __init__(self, settings: MpdSettings) -> None:
        self.settings = settings
        self.music_directory = os.path.abspath(os.path.expanduser(settings.music_directory or "."))
        self._client: Any = None

    @property
    def where(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    def connect(self) -> Mpd:
        try:
            import mpd
        except ImportError:
            raise MpdError(
                "the MPD radio needs python-mpd2 (pip install 'beets-deepsim[mpd]')"
            ) from None
        client = mpd.MPDClient()
        client.timeout = self.settings.timeout
        try:
            client.connect(self.settings.host, self.settings.port)
            if self.settings.password:
                client.password(self.settings.password)
        except (OSError, mpd.MPDError) as exc:
            raise MpdError(f"cannot connect to MPD at {self.where}: {exc}") from exc
        self._client = client
        return self

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
                self._client.disconnect()
            except Exception:  # closing a broken connection is best effort
                pass
            self._client = None

    def __enter__(self) -> Mpd:
        return self.connect() if self._client is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, command: str, *args: Any) -> Any:
        """Run one MPD command (an :class:`MpdError` naming it on failure)."""
        import mpd

        if self._client is None:
            self.connect()
        try:
            return getattr(self._client, command)(*args)
        except (OSError, mpd.ConnectionError) as exc:
            self.close()
            raise MpdError(f"MPD at {self.where}: {command}: {exc}") from exc
        except mpd.MPDError as exc:
            raise MpdError(f"MPD at {self.where}: {command}: {exc}") from exc

    # -- paths -----------------------------------------------------------------

    def uri_for(self, path: str | bytes) -> str | None:
        """The MPD URI of a library path, or None when it is outside ``music_directory``."""
        absolute = os.path.abspath(_text(path))
        relative = os.path.relpath(absolute, self.music_directory)
        if relative == os.pardir or relative.startswith(os.pardir + os.sep):
            return None
        return self.settings.strip_path + relative.replace(os.sep, "/")

    def path_for(self, uri: str) -> str | None:
        """The library path of an MPD URI (as ``mpdstats`` maps it), None for a stream."""
        if "://" in uri:
            return None
        if self.settings.strip_path and uri.startswith(self.settings.strip_path):
            uri = uri[len(self.settings.strip_path) :]
        return os.path.join(self.music_directory, uri)

    # -- queue -----------------------------------------------------------------

    def enqueue(self, items: Iterable[Item]) -> QueueResult:
        """Append items to the queue (one ``addid`` each); unplayable ones are skipped."""
        result = QueueResult()
        for item in items:
            uri = self.uri_for(item.path)
            if uri is None:
                result.skipped.append(
                    (item, f"not under MPD's music_directory {self.music_directory}")
                )
                continue
            try:
                self.call("addid", uri)
            except MpdError as exc:
                if self._client is None:
                    raise  # the connection is gone: stop here
                result.skipped.append((item, str(exc)))
                continue
            result.added.append(item)
        return result

    def queue_uris(self) -> list[str]:
        return [entry.get("file", "") for entry in self.call("playlistinfo")]

    def status(self) -> dict[str, str]:
        return self.call("status")

    def update_database(self, *, wait: float = 30.0) -> None:
        """Ask MPD to rescan its music directory and wait until it is done."""
        self.call("update")
        deadline = time.monotonic() + wait
        while "updating_db" in self.status():
            if time.monotonic() > deadline:
                raise MpdError(f"MPD at {self.where}: database update still running after {wait} s")
            time.sleep(0.1)


# --------------------------------------------------------------------------- radio


def items_by_paths(lib: Library, paths: Iterable[str]) -> dict[str, Item]:
    """Library items by path (paths that are not in the library are absent)."""
    from beets.dbcore.query import OrQuery, PathQuery
    from beets.util import bytestring_path, normpath

    wanted = {os.fsdecode(normpath(p)): p for p in paths}
    found: dict[str, Item] = {}
    names = list(wanted)
    for start in range(0, len(names), 200):
        chunk = names[start : start + 200]
        query = OrQuery([PathQuery("path", bytestring_path(p)) for p in chunk])
        for item in lib.items(query):
            original = wanted.get(os.fsdecode(normpath(item.path)))
            if original is not None:
                found[original] = item
    return found


@dataclass
class RadioStep:
    """What one :meth:`Radio.step` did: tracks added, and after what."""

    added: list[Item] = field(default_factory=list)
    skipped: int = 0
    seeds: list[Item] = field(default_factory=list)
    waiting: str = ""


class Radio:
    """Keeps MPD's queue filled with tracks similar to what is playing.

    Parameters
    ----------
    lib
        The beets library.
    mpd
        A connected :class:`Mpd`.
    search
        ``search(seeds, count, exclude_ids)`` → items similar to the seeds'
        mean, best first, filters applied (the plugin passes
        :func:`deepsim.similar.find_similar` with its options).
    seeds
        Items to start from while nothing has played (e.g. ``QUERY``'s tracks).
    ahead
        Refill when fewer tracks than this are queued after the current one.
    batch
        Tracks added per refill.
    history
        How many of the last played tracks make the seed mean.
    avoid_seconds
        Never add a track played this recently.
    clock
        Seconds since the epoch (a test can replace it).
    """

    def __init__(
        self,
        lib: Library,
        mpd: Mpd,
        search: Callable[[Sequence[Item], int, set[int]], list[Item]],
        *,
        seeds: Sequence[Item] = (),
        ahead: int = 3,
        batch: int = 5,
        history: int = 3,
        avoid_seconds: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.lib = lib
        self.mpd = mpd
        self.search = search
        self.seeds = list(seeds)
        self.ahead = check_int("ahead", ahead, minimum=1)
        self.batch = check_int("batch", batch, minimum=1)
        self.history = check_int("history", history, minimum=1)
        self.avoid_seconds = check_float("avoid_seconds", avoid_seconds, low=0.0)
        self.clock = clock
        self.played: deque[tuple[float, Item]] = deque()
        self._last_song: str | None = None
        self.added_total = 0

    def _observe(self, queue: list[str], position: int | None) -> None:
        """Record what is playing (and, on the first look, what was played before it)."""
        if position is None or position >= len(queue):
            return
        current = queue[position]
        if current == self._last_song:
            return
        now = self.clock()
        earlier = (
            queue[max(0, position - self.history + 1) : position] if self._last_song is None else []
        )
        self._last_song = current
        paths = {uri: self.mpd.path_for(uri) for uri in [*earlier, current]}
        items = items_by_paths(self.lib, [p for p in paths.values() if p])
        for uri in [*earlier, current]:
            item = items.get(paths[uri] or "")
            if item is not None:
                self.played.append((now, item))
        cutoff = now - max(self.avoid_seconds, 0.0)
        while self.played and self.played[0][0] < cutoff and len(self.played) > self.history:
            self.played.popleft()

    def _recent_ids(self) -> set[int]:
        since = self.clock() - self.avoid_seconds
        ids = {store.item_id(item) for when, item in self.played if when >= since}
        return ids | store.ids_played_since(self.lib, since)

    def step(self) -> RadioStep:
        """Look at the player once, and refill the queue if it runs short."""
        status = self.mpd.status()
        queue = self.mpd.queue_uris()
        position = int(status["song"]) if "song" in status else None
        self._observe(queue, position)
        after = len(queue) - (position + 1 if position is not None else 0)
        result = RadioStep()
        if after >= self.ahead:
            return result
        recent = [item for _, item in list(self.played)[-self.history :]]
        result.seeds = recent or self.seeds
        if not result.seeds:
            result.waiting = "nothing is playing and no seed tracks were given"
            return result
        in_queue = items_by_paths(self.lib, [p for p in map(self.mpd.path_for, queue) if p])
        exclude = self._recent_ids() | {store.item_id(i) for i in in_queue.values()}
        exclude |= {store.item_id(i) for i in result.seeds}
        found = self.search(result.seeds, self.batch, exclude)
        if not found:
            result.waiting = "no more tracks pass the filters"
            return result
        queued = self.mpd.enqueue(found)
        result.added, result.skipped = queued.added, len(queued.skipped)
        for item, reason in queued.skipped:
            log.warning("not queued: %s (%s)", _text(item.path), reason)
        self.added_total += len(queued.added)
        return result

    def run(
        self,
        *,
        interval: float = 2.0,
        report: Callable[[RadioStep], None] | None = None,
        steps: int | None = None,
    ) -> None:
        """Step every ``interval`` seconds until Ctrl-C (or ``steps`` steps)."""
        interval = check_float("interval", interval, low=0.0)
        done = 0
        while steps is None or done < steps:
            result = self.step()
            if report is not None and (result.added or result.waiting):
                report(result)
            done += 1
            if steps is None or done < steps:
                time.sleep(interval)
