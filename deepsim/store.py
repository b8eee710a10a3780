"""Vectors in the beets database — the only module that talks SQL.

Layout (beets flexible attributes, so beets deletes them with the item):

``deepsim_vector`` / ``deepsim_model`` / ``deepsim_audio`` / ``deepsim_tags``
    The *main slot*: the vector of the first model that embedded the item (or
    of the active model after ``beet deepsim-embed --prune``), its model id,
    the :class:`~deepsim.identity.AudioIdentity` of the file it was computed
    from (``size:mtime_ns:digest``) and, optionally, the model's top tags.
    ``deepsim_vector`` is typed by :class:`VectorType`, whose values are
    :class:`Vector` objects: immutable, comparable, hashable, shown as
    ``<200-d vector>``.
``deepsim_vector:<model id>`` / ``deepsim_audio:<model id>`` / ``deepsim_tags:<model id>``
    One slot per other model.  Embedding with another model never touches a
    slot of a different model, so switching ``model:`` and back needs no
    recomputation; :func:`prune` removes the slots of models no longer wanted.
``deepsim_failed``
    ``size:mtime_ns:<reason>`` of a file that could not be embedded, so an
    unchanged broken file is not decoded again on every run.

Older libraries may hold ``deepsim_backbone_vector`` / ``deepsim_backbone_model``
(the slot of a trained head's backbone before there was one slot per model):
read as the slot of that model, removed when that model's vector is rewritten.

A vector is stored as base64 of little-endian float16 (a 400-d vector is
1,068 characters).  Reads go through one SQL query per slot (never through
``Item`` objects) and validate every value: bad base64, a length that is not
the dimension of the model's other vectors, NaN or infinity — such a value is
named once in a warning (item id and path) and treated as missing.  Writes go
in transactions of ``batch_size`` items, so an interruption loses at most the
batch in flight.  SQLite triggers keep a log of the items whose vectors
changed, in the same transaction as each write, whoever makes it
(:func:`change_state`, :func:`changed_since`): what the index needs to stay
up to date at a cost in proportion to the change.  torch is never imported here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, cast
from urllib.parse import quote

import numpy as np
from beets.dbcore import query as dbquery
from beets.dbcore import types
from beets.dbcore.db import DBAccessError

from deepsim.errors import ParameterError
from deepsim.util import check_int, get_logger

if TYPE_CHECKING:
    from beets.library import Album, Item, Library

log = get_logger(__name__)

VECTOR_FIELD = "deepsim_vector"
MODEL_FIELD = "deepsim_model"
AUDIO_FIELD = "deepsim_audio"
TAGS_FIELD = "deepsim_tags"
FAILED_FIELD = "deepsim_failed"
BACKBONE_VECTOR_FIELD = "deepsim_backbone_vector"
BACKBONE_MODEL_FIELD = "deepsim_backbone_model"

#: Ids per SQL ``IN (...)`` list (below SQLite's variable limit): the one chunking scheme.
ID_CHUNK = 900

_DTYPE = np.dtype("<f2")


def slot_keys(model_id: str) -> tuple[str, str, str]:
    """The (vector, audio, tags) keys of ``model_id``'s own slot (not the main one)."""
    return f"{VECTOR_FIELD}:{model_id}", f"{AUDIO_FIELD}:{model_id}", f"{TAGS_FIELD}:{model_id}"


def item_id(item: Item | Album) -> int:
    """The id of a stored item or album (beets types it ``int | None``: unset before storing)."""
    return int(cast(int, item.id))


def chunks(ids: Sequence[int], size: int | None = None) -> Iterator[list[int]]:
    """``ids`` in lists of at most ``size`` (default :data:`ID_CHUNK`)."""
    size = size or ID_CHUNK
    for start in range(0, len(ids), size):
        yield [int(i) for i in ids[start : start + size]]


# --------------------------------------------------------------------------------------------
# Encoding and the beets value


def encode_vector(vector: Any) -> str:
    """Encode a 1-D vector as base64 of little-endian float16."""
    array = np.asarray(vector, dtype=np.float32)
    if array.ndim != 1 or array.size == 0:
        raise ParameterError(f"vector must be a non-empty 1-D array, got shape {array.shape!r}")
    if not np.all(np.isfinite(array)):
        raise ParameterError("vector contains NaN or infinite values")
    return base64.b64encode(array.astype(_DTYPE).tobytes()).decode("ascii")


def _decode(text: Any) -> np.ndarray | None:
    """float32 vector of an encoding, or None when it is not a valid one."""
    try:
        raw = binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError, TypeError):
        return None
    if len(raw) == 0 or len(raw) % _DTYPE.itemsize:
        return None
    array = np.frombuffer(raw, dtype=_DTYPE).astype(np.float32)
    if not np.all(np.isfinite(array)):
        return None
    return array


def decode_vector(text: str | bytes) -> np.ndarray:
    """Inverse of :func:`encode_vector`; returns float32."""
    array = _decode(text)
    if array is None:
        raise ParameterError(f"not a deepsim vector encoding: {str(text)[:40]!r}")
    return array


class Vector:
    """A stored vector as a beets value: immutable, ``==`` and ``hash`` by content.

    ``numpy.asarray(vector)`` (or :attr:`array`) gives the read-only float32
    array; ``str(vector)`` is ``<400-d vector>``.
    """

    __slots__ = ("__weakref__", "_array", "_text")
    _array: np.ndarray
    _text: str

    def __init__(self, values: Any) -> None:
        if isinstance(values, Vector):
            self._array, self._text = values._array, values._text
            return
        if isinstance(values, (str, bytes)):
            array = decode_vector(values)
            text = values if isinstance(values, str) else values.decode("ascii")
        else:
            text = encode_vector(values)
            array = np.asarray(values, dtype=np.float32).copy()
        array.setflags(write=False)
        self._array = array
        self._text = text

    @property
    def array(self) -> np.ndarray:
        return self._array

    @property
    def text(self) -> str:
        """The stored encoding."""
        return self._text

    @property
    def dim(self) -> int:
        return int(self._array.shape[0])

    def __len__(self) -> int:
        return self.dim

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self._array if dtype is None else self._array.astype(dtype)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Vector):
            return self._text == other._text
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._text)

    def __str__(self) -> str:
        return f"<{self.dim}-d vector>"

    def __repr__(self) -> str:
        return f"Vector(<{self.dim}-d>, {self.digest})"

    @property
    def digest(self) -> str:
        return hashlib.blake2b(self._text.encode("ascii"), digest_size=4).hexdigest()


