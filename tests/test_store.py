from __future__ import annotations

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


def test_typed_field_on_items(lib: Library) -> None:
    import beets.library

    item = lib.get_item(1)
    store.write_vectors(lib, [(1, np.ones(8, np.float32) / np.sqrt(8), "rock, pop")], "m-1")
    # The plugin registers the type; emulate that here.
    types = dict(beets.library.Item._types)
    beets.library.Item._types = {**types, store.VECTOR_FIELD: store.VectorType()}
    try:
        item = lib.get_item(1)
        assert isinstance(item[store.VECTOR_FIELD], np.ndarray)
        assert item.formatted()[store.VECTOR_FIELD] == "<8-d vector>"
        assert item[store.MODEL_FIELD] == "m-1"
        assert item[store.TAGS_FIELD] == "rock, pop"
    finally:
        beets.library.Item._types = types


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


def test_damaged_value_is_treated_as_missing(lib: Library) -> None:
    store.write_vectors(lib, [(1, np.ones(8)), (2, np.ones(8))], "m")
    with lib.transaction() as tx:
        tx.mutate(
            "UPDATE item_attributes SET value='%%%' WHERE entity_id=2 AND key=?",
            (store.VECTOR_FIELD,),
        )
    ids, _ = store.read_vectors(lib, "m")
    assert ids.tolist() == [1]


def test_clear_vectors(lib: Library) -> None:
    store.write_vectors(lib, [(1, np.ones(8)), (2, np.ones(8))], "m")
    store.clear_vectors(lib, [1])
    assert store.ids_with_vectors(lib, "m") == {2}
