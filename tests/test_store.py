from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
from beets.library import Item, Library

from deepsim import store


@pytest.fixture
def lib() -> Library:
    lib = Library(":memory:")
    for i in range(6):
        lib.add(Item(title=f"t{i}", artist="a", path=f"/music/{i}.mp3".encode()))
    return lib


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    m = rng.standard_normal((n, dim)).astype(np.float32)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def test_encoding_roundtrip_is_float16_exact_enough() -> None:
    v = unit(np.random.default_rng(0), 1, 400)[0]
    text = store.encode_vector(v)
    assert len(text) == 1068  # 800 bytes of float16, base64
    back = store.decode_vector(text)
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, v, atol=1e-3)
    assert float(back @ v) > 0.99999


@pytest.mark.parametrize("bad", ["", "not base64!", "QUJD"])
def test_bad_encodings_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        store.decode_vector(bad)


def test_write_then_read_in_one_query(lib: Library) -> None:
    vectors = unit(np.random.default_rng(1), 4, 16)
    written = store.write_vectors(lib, [(i + 1, vectors[i]) for i in range(4)], "m-1", batch_size=3)
    assert written == 4
    ids, matrix = store.read_vectors(lib, "m-1")
    assert ids.tolist() == [1, 2, 3, 4]
    np.testing.assert_allclose(matrix, vectors, atol=1e-3)
    assert store.ids_with_vectors(lib, "m-1") == {1, 2, 3, 4}
    # models never mix
    assert store.read_vectors(lib, "other")[0].size == 0
    sub_ids, _sub = store.read_vectors(lib, "m-1", ids=[2, 4, 6])
    assert sub_ids.tolist() == [2, 4]


@pytest.fixture
def typed() -> Iterator[None]:
    """Item types as the plugin registers them, through beets' own type cache.

    beets caches ``Item._types`` per class (``cached_classproperty``); putting
    the entry there and clearing it afterwards (as beets' test helpers do)
    leaves nothing behind for the next test, whatever the order.
    """
    from beets.util import cached_classproperty

    cached_classproperty.cache.clear()
    base = dict(Item._types)
    cached_classproperty.cache[(Item, "_types")] = {**base, store.VECTOR_FIELD: store.VectorType()}
    yield
    cached_classproperty.cache.clear()


def test_typed_field_on_items(lib: Library, typed: None) -> None:
    store.write_vectors(lib, [(1, np.ones(8, np.float32) / np.sqrt(8), "rock, pop")], "m-1")
    item = lib.get_item(1)
    vector = item[store.VECTOR_FIELD]
    assert isinstance(vector, store.Vector)
    assert np.asarray(vector).shape == (8,) and np.asarray(vector).dtype == np.float32
    assert str(vector) == "<8-d vector>"
    assert item.formatted()[store.VECTOR_FIELD].startswith("<8-d vector ")
    assert item[store.MODEL_FIELD] == "m-1"
    assert item[store.TAGS_FIELD] == "rock, pop"


def test_the_vector_value_behaves_like_a_beets_value(lib: Library, typed: None) -> None:
    rng = np.random.default_rng(5)
    v = unit(rng, 1, 400)[0]
    a, b, c = store.Vector(v), store.Vector(store.encode_vector(v)), store.Vector(-v)
    # equality and hashing by content, never numpy's elementwise ==
    assert a == b and hash(a) == hash(b) and a != c
    assert (a == "text") is False and a != None  # noqa: E711
    assert len({a, b, c}) == 2
    with pytest.raises(ValueError):
        np.asarray(a)[0] = 1.0  # immutable
    typ = store.VectorType()
    # SQL round trip keeps the stored text exactly
    assert typ.from_sql(typ.to_sql(a)) == a
    # format is short; parse reads back a stored encoding and a shown vector
    shown = typ.format(a)
    assert shown.startswith("<400-d vector ") and len(shown) < 30
    assert typ.parse(shown) == a
    assert typ.parse(a.text) == a
    assert typ.parse("not a vector") is None
    # beets' own diff code compares with ==: an unchanged item shows no change
    store.write_vectors(lib, [(1, v)], "m-1")
    first, second = lib.get_item(1), lib.get_item(1)
    assert first[store.VECTOR_FIELD] == second[store.VECTOR_FIELD]
    from beets.ui import show_model_changes

    assert show_model_changes(second, first) is False
    second.title = "changed"
    second.store()
    assert lib.get_item(1)[store.VECTOR_FIELD] == a


