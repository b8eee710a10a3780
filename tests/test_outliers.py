from __future__ import annotations

import numpy as np
import pytest
from libgen import MODEL_ID, make_library, unit

from deepsim.errors import ParameterError
from deepsim.outliers import album_fits, outlier_ids, score_albums


def _album(rng: np.random.Generator, centre: np.ndarray, n: int, spread: float) -> list:
    return [unit(centre + spread * rng.normal(size=centre.size)) for _ in range(n)]


def _lib():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=16), rng.normal(size=16)
    tracks = []
    for k, v in enumerate(_album(rng, a, 7, 0.3)):
        tracks.append({"title": f"a{k}", "artist": "X", "album": "Alpha", "vector": v})
    # a foreign track filed under Alpha: it sounds like album Beta
    tracks.append({"title": "intruder", "artist": "Y", "album": "Alpha", "vector": unit(b)})
    for k, v in enumerate(_album(rng, b, 6, 0.3)):
        tracks.append({"title": f"b{k}", "artist": "Y", "album": "Beta", "vector": v})
    for k, v in enumerate(_album(rng, b, 3, 0.3)):  # too small to score
        tracks.append({"title": f"c{k}", "artist": "Z", "album": "Gamma", "vector": v})
    return make_library(tracks)


def test_album_fits_single_out_the_foreign_vector() -> None:
    rng = np.random.default_rng(1)
    centre = rng.normal(size=8)
    matrix = np.stack([*_album(rng, centre, 6, 0.2), unit(-centre)])
    fits, scores = album_fits(matrix)
    assert int(np.argmin(fits)) == 6 and fits[6] < 0
    assert scores[6] < -5 and np.all(scores[:6] > -2.5)


def test_score_albums_ranks_the_intruder_first() -> None:
    lib, items = _lib()
    fits = score_albums(lib, MODEL_ID)
    assert fits[0].item_id == items["intruder"].id and fits[0].is_outlier()
    assert fits[0].album == "Alpha" and fits[0].album_size == 8
    assert not any(f.is_outlier() for f in fits[1:])
    assert {f.album for f in fits} == {"Alpha", "Beta"}  # Gamma has 3 tracks
    assert outlier_ids(lib, MODEL_ID) == {items["intruder"].id}
    # a query lists only its own tracks, scored against their whole album
    only = score_albums(lib, MODEL_ID, ids=[items["intruder"].id, items["a1"].id])
    assert [f.item_id for f in only] == [items["intruder"].id, items["a1"].id]
    assert only[0].score == pytest.approx(fits[0].score)


def test_bad_parameters() -> None:
    lib, _ = _lib()
    with pytest.raises(ParameterError, match="min_tracks"):
        score_albums(lib, MODEL_ID, min_tracks=2)
    with pytest.raises(ParameterError, match="threshold"):
        outlier_ids(lib, MODEL_ID, threshold=-1)
