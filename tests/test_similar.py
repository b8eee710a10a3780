"""deepsim.similar on a small beets library: seeds, filters, caps, index upkeep."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from beets.library import Item, Library

from deepsim import store
from deepsim.errors import DeepsimError
from deepsim.index import AnnoyIndex, index_paths, load_index, refresh_index, save_index
from deepsim.similar import find_similar, find_similar_each, load_items, where_ids

MODEL = "test-model-1"
DIM = 16
ARTISTS = 6
PER_ARTIST = 12


@pytest.fixture(autouse=True)
def _no_plugin_types() -> Iterator[None]:
    """No field types left cached by a plugin test that ran before (beets' type cache)."""
    from beets.util import cached_classproperty

    cached_classproperty.cache.clear()
    yield


@pytest.fixture(scope="module")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """72 items: 6 artists (vectors clustered by artist), 2 albums each, FLAC/MP3 alternating.

    Artist 0's even-numbered songs carry a flexible ``mood`` field (for slow
    queries); item 73 has no vector.
    """
    root = tmp_path_factory.mktemp("template")
    (root / "music").mkdir()
    lib = Library(str(root / "library.db"), str(root / "music"))
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(ARTISTS, DIM))
    rows = []
    with lib.transaction():
        for a in range(ARTISTS):
            for album in range(2):
                items = []
                for k in range(PER_ARTIST // 2):
                    n = a * PER_ARTIST + album * (PER_ARTIST // 2) + k
                    item = Item(
                        title=f"Song {n}",
                        artist=f"Artist {a}",
                        album=f"Album {a}-{album}",
                        format="FLAC" if n % 2 == 0 else "MP3",
                        length=100.0 + n,
                        path=str(root / "music" / f"{n}.mp3").encode(),
                    )
                    (root / "music" / f"{n}.mp3").write_bytes(b"")  # present on disk
                    if a == 0 and n % 2 == 0:
                        item["mood"] = "calm"
                    items.append(item)
                lib.add_album(items)
                rows.extend((item.id, centres[a] + 0.6 * rng.normal(size=DIM)) for item in items)
        lib.add(Item(title="No vector", artist="Nobody", path=b"/nowhere.mp3"))
    store.write_vectors(lib, rows, MODEL, batch_size=len(rows))
    lib._close()
    return root / "library.db"


@pytest.fixture
def lib(template_db: Path, tmp_path: Path) -> Iterator[Library]:
    """A private copy of the template library."""
    shutil.copyfile(template_db, tmp_path / "library.db")
    lib = Library(str(tmp_path / "library.db"), str(template_db.parent / "music"))
    yield lib
    lib._close()


@pytest.fixture
def index_dir(lib: Library, tmp_path: Path) -> Path:
    """A state folder with a fresh Annoy index of ``lib`` (built although ``lib`` is small)."""
    path = tmp_path / "deepsim"
    refresh_index(lib, MODEL, path, exact_below=10, n_trees=5)
    return path


def vectors(lib: Library) -> dict[int, np.ndarray]:
    ids, matrix = store.read_vectors(lib, MODEL)
    return dict(zip(ids.tolist(), matrix, strict=True))


def ranking(
    lib: Library, query: np.ndarray, *, exclude: set[int] = frozenset(), keep=None
) -> list[tuple[int, float]]:
    """Brute-force (id, cosine) best first from the stored vectors."""
    q = query / np.linalg.norm(query)
    out = [
        (i, float(v @ q))
        for i, v in vectors(lib).items()
        if i not in exclude and (keep is None or keep(i))
    ]
    return sorted(out, key=lambda p: (-p[1], p[0]))


def ids_of(result) -> list[int]:  # type: ignore[no-untyped-def]
    return [item.id for item, _ in result.matches]


# --------------------------------------------------------------------------- search


def test_one_seed_gives_the_exact_nearest_items_excluding_the_seed(lib: Library) -> None:
    seed = lib.get_item(5)
    result = find_similar(lib, [seed], model_id=MODEL, count=8)
    expected = ranking(lib, vectors(lib)[5], exclude={5})[:8]
    assert ids_of(result) == [i for i, _ in expected]
    np.testing.assert_allclose([s for _, s in result.matches], [s for _, s in expected], atol=1e-5)
    assert result.backend == "exact" and result.missing == [] and not result.exhausted
    assert [s.id for s in result.seeds] == [5]


def test_seed_is_first_when_not_excluded(lib: Library) -> None:
    result = find_similar(lib, [lib.get_item(5)], model_id=MODEL, count=3, exclude_seeds=False)
    assert ids_of(result)[0] == 5
    assert result.matches[0][1] == pytest.approx(1.0, abs=1e-5)


def test_several_seeds_use_the_normalised_mean(lib: Library) -> None:
    seeds = [lib.get_item(i) for i in (2, 20, 40)]
    result = find_similar(lib, seeds, model_id=MODEL, count=10)
    v = vectors(lib)
    mean = v[2] + v[20] + v[40]
    assert ids_of(result) == [i for i, _ in ranking(lib, mean, exclude={2, 20, 40})[:10]]


def test_seeds_without_vectors_are_reported(lib: Library) -> None:
    orphan = lib.get_item(73)
    assert orphan is not None and orphan.title == "No vector"
    result = find_similar(lib, [orphan, lib.get_item(1)], model_id=MODEL, count=5)
    assert [s.id for s in result.missing] == [73]
    assert [s.id for s in result.seeds] == [1]
    assert len(result.matches) == 5
    alone = find_similar(lib, [orphan], model_id=MODEL, count=5)
    assert alone.matches == [] and [s.id for s in alone.missing] == [73]
    # another model's vectors are not this model's
    other = find_similar(lib, [lib.get_item(1)], model_id="other-model", count=5)
    assert other.matches == [] and [s.id for s in other.missing] == [1]


def test_similarity_and_distance_are_formattable_but_not_stored(lib: Library) -> None:
    result = find_similar(lib, [lib.get_item(1)], model_id=MODEL, count=3)
    item, sim = result.matches[0]
    text = item.evaluate_template("$title|$deepsim_similarity|$deepsim_distance")
    title, shown_sim, shown_dist = text.split("|")
    assert title == item.title
    # stored rounded to 4 digits (the plugin's 3-digit type is not loaded here)
    assert float(shown_sim) == pytest.approx(sim, abs=1e-4)
    assert float(shown_dist) == pytest.approx(1 - sim, abs=1e-4)
    assert -1.0 <= sim <= 1.0
    fresh = lib.get_item(item.id)
    assert "deepsim_similarity" not in fresh and "deepsim_distance" not in fresh


def test_where_with_a_fast_query(lib: Library) -> None:
    seed = lib.get_item(3)
    result = find_similar(lib, [seed], model_id=MODEL, count=10, where="format:FLAC")
    assert all(item.format == "FLAC" for item in result.items)
    flac = {i.id for i in lib.items("format:FLAC")}
    expected = ranking(lib, vectors(lib)[3], exclude={3}, keep=flac.__contains__)[:10]
    assert ids_of(result) == [i for i, _ in expected]
    negated = find_similar(lib, [seed], model_id=MODEL, count=10, where="^artist:'Artist 0'")
    assert negated.matches and all(item.artist != "Artist 0" for item in negated.items)


def test_where_with_a_slow_query_on_a_flexible_field(lib: Library) -> None:
    seed = lib.get_item(30)
    assert where_ids(lib, _parse(lib, "mood:calm")) is None  # evaluated on items
    result = find_similar(lib, [seed], model_id=MODEL, count=4, where="mood:calm")
    calm = {i.id for i in lib.items("mood:calm")}
    assert len(calm) == 6
    assert set(ids_of(result)) <= calm and len(result.matches) == 4
    expected = ranking(lib, vectors(lib)[30], exclude={30}, keep=calm.__contains__)[:4]
    assert ids_of(result) == [i for i, _ in expected]


def _parse(lib: Library, text: str):  # type: ignore[no-untyped-def]
    from deepsim.similar import parse_where

    return parse_where(lib, text)


def test_invalid_where_query_names_it(lib: Library) -> None:
    with pytest.raises(DeepsimError, match=r"year:x\.\.y"):
        find_similar(lib, [lib.get_item(1)], model_id=MODEL, where="year:x..y")


def test_fewer_matches_than_asked_when_the_filters_run_out(lib: Library) -> None:
    result = find_similar(lib, [lib.get_item(1)], model_id=MODEL, count=50, where="mood:calm")
    assert len(result.matches) == 6 - 1  # the seed (calm too) is excluded
    assert result.exhausted


def test_max_per_artist_and_album(lib: Library) -> None:
    seed = lib.get_item(1)
    result = find_similar(lib, [seed], model_id=MODEL, count=6, max_per_artist=1)
    artists = [item.artist for item in result.items]
    assert len(artists) == ARTISTS and len(set(artists)) == ARTISTS
    # greedy over the exact ranking: the best item of each artist, in order
    seen: set[str] = set()
    expected = []
    for i, _ in ranking(lib, vectors(lib)[1], exclude={1}):
        artist = lib.get_item(i).artist
        if artist not in seen:
            seen.add(artist)
            expected.append(i)
    assert ids_of(result) == expected
    capped = find_similar(lib, [seed], model_id=MODEL, count=30, max_per_album=2)
    albums = [item.album_id for item in capped.items]
    assert max(albums.count(a) for a in set(albums)) == 2
    assert len(capped.matches) == 2 * 2 * ARTISTS
    assert capped.exhausted
    with pytest.raises(ValueError, match="max_per_artist"):
        find_similar(lib, [seed], model_id=MODEL, max_per_artist=-1)


def test_each_seed_gets_its_own_result(lib: Library) -> None:
    seeds = [lib.get_item(1), lib.get_item(73), lib.get_item(50)]
    results = find_similar_each(lib, seeds, model_id=MODEL, count=5)
    assert len(results) == 3
    assert ids_of(results[0]) == [
        i for i, _ in ranking(lib, vectors(lib)[1], exclude={1, 50, 73})[:5]
    ]
    assert results[1].matches == [] and [s.id for s in results[1].missing] == [73]
    assert ids_of(results[2]) == [
        i for i, _ in ranking(lib, vectors(lib)[50], exclude={1, 50, 73})[:5]
    ]
    # separate Item objects: each result shows its own similarity
    for result in results:
        for item, sim in result.matches:
            assert item["deepsim_similarity"] == pytest.approx(sim, abs=1e-4)


def test_items_are_loaded_in_one_query(lib: Library, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    original = Library.items

    def counting(self: Library, *args: object, **kwargs: object) -> object:
        calls.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Library, "items", counting)
    result = find_similar(lib, [lib.get_item(1)], model_id=MODEL, count=10, max_per_artist=3)
    assert len(result.matches) == 10
    assert len(calls) == 1
    assert len(load_items(lib, [1, 2, 9999])) == 2


def test_invalid_options(lib: Library) -> None:
    seed = lib.get_item(1)
    with pytest.raises(DeepsimError, match="no seed"):
        find_similar(lib, [], model_id=MODEL)
    with pytest.raises(ValueError, match="count"):
        find_similar(lib, [seed], model_id=MODEL, count=0)
    with pytest.raises(ValueError, match="backend"):
        find_similar(lib, [seed], model_id=MODEL, backend="faiss")  # type: ignore[arg-type]


def test_seed_vectors_that_cancel_out(lib: Library) -> None:
    v = vectors(lib)[1]
    store.write_vectors(lib, [(2, -v)], MODEL)
    with pytest.raises(DeepsimError, match="cancel out"):
        find_similar(lib, [lib.get_item(1), lib.get_item(2)], model_id=MODEL)


# --------------------------------------------------------------------------- the saved index


def test_refresh_builds_once_then_reports_fresh(lib: Library, tmp_path: Path) -> None:
    index_dir = tmp_path / "deepsim"
    built = refresh_index(lib, MODEL, index_dir, exact_below=10, n_trees=5)
    assert built.action == "built" and built.count == ARTISTS * PER_ARTIST
    assert built.path is not None and Path(built.path).exists()
    assert refresh_index(lib, MODEL, index_dir, exact_below=10, n_trees=5).action == "fresh"
    # another n_trees setting rebuilds
    assert refresh_index(lib, MODEL, index_dir, exact_below=10, n_trees=6).action == "built"
    assert refresh_index(lib, MODEL, index_dir, exact_below=10, force=True).action == "built"


def test_index_is_stale_after_a_vector_write(lib: Library, index_dir: Path) -> None:
    store.write_vectors(lib, [(7, np.ones(DIM, np.float32))], MODEL)
    result = find_similar(lib, [lib.get_item(1)], model_id=MODEL, index_dir=index_dir)
    assert result.index_state == "stale" and result.backend == "exact"
    assert refresh_index(lib, MODEL, index_dir, exact_below=10, n_trees=5).action == "updated"
    result = find_similar(lib, [lib.get_item(1)], model_id=MODEL, index_dir=index_dir)
    assert result.index_state == "fresh" and result.backend == "annoy"


def test_index_is_stale_after_an_item_removal(lib: Library, index_dir: Path) -> None:
    nearest = find_similar(lib, [lib.get_item(1)], model_id=MODEL, count=1, index_dir=index_dir)
    gone = nearest.items[0].id
    lib.get_item(gone).remove()
    result = find_similar(lib, [lib.get_item(1)], model_id=MODEL, count=10, index_dir=index_dir)
    assert result.index_state == "stale"
    assert gone not in ids_of(result)


def test_removed_items_are_never_returned_even_by_a_fresh_looking_index(
    lib: Library, tmp_path: Path
) -> None:
    index_dir = tmp_path / "deepsim"
    ids, matrix = store.read_vectors(lib, MODEL)
    index = AnnoyIndex(n_trees=5).build(ids, matrix)
    nearest = find_similar(lib, [lib.get_item(1)], model_id=MODEL, count=3)
    gone = nearest.items[0].id
    lib.get_item(gone).remove()
    # an index that still holds the removed item, whose sidecar claims to be current
    save_index(index, index_dir, model_id=MODEL, fingerprint=store.fingerprint(lib, MODEL))
    result = find_similar(lib, [lib.get_item(1)], model_id=MODEL, count=3, index_dir=index_dir)
    assert result.backend == "annoy" and result.index_state == "fresh"
    assert gone not in ids_of(result) and len(result.matches) == 3
    assert ids_of(result)[:2] == [item.id for item in nearest.items[1:]]


def test_annoy_and_exact_agree(lib: Library, tmp_path: Path) -> None:
    index_dir = tmp_path / "deepsim"
    refresh_index(lib, MODEL, index_dir, exact_below=10, n_trees=10)
    for seed_id in (1, 30, 66):
        seeds = [lib.get_item(seed_id)]
        a = find_similar(lib, seeds, model_id=MODEL, count=10, index_dir=index_dir)
        e = find_similar(lib, seeds, model_id=MODEL, count=10, backend="exact")
        assert a.backend == "annoy" and e.backend == "exact"
        assert ids_of(a) == ids_of(e)
        np.testing.assert_allclose([s for _, s in a.matches], [s for _, s in e.matches], atol=1e-4)
        # filters on top of the index: a large where-set filters Annoy's candidates
        fa = find_similar(
            lib,
            seeds,
            model_id=MODEL,
            count=5,
            index_dir=index_dir,
            where="format:MP3",
            exact_below=10,
            max_per_artist=2,
        )
        fe = find_similar(
            lib,
            seeds,
            model_id=MODEL,
            count=5,
            where="format:MP3",
            backend="exact",
            max_per_artist=2,
        )
        assert fa.backend == "annoy" and fe.backend == "exact"
        assert ids_of(fa) == ids_of(fe)


def test_small_where_set_is_searched_exactly(lib: Library, index_dir: Path) -> None:
    result = find_similar(
        lib,
        [lib.get_item(1)],
        model_id=MODEL,
        count=3,
        index_dir=index_dir,
        where="artist:'Artist 4'",
        exact_below=20,
    )
    assert result.backend == "exact" and result.index_state == "unused"
    assert all(item.artist == "Artist 4" for item in result.items)


def test_small_libraries_keep_no_index(lib: Library, index_dir: Path) -> None:
    path, sidecar = index_paths(index_dir, MODEL)
    assert path.exists()
    small = refresh_index(lib, MODEL, index_dir)  # default threshold: far above 72
    assert small.action == "small"
    assert not path.exists() and not sidecar.exists()
    assert refresh_index(lib, "other-model", index_dir).action == "empty"


def test_a_corrupt_index_falls_back_to_exact_search(lib: Library, index_dir: Path) -> None:
    path, _ = index_paths(index_dir, MODEL)
    path.write_bytes(path.read_bytes()[:1000])
    result = find_similar(lib, [lib.get_item(1)], model_id=MODEL, count=5, index_dir=index_dir)
    assert result.index_state == "corrupt" and result.backend == "exact"
    assert ids_of(result) == [i for i, _ in ranking(lib, vectors(lib)[1], exclude={1})[:5]]
    assert refresh_index(lib, MODEL, index_dir, exact_below=10, n_trees=5).action == "built"
    assert load_index(index_dir, model_id=MODEL, fingerprint=store.fingerprint(lib, MODEL)).fresh


def test_the_similarity_path_never_imports_torch(tmp_path: Path) -> None:
    from fresh import run_fresh

    run_fresh(
        "import sys\n"
        "import numpy as np\n"
        "from deepsim import index, playlist, similar, store\n"
        "i = index.AnnoyIndex(n_trees=2).build([1, 2], np.eye(2, dtype=np.float32))\n"
        "assert i.query([1.0, 0.0], 1)[0].tolist() == [1]\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )


def test_filters_that_reject_most_candidates_fall_back_to_exact_search(
    lib: Library, index_dir: Path
) -> None:
    seeds = [lib.get_item(1)]
    # 36 MP3 items (not "small" for exact_below=10), one per artist wanted: Annoy's
    # candidates run short, the search goes on exactly over the MP3 items
    result = find_similar(
        lib,
        seeds,
        model_id=MODEL,
        count=30,
        index_dir=index_dir,
        where="format:MP3",
        exact_below=10,
        max_per_artist=1,
    )
    expected = find_similar(
        lib,
        seeds,
        model_id=MODEL,
        count=30,
        where="format:MP3",
        backend="exact",
        max_per_artist=1,
    )
    assert result.index_state == "fresh" and result.backend == "exact"
    assert result.exhausted and len(result.matches) == ARTISTS
    assert ids_of(result) == ids_of(expected)
    assert all(item.format == "MP3" for item in result.items)


@pytest.mark.parametrize("exact_below", [2000, 3])
def test_where_on_an_album_field(lib: Library, tmp_path: Path, exact_below: int) -> None:
    album = lib.get_item(30).get_album()
    album.artpath = b"/covers/front.jpg"
    album.store()
    members = {item.id for item in album.items()}
    index_dir = tmp_path / "deepsim"
    refresh_index(lib, MODEL, index_dir, exact_below=10, n_trees=5)
    result = find_similar(
        lib,
        [lib.get_item(1)],
        model_id=MODEL,
        count=4,
        index_dir=index_dir,
        where="artpath::covers",
        exact_below=exact_below,
    )
    # a small set is searched exactly; otherwise the index is consulted first
    assert result.index_state == ("unused" if exact_below == 2000 else "fresh")
    assert len(result.matches) == 4 and set(ids_of(result)) <= members


@pytest.mark.parametrize("where", ["format:MP3", "^format:OGG"])
def test_where_sets_read_in_chunks_or_at_once_agree(
    lib: Library, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    seeds = [lib.get_item(3)]
    expected = find_similar(lib, seeds, model_id=MODEL, count=15, where=where, backend="exact")
    # 36 MP3 ids read 2 at a time; 72 ids (> 20 chunks) read at once and filtered
    monkeypatch.setattr(store, "ID_CHUNK", 2)
    result = find_similar(lib, seeds, model_id=MODEL, count=15, where=where, backend="exact")
    assert ids_of(result) == ids_of(expected) and len(result.matches) == 15