def test_one_slot_per_model(lib: Library) -> None:
    rng = np.random.default_rng(6)
    a, b = unit(rng, 3, 8), unit(rng, 3, 16)
    store.write_vectors(lib, [(i + 1, a[i]) for i in range(3)], "model-a")
    store.write_vectors(lib, [(i + 1, b[i]) for i in range(2)], "model-b")
    # embedding with another model destroys nothing
    ids_a, matrix_a = store.read_vectors(lib, "model-a")
    ids_b, matrix_b = store.read_vectors(lib, "model-b")
    assert ids_a.tolist() == [1, 2, 3] and ids_b.tolist() == [1, 2]
    np.testing.assert_allclose(matrix_a, a, atol=1e-3)
    np.testing.assert_allclose(matrix_b, b[:2], atol=1e-3)
    # the main slot keeps the first model; the other has its own slot
    item = lib.get_item(1)
    assert item[store.MODEL_FIELD] == "model-a"
    assert store.slot_keys("model-b")[0] in item
    # rewriting a model's vector stays in that model's slot
    store.write_vectors(lib, [(1, b[2])], "model-b")
    np.testing.assert_allclose(store.read_vectors(lib, "model-b", ids=[1])[1][0], b[2], atol=1e-3)
    np.testing.assert_allclose(store.read_vectors(lib, "model-a", ids=[1])[1][0], a[0], atol=1e-3)
    assert store.model_counts(lib) == {"model-a": 3, "model-b": 2}
    # prune keeps one model; its vectors move into the main slot
    assert store.prune(lib, {"model-b"}) == {"model-a": 3}
    assert store.model_counts(lib) == {"model-b": 2}
    item = lib.get_item(1)
    assert item[store.MODEL_FIELD] == "model-b"
    assert not [k for k in item.keys(True) if k.startswith("deepsim_") and ":" in k]
    np.testing.assert_allclose(store.read_vectors(lib, "model-b")[1], [b[2], b[1]], atol=1e-3)


def test_legacy_backbone_slot_is_read(lib: Library) -> None:
    v = unit(np.random.default_rng(7), 1, 8)[0]
    with lib.transaction() as tx:
        tx.mutate_many(
            "INSERT INTO item_attributes (entity_id, key, value) VALUES (?, ?, ?)",
            [
                (4, store.BACKBONE_VECTOR_FIELD, store.encode_vector(v)),
                (4, store.BACKBONE_MODEL_FIELD, "old-backbone"),
            ],
        )
    assert store.read_vectors(lib, "old-backbone")[0].tolist() == [4]
    store.write_vectors(lib, [(4, v)], "old-backbone")  # supersedes the legacy slot
    assert store.BACKBONE_VECTOR_FIELD not in lib.get_item(4)
    assert store.read_vectors(lib, "old-backbone")[0].tolist() == [4]


def test_fingerprint_changes_on_write_and_removal(lib: Library) -> None:
    rng = np.random.default_rng(2)
    store.write_vectors(
        lib, [(i, v) for i, v in zip(range(1, 6), unit(rng, 5, 8), strict=False)], "m"
    )
    first = store.fingerprint(lib, "m")
    assert store.fingerprint(lib, "m") == first
    # rewrite the last-written vector with new values
    store.write_vectors(lib, [(5, unit(rng, 1, 8)[0])], "m")
    second = store.fingerprint(lib, "m")
    assert second != first
    lib.get_item(2).remove()
    assert store.fingerprint(lib, "m") != second
    assert 2 not in store.ids_with_vectors(lib, "m")


