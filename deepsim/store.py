"""Vectors in the beets database.

Each embedded item carries two flexible attributes:

``deepsim_vector``
    The L2-normalised vector, base64 of little-endian float16 (a 400-d vector
    is 1,068 characters; float32 would double that for no gain in ranking —
    see docs/performance.md).  Typed by :class:`VectorType`, so
    ``item.deepsim_vector`` is a float32 numpy array.
``deepsim_model``
    The id of the model that made it.  Vectors of other ids are ignored, so
    models never mix.

Optionally ``deepsim_tags`` holds the model's top tags as text.

A second slot, ``deepsim_backbone_vector`` / ``deepsim_backbone_model``, keeps
the vector of the model a trained head reads (its *backbone*), so that
re-training, re-embedding after ``beet deepsim-train --no-embed`` and going
back to ``model: default`` need no audio.  Reads for a model id look in both
slots (the main one wins); a vector means the same whichever slot holds it.

Reads go through one SQL query (never by loading ``Item`` objects); writes go
in transactions of ``batch_size`` items, so an interruption loses at most the
batch in flight.  torch is never imported here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from beets.dbcore import types

if TYPE_CHECKING:
    from beets.library import Library

VECTOR_FIELD = "deepsim_vector"
MODEL_FIELD = "deepsim_model"
TAGS_FIELD = "deepsim_tags"
BACKBONE_VECTOR_FIELD = "deepsim_backbone_vector"
BACKBONE_MODEL_FIELD = "deepsim_backbone_model"
_SLOTS = ((BACKBONE_VECTOR_FIELD, BACKBONE_MODEL_FIELD), (VECTOR_FIELD, MODEL_FIELD))

_DTYPE = np.dtype("<f2")


def encode_vector(vector: np.ndarray) -> str:
    """Encode a 1-D vector as base64 of little-endian float16."""
    array = np.asarray(vector, dtype=np.float32)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"expected a non-empty 1-D vector, got shape {array.shape!r}")
    if not np.all(np.isfinite(array)):
        raise ValueError("vector contains NaN or infinite values")
    return base64.b64encode(array.astype(_DTYPE).tobytes()).decode("ascii")


def decode_vector(text: str | bytes) -> np.ndarray:
    """Inverse of :func:`encode_vector`; returns float32."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not a deepsim vector encoding ({exc})") from None
    if len(raw) == 0 or len(raw) % _DTYPE.itemsize:
        raise ValueError(f"not a deepsim vector encoding ({len(raw)} bytes)")
    return np.frombuffer(raw, dtype=_DTYPE).astype(np.float32)


class VectorType(types.Type):  # type: ignore[type-arg]
    """beets field type of ``deepsim_vector``: float32 array in memory, base64 text in SQL."""

    sql = "TEXT"
    model_type = np.ndarray

    @property
    def null(self) -> None:
        return None

    def format(self, value: Any) -> str:
        if value is None:
            return ""
        return f"<{len(value)}-d vector>"

    def parse(self, string: str) -> np.ndarray | None:
        try:
            return decode_vector(string)
        except ValueError:
            return None

    def normalize(self, value: Any) -> np.ndarray | None:
        if value is None:
            return None
        if isinstance(value, (str, bytes)):
            return self.parse(value if isinstance(value, str) else value.decode("ascii", "ignore"))
        return np.asarray(value, dtype=np.float32)

    def to_sql(self, model_value: Any) -> str | None:
        if model_value is None:
            return None
        return encode_vector(model_value)


def _slot_rows(vector_key: str, model_key: str) -> str:
    return f"""
    FROM item_attributes AS v
    JOIN item_attributes AS m
      ON m.entity_id = v.entity_id AND m.key = '{model_key}'
    JOIN items AS i ON i.id = v.entity_id
    WHERE v.key = '{vector_key}' AND m.value = ?
"""


def _query_slots(lib: Library, columns: str, model_id: str, extra: str = "", params=()) -> list:
    """Rows of both slots for ``model_id``; main-slot rows come last (and win)."""
    rows: list[Any] = []
    with lib.transaction() as tx:
        for vector_key, model_key in _SLOTS:
            sql = f"SELECT {columns} {_slot_rows(vector_key, model_key)}{extra}"
            rows.extend(tx.query(sql, [model_id, *params]))
    return rows