class VectorType(types.Type):
    """beets type of ``deepsim_vector``: a :class:`Vector` in memory, base64 text in SQL.

    ``format`` shows ``<400-d vector>``; ``parse`` reads a stored encoding
    back, and also the shown form of a vector this process formatted (so
    ``beet edit --all`` leaves vectors as they are); anything else parses to
    no vector.
    """

    sql = "TEXT"
    model_type = Vector
    _shown: ClassVar[dict[str, Vector]] = {}

    @property
    def null(self) -> None:
        return None

    def format(self, value: Any) -> str:
        if value is None:
            return ""
        vector = self.normalize(value)
        if vector is None:
            return ""
        shown = f"<{vector.dim}-d vector {vector.digest}>"
        if len(self._shown) > 4096:
            self._shown.clear()
        self._shown[shown] = vector
        return shown

    def parse(self, string: str) -> Vector | None:
        if string in self._shown:
            return self._shown[string]
        try:
            return Vector(string.strip())
        except (ParameterError, UnicodeDecodeError):
            return None

    def normalize(self, value: Any) -> Vector | None:
        if value is None or isinstance(value, Vector):
            return value
        if isinstance(value, (str, bytes)):
            return self.parse(value if isinstance(value, str) else value.decode("ascii", "ignore"))
        try:
            return Vector(value)
        except ParameterError:
            return None

    def from_sql(self, sql_value: Any) -> Vector | None:
        return self.normalize(sql_value)

    def to_sql(self, model_value: Any) -> str | None:
        vector = self.normalize(model_value)
        return None if vector is None else vector.text


# --------------------------------------------------------------------------------------------
# Items by id


class IdsQuery(dbquery.Query):
    """``items.id IN (...)`` as a fast beets query (at most :data:`ID_CHUNK` ids)."""

    def __init__(self, ids: Sequence[int]) -> None:
        self.ids = [int(i) for i in ids]
        self._set = set(self.ids)

    def clause(self) -> tuple[str, Sequence[int]]:
        return f"items.id IN ({','.join('?' * len(self.ids))})", self.ids

    def match(self, obj: Any) -> bool:
        return obj.id in self._set

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IdsQuery) and other._set == self._set

    def __hash__(self) -> int:
        return hash(frozenset(self._set))


def items_by_ids(lib: Library, ids: Iterable[int]) -> dict[int, Item]:
    """The items with these ids that still exist, by id (one query per :data:`ID_CHUNK`)."""
    wanted = sorted({int(i) for i in ids})
    found: dict[int, Item] = {}
    for chunk in chunks(wanted):
        for item in lib.items(IdsQuery(chunk)):
            found[item_id(item)] = item
    return found


def path_resolver(lib: Library) -> Callable[[Any], bytes]:
    """A function turning ``items.path`` values read by SQL into the absolute paths
    beets gives ``item.path`` (beets stores paths under the music directory relative
    to it, with ``/`` separators)."""
    base = os.fsencode(lib.directory) if getattr(lib, "directory", None) else b""
    prefix = os.path.normpath(base).rstrip(b"/") + b"/" if base else b""
    plain = os.sep == "/"

    def resolve(raw: Any) -> bytes:
        if raw is None:
            return b""
        if isinstance(raw, memoryview):
            raw = bytes(raw)
        if isinstance(raw, str):
            raw = os.fsencode(raw)
        if raw and base and not raw.startswith(b"/") and not os.path.isabs(raw):
            odd = raw[:1] == b"." or raw[-1:] == b"/" or b"/." in raw or b"//" in raw
            if plain and not odd:  # what beets stores (relpath: already normal)
                return prefix + raw
            if os.sep != "/":
                raw = raw.replace(b"/", os.fsencode(os.sep))
            return os.path.normpath(os.path.join(base, raw))
        return raw

    return resolve


def album_ids(lib: Library, ids: Sequence[int]) -> dict[int, int]:
    """``{item id: album id}`` of those of ``ids`` that belong to an album."""
    found: dict[int, int] = {}
    with lib.transaction() as tx:
        for chunk in chunks(sorted({int(i) for i in ids})):
            sql = (
                "SELECT id, album_id FROM items WHERE album_id IS NOT NULL "
                f"AND id IN ({','.join('?' * len(chunk))})"
            )
            for row in tx.query(sql, chunk):
                found[int(row[0])] = int(row[1])
    return found


def all_item_ids(lib: Library) -> list[int]:
    with lib.transaction() as tx:
        return [int(row[0]) for row in tx.query("SELECT id FROM items ORDER BY id")]


# --------------------------------------------------------------------------------------------
# Reading


def _slot_sql(model_id: str) -> list[tuple[str, list[Any]]]:
    """(SQL, params) selecting ``entity_id, vector, audio`` of each slot, lowest priority first."""
    vec_key, audio_key, _ = slot_keys(model_id)
    legacy = (
        "SELECT v.entity_id, v.value, NULL FROM item_attributes AS v "
        "JOIN item_attributes AS m ON m.entity_id = v.entity_id AND m.key = ? AND m.value = ? "
        "WHERE v.key = ?",
        [BACKBONE_MODEL_FIELD, model_id, BACKBONE_VECTOR_FIELD],
    )
    own = (
        "SELECT v.entity_id, v.value, a.value FROM item_attributes AS v "
        "LEFT JOIN item_attributes AS a ON a.entity_id = v.entity_id AND a.key = ? "
        "WHERE v.key = ?",
        [audio_key, vec_key],
    )
    main = (
        "SELECT v.entity_id, v.value, a.value FROM item_attributes AS v "
        "JOIN item_attributes AS m ON m.entity_id = v.entity_id AND m.key = ? AND m.value = ? "
        "LEFT JOIN item_attributes AS a ON a.entity_id = v.entity_id AND a.key = ? "
        "WHERE v.key = ?",
        [MODEL_FIELD, model_id, AUDIO_FIELD, VECTOR_FIELD],
    )
    return [legacy, own, main]


def _slot_rows(
    lib: Library, model_id: str, ids: Sequence[int] | None
) -> dict[int, tuple[Any, Any]]:
    """``{item id: (vector text, audio text)}`` of ``model_id`` for existing items."""
    rows: dict[int, tuple[Any, Any]] = {}
    id_lists: list[list[int] | None]
    if ids is None or len(ids) > 20 * ID_CHUNK:
        id_lists = [None]  # many ids: one read of everything beats many lookups
    else:
        id_lists = list(chunks(sorted({int(i) for i in ids})))
    wanted = None if ids is None else {int(i) for i in ids}
    with lib.transaction() as tx:
        for sql, params in _slot_sql(model_id):
            for chunk in id_lists:
                # EXISTS, not IN (SELECT id FROM items): SQLite would loop over every item
                extra = " AND EXISTS (SELECT 1 FROM items WHERE items.id = v.entity_id)"
                args = list(params)
                if chunk is not None:
                    extra += f" AND v.entity_id IN ({','.join('?' * len(chunk))})"
                    args.extend(chunk)
                for row in tx.query(sql + extra, args):
                    item_id = int(row[0])
                    if wanted is None or item_id in wanted:
                        rows[item_id] = (row[1], row[2])
    return rows


