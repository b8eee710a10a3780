from __future__ import annotations

import math

import numpy as np
import pytest
from libgen import MODEL_ID, make_library, unit

from deepsim.dupes import VersionFolder
from deepsim.errors import DeepsimError
from deepsim.paths import find_path, slerp


def _arc(degrees: float) -> np.ndarray:
    return unit([math.cos(math.radians(degrees)), math.sin(math.radians(degrees)), 0, 0])


def _lib():
    # tracks every 5 degrees on the arc from A (0°) to B (90°), two artists alternating
    tracks = []
    for deg in range(0, 91, 5):
        tracks.append(
            {
                "title": f"t{deg:02d}",
                "artist": "Odd" if deg % 10 else "Even",
                "album": f"Al{deg // 30}",
                "format": "MP3",
                "vector": _arc(deg),
            }
        )
    # a copy of t45 in another format, and an off-arc track
    tracks.append(
        {"title": "t45", "artist": "Odd", "album": "Al1", "format": "FLAC", "vector": _arc(47.5)}
    )
    tracks.append({"title": "off", "artist": "Z", "album": "Z", "format": "MP3",
                   "vector": unit([0, 0, 1, 0])})  # fmt: skip
    return make_library(tracks)


def test_slerp_moves_evenly_on_the_sphere() -> None:
    a, b = _arc(0), _arc(90)
    points = slerp(a, b, [0, 0.25, 0.5, 1])
    assert np.allclose(np.linalg.norm(points, axis=1), 1, atol=1e-6)
    assert np.allclose(points[2], _arc(45), atol=1e-6)
    assert np.allclose(points[[0, 3]], [a, b], atol=1e-6)
    assert np.allclose(slerp(a, a, [0.5]), [a])


def test_path_walks_from_start_to_end() -> None:
    lib, _items = _lib()
    seeds = [i for i in lib.items("title:t00")]
    targets = [i for i in lib.items("title:t90")]
    path = find_path(lib, seeds, targets, model_id=MODEL_ID, count=8)
    titles = [s.item.title for s in path.steps]
    assert titles[0] == "t00" and titles[-1] == "t90" and len(titles) == 10
    assert len({s.item.id for s in path.steps}) == 10  # no track twice
    to_end = [s.to_end for s in path.steps]
    to_start = [s.to_start for s in path.steps]
    assert to_end == sorted(to_end) and to_start == sorted(to_start, reverse=True)
    assert "off" not in titles
    # 8 waypoints 10° apart: the nearest tracks are t10 ... t80
    assert titles[1:-1] == [f"t{d:02d}" for d in range(10, 81, 10)]
    assert path.steps[1].to_waypoint == pytest.approx(1.0, abs=1e-3)
    assert path.steps[0].item["deepsim_similarity"] == pytest.approx(1.0, abs=1e-3)


def test_path_filters() -> None:
    lib, items = _lib()
    seeds, targets = list(lib.items("title:t00")), list(lib.items("title:t90"))
    # every 10° is an "Even" track: --where artist:Odd picks the odd ones
    path = find_path(lib, seeds, targets, model_id=MODEL_ID, count=4, where="artist:Odd")
    assert all(s.item.artist == "Odd" for s in path.steps[1:-1])
    # a cap: at most 2 per artist in between
    path = find_path(lib, seeds, targets, model_id=MODEL_ID, count=6, max_per_artist=2)
    middle = [s.item.artist for s in path.steps[1:-1]]
    assert middle.count("Odd") <= 2 and middle.count("Even") <= 2
    assert path.exhausted  # only Odd, Even and Z exist
    # exclusions
    path = find_path(lib, seeds, targets, model_id=MODEL_ID, count=1,
                     exclude_ids=[items["t45"].id])  # fmt: skip
    assert path.steps[1].item.title == "t45" and path.steps[1].item.format == "MP3"


def test_path_folds_versions() -> None:
    lib, items = _lib()
    seeds, targets = list(lib.items("title:t00")), list(lib.items("title:t90"))
    # without t50, the waypoint at 50° takes the copy of t45 (at 47.5°) unless folded
    # (by tags here: 5° apart is cos 0.996, within the default vector threshold)
    gap = [items["t50"].id]
    kept = find_path(lib, seeds, targets, model_id=MODEL_ID, count=17, exclude_ids=gap)
    assert [s.item.title for s in kept.steps].count("t45") == 2
    folded = find_path(lib, seeds, targets, model_id=MODEL_ID, count=17, exclude_ids=gap,
                       fold=VersionFolder(lib, MODEL_ID, threshold=None))  # fmt: skip
    assert [s.item.title for s in folded.steps].count("t45") == 1
    assert len(folded.steps) == 19


def test_path_errors() -> None:
    lib, _items = _lib()
    seeds = list(lib.items("title:t00"))
    with pytest.raises(DeepsimError, match="both a seed and a target"):
        find_path(lib, seeds, seeds, model_id=MODEL_ID)
    with pytest.raises(DeepsimError, match="no seed track has a other-model vector"):
        find_path(lib, seeds, list(lib.items("title:t90")), model_id="other-model")
    with pytest.raises(DeepsimError, match="seed tracks and target"):
        find_path(lib, [], seeds, model_id=MODEL_ID)