def _rows_to_matrix(rows: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.fromiter((int(row[0]) for row in rows), np.int64, count=len(rows))
    raws: list[bytes] = []
    for _, text in rows:
        try:
            raws.append(binascii.a2b_base64(text, strict_mode=True))
        except (binascii.Error, ValueError, TypeError):
            raws.append(b"")  # a damaged value is treated as "no vector"
    sizes = np.fromiter((len(r) for r in raws), np.int64, count=len(raws))
    if len(raws) == 0:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    # The common size is the dimension; rows of any other size are dropped.
    valid = sizes[(sizes > 0) & (sizes % _DTYPE.itemsize == 0)]
    if valid.size == 0:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    size = int(np.bincount(valid).argmax())
    keep = sizes == size
    if not keep.all():
        raws = [r for r, k in zip(raws, keep, strict=True) if k]
        ids = ids[keep]
    matrix = np.frombuffer(b"".join(raws), dtype=_DTYPE).reshape(len(raws), -1)
    matrix = matrix.astype(np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    np.divide(matrix, norms, out=matrix, where=norms > 0)
    return ids, matrix


def read_vectors(
    lib: Library, model_id: str, *, ids: Iterable[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """All stored vectors of ``model_id`` (or of the given item ids), in one query.

    Returns
    -------
    ids, matrix
        int64 item ids (ascending) and float32 ``(n, dim)`` unit rows.  Items
        without a vector of this model are absent.
    """
    extra = ""
    params: list[Any] = []
    wanted: set[int] | None = None
    if ids is not None:
        wanted = {int(i) for i in ids}
        if len(wanted) <= 500:
            extra = f" AND v.entity_id IN ({','.join('?' * len(wanted))})"
            params.extend(sorted(wanted))
            wanted = None
    by_id = {
        int(row[0]): row[1]
        for row in _query_slots(lib, "v.entity_id, v.value", model_id, extra, params)
    }
    if wanted is not None:
        by_id = {i: v for i, v in by_id.items() if i in wanted}
    return _rows_to_matrix(sorted(by_id.items()))


def ids_with_vectors(lib: Library, model_id: str) -> set[int]:
    """Ids of the items that hold a vector of ``model_id`` (one query a slot, no decoding)."""
    return {int(row[0]) for row in _query_slots(lib, "v.entity_id", model_id)}


def _int_list(text: str | None) -> np.ndarray:
    return np.fromstring(text, np.int64, sep=",") if text else np.zeros(0, np.int64)


def vector_row_ids(lib: Library, model_id: str) -> tuple[np.ndarray, np.ndarray]:
    """Item ids (ascending) and SQLite row ids of ``model_id``'s vectors, without decoding.

    beets replaces a rewritten attribute row, which gets a new row id, so
    comparing row ids with an earlier read tells added, rewritten and removed
    vectors apart (what :func:`deepsim.index.refresh_index` keeps up).
    """
    ids, rows = np.zeros(0, np.int64), np.zeros(0, np.int64)
    for entity_text, row_text in _query_slots(
        lib, "group_concat(v.entity_id), group_concat(v.id)", model_id
    ):
        # The main slot comes last and wins over the backbone slot.
        ids = np.concatenate([_int_list(entity_text), ids])
        rows = np.concatenate([_int_list(row_text), rows])
    ids, first = np.unique(ids[::-1], return_index=True)
    return ids, rows[::-1][first]


def vector_rows(lib: Library) -> tuple[np.ndarray, np.ndarray]:
    """Item ids and row ids of every stored vector row, of any model and slot.

    One aggregate over one key pair with no join: 100k rows in about 50 ms, a
    quarter of :func:`vector_row_ids` (which filters by model).
    """
    with lib.transaction() as tx:
        (row,) = tx.query(
            "SELECT group_concat(entity_id), group_concat(id) "
            "FROM item_attributes WHERE key IN (?, ?)",
            [VECTOR_FIELD, BACKBONE_VECTOR_FIELD],
        )
    return _int_list(row[0]), _int_list(row[1])


def ids_with_any_vector(lib: Library) -> set[int]:
    """Ids of the items that hold a main vector of any model."""
    with lib.transaction() as tx:
        rows = tx.query("SELECT entity_id FROM item_attributes WHERE key = ?", [VECTOR_FIELD])
    return {int(row[0]) for row in rows}


def fingerprint(lib: Library, model_id: str) -> str:
    """A cheap digest of the stored vectors.

    It changes whenever a vector is written (beets' flexible-attribute table
    replaces a rewritten row, which gets a new row id) or an item with a vector
    is removed (beets deletes its attributes), without reading the vectors.
    It covers the vectors of every model, so writing another model's vectors
    also changes it: harmless (an index rebuilt once more), and it keeps the
    query to one aggregate over one key.
    """
    with lib.transaction() as tx:
        (row,) = tx.query(
            "SELECT count(*), total(id), max(id), total(entity_id) "
            "FROM item_attributes WHERE key IN (?, ?)",
            [VECTOR_FIELD, BACKBONE_VECTOR_FIELD],
        )
    text = f"{model_id}|{row[0]}|{row[1]}|{row[2]}|{row[3]}"
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def write_vectors(
    lib: Library,
    rows: Iterable[tuple[Any, ...]],
    model_id: str,
    *,
    batch_size: int = 64,
    backbone_id: str | None = None,
) -> int:
    """Store vectors (and optional tag text) for item ids, ``batch_size`` per transaction.

    Rows are ``(item_id, vector)``, ``(item_id, vector, tags_text)`` or, with
    ``backbone_id``, ``(item_id, vector, tags_text, backbone_vector)``: the
    backbone vector goes to the backbone slot.  Each transaction commits
    before the next batch is read from ``rows``, so a generator that embeds
    lazily loses at most one batch when interrupted.

    Returns
    -------
    int
        Number of items written.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size!r}")
    written = 0
    batch: list[tuple[str, ...] | tuple[Any, ...]] = []

    def flush() -> None:
        nonlocal written
        if not batch:
            return
        records: list[tuple[int, str, str]] = []
        for item_id, encoded, tags, backbone in batch:
            # Vector first, then model, then the rest: a rewritten vector row
            # never holds the highest row id, so it always gets a new one.
            records.append((item_id, VECTOR_FIELD, encoded))
            records.append((item_id, MODEL_FIELD, model_id))
            if tags is not None:
                records.append((item_id, TAGS_FIELD, tags))
            if backbone is not None and backbone_id is not None:
                records.append((item_id, BACKBONE_VECTOR_FIELD, backbone))
                records.append((item_id, BACKBONE_MODEL_FIELD, backbone_id))
        with lib.transaction() as tx:
            tx.mutate_many(
                "INSERT INTO item_attributes (entity_id, key, value) VALUES (?, ?, ?)",
                records,
            )
        written += len(batch)
        batch.clear()

    for row in rows:
        item_id, vector = int(row[0]), row[1]
        tags = row[2] if len(row) > 2 else None
        backbone = row[3] if len(row) > 3 and row[3] is not None else None
        batch.append(
            (
                item_id,
                encode_vector(vector),
                tags,
                None if backbone is None else encode_vector(backbone),
            )
        )
        if len(batch) >= batch_size:
            flush()
    flush()
    return written


def write_backbone_vectors(
    lib: Library, rows: Iterable[tuple[int, np.ndarray]], model_id: str
) -> int:
    """Store vectors in the backbone slot only (the main vector is left alone)."""
    records: list[tuple[int, str, str]] = []
    for item_id, vector in rows:
        records.append((int(item_id), BACKBONE_VECTOR_FIELD, encode_vector(vector)))
        records.append((int(item_id), BACKBONE_MODEL_FIELD, model_id))
    with lib.transaction() as tx:
        tx.mutate_many(
            "INSERT INTO item_attributes (entity_id, key, value) VALUES (?, ?, ?)", records
        )
    return len(records) // 2


def clear_vectors(lib: Library, item_ids: Iterable[int]) -> None:
    """Remove deepsim's fields from the given items."""
    ids = [int(i) for i in item_ids]
    with lib.transaction() as tx:
        tx.mutate_many(
            "DELETE FROM item_attributes WHERE entity_id = ? AND key IN (?, ?, ?, ?, ?)",
            [
                (
                    i,
                    VECTOR_FIELD,
                    MODEL_FIELD,
                    TAGS_FIELD,
                    BACKBONE_VECTOR_FIELD,
                    BACKBONE_MODEL_FIELD,
                )
                for i in ids
            ],
        )


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
        return list(tx.query(sql, tuple(keys)))


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