def test_interrupted_writer_keeps_committed_batches(lib: Library) -> None:
    rng = np.random.default_rng(3)

    def rows():
        for i in range(1, 6):
            if i == 5:
                raise KeyboardInterrupt
            yield i, unit(rng, 1, 8)[0]

    with pytest.raises(KeyboardInterrupt):
        store.write_vectors(lib, rows(), "m", batch_size=2)
    assert store.ids_with_vectors(lib, "m") == {1, 2, 3, 4}


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        ("%%%", "not base64"),
        (store.encode_vector(np.ones(5)), "10 bytes, not 16"),
        (store.base64.b64encode(np.full(8, np.nan, "<f2").tobytes()).decode(), "NaN"),
    ],
)
def test_damaged_value_is_named_once_and_treated_as_missing(
    lib: Library, damage: str, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    store.write_vectors(lib, [(1, np.ones(8)), (2, np.ones(8)), (3, np.ones(8))], "m")
    with lib.transaction() as tx:
        tx.mutate(
            "UPDATE item_attributes SET value=? WHERE entity_id=2 AND key=?",
            (damage, store.VECTOR_FIELD),
        )
    store._warned.clear()
    with caplog.at_level("WARNING", logger="deepsim"):
        ids, _ = store.read_vectors(lib, "m")
        store.read_vectors(lib, "m")
    assert ids.tolist() == [1, 3]
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "deepsim.store" and "damaged" in r.getMessage()
    ]
    assert len(warnings) == 1 and "item 2: /music/1.mp3" in warnings[0] and why in warnings[0]
    stored = store.read_stored(lib, "m", warn=False)
    assert list(stored.corrupt) == [2]
    assert "`beet deepsim-embed -f id:2` recomputes it" in warnings[0]
    # deciding what to embed reads no vector value: the slot is filled
    states = {s.item_id: s for s in store.embed_states(lib, "m")}
    assert states[2].vector and states[1].vector


def test_items_by_ids_in_chunks(lib: Library, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "ID_CHUNK", 2)
    found = store.items_by_ids(lib, [1, 3, 4, 5, 99])
    assert sorted(found) == [1, 3, 4, 5]
    assert found[3].title == "t2"


def test_failures_and_audio_are_recorded(lib: Library) -> None:
    store.record_failures(lib, [(2, "10:20:no audio stream")])
    assert lib.get_item(2)[store.FAILED_FIELD] == "10:20:no audio stream"
    store.write_records(lib, [store.VectorRecord(2, "m", np.ones(8), audio="10:20:ab")])
    item = lib.get_item(2)
    assert store.FAILED_FIELD not in item  # a vector clears the failure
    assert item[store.AUDIO_FIELD] == "10:20:ab"
    store.write_audio(lib, "m", {2: "11:21:ab"})
    assert store.audio_identities(lib, "m", [2]) == {2: "11:21:ab"}


# --------------------------------------------------------------------------- the change log


def test_change_log_lists_every_vector_write_whoever_makes_it(lib: Library) -> None:
    rng = np.random.default_rng(5)
    store.write_vectors(lib, [(i, unit(rng, 1, 8)[0]) for i in (1, 2, 3)], "m")
    state = store.change_state(lib)
    assert store.changed_since(lib, state.seq).tolist() == []
    # writes that are not vectors are not changes
    item = lib.get_item(1)
    item.title = "retitled"
    item["deepsim_audio"] = "1:2:abc"
    item.store()
    store.write_audio(lib, "m", {2: "3:4:def"})
    store.record_failures(lib, [(4, "1:2:no audio")])
    assert store.change_state(lib) == state
    # beets' own writes of the fields are (beet modify, beet remove, another tool)
    item = lib.get_item(2)
    item[store.VECTOR_FIELD] = store.encode_vector(unit(rng, 1, 8)[0])
    item.store()
    item = lib.get_item(3)
    del item[store.VECTOR_FIELD]
    item.store()
    lib.get_item(1).remove()
    with lib.transaction() as tx:
        tx.mutate(
            "UPDATE item_attributes SET key = ? WHERE entity_id = 5 AND key = 'title_sort'",
            [store.VECTOR_FIELD],
        )
        tx.mutate(
            "INSERT INTO item_attributes (entity_id, key, value) VALUES (6, ?, 'x')",
            [f"{store.VECTOR_FIELD}:other"],
        )
    after = store.change_state(lib)
    assert after.epoch == state.epoch and after.seq > state.seq
    assert store.changed_since(lib, state.seq).tolist() == [1, 2, 3, 6]
    assert store.changed_since(lib, state.seq, limit=3) is None
    assert store.fingerprint(lib, "m") == after.text != state.text