def audio_identities(lib: Library, model_id: str, ids: Sequence[int]) -> dict[int, str | None]:
    """The recorded audio identity of each of ``ids``' ``model_id`` vector (None: not recorded)."""
    return {i: audio for i, (_, audio) in _slot_rows(lib, model_id, ids).items()}


_warned: set[tuple[str, int, str]] = set()


def _warn_corrupt(lib: Library, model_id: str, bad: dict[int, str]) -> None:
    """Name each damaged value once per process (item id and path)."""
    new = {i: why for i, why in bad.items() if (model_id, i, why) not in _warned}
    if not new:
        return
    paths = {i: item.path for i, item in items_by_ids(lib, new).items()}
    for item_id, why in sorted(new.items()):
        _warned.add((model_id, item_id, why))
        path = os.fsdecode(paths.get(item_id) or b"?")
        log.warning(
            f"item {item_id}: {path}: damaged {model_id} vector ({why}); treated as missing, "
            f"`beet deepsim-embed -f id:{item_id}` recomputes it"
        )


@dataclass
class StoredVectors:
    """Valid vectors of one model: ``ids`` (ascending), unit ``matrix`` rows, ``audio`` texts."""

    ids: np.ndarray
    matrix: np.ndarray
    audio: list[str | None]
    corrupt: dict[int, str]


def read_stored(
    lib: Library, model_id: str, *, ids: Iterable[int] | None = None, warn: bool = True
) -> StoredVectors:
    """All valid vectors of ``model_id`` (or of ``ids``), their audio identities, the damaged ones.

    The dimension is that of the most common length among the model's
    values; a value of another length, bad base64, NaN or infinity is
    damaged: left out, listed in ``corrupt`` (``{id: reason}``) and, with
    ``warn``, named once in a warning.
    """
    wanted = None if ids is None else sorted({int(i) for i in ids})
    rows = _slot_rows(lib, model_id, wanted)
    order = sorted(rows)
    raws: list[bytes | None] = []
    corrupt: dict[int, str] = {}
    for item_id in order:
        try:
            raws.append(binascii.a2b_base64(rows[item_id][0], strict_mode=True))
        except (binascii.Error, ValueError, TypeError):
            raws.append(None)
            corrupt[item_id] = "not base64"
    sizes = np.fromiter((len(r) if r is not None else 0 for r in raws), np.int64, len(raws))
    valid = sizes[(sizes > 0) & (sizes % _DTYPE.itemsize == 0)]
    size = int(np.bincount(valid).argmax()) if valid.size else 0
    keep_ids: list[int] = []
    keep_raw: list[bytes] = []
    audio: list[str | None] = []
    for item_id, raw in zip(order, raws, strict=True):
        if raw is None:
            continue
        if len(raw) != size:
            corrupt[item_id] = f"{len(raw)} bytes, not {size}"
            continue
        keep_ids.append(item_id)
        keep_raw.append(raw)
        audio.append(rows[item_id][1])
    if keep_raw:
        matrix = np.frombuffer(b"".join(keep_raw), dtype=_DTYPE).reshape(len(keep_raw), -1)
        matrix = matrix.astype(np.float32)
        finite = np.isfinite(matrix).all(axis=1)
        if not finite.all():
            for k in np.flatnonzero(~finite).tolist():
                corrupt[keep_ids[k]] = "NaN or infinite values"
            matrix = matrix[finite]
            flags = [bool(f) for f in np.asarray(finite).tolist()]
            keep_ids = [i for i, f in zip(keep_ids, flags, strict=True) if f]
            audio = [a for a, f in zip(audio, flags, strict=True) if f]
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        np.divide(matrix, norms, out=matrix, where=norms > 0)
    else:
        matrix = np.zeros((0, 0), np.float32)
    if corrupt and warn:
        _warn_corrupt(lib, model_id, corrupt)
    return StoredVectors(np.asarray(keep_ids, np.int64), matrix, audio, corrupt)


