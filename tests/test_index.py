"""deepsim.index: both backends pass the same behavioural tests; saved-index checks."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from beets.library import Item, Library

from deepsim import store
from deepsim.errors import AnnIndexError
from deepsim.index import (
    BACKENDS as BACKEND_CLASSES,
)
from deepsim.index import (
    AnnoyIndex,
    ExactIndex,
    UpdatedIndex,
    VectorIndex,
    index_lock,
    index_paths,
    load_index,
    open_index,
    refresh_index,
    remove_index,
    save_index,
)

BACKENDS = ["annoy", "exact"]
MODEL = "test-model-1"
FP = "fingerprint-1"


def clustered(n: int, dim: int, *, clusters: int, seed: int) -> np.ndarray:
    """Unit vectors from anisotropic gaussian clusters sharing an offset, softplus'd."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)) + rng.normal(size=dim) * 0.5
    labels = rng.integers(0, clusters, n)
    scales = rng.gamma(0.5, 1.0, size=(clusters, dim)) * 0.6
    x = centres[labels] + rng.normal(size=(n, dim)) * scales[labels]
    x = np.logaddexp(0.0, x).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    """2,000 × 32-d clustered vectors under non-contiguous ids (holes for Annoy)."""
    matrix = clustered(2000, 32, clusters=25, seed=0)
    ids = 7 + 3 * np.arange(2000, dtype=np.int64)
    return ids, matrix


def brute_force(
    ids: np.ndarray, matrix: np.ndarray, q: np.ndarray, n: int, exclude: list[int] = ()
) -> tuple[np.ndarray, np.ndarray]:
    sims = matrix @ (q / np.linalg.norm(q))
    keep = ~np.isin(ids, list(exclude))
    order = np.lexsort((ids[keep], -sims[keep]))[:n]
    return ids[keep][order], sims[keep][order]


@pytest.fixture(params=BACKENDS)
def built(request: pytest.FixtureRequest, data: tuple[np.ndarray, np.ndarray]) -> VectorIndex:
    ids, matrix = data
    return BACKEND_CLASSES[request.param]().build(ids, matrix)


# --------------------------------------------------------------------------- shared behaviour


def test_the_nearest_of_an_indexed_vector_is_itself(
    built: VectorIndex, data: tuple[np.ndarray, np.ndarray]
) -> None:
    ids, matrix = data
    for row in (0, 17, 1999):
        found, sims = built.query(matrix[row], 3)
        assert found[0] == ids[row]
        assert sims[0] == pytest.approx(1.0, abs=1e-5)


def test_results_are_ordered_and_similarities_are_exact_cosines(
    built: VectorIndex, data: tuple[np.ndarray, np.ndarray]
) -> None:
    ids, matrix = data
    q = matrix[5] + matrix[900]
    found, sims = built.query(q, 25)
    assert found.dtype == np.int64 and sims.dtype == np.float32
    assert len(found) == 25 and len(set(found.tolist())) == 25
    assert np.all(np.diff(sims) <= 1e-7)
    assert np.all((sims >= -1.0) & (sims <= 1.0))
    by_id = dict(zip(ids.tolist(), range(len(ids)), strict=True))
    expected = matrix[[by_id[i] for i in found.tolist()]] @ (q / np.linalg.norm(q))
    np.testing.assert_allclose(sims, expected, atol=1e-4)


def test_exclusion_and_result_count(
    built: VectorIndex, data: tuple[np.ndarray, np.ndarray]
) -> None:
    _ids, matrix = data
    first, _ = built.query(matrix[3], 10)
    excluded = first[:4].tolist()
    found, _ = built.query(matrix[3], 10, exclude=excluded)
    assert len(found) == 10
    assert not set(found.tolist()) & set(excluded)
    assert found[:6].tolist() == first[4:].tolist()
    assert built.query(matrix[3], 0)[0].size == 0
    # numpy arrays and generators are accepted as exclusions too
    again, _ = built.query(matrix[3], 10, exclude=np.asarray(excluded))
    assert again.tolist() == found.tolist()
    again, _ = built.query(matrix[3], 10, exclude=(i for i in excluded))
    assert again.tolist() == found.tolist()