def test_change_log_survives_its_triggers_being_dropped(lib: Library) -> None:
    rng = np.random.default_rng(6)
    state = store.change_state(lib)
    with lib.transaction() as tx:
        for name in store._TRIGGERS:
            tx.mutate(f"DROP TRIGGER {name}")
    store.write_vectors(lib, [(1, unit(rng, 1, 8)[0])], "m")  # not logged...
    again = store.change_state(lib)
    assert again.epoch != state.epoch  # ...so the log starts a new epoch: nothing is trusted
    store.write_vectors(lib, [(2, unit(rng, 1, 8)[0])], "m")
    assert store.changed_since(lib, again.seq).tolist() == [2]


def test_change_log_commits_with_its_write(lib: Library) -> None:
    rng = np.random.default_rng(7)
    state = store.change_state(lib)

    def rows():
        yield 1, unit(rng, 1, 8)[0]
        yield 2, unit(rng, 1, 8)[0]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.write_vectors(lib, rows(), "m", batch_size=1)
    assert store.changed_since(lib, state.seq).tolist() == [1, 2]
    assert store.ids_with_vectors(lib, "m") == {1, 2}


def test_trimmed_log_raises_its_floor(lib: Library) -> None:
    rng = np.random.default_rng(8)
    start = store.change_state(lib)
    store.write_vectors(lib, [(i, unit(rng, 1, 8)[0]) for i in (1, 2)], "m")
    middle = store.change_state(lib)
    store.write_vectors(lib, [(3, unit(rng, 1, 8)[0])], "m")
    store.trim_changes(lib, middle.seq)
    now = store.change_state(lib)
    assert now.floor == middle.seq > start.seq and now.seq > middle.seq
    assert store.changed_since(lib, middle.seq).tolist() == [3]
    store.trim_changes(lib, now.seq)
    assert store.changed_since(lib, now.seq).tolist() == []
    # seq numbers are never reused after a trim
    store.write_vectors(lib, [(4, unit(rng, 1, 8)[0])], "m")
    assert store.change_state(lib).seq > now.seq


