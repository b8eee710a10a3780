from __future__ import annotations

import numpy as np
import pytest
from libgen import MODEL_ID, make_library, unit

from deepsim.dupes import VersionFolder, find_versions, measure_threshold, version_key
from deepsim.errors import ParameterError


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("Björk", "Jóga"), ("bjork", "JOGA")),
        (("The Band", "Song (Remastered 2011)"), ("The Band", "Song")),
        (("The Band", "Song - 2009 Remaster"), ("the band", "song")),
        (("The Band", "Song [Mono]"), ("The Band", "Song")),
        (("The Band feat. Guest", "Song"), ("The Band", "Song (feat. Guest)")),
        (("A", "Song - Single Version"), ("A", "Song")),
    ],
)
def test_version_key_equal(a: tuple[str, str], b: tuple[str, str]) -> None:
    assert version_key(*a) == version_key(*b) is not None


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("The Band", "Song"), ("The Band", "Song (Live)")),
        (("The Band", "Song"), ("The Band", "Song - Remix")),
        (("Aleksi Aubry-Carlson", "Frantic"), ("Stephen Rozanc", "Frantic")),
    ],
)
def test_version_key_different(a: tuple[str, str], b: tuple[str, str]) -> None:
    assert version_key(*a) != version_key(*b)


def test_version_key_needs_artist_and_title() -> None:
    assert version_key("", "Song") is None
    assert version_key("A", None) is None


def _lib():
    base = unit([1, 0, 0, 0])
    tracks = [
        {"title": "Song", "artist": "A", "format": "FLAC", "vector": base},
        # same tags, another format: a little different vector
        {"title": "Song (Remastered)", "artist": "A", "format": "MP3",
         "vector": base + np.array([0, 0.02, 0, 0])},
        # untagged copy: the vector alone tells
        {"title": "track01", "artist": "", "format": "OGG",
         "vector": base + np.array([0, 0, 0.05, 0])},
        # a similar but different song
        {"title": "Other", "artist": "A", "format": "MP3", "vector": unit([1, 0.4, 0, 0])},
        {"title": "Far", "artist": "B", "format": "MP3", "vector": unit([0, 0, 0, 1])},
    ]  # fmt: skip
    return make_library(tracks)


def test_find_versions_groups_by_tags_and_vectors() -> None:
    lib, items = _lib()
    groups = find_versions(lib, MODEL_ID, threshold=0.99)
    assert len(groups) == 1
    members = {i for i, _ in groups[0]}
    assert members == {items["Song"].id, items["Song (Remastered)"].id, items["track01"].id}
    first_id, first_sim = groups[0][0]
    assert first_id == min(members) and first_sim == pytest.approx(1.0, abs=1e-3)
    # vectors only: the tagged remaster is still within the threshold
    assert len(find_versions(lib, MODEL_ID, threshold=0.99, use_tags=False)[0]) == 3
    # tags only: the untagged copy is not found
    groups = find_versions(lib, MODEL_ID, threshold=None)
    assert {i for i, _ in groups[0]} == {items["Song"].id, items["Song (Remastered)"].id}
    # a query restricts the candidates
    assert find_versions(lib, MODEL_ID, ids=[items["Song"].id, items["Far"].id]) == []


def test_folder_keeps_first_version_only() -> None:
    lib, items = _lib()
    folder = VersionFolder(lib, MODEL_ID)
    ranked = [items[t].id for t in ("Song", "Other", "Song (Remastered)", "track01", "Far")]
    fold = folder.start()
    kept = []
    for item_id in ranked:
        if not fold.is_version(item_id):
            fold.keep(item_id)
            kept.append(item_id)
    assert kept == [items["Song"].id, items["Other"].id, items["Far"].id]
    # a seed's versions are folded too, the seed itself is not
    fold = folder.start([items["track01"].id])
    assert fold.is_version(items["Song"].id)
    assert not fold.is_version(items["track01"].id)
    assert not fold.is_version(items["Other"].id)
    with pytest.raises(ParameterError, match="threshold"):
        VersionFolder(lib, MODEL_ID, threshold=2.0)


def test_measure_threshold_separates_groups() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 16))
    rows, labels = [], []
    for g, c in enumerate(centres):
        for _ in range(3):
            rows.append(unit(c + 0.01 * rng.normal(size=16)))
            labels.append(g)
    report = measure_threshold(np.stack(rows), labels)
    assert report.same_pairs == 6 * 3 and report.other_pairs == 18 * 17 // 2 - 18
    assert report.same_min > report.other_max
    assert report.other_max < report.suggested < report.same_min