def read_vectors(
    lib: Library, model_id: str, *, ids: Iterable[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """All valid vectors of ``model_id`` (or of the given item ids).

    Returns
    -------
    ids, matrix
        int64 item ids (ascending) and float32 ``(n, dim)`` unit rows.  Items
        without a usable vector of this model are absent (see :func:`read_stored`).
    """
    stored = read_stored(lib, model_id, ids=ids)
    return stored.ids, stored.matrix


def ids_with_vectors(lib: Library, model_id: str) -> set[int]:
    """Ids of the items that hold a usable vector of ``model_id``."""
    return set(read_stored(lib, model_id, warn=False).ids.tolist())


class ItemState(NamedTuple):
    """What :func:`embed_states` knows of one item without loading it."""

    item_id: int
    path: bytes
    vector: bool  # a vector of the model is stored (not decoded: see embed_states)
    audio: str | None  # its recorded audio identity
    failed: str | None  # the recorded failure (``size:mtime_ns:reason``)


def _pair_index(tx: Any) -> str:
    """``INDEXED BY`` the ``(entity_id, key)`` index beets' UNIQUE constraint creates, when
    it exists: SQLite's planner otherwise prefers beets' ``(entity_id)`` index, which makes
    it read every attribute row (vectors included) to check its key."""
    rows = tx.query(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'item_attributes' "
        "AND name = 'sqlite_autoindex_item_attributes_1'"
    )
    return " INDEXED BY sqlite_autoindex_item_attributes_1" if rows else ""


def _states(
    tx: Any, resolve: Callable[[Any], bytes], model_id: str, where: str, args: list[Any]
) -> list[ItemState]:
    """:class:`ItemState` of the items ``where`` selects (an ``id`` condition), in id order.

    Three queries: which items hold a vector slot (the index alone: no vector
    value is read), the short fields (model ids, identities, failures), the
    paths.  The slot rule: the main slot when it holds the model, else the
    model's own slot, else an old backbone slot of the model (no identity).
    """
    vec_key, audio_key, _ = slot_keys(model_id)
    vector_keys = [VECTOR_FIELD, vec_key, BACKBONE_VECTOR_FIELD]
    value_keys = [MODEL_FIELD, AUDIO_FIELD, audio_key, BACKBONE_MODEL_FIELD, FAILED_FIELD]
    table = "item_attributes" + _pair_index(tx)
    attr_where = where.replace("id", "entity_id")
    slots: dict[str, set[int]] = {key: set() for key in vector_keys}
    for entity_id, key in tx.query(
        f"SELECT entity_id, key FROM {table} WHERE {attr_where} AND key IN (?, ?, ?)",
        [*args, *vector_keys],
    ):
        slots[key].add(entity_id)
    values: dict[str, dict[int, Any]] = {key: {} for key in value_keys}
    for entity_id, key, value in tx.query(
        f"SELECT entity_id, key, value FROM {table} WHERE {attr_where} AND key IN (?, ?, ?, ?, ?)",
        [*args, *value_keys],
    ):
        values[key][entity_id] = value
    main, own, legacy = (slots[key] for key in vector_keys)
    models, audios, own_audios, backbones, failures = (values[key] for key in value_keys)
    states: list[ItemState] = []
    new = tuple.__new__  # what ItemState._make calls, without a Python-level call per item
    for item_id, raw in tx.query(f"SELECT id, path FROM items WHERE {where} ORDER BY id", args):
        path = raw if type(raw) is bytes and raw[:1] == b"/" else resolve(raw)
        if item_id in main and models.get(item_id) == model_id:
            state = (item_id, path, True, audios.get(item_id), failures.get(item_id))
        elif item_id in own:
            state = (item_id, path, True, own_audios.get(item_id), failures.get(item_id))
        else:
            old = item_id in legacy and backbones.get(item_id) == model_id
            state = (item_id, path, old, None, failures.get(item_id))
        states.append(new(ItemState, state))
    return states


#: deepsim's short fields (model ids, audio identities, failures).  A partial covering index
#: holds them (:func:`ensure_short_index`), so that deciding what to embed reads them without
#: touching the pages of the 1 KB vector values they sit beside.  The same literal condition
#: is in the index and in every query meant to use it (SQLite's rule for a partial index).
_SHORT_KEYS = (
    f"(key IN ('{MODEL_FIELD}', '{AUDIO_FIELD}', '{BACKBONE_MODEL_FIELD}', '{FAILED_FIELD}') "
    f"OR key GLOB '{AUDIO_FIELD}:*')"
)
SHORT_INDEX = "deepsim_short_fields_v1"


def ensure_short_index(lib: Library) -> bool:
    """Create the partial covering index of the short fields once (idempotent, safe beside
    another process); False where it cannot be made (a read-only database): the queries
    are the same without it, only slower.  beets never reads or needs it."""
    with lib.transaction() as tx:
        if tx.query("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?", [SHORT_INDEX]):
            return True
    try:
        with lib.transaction() as tx:
            tx.mutate(
                f"CREATE INDEX IF NOT EXISTS {SHORT_INDEX} ON item_attributes "
                f"(key, entity_id, value) WHERE {_SHORT_KEYS}"
            )
    except (sqlite3.OperationalError, DBAccessError) as exc:
        log.debug("index %s not created: %s", SHORT_INDEX, exc)
        return False
    log.debug("index %s created", SHORT_INDEX)
    return True


def _current_audio(
    tx: Any,
    resolve: Callable[[Any], bytes],
    prefix: bytes | None,
    model_id: str,
    where: str,
    args: list[Any],
) -> list[tuple[int, bytes, str | None]]:
    """``(id, path, audio)`` of the items ``where`` selects, in one query: ``audio`` is the
    recorded identity of the slot :func:`embed_states` would choose when that slot holds a
    vector of the model (the main slot, else the model's own), else None.

    The absolute path is made in SQL where that is plain: an absolute value as it is, a
    relative one as beets 2 stores it (``os.path.relpath``: already normal) after
    ``prefix`` (the music directory and ``/``; None on another OS); anything else (text,
    ``.`` or ``..`` parts, ``//``) goes through ``resolve`` (:func:`path_resolver`)."""
    vec_key, audio_key, _ = slot_keys(model_id)
    pair = _pair_index(tx)
    short = (
        f" INDEXED BY {SHORT_INDEX}"
        if tx.query("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?", [SHORT_INDEX])
        else ""
    )

    def joined(alias: str) -> str:
        return (
            f"LEFT JOIN item_attributes AS {alias}{short} ON {alias}.key = ? "
            f"AND {alias}.entity_id = i.id AND {_SHORT_KEYS.replace('key', alias + '.key')}"
        )

    sql = (
        "SELECT i.id, CASE WHEN typeof(i.path) = 'blob' AND substr(i.path, 1, 1) = X'2F' "
        "THEN i.path WHEN ? IS NOT NULL AND typeof(i.path) = 'blob' AND length(i.path) > 0 "
        "AND substr(i.path, 1, 1) <> X'2E' AND substr(i.path, -1) <> X'2F' "
        "AND instr(i.path, X'2F2E') = 0 AND instr(i.path, X'2F2F') = 0 "
        "THEN CAST(? || i.path AS BLOB) END, i.path, CASE "
        f"WHEN m.value = ? AND EXISTS (SELECT 1 FROM item_attributes{pair} "
        "WHERE entity_id = i.id AND key = ?) THEN a.value "
        f"WHEN EXISTS (SELECT 1 FROM item_attributes{pair} WHERE entity_id = i.id AND key = ?) "
        f"THEN o.value END FROM items AS i {joined('m')} {joined('a')} {joined('o')} "
        f"WHERE i.{where} ORDER BY i.id"
    )
    params = [prefix, prefix, model_id, VECTOR_FIELD, vec_key]
    params += [MODEL_FIELD, AUDIO_FIELD, audio_key, *args]
    return [
        (item_id, resolve(raw) if path is None else path, audio)
        for item_id, path, raw, audio in tx.query(sql, params)
    ]


class _OwnReader:
    """Reads of a database through a read-only connection of its own, with the
    ``query`` of a beets transaction: for a child process (:func:`current_audio_batches`),
    which must not use the connections it copied from its parent."""

    def __init__(self, lib: Library) -> None:
        path = os.fsdecode(os.path.abspath(os.fsdecode(lib.path)))
        self._conn = sqlite3.connect(
            f"file:{quote(path)}?mode=ro", uri=True, timeout=float(getattr(lib, "timeout", 5.0))
        )

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return self._conn.execute(sql, params).fetchall()

    def close(self) -> None:
        self._conn.close()


def in_transaction(lib: Library) -> bool:
    """Whether this thread has a transaction of ``lib`` open (beets keeps a stack of them per
    thread; False where that cannot be told).  A child process forked inside one would
    share its locks' bookkeeping without holding them (:func:`current_audio_batches`)."""
    import threading

    stacks = getattr(lib, "_tx_stacks", None)
    if not isinstance(stacks, dict):
        return False
    return bool(stacks.get(threading.current_thread().ident))


#: A run of items for :func:`current_audio_batches`: ``(ids, start, stop)`` (:func:`split_items`).
ItemRun = tuple[list[int] | None, int, int | None]


def split_items(
    lib: Library, ids: Iterable[int] | None, parts: int, *, min_items: int = 0
) -> list[ItemRun]:
    """The items (all, or ``ids``) in ``parts`` runs of consecutive ids of about the same
    size (one run where there are fewer than ``min_items``), as ``(ids, start, stop)``
    for :func:`current_audio_batches`: ``ids`` a sorted share of the given ones, or None
    with every item of ``start <= id < stop`` (``stop`` None: no end).  Makes the
    short-field index first (:func:`ensure_short_index`), so that every reader of a
    part finds it."""
    ensure_short_index(lib)
    if ids is not None:
        wanted = sorted({int(i) for i in ids})
        if len(wanted) < max(min_items, 2) or parts <= 1:
            return [(wanted, 0, None)]
        size = -(-len(wanted) // parts)
        return [(wanted[k : k + size], 0, None) for k in range(0, len(wanted), size)]
    cuts: list[int] = []
    with lib.transaction() as tx:
        count = int(tx.query("SELECT count(*) FROM items")[0][0])
        if count >= max(min_items, parts, 2):
            for k in range(1, parts):
                row = tx.query(
                    "SELECT id FROM items ORDER BY id LIMIT 1 OFFSET ?", [count * k // parts]
                )
                if row and (not cuts or int(row[0][0]) > cuts[-1]):
                    cuts.append(int(row[0][0]))
    return [(None, low, high) for low, high in zip([0, *cuts], [*cuts, None], strict=True)]


def current_audio_batches(
    lib: Library,
    model_id: str,
    ids: Iterable[int] | None = None,
    *,
    batch: int | None = None,
    start: int = 0,
    stop: int | None = None,
    own_connection: bool = False,
) -> Iterator[list[tuple[int, bytes, str | None]]]:
    """``(id, path, audio)`` of every item (all, or ``ids``), in batches of ``batch`` ids
    (default ``10 * ID_CHUNK``): what the common "already embedded, same file" decision
    needs, one query a batch (see :func:`_current_audio`); memory flat in library size.
    Everything else is for :func:`embed_states` to say, for the few items that need it.

    Without ``ids``, only the items of ``start <= id < stop`` (``stop`` None: no end; see
    :func:`split_items`).  ``own_connection`` reads through a read-only connection of
    its own, not beets' (for a forked child process: see :func:`deepsim.threads.in_processes`);
    the short-field index is then used where it exists, never made."""
    size = batch or 10 * ID_CHUNK
    reader = _OwnReader(lib) if own_connection else None
    if reader is None:
        ensure_short_index(lib)

    @contextmanager
    def reading() -> Iterator[Any]:
        if reader is not None:
            yield reader
        else:
            with lib.transaction() as tx:
                yield tx

    resolve = path_resolver(lib)
    directory = os.fsencode(lib.directory) if getattr(lib, "directory", None) else b""
    prefix = os.path.normpath(directory).rstrip(b"/") + b"/" if directory else None
    if os.sep != "/":
        prefix = None
    try:
        if ids is not None:
            wanted = sorted({int(i) for i in ids})
            for first in range(0, len(wanted), size):
                rows: list[tuple[int, bytes, str | None]] = []
                with reading() as tx:
                    for chunk in chunks(wanted[first : first + size]):
                        where = f"id IN ({','.join('?' * len(chunk))})"
                        rows.extend(_current_audio(tx, resolve, prefix, model_id, where, chunk))
                yield rows
            return
        low = start
        end = (stop - 1) if stop is not None else None  # the last id wanted
        bound, bound_args = ("", []) if end is None else (" AND id <= ?", [end])
        while True:
            with reading() as tx:
                last = tx.query(
                    f"SELECT id FROM items WHERE id >= ?{bound} ORDER BY id LIMIT 1 OFFSET ?",
                    [low, *bound_args, size - 1],
                )
                if last:
                    high = int(last[0][0])
                    rows = _current_audio(
                        tx, resolve, prefix, model_id, "id BETWEEN ? AND ?", [low, high]
                    )
                elif end is None:
                    rows = _current_audio(tx, resolve, prefix, model_id, "id >= ?", [low])
                else:
                    rows = _current_audio(
                        tx, resolve, prefix, model_id, "id BETWEEN ? AND ?", [low, end]
                    )
            if rows:
                yield rows
            if not last or (end is not None and high >= end):
                return
            low = high + 1
    finally:
        if reader is not None:
            reader.close()


def embed_states(lib: Library, model_id: str, ids: Iterable[int] | None = None) -> list[ItemState]:
    """For each item (all, or ``ids``): path, whether a vector is stored, audio identity, failure.

    Two SQL queries per :data:`ID_CHUNK` ids (one for all items), no ``Item``
    objects, and no vector value read or decoded: a damaged value is found by
    the readers (:func:`read_stored` names it), not here, so deciding costs
    the same whatever the vectors' size.
    """
    resolve = path_resolver(lib)
    with lib.transaction() as tx:
        if ids is None:
            return _states(tx, resolve, model_id, "id IS NOT NULL", [])
        states: list[ItemState] = []
        for chunk in chunks(sorted({int(i) for i in ids})):
            states.extend(
                _states(tx, resolve, model_id, f"id IN ({','.join('?' * len(chunk))})", chunk)
            )
        return states


def model_counts(lib: Library) -> Counter[str]:
    """How many items hold a vector of each model (any slot)."""
    counts: Counter[str] = Counter()
    with lib.transaction() as tx:
        for row in tx.query(
            "SELECT value, count(*) FROM item_attributes WHERE key IN (?, ?) GROUP BY value",
            [MODEL_FIELD, BACKBONE_MODEL_FIELD],
        ):
            counts[str(row[0])] += int(row[1])
        prefix = f"{VECTOR_FIELD}:"
        for row in tx.query(
            "SELECT key, count(*) FROM item_attributes WHERE key LIKE ? GROUP BY key",
            [prefix + "%"],
        ):
            counts[str(row[0])[len(prefix) :]] += int(row[1])
    return counts


def fingerprint(lib: Library, model_id: str) -> str:
    """What the stored vectors look like now, cheaply: :attr:`ChangeState.text`.

    It changes whenever a vector (of any model) is written or removed, by
    deepsim or by beets itself (``beet modify``, ``beet remove``), because the
    change log's triggers record every such write (see :func:`change_state`);
    reading it is three indexed lookups whatever the library size.
    ``model_id`` is accepted for symmetry with the readers; the state covers
    every model.
    """
    return change_state(lib).text


# --------------------------------------------------------------------------------------------
# The change log: which items' vectors changed since a given point, kept by SQLite itself
#
# Three triggers on ``item_attributes`` append the item id to ``deepsim_changes`` in the
# same statement as every insert, update or delete of a vector row (any model's slot, the
# main slot's model id, an old backbone slot), whoever writes it: this module, beets'
# ``store()``/``remove()``, ``beet modify``, another tool using SQLite.  ``seq`` (SQLite
# AUTOINCREMENT: never reused, even after rows are trimmed) orders the changes; a crash
# loses nothing because a log row commits or rolls back with its write.  ``deepsim_meta``
# holds the log's ``epoch`` (a random token chosen whenever the triggers are (re)installed,
# so changes made while they were missing can never be mistaken for none) and its
# ``floor`` (the seq up to which rows were trimmed).

CHANGES_TABLE = "deepsim_changes"
META_TABLE = "deepsim_meta"
_LOG_VERSION = 1
_TRIGGERS = tuple(f"deepsim_log{_LOG_VERSION}_{op}" for op in ("insert", "delete", "update"))
_LOGGED_KEYS = (VECTOR_FIELD, MODEL_FIELD, BACKBONE_VECTOR_FIELD, BACKBONE_MODEL_FIELD)


def _logged(row: str) -> str:
    keys = " OR ".join(f"{row}.key = '{key}'" for key in _LOGGED_KEYS)
    return f"({keys} OR {row}.key GLOB '{VECTOR_FIELD}:*')"


def _trigger_sql() -> list[str]:
    log = f"INSERT INTO {CHANGES_TABLE} (entity_id) VALUES"
    insert, delete, update = _TRIGGERS
    return [
        f"CREATE TRIGGER {insert} AFTER INSERT ON item_attributes WHEN {_logged('NEW')} "
        f"BEGIN {log} (NEW.entity_id); END",
        f"CREATE TRIGGER {delete} AFTER DELETE ON item_attributes WHEN {_logged('OLD')} "
        f"BEGIN {log} (OLD.entity_id); END",
        f"CREATE TRIGGER {update} AFTER UPDATE ON item_attributes "
        f"WHEN {_logged('OLD')} OR {_logged('NEW')} "
        f"BEGIN {log} (OLD.entity_id); {log} (NEW.entity_id); END",
    ]


@dataclass(frozen=True)
class ChangeState:
    """Where the change log stands: ``epoch``, the last ``seq`` written, the trimmed ``floor``.

    ``text`` (``epoch:seq``) is what an index records of the store it was
    built from; two equal texts mean no vector was written or removed in
    between.  An epoch starting with ``scan-`` means the log could not be
    installed (a read-only database): the text is then a digest of the vector
    rows (a full-table aggregate) and no changes can be listed.
    """

    epoch: str
    seq: int
    floor: int = 0

    @property
    def text(self) -> str:
        return f"{self.epoch}:{self.seq}"

    @property
    def logged(self) -> bool:
        return not self.epoch.startswith("scan-")

    @classmethod
    def parse(cls, text: str) -> ChangeState | None:
        epoch, _, seq = str(text).rpartition(":")
        if not epoch or not seq.isdigit():
            return None
        return cls(epoch, int(seq))


def _read_state(tx: Any) -> ChangeState | None:
    """The log's state, or None when its tables or triggers are missing."""
    names = {
        str(row[0])
        for row in tx.query(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'item_attributes'"
        )
    }
    if not names.issuperset(_TRIGGERS):
        return None
    try:
        meta = dict(tx.query(f"SELECT key, value FROM {META_TABLE}"))
        rows = tx.query("SELECT seq FROM sqlite_sequence WHERE name = ?", [CHANGES_TABLE])
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return None
        raise
    if "epoch" not in meta:
        return None
    seq = int(rows[0][0]) if rows and rows[0][0] is not None else 0
    return ChangeState(str(meta["epoch"]), seq, int(meta.get("floor") or 0))


def _scan_state(tx: Any) -> ChangeState:
    (row,) = tx.query(
        "SELECT count(*), total(id), max(id), total(entity_id) FROM item_attributes "
        "WHERE key IN (?, ?) OR key LIKE ?",
        [VECTOR_FIELD, BACKBONE_VECTOR_FIELD, f"{VECTOR_FIELD}:%"],
    )
    text = "|".join(str(v) for v in row)
    return ChangeState("scan-" + hashlib.sha1(text.encode()).hexdigest()[:16], 0)


def _install_log(lib: Library) -> ChangeState:
    """Create the log's tables and triggers (a new epoch whenever the triggers were missing)."""
    with lib.transaction() as tx:
        tx.mutate(f"CREATE TABLE IF NOT EXISTS {META_TABLE} (key TEXT PRIMARY KEY, value TEXT)")
        tx.mutate(
            f"CREATE TABLE IF NOT EXISTS {CHANGES_TABLE} "
            "(seq INTEGER PRIMARY KEY AUTOINCREMENT, entity_id INTEGER NOT NULL)"
        )
        # A write first: it takes SQLite's write lock, so two processes never both install.
        tx.mutate(f"INSERT OR IGNORE INTO {META_TABLE} (key, value) VALUES ('floor', '0')")
        state = _read_state(tx)
        if state is not None:
            return state
        for name in _TRIGGERS:
            tx.mutate(f"DROP TRIGGER IF EXISTS {name}")
        for sql in _trigger_sql():
            tx.mutate(sql)
        rows = tx.query("SELECT seq FROM sqlite_sequence WHERE name = ?", [CHANGES_TABLE])
        seq = int(rows[0][0]) if rows and rows[0][0] is not None else 0
        epoch = os.urandom(8).hex()
        tx.mutate_many(
            f"INSERT OR REPLACE INTO {META_TABLE} (key, value) VALUES (?, ?)",
            [("epoch", epoch), ("floor", str(seq))],
        )
        log.debug("vector change log installed (epoch %s)", epoch)
        return ChangeState(epoch, seq, seq)


def change_state(lib: Library) -> ChangeState:
    """Where the change log stands now, installing it first if needed.

    The first call on a library (or after something dropped the triggers,
    such as a table rebuilt by hand) creates them with a new epoch; every
    later one is three small indexed reads.  On a database that cannot be
    written the state is a digest of the vector rows instead (see
    :class:`ChangeState`).
    """
    with lib.transaction() as tx:
        state = _read_state(tx)
    if state is not None:
        return state
    try:
        return _install_log(lib)
    except (DBAccessError, sqlite3.Error) as exc:  # e.g. a read-only database
        log.debug("vector change log not installed (%s); using a full-table digest", exc)
        with lib.transaction() as tx:
            return _scan_state(tx)


def changed_since(lib: Library, seq: int, *, limit: int | None = None) -> np.ndarray | None:
    """Ids (ascending, distinct) of the items whose vectors changed after ``seq``.

    One range read of the log, in proportion to the change.  None when more
    than ``limit`` items changed (the caller rebuilds instead of listing them).
    """
    sql = f"SELECT DISTINCT entity_id FROM {CHANGES_TABLE} WHERE seq > ?"
    args: list[Any] = [int(seq)]
    if limit is not None:
        sql += " LIMIT ?"
        args.append(int(limit) + 1)
    with lib.transaction() as tx:
        ids = np.fromiter((int(row[0]) for row in tx.query(sql, args)), np.int64)
    if limit is not None and ids.size > limit:
        return None
    return np.unique(ids)


def trim_changes(lib: Library, upto: int) -> None:
    """Forget the log up to ``upto`` (an index rebuilt from the state at ``upto`` needs none
    of it); an index recorded before it can no longer be updated and is rebuilt instead."""
    with lib.transaction() as tx:
        if _read_state(tx) is None:
            return
        tx.mutate(f"DELETE FROM {CHANGES_TABLE} WHERE seq <= ?", [int(upto)])
        tx.mutate(
            f"UPDATE {META_TABLE} SET value = ? WHERE key = 'floor' AND CAST(value AS INTEGER) < ?",
            [str(int(upto)), int(upto)],
        )


# --------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class VectorRecord:
    """One vector to store: the item, the model, and what identifies the audio."""

    item_id: int
    model_id: str
    vector: Any
    audio: str | None = None
    tags: str | None = None


_INSERT = "INSERT INTO item_attributes (entity_id, key, value) VALUES (?, ?, ?)"


def _main_models(tx: Any, ids: Sequence[int]) -> dict[int, str]:
    found: dict[int, str] = {}
    for chunk in chunks(sorted(set(ids))):
        sql = (
            "SELECT v.entity_id, m.value FROM item_attributes AS v LEFT JOIN item_attributes AS m "
            "ON m.entity_id = v.entity_id AND m.key = ? "
            f"WHERE v.key = ? AND v.entity_id IN ({','.join('?' * len(chunk))})"
        )
        for row in tx.query(sql, [MODEL_FIELD, VECTOR_FIELD, *chunk]):
            found[int(row[0])] = str(row[1])
    return found


def _write_batch(lib: Library, batch: list[tuple[VectorRecord, str]]) -> None:
    with lib.transaction() as tx:
        main = _main_models(tx, [r.item_id for r, _ in batch])
        deletes: list[tuple[int, str]] = []
        records: list[tuple[int, str, str]] = []
        for rec, encoded in batch:
            vec_key, audio_key, tags_key = slot_keys(rec.model_id)
            deletes.append((rec.item_id, FAILED_FIELD))
            if main.setdefault(rec.item_id, rec.model_id) == rec.model_id:
                # Vector first, then the rest: a rewritten vector row never
                # holds the highest row id, so it always gets a new one.
                keys = (VECTOR_FIELD, AUDIO_FIELD, TAGS_FIELD)
                records.append((rec.item_id, VECTOR_FIELD, encoded))
                records.append((rec.item_id, MODEL_FIELD, rec.model_id))
                deletes.extend((rec.item_id, key) for key in (vec_key, audio_key, tags_key))
            else:
                keys = (vec_key, audio_key, tags_key)
                records.append((rec.item_id, vec_key, encoded))
            deletes.append((rec.item_id, keys[1]))
            if rec.audio is not None:
                records.append((rec.item_id, keys[1], rec.audio))
            if rec.tags is not None:
                records.append((rec.item_id, keys[2], rec.tags))
        tx.mutate_many("DELETE FROM item_attributes WHERE entity_id = ? AND key = ?", deletes)
        # A legacy backbone slot of the same model is superseded.
        tx.mutate_many(
            "DELETE FROM item_attributes WHERE entity_id = ? AND key IN (?, ?) AND entity_id IN "
            "(SELECT entity_id FROM item_attributes WHERE entity_id = ? AND key = ? AND value = ?)",
            [
                (
                    r.item_id,
                    BACKBONE_VECTOR_FIELD,
                    BACKBONE_MODEL_FIELD,
                    r.item_id,
                    BACKBONE_MODEL_FIELD,
                    r.model_id,
                )
                for r, _ in batch
            ],
        )
        tx.mutate_many(_INSERT, records)


def write_records(lib: Library, records: Iterable[VectorRecord], *, batch_size: int = 64) -> int:
    """Store vectors, each in its model's slot, ``batch_size`` per transaction.

    A model's vector goes to the main slot when that is empty or already
    holds that model, else to the model's own slot; no other model's vector
    is touched.  A recorded failure of the item is cleared.  Each
    transaction commits before the next batch is read from ``records``, so a
    generator that embeds lazily loses at most one batch when interrupted.

    Returns
    -------
    int
        Number of records written.
    """
    check_int("batch_size", batch_size, minimum=1)
    written = 0
    batch: list[tuple[VectorRecord, str]] = []
    for rec in records:
        batch.append((rec, encode_vector(rec.vector)))
        if len(batch) >= batch_size:
            _write_batch(lib, batch)
            written += len(batch)
            batch = []
    if batch:
        _write_batch(lib, batch)
        written += len(batch)
    return written


def write_vectors(
    lib: Library,
    rows: Iterable[tuple[Any, ...] | VectorRecord],
    model_id: str,
    *,
    batch_size: int = 64,
) -> int:
    """Store ``(item_id, vector)`` or ``(item_id, vector, tags)`` rows as ``model_id``'s.

    See :func:`write_records`, which this calls (a :class:`VectorRecord` row
    is written as it is).
    """

    def records() -> Iterator[VectorRecord]:
        for row in rows:
            if isinstance(row, VectorRecord):
                yield row
            else:
                tags = row[2] if len(row) > 2 else None
                yield VectorRecord(int(row[0]), model_id, row[1], tags=tags)

    return write_records(lib, records(), batch_size=batch_size)


def write_audio(lib: Library, model_id: str, audio: dict[int, str]) -> None:
    """Record new audio identities of existing ``model_id`` vectors (a retagged file)."""
    if not audio:
        return
    _, own_key, _ = slot_keys(model_id)
    with lib.transaction() as tx:
        main = _main_models(tx, list(audio))
        rows = [
            (i, AUDIO_FIELD if main.get(i) == model_id else own_key, text)
            for i, text in audio.items()
        ]
        tx.mutate_many(
            "DELETE FROM item_attributes WHERE entity_id = ? AND key = ?", [r[:2] for r in rows]
        )
        tx.mutate_many(_INSERT, rows)


def record_failures(lib: Library, failures: Iterable[tuple[int, str]]) -> int:
    """Remember failures: ``(item_id, "size:mtime_ns:reason")``."""
    rows = [(int(i), FAILED_FIELD, text) for i, text in failures]
    if rows:
        with lib.transaction() as tx:
            tx.mutate_many(
                "DELETE FROM item_attributes WHERE entity_id = ? AND key = ?",
                [r[:2] for r in rows],
            )
            tx.mutate_many(_INSERT, rows)
    return len(rows)


def prune(lib: Library, keep: Iterable[str]) -> Counter[str]:
    """Remove the vectors of every model not in ``keep``; return how many per model.

    Where the main slot held a pruned model and a kept model has its own
    slot, that vector moves into the main slot.
    """
    keep = set(keep)
    removed: Counter[str] = Counter()
    with lib.transaction() as tx:
        for model, count in model_counts(lib).items():
            if model not in keep:
                removed[model] = count
        gone = [m for m in removed]
        for model in gone:
            vec_key, audio_key, tags_key = slot_keys(model)
            tx.mutate(
                "DELETE FROM item_attributes WHERE key IN (?, ?, ?)", (vec_key, audio_key, tags_key)
            )
            tx.mutate(
                "DELETE FROM item_attributes WHERE key IN (?, ?) AND entity_id IN (SELECT "
                "entity_id FROM item_attributes WHERE key = ? AND value = ?)",
                (BACKBONE_VECTOR_FIELD, BACKBONE_MODEL_FIELD, BACKBONE_MODEL_FIELD, model),
            )
            tx.mutate(
                "DELETE FROM item_attributes WHERE key IN (?, ?, ?, ?) AND entity_id IN (SELECT "
                "entity_id FROM item_attributes WHERE key = ? AND value = ?)",
                (VECTOR_FIELD, AUDIO_FIELD, TAGS_FIELD, MODEL_FIELD, MODEL_FIELD, model),
            )
        # Promote a kept model's own slot into an empty main slot.
        for model in sorted(keep):
            vec_key, audio_key, tags_key = slot_keys(model)
            empty = "entity_id NOT IN (SELECT entity_id FROM item_attributes WHERE key = ?)"
            ids = [
                int(r[0])
                for r in tx.query(
                    f"SELECT entity_id FROM item_attributes WHERE key = ? AND {empty}",
                    (vec_key, VECTOR_FIELD),
                )
            ]
            for chunk in chunks(ids):
                marks = ",".join("?" * len(chunk))
                tx.mutate_many(_INSERT, [(i, MODEL_FIELD, model) for i in chunk])
                for old, new in (
                    (vec_key, VECTOR_FIELD),
                    (audio_key, AUDIO_FIELD),
                    (tags_key, TAGS_FIELD),
                ):
                    tx.mutate(
                        "UPDATE OR REPLACE item_attributes SET key = ? "
                        f"WHERE key = ? AND entity_id IN ({marks})",
                        (new, old, *chunk),
                    )
    return removed


# --------------------------------------------------------------------------------------------
# Listening data kept in the library (deepsim.listening.read_library)


def read_listening_fields(lib: Library, keys: Sequence[str]) -> list[tuple[Any, ...]]:
    """Every item with the given flexible attributes, in one query.

    Rows are ``(id, artist, title, mb_trackid, path, key, value)`` ordered by
    id; an item without any of ``keys`` has one row with ``key`` and ``value``
    ``None``, an item with several has one row per attribute.
    """
    marks = ", ".join("?" for _ in keys)
    sql = (
        "SELECT i.id, i.artist, i.title, i.mb_trackid, i.path, a.key, a.value "
        "FROM items AS i LEFT JOIN item_attributes AS a "
        f"ON a.entity_id = i.id AND a.key IN ({marks}) ORDER BY i.id"
    )
    with lib.transaction() as tx:
        return [tuple(row) for row in tx.query(sql, tuple(keys))]


# --------------------------------------------------------------------------------------------
# Item fields and play times for paths, versions, outliers, the map and the radio


def read_item_fields(
    lib: Library, ids: Iterable[int], fields: Sequence[str]
) -> dict[int, tuple[Any, ...]]:
    """Fixed ``items`` columns of the given ids, in one query (ids that no longer exist are absent).

    ``fields`` must be fixed item fields (``artist``, ``title``, ``album``,
    ``album_id``, ``year``, ``genres``, ``path``...); list fields such as
    ``genres`` come back as stored (beets' delimited text), paths as bytes.
    """
    from beets.library import Item

    unknown = [name for name in fields if name not in Item._fields]
    if unknown:
        raise ValueError(f"not fixed item fields: {', '.join(unknown)}")
    wanted = sorted({int(i) for i in ids})
    out: dict[int, tuple[Any, ...]] = {}
    columns = ", ".join(f'"{name}"' for name in fields)
    with lib.transaction() as tx:
        for start in range(0, len(wanted), 900):
            chunk = wanted[start : start + 900]
            rows = tx.query(
                f"SELECT id, {columns} FROM items WHERE id IN ({','.join('?' * len(chunk))})",
                chunk,
            )
            for row in rows:
                out[int(row[0])] = tuple(row[1:])
    return out


def read_all_item_fields(lib: Library, fields: Sequence[str]) -> dict[int, tuple[Any, ...]]:
    """:func:`read_item_fields` for every item of the library (one query)."""
    from beets.library import Item

    unknown = [name for name in fields if name not in Item._fields]
    if unknown:
        raise ValueError(f"not fixed item fields: {', '.join(unknown)}")
    columns = ", ".join(f'"{name}"' for name in fields)
    with lib.transaction() as tx:
        rows = tx.query(f"SELECT id, {columns} FROM items")
    return {int(row[0]): tuple(row[1:]) for row in rows}


def ids_played_since(lib: Library, since: float) -> set[int]:
    """Ids of items whose ``last_played`` (set by beets' mpdstats) is at or after ``since``."""
    with lib.transaction() as tx:
        rows = tx.query(
            "SELECT entity_id FROM item_attributes WHERE key = 'last_played' "
            "AND CAST(value AS REAL) >= ?",
            [float(since)],
        )
    return {int(row[0]) for row in rows}


# --------------------------------------------------------------------------------------------
# Queries moved from other modules (issue 12)


@dataclass(frozen=True)
class WhereSQL:
    """A beets query SQL can evaluate, over ``items`` (joined to ``albums`` when it needs to be)."""

    source: str
    clause: str
    subvals: tuple[Any, ...]


def where_sql(where: dbquery.Query) -> WhereSQL | None:
    """``where`` as SQL, or None for a query SQL cannot evaluate (flexible attributes...)."""
    from beets.library import Item

    clause, subvals = where.clause()
    if clause is None:
        return None
    source = "items"
    if getattr(where, "field_names", set()) & getattr(Item, "other_db_fields", set()):
        source += f" {Item.relation_join}"
    return WhereSQL(source, clause, tuple(subvals))


def where_ids(lib: Library, where: WhereSQL, *, limit: int | None = None) -> np.ndarray:
    """Ids (int64) of the items matching ``where``, in one query; at most ``limit`` of them."""
    sql = f"SELECT items.id FROM {where.source} WHERE {where.clause} GROUP BY items.id"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    with lib.transaction() as tx:
        rows = tx.query(sql, list(where.subvals))
    return np.fromiter((row[0] for row in rows), np.int64, count=len(rows))


def cap_rows(
    lib: Library, ids: Sequence[int], where: WhereSQL | None = None
) -> Iterator[tuple[int, Any, Any, Any, Any, bytes]]:
    """``(id, artist, albumartist, album, album_id, absolute path)`` of those of ``ids``
    that exist and match ``where`` (one query per :data:`ID_CHUNK`)."""
    source, clause, subvals = "items", "1", ()
    if where is not None:
        source, clause, subvals = where.source, where.clause, where.subvals
    resolve = path_resolver(lib)
    for chunk in chunks(sorted({int(i) for i in ids})):
        sql = (
            "SELECT items.id, items.artist, items.albumartist, items.album, items.album_id, "
            f"items.path FROM {source} WHERE items.id IN ({','.join('?' * len(chunk))}) "
            f"AND ({clause}) GROUP BY items.id"
        )
        with lib.transaction() as tx:
            rows = tx.query(sql, [*chunk, *subvals])
        for row in rows:
            yield int(row[0]), row[1], row[2], row[3], row[4], resolve(row[5])