def test_without_a_writable_log_the_state_is_a_digest(
    lib: Library, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    def refuse(_lib: Library) -> store.ChangeState:
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(store, "_install_log", refuse)
    rng = np.random.default_rng(9)
    first = store.change_state(lib)
    assert not first.logged and store.change_state(lib) == first
    store.write_vectors(lib, [(1, unit(rng, 1, 8)[0])], "m")
    assert store.change_state(lib) != first


def test_embed_states_follow_the_slot_rule_without_reading_vectors(lib: Library) -> None:
    rng = np.random.default_rng(13)
    store.write_records(
        lib,
        [
            store.VectorRecord(1, "a", unit(rng, 1, 8)[0], audio="1:2:x"),  # main slot: a
            store.VectorRecord(1, "b", unit(rng, 1, 8)[0], audio="3:4:y"),  # own slot of b
            store.VectorRecord(2, "b", unit(rng, 1, 8)[0]),  # main slot: b, no identity
        ],
    )
    with lib.transaction() as tx:
        tx.mutate_many(
            "INSERT INTO item_attributes (entity_id, key, value) VALUES (?, ?, ?)",
            [
                (3, store.BACKBONE_VECTOR_FIELD, "not even base64"),
                (3, store.BACKBONE_MODEL_FIELD, "a"),
                (4, store.FAILED_FIELD, "5:6:no audio"),
            ],
        )
        tx.mutate("UPDATE items SET path = ? WHERE id = 5", [b"relative/5.mp3"])
    states = {s.item_id: s for s in store.embed_states(lib, "a")}
    assert [(s.vector, s.audio) for s in states.values()] == [
        (True, "1:2:x"),
        (False, None),
        (True, None),  # a legacy backbone slot of a (its value is not read, damaged or not)
        (False, None),
        (False, None),
        (False, None),
    ]
    assert states[4].failed == "5:6:no audio" and states[1].failed is None
    assert states[5].path == os.path.join(os.fsencode(lib.directory), b"relative", b"5.mp3")
    b_states = {s.item_id: s for s in store.embed_states(lib, "b", ids=[1, 2, 3])}
    assert [(s.vector, s.audio) for s in b_states.values()] == [
        (True, "3:4:y"),
        (True, None),
        (False, None),
    ]
    # the one-query fast read: the identity of the slot embed_states chooses, when it holds
    # a vector, in batches of ids
    batches = list(store.current_audio_batches(lib, "a", batch=4))
    assert [[row[0] for row in part] for part in batches] == [[1, 2, 3, 4], [5, 6]]
    assert [row for part in batches for row in part] == [
        (s.item_id, s.path, s.audio if s.vector else None) for s in states.values()
    ]
    b_rows = [row for part in store.current_audio_batches(lib, "b", ids=[3, 1, 2]) for row in part]
    assert [(i, audio) for i, _, audio in b_rows] == [(1, "3:4:y"), (2, None), (3, None)]


def test_short_field_index_is_made_once_and_used(lib: Library) -> None:
    rng = np.random.default_rng(14)
    store.write_records(lib, [store.VectorRecord(1, "a", unit(rng, 1, 8)[0], audio="1:2:x")])
    assert store.ensure_short_index(lib) and store.ensure_short_index(lib)
    with lib.transaction() as tx:
        (sql,) = tx.query("SELECT sql FROM sqlite_master WHERE name = ?", [store.SHORT_INDEX])[0]
        assert "WHERE" in sql  # partial: no vector value is copied into it
        plan = tx.query(
            # INDEXED BY fails ("no query solution") unless the query may use the partial index
            f"EXPLAIN QUERY PLAN SELECT value FROM item_attributes INDEXED BY {store.SHORT_INDEX} "
            f"WHERE {store._SHORT_KEYS} AND key = ? AND entity_id = ?",
            [store.AUDIO_FIELD, 1],
        )
        assert any(store.SHORT_INDEX in str(tuple(row)) for row in plan)
    # beets keeps working on the items: edits, flexible attributes, removal
    item = lib.get_item(1)
    assert item is not None
    item["deepsim_audio"] = "9:9:z"
    item.store()
    assert next(row[2] for part in store.current_audio_batches(lib, "a") for row in part) == "9:9:z"
    item.remove()
    assert lib.get_item(1) is None


@pytest.mark.parametrize("directory", ["/music", "/music/", "/x/../music"])
def test_fast_read_gives_the_paths_beets_gives(directory: str) -> None:
    # relative paths are joined in SQL where plain, the rest resolved as beets does
    lib = Library(":memory:", directory)
    raws: list[bytes | str] = [b"a/b.mp3", b"/abs/x.mp3", b"./c.mp3", b"a/../d.mp3", b"a//e.mp3"]
    raws += [b".h/f.mp3", b"a/.g.mp3", b"\xff\xfe/bad.mp3", b"", "text/t.mp3"]
    for _ in raws:
        lib.add(Item(title="x"))
    with lib.transaction() as tx:
        for i, raw in enumerate(raws, 1):
            tx.mutate("UPDATE items SET path = ? WHERE id = ?", [raw, i])
    got = [path for part in store.current_audio_batches(lib, "m") for _, path, _ in part]
    base = os.fsencode(lib.directory)
    want = []
    for raw in raws:
        raw = raw.encode() if isinstance(raw, str) else raw
        want.append(raw if not raw or raw[:1] == b"/" else os.path.normpath(base + b"/" + raw))
    assert got == want
    assert got[0] == b"/music/a/b.mp3" and got[3] == b"/music/d.mp3"