def test_recall_at_10_against_exact_search_on_clustered_data(
    built: VectorIndex, data: tuple[np.ndarray, np.ndarray]
) -> None:
    ids, matrix = data
    rng = np.random.default_rng(1)
    hits = []
    for row in rng.choice(len(ids), 50, replace=False):
        q = matrix[row] + 0.3 * matrix[rng.integers(len(ids))]
        truth, _ = brute_force(ids, matrix, q, 10)
        found, _ = built.query(q, 10)
        hits.append(len(set(truth.tolist()) & set(found.tolist())) / 10)
    assert np.mean(hits) >= 0.99


def test_asking_for_more_than_the_index_holds(built: VectorIndex) -> None:
    small = BACKEND_CLASSES[built.backend]().build([4, 9, 2], np.eye(3, dtype=np.float32) + 0.1)
    found, _sims = small.query([1.0, 0.2, 0.1], 10, exclude=[9])
    assert sorted(found.tolist()) == [2, 4]
    assert found[0] == 4
    assert len(small) == 3 and small.dim == 3


def test_save_load_roundtrip_gives_the_same_answers(
    built: VectorIndex, data: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    ids, matrix = data
    path = save_index(built, tmp_path / "deepsim", model_id=MODEL, fingerprint=FP)
    assert path.name == f"index-{MODEL}{built.suffix}"
    check = load_index(tmp_path / "deepsim", model_id=MODEL, fingerprint=FP)
    assert check.state == "fresh", check.reason
    assert check.fresh and check.index is not None
    loaded = check.index
    assert type(loaded) is type(built)
    assert len(loaded) == len(ids) and loaded.dim == matrix.shape[1]
    for row in (0, 250, 1234):
        a_ids, a_sims = built.query(matrix[row], 15, exclude=[ids[row]])
        b_ids, b_sims = loaded.query(matrix[row], 15, exclude=[ids[row]])
        assert a_ids.tolist() == b_ids.tolist()
        np.testing.assert_allclose(a_sims, b_sims, atol=1e-6)
    sidecar = check.sidecar
    assert sidecar is not None
    assert (sidecar.model_id, sidecar.count, sidecar.dim, sidecar.fingerprint) == (
        MODEL,
        len(ids),
        matrix.shape[1],
        FP,
    )
    assert sidecar.max_id == int(ids.max())
    # atomic writes leave no temporary files behind
    assert sorted(p.name for p in (tmp_path / "deepsim").iterdir()) == sorted(
        [path.name, f"index-{MODEL}.json"]
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_input_is_rejected_naming_the_problem(backend: str) -> None:
    index = BACKEND_CLASSES[backend]()
    eye = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match="3 ids but 4"):
        index.build([1, 2, 3], eye)
    with pytest.raises(ValueError, match="unique"):
        index.build([1, 2, 2, 3], eye)
    with pytest.raises(ValueError, match="non-negative"):
        index.build([1, 2, -3, 4], eye)
    with pytest.raises(ValueError, match="id 3 is zero"):
        index.build([1, 2, 3, 4], np.diag([1, 1, 0, 1]).astype(np.float32))
    with pytest.raises(ValueError, match="NaN"):
        index.build([1, 2, 3, 4], np.full((4, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match="two-dimensional"):
        index.build([1], np.ones(4, np.float32))
    index.build([1, 2, 3, 4], eye)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        index.query(np.ones(5), 2)
    with pytest.raises(ValueError, match="non-zero"):
        index.query(np.zeros(4), 2)
    with pytest.raises(ValueError, match="-1"):
        index.query(np.ones(4), -1)


def test_annoy_specific_limits(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2\\*\\*31"):
        AnnoyIndex().build([2**31], np.ones((1, 3), np.float32))
    with pytest.raises(ValueError, match="n_trees"):
        AnnoyIndex(n_trees=0)
    with pytest.raises(ValueError, match="search_fraction"):
        AnnoyIndex(search_fraction=2.0)
    with pytest.raises(AnnIndexError, match="build or load"):
        AnnoyIndex().query(np.ones(3), 1)
    with pytest.raises(ValueError, match="unknown index backend"):
        index_paths(tmp_path, MODEL, backend="faiss")
    with pytest.raises(AnnIndexError, match="empty"):
        save_index(ExactIndex(), tmp_path, model_id=MODEL, fingerprint=FP)


# --------------------------------------------------------------------------- saved-index checks


@pytest.fixture
def saved(data: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> tuple[Path, Path, Path]:
    """An Annoy index saved under tmp_path/deepsim: (directory, index file, sidecar)."""
    ids, matrix = data
    directory = tmp_path / "deepsim"
    save_index(AnnoyIndex(n_trees=5).build(ids, matrix), directory, model_id=MODEL, fingerprint=FP)
    path, sidecar = index_paths(directory, MODEL)
    assert path.exists() and sidecar.exists()
    return directory, path, sidecar


def test_missing_index(tmp_path: Path) -> None:
    check = load_index(tmp_path / "nowhere", model_id=MODEL, fingerprint=FP)
    assert check.state == "missing" and check.index is None


def test_stale_after_the_library_changed(saved: tuple[Path, Path, Path]) -> None:
    directory, _, _ = saved
    check = load_index(directory, model_id=MODEL, fingerprint="fingerprint-2")
    assert check.state == "stale" and check.index is None
    assert "changed" in check.reason
    # the fingerprint callable is consulted only when there is a sidecar to compare
    calls: list[int] = []

    def fingerprint() -> str:
        calls.append(1)
        return FP

    assert load_index(directory, model_id=MODEL, fingerprint=fingerprint).fresh
    assert calls == [1]
    assert load_index(directory, model_id="other", fingerprint=fingerprint).state == "missing"
    assert calls == [1]


def test_foreign_model_files_are_stale(saved: tuple[Path, Path, Path]) -> None:
    directory, path, sidecar = saved
    # someone copies model A's index over model B's names
    other_path, other_sidecar = index_paths(directory, "model-b")
    other_path.write_bytes(path.read_bytes())
    other_sidecar.write_text(sidecar.read_text())
    check = load_index(directory, model_id="model-b", fingerprint=FP)
    assert check.state == "stale" and check.index is None
    assert MODEL in check.reason


def test_truncated_index_is_corrupt(saved: tuple[Path, Path, Path]) -> None:
    directory, path, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    check = load_index(directory, model_id=MODEL, fingerprint=FP)
    assert check.state == "corrupt" and check.index is None
    assert "bytes" in check.reason


def test_overwritten_index_is_corrupt(saved: tuple[Path, Path, Path]) -> None:
    directory, path, _ = saved
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = os.urandom(64)
    path.write_bytes(bytes(data))
    assert load_index(directory, model_id=MODEL, fingerprint=FP).state == "corrupt"
    # bit rot that keeps the size and the modification time: the digest catches it
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    check = load_index(directory, model_id=MODEL, fingerprint=FP)
    assert check.state == "corrupt" and "content" in check.reason


def test_a_different_file_of_the_same_size_is_corrupt(
    saved: tuple[Path, Path, Path], data: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    directory, path, _ = saved
    ids, matrix = data
    # another library's index with the same shape, moved into place with the same mtime
    other = tmp_path / "other"
    save_index(
        AnnoyIndex(n_trees=5).build(ids, matrix[::-1].copy()),
        other,
        model_id=MODEL,
        fingerprint=FP,
    )
    other_path, _ = index_paths(other, MODEL)
    size = path.stat().st_size
    foreign = other_path.read_bytes()[:size]
    other_path.write_bytes(foreign + bytes(size - len(foreign)))
    stat = path.stat()
    os.replace(other_path, path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == size
    assert load_index(directory, model_id=MODEL, fingerprint=FP).state == "corrupt"


@pytest.mark.parametrize(
    "edit",
    [
        lambda text: "{not json",
        lambda text: "[]",
        lambda text: text.replace('"dim": 32', '"dim": 33'),
        lambda text: text.replace('"count": 2000', '"count": "many"'),
        lambda text: text.replace('"n_trees": 5', '"n_trees": 6'),
    ],
    ids=["not-json", "not-object", "wrong-dim", "wrong-type", "wrong-trees"],
)
def test_damaged_sidecar_is_corrupt_never_a_crash(
    saved: tuple[Path, Path, Path], edit: object
) -> None:
    directory, _, sidecar = saved
    text = sidecar.read_text()
    new = edit(text)  # type: ignore[operator]
    assert new != text
    sidecar.write_text(new)
    check = load_index(directory, model_id=MODEL, fingerprint=FP)
    assert check.state == "corrupt" and check.index is None


def test_sidecar_without_index_file_is_missing(saved: tuple[Path, Path, Path]) -> None:
    directory, path, _ = saved
    path.unlink()
    assert load_index(directory, model_id=MODEL, fingerprint=FP).state == "missing"


def test_remove_index(saved: tuple[Path, Path, Path]) -> None:
    directory, path, sidecar = saved
    assert remove_index(directory, MODEL)
    assert not path.exists() and not sidecar.exists()
    assert not remove_index(directory, MODEL)


def test_model_ids_become_safe_distinct_file_names(tmp_path: Path) -> None:
    a, _ = index_paths(tmp_path, "head/../x y")
    b, _ = index_paths(tmp_path, "head_.._x_y")
    assert a.parent == tmp_path and "/" not in a.name
    assert a != b
    with pytest.raises(ValueError, match="model_id"):
        index_paths(tmp_path, "")


def test_unwritable_directory_raises_index_error(
    data: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    ids, matrix = data
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(AnnIndexError, match=str(blocker)):
        save_index(
            ExactIndex().build(ids, matrix), blocker / "deepsim", model_id=MODEL, fingerprint=FP
        )


def test_sidecar_records_the_build(saved: tuple[Path, Path, Path]) -> None:
    _, path, sidecar = saved
    data = json.loads(sidecar.read_text())
    assert data["backend"] == "annoy" and data["n_trees"] == 5
    assert data["file_size"] == path.stat().st_size
    assert data["built_at"] > 0


# --------------------------------------------------------------------------- lifecycle on a library


LIB_DIM = 16


@pytest.fixture
def lib(tmp_path: Path) -> Iterator[Library]:
    """A beets library of 400 items with clustered vectors of MODEL."""
    library = Library(str(tmp_path / "library.db"), str(tmp_path / "music"))
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(8, LIB_DIM))
    with library.transaction():
        items = [
            Item(title=f"Song {k}", artist=f"A{k % 8}", path=f"/{k}.mp3".encode())
            for k in range(400)
        ]
        for item in items:
            library.add(item)
    rows = [(it.id, centres[it.id % 8] + 0.7 * rng.normal(size=LIB_DIM)) for it in items]
    store.write_vectors(library, rows, MODEL, batch_size=len(rows))
    yield library
    library._close()


def exact_top(lib: Library, vector: np.ndarray, n: int, exclude: int) -> list[int]:
    ids, matrix = store.read_vectors(lib, MODEL)
    return ExactIndex().build(ids, matrix).query(vector, n, exclude=[exclude])[0].tolist()


@pytest.mark.parametrize("count", [20, 150, 200])
def test_a_fresh_small_400_d_index_is_not_corrupt(count: int, tmp_path: Path) -> None:
    # Annoy reports 39 "trees" for 20 asked with <= ~400 items of 400-d (a root per leaf)
    matrix = clustered(count, 400, clusters=4, seed=count)
    index = AnnoyIndex(n_trees=20).build(np.arange(1, count + 1), matrix)
    save_index(index, tmp_path, model_id=MODEL, fingerprint=FP)
    check = load_index(tmp_path, model_id=MODEL, fingerprint=FP)
    assert check.state == "fresh", check.reason
    assert check.index is not None and len(check.index) == count


def test_a_small_annoy_index_loads_fresh(lib: Library, tmp_path: Path) -> None:
    # Annoy builds fewer trees than asked for a few hundred items: never "corrupt" for it
    directory = tmp_path / "deepsim"
    result = refresh_index(lib, MODEL, directory, exact_below=100, n_trees=20)
    assert result.action == "built"
    check = open_index(lib, MODEL, directory)
    assert check.state == "fresh", check.reason
    sidecar = check.sidecar
    assert sidecar is not None and sidecar.n_trees == 20 and sidecar.trees > 0
    assert refresh_index(lib, MODEL, directory, exact_below=100, n_trees=20).action == "fresh"


def test_an_index_built_on_request_is_kept_in_a_small_library(lib: Library, tmp_path: Path) -> None:
    directory = tmp_path / "deepsim"
    assert refresh_index(lib, MODEL, directory, force=True).action == "built"  # 400 < 2000
    assert refresh_index(lib, MODEL, directory).action == "fresh"
    store.write_vectors(lib, [(5, np.ones(LIB_DIM))], MODEL)
    assert refresh_index(lib, MODEL, directory).action == "updated"
    assert open_index(lib, MODEL, directory).fresh
    # an index built for the threshold (not on request) is dropped once the library is small
    assert refresh_index(lib, MODEL, directory, exact_below=100, force=False).action == "fresh"
    remove_index(directory, MODEL)
    assert refresh_index(lib, MODEL, directory, exact_below=100).action == "built"
    assert refresh_index(lib, MODEL, directory, exact_below=1000).action == "small"
    assert not index_paths(directory, MODEL)[0].exists()


def test_changes_are_kept_beside_the_index_in_proportion(lib: Library, tmp_path: Path) -> None:
    directory = tmp_path / "deepsim"
    refresh_index(lib, MODEL, directory, exact_below=10, n_trees=10)
    built = index_paths(directory, MODEL)[0].stat().st_mtime_ns
    rng = np.random.default_rng(9)
    # 5 new items, 3 rewritten vectors, 2 removed items: 10 changes of 400 (2.5 %)
    new_items = [Item(title=f"New {k}", path=f"/new{k}.mp3".encode()) for k in range(5)]
    for item in new_items:
        lib.add(item)
    target = store.read_vectors(lib, MODEL, ids=[17])[1][0]
    rows = [(it.id, target + 0.01 * rng.normal(size=LIB_DIM)) for it in new_items]
    rows += [(k, rng.normal(size=LIB_DIM)) for k in (30, 31, 32)]
    store.write_vectors(lib, rows, MODEL)
    for k in (40, 41):
        lib.get_item(k).remove()
    assert open_index(lib, MODEL, directory).state == "stale"
    result = refresh_index(lib, MODEL, directory, exact_below=10, n_trees=10)
    assert result.action == "updated" and result.changed == 5 + 3 + 3 + 2
    assert index_paths(directory, MODEL)[0].stat().st_mtime_ns == built  # not rebuilt
    check = open_index(lib, MODEL, directory)
    assert check.fresh and isinstance(check.index, UpdatedIndex)
    index = check.index
    assert len(index) == 400 + 5 - 2
    # the new vectors are found, the removed and the old rewritten ones never are
    found, _ = index.query(target, 10, exclude=[17])
    assert {it.id for it in new_items} <= set(found.tolist())
    assert found.tolist() == exact_top(lib, target, 10, 17)
    ids, matrix = store.read_vectors(lib, MODEL)
    hits = []
    for row in range(0, len(ids), 7):
        got, got_sims = index.query(matrix[row], 10, exclude=[ids[row]])
        assert not {40, 41} & set(got.tolist())
        if int(ids[row]) in (30, 31, 32):
            continue
        truth = exact_top(lib, matrix[row], 10, int(ids[row]))
        hits.append(len(set(truth) & set(got.tolist())) / 10)
        for item_id, sim in zip(got.tolist(), got_sims.tolist(), strict=True):
            np.testing.assert_allclose(
                sim, float(matrix[ids == item_id][0] @ matrix[row]), atol=1e-4
            )
    assert np.mean(hits) >= 0.99
    # a second update reuses the delta and stays in proportion; a no-op is "fresh"
    store.write_vectors(lib, [(50, rng.normal(size=LIB_DIM))], MODEL)
    again = refresh_index(lib, MODEL, directory, exact_below=10, n_trees=10)
    assert again.action == "updated" and again.changed == 13 + 2
    assert refresh_index(lib, MODEL, directory, exact_below=10, n_trees=10).action == "fresh"
    # another model's vector for item 60 goes to that model's own slot: 60 keeps its
    # vector of this model and stays in this model's index (one slot per model)
    store.write_vectors(lib, [(60, rng.normal(size=LIB_DIM))], "other-model")
    assert refresh_index(lib, MODEL, directory, exact_below=10, n_trees=10).action in (
        "fresh",
        "updated",
    )
    index = open_index(lib, MODEL, directory).index
    assert index is not None and len(index) == 400 + 5 - 2
    assert 60 in index.query(matrix[ids == 60][0], 50)[0].tolist()


def test_changes_past_the_share_rebuild(lib: Library, tmp_path: Path) -> None:
    directory = tmp_path / "deepsim"
    refresh_index(lib, MODEL, directory, exact_below=10, n_trees=5)
    rng = np.random.default_rng(1)
    store.write_vectors(lib, [(k, rng.normal(size=LIB_DIM)) for k in range(1, 40)], MODEL)
    assert refresh_index(lib, MODEL, directory, exact_below=10, n_trees=5).action == "built"
    assert not (directory / f"index-{MODEL}.delta.npz").exists()
    check = open_index(lib, MODEL, directory)
    assert check.fresh and isinstance(check.index, AnnoyIndex)


def test_a_damaged_delta_falls_back_and_is_rebuilt(lib: Library, tmp_path: Path) -> None:
    directory = tmp_path / "deepsim"
    refresh_index(lib, MODEL, directory, exact_below=10, n_trees=5)
    store.write_vectors(lib, [(3, np.ones(LIB_DIM))], MODEL)
    refresh_index(lib, MODEL, directory, exact_below=10, n_trees=5)
    delta = directory / f"index-{MODEL}.delta.npz"
    delta.write_bytes(delta.read_bytes()[:-10])
    assert open_index(lib, MODEL, directory).state == "corrupt"
    assert refresh_index(lib, MODEL, directory, exact_below=10, n_trees=5).action == "built"
    assert open_index(lib, MODEL, directory).fresh


def test_one_writer_at_a_time(lib: Library, tmp_path: Path) -> None:
    directory = tmp_path / "deepsim"
    results: list[str] = []
    with index_lock(directory, MODEL):
        worker = threading.Thread(
            target=lambda: results.append(
                refresh_index(lib, MODEL, directory, exact_below=10, n_trees=5).action
            )
        )
        worker.start()
        worker.join(timeout=1.0)
        assert worker.is_alive() and results == []  # waiting for the lock
        assert not index_paths(directory, MODEL)[0].exists()
    worker.join(timeout=30)
    assert results == ["built"]
    # the second writer finds the work done
    assert refresh_index(lib, MODEL, directory, exact_below=10, n_trees=5).action == "fresh"


def test_upkeep_reads_only_what_changed(
    lib: Library, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "deepsim"
    assert refresh_index(lib, MODEL, directory, exact_below=10, n_trees=5).action == "built"
    rng = np.random.default_rng(4)
    reads: list[object] = []
    original = store.read_stored

    def counting(lib_: Library, model_id: str, **kwargs: object) -> store.StoredVectors:
        reads.append(kwargs.get("ids"))
        return original(lib_, model_id, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "read_stored", counting)
    # written by beets itself, not through the store (beet modify, another tool)
    item = lib.get_item(7)
    item[store.VECTOR_FIELD] = store.encode_vector(rng.normal(size=LIB_DIM))
    item.store()
    lib.get_item(8).remove()
    # another model's vector of item 9: item 9 keeps its indexed vector of this model
    store.write_vectors(lib, [(9, rng.normal(size=LIB_DIM))], "other-model")
    result = refresh_index(lib, MODEL, directory, exact_below=10, n_trees=5)
    assert result.action == "updated" and result.changed == 1 + 1 + 1  # 7 new, 7 and 8 dropped
    assert reads and all(ids is not None and len(ids) <= 3 for ids in reads)  # type: ignore[arg-type]
    index = open_index(lib, MODEL, directory).index
    assert isinstance(index, UpdatedIndex) and index.delta.ids.tolist() == [7]
    assert index.dropped.tolist() == [7, 8]
    ids, matrix = store.read_vectors(lib, MODEL)
    for item_id in (7, 9):
        assert index.query(matrix[ids == item_id][0], 1)[0].tolist() == [item_id]
    assert 8 not in index.query(matrix[0], 400)[0].tolist()
    # nothing written since: fresh, without reading a vector
    reads.clear()
    assert refresh_index(lib, MODEL, directory, exact_below=10, n_trees=5).action == "fresh"
    assert reads == []


def test_a_writer_killed_mid_write_loses_nothing_the_index_needs(
    lib: Library, tmp_path: Path
) -> None:
    import subprocess
    import sys
    import textwrap

    directory = tmp_path / "deepsim"
    assert refresh_index(lib, MODEL, directory, exact_below=10, n_trees=5).action == "built"
    db = lib.path
    lib._close()
    # A writer that commits batches of 2 vectors, then dies (SIGKILL: no cleanup,
    # no cli_exit) inside the third batch's transaction, its rows written.
    child = textwrap.dedent(
        f"""
        import os, signal
        import numpy as np
        from beets.library import Library
        from deepsim import store
        from beets.library import Item
        lib = Library({os.fsdecode(db)!r})
        rng = np.random.default_rng(11)
        new = [Item(title=f"new {{k}}", path=f"/new{{k}}.mp3".encode()) for k in range(7)]
        for item in new:
            lib.add(item)
        original, calls = store._write_batch, []
        def dying(lib_, batch):
            calls.append(1)
            if len(calls) < 3:
                return original(lib_, batch)
            with lib_.transaction():  # the third batch is written, not committed
                original(lib_, batch)
                os.kill(os.getpid(), signal.SIGKILL)
        store._write_batch = dying
        rows = [(item.id, rng.normal(size={LIB_DIM})) for item in new]
        store.write_vectors(lib, rows, {MODEL!r}, batch_size=2)
        """
    )
    done = subprocess.run([sys.executable, "-c", child], check=False, timeout=120)
    assert done.returncode == -9
    reopened = Library(os.fsdecode(db), str(tmp_path / "music"))
    try:
        # batches (401, 402) and (403, 404) committed; (405, 406) were in flight and are gone
        written = store.read_vectors(reopened, MODEL, ids=range(401, 408))[0].tolist()
        assert written == [401, 402, 403, 404]
        result = refresh_index(reopened, MODEL, directory, exact_below=10, n_trees=5)
        assert result.action == "updated" and result.changed == 4  # 4 new
        index = open_index(reopened, MODEL, directory).index
        assert index is not None
        ids, matrix = store.read_vectors(reopened, MODEL)
        for item_id in written:
            assert index.query(matrix[ids == item_id][0], 1)[0].tolist() == [item_id]
    finally:
        reopened._close()


def test_a_log_trimmed_past_an_index_rebuilds_it(lib: Library, tmp_path: Path) -> None:
    directory = tmp_path / "deepsim"
    other = tmp_path / "other"
    rng = np.random.default_rng(12)
    assert refresh_index(lib, MODEL, directory, exact_below=10, n_trees=5).action == "built"
    store.write_vectors(lib, [(k, rng.normal(size=LIB_DIM)) for k in range(1, 4)], MODEL)
    # another index directory rebuilt meanwhile trims the log past the first one's position
    assert refresh_index(lib, MODEL, other, exact_below=10, n_trees=5).action == "built"
    assert refresh_index(lib, MODEL, directory, exact_below=10, n_trees=5).action == "built"
    check = open_index(lib, MODEL, directory)
    assert check.fresh and isinstance(check.index, AnnoyIndex)
