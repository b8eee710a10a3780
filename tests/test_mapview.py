"""The map page: its data, that it is self-contained, and a real headless browser on it."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from browser import chromium_executable, headless_chromium
from libgen import MODEL_ID, make_library, unit

from deepsim.errors import ParameterError
from deepsim.mapview import map_data, neighbours, spherical_kmeans, write_map

pytest.importorskip("openTSNE")


def _lib(n_per: int = 12):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 3
    tracks = []
    for c, album in enumerate(["Red </script> Album", "Green", "Blue"]):
        for k in range(n_per):
            tracks.append(
                {
                    "title": f"{album.split()[0]} song {k}",
                    "artist": f"Artist {c}",
                    "album": album,
                    "genres": [["Rock", "Pop"][c % 2]],
                    "year": 1975 + 10 * c,
                    "vector": unit(centres[c] + rng.normal(size=16)),
                }
            )
    return make_library(tracks)


def test_neighbours_exact_and_padded() -> None:
    rng = np.random.default_rng(0)
    m = np.stack([unit(v) for v in rng.normal(size=(30, 8))])
    nn, sims = neighbours(m, 5)
    full = m @ m.T
    np.fill_diagonal(full, -np.inf)
    assert np.array_equal(nn[:, 0], full.argmax(1))
    assert np.all(np.diff(sims, axis=1) <= 1e-6)
    nn, _ = neighbours(m[:3], 5)
    assert (nn[:, 2:] == -1).all() and (nn[:, :2] >= 0).all()


def test_spherical_kmeans_finds_clusters() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 4
    m = np.stack([unit(centres[i % 3] + rng.normal(size=16)) for i in range(60)])
    labels = spherical_kmeans(m, 3)
    for c in range(3):
        assert len(set(labels[c::3].tolist())) == 1
    assert len(set(labels.tolist())) == 3


@pytest.mark.parametrize("color_by", ["genre", "album", "artist", "year", "cluster"])
def test_map_data_colours(tmp_path: Path, color_by: str) -> None:
    lib, _items = _lib()
    data, action = map_data(lib, model_id=MODEL_ID, state_dir=tmp_path, color_by=color_by)
    assert action in ("computed", "cached") and len(data["x"]) == 36
    assert len(data["nn"]) == 36 * data["k"]
    names = {data["names"][c] for c in data["color"]}
    expected = {
        "genre": {"Rock", "Pop"},
        "album": {"Red </script> Album", "Green", "Blue"},
        "artist": {"Artist 0", "Artist 1", "Artist 2"},
        "year": {"1970s", "1980s", "1990s"},
    }.get(color_by)
    if expected is not None:
        assert names == expected
    else:
        assert len(names) >= 2


def test_map_of_a_query_and_errors(tmp_path: Path) -> None:
    lib, _items = _lib()
    ids = [i.id for i in lib.items("album:Green")]
    data, _ = map_data(lib, model_id=MODEL_ID, state_dir=tmp_path, ids=ids)
    assert sorted(data["ids"]) == sorted(ids)
    with pytest.raises(ParameterError, match="color_by"):
        map_data(lib, model_id=MODEL_ID, state_dir=tmp_path, color_by="mood")


def test_html_is_self_contained(tmp_path: Path) -> None:
    lib, _ = _lib()
    out = write_map(lib, tmp_path / "map.html", model_id=MODEL_ID, state_dir=tmp_path)
    html = Path(out.path).read_text("utf-8")
    assert out.count == 36
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "fetch(" not in html and "XMLHttpRequest" not in html
    # the album name with "</script>" cannot close the data element
    assert html.count("</script>") == 2


def test_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    lib, _ = _lib()
    out = write_map(lib, tmp_path / "map.png", model_id=MODEL_ID, state_dir=tmp_path)
    assert Path(out.path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def browser():
    executable = chromium_executable()
    if executable is None:
        pytest.skip("chromium is not installed (Debian package chromium)")
    pytest.importorskip("playwright.sync_api")
    with headless_chromium(executable) as b:
        yield b


def test_in_a_headless_browser(tmp_path: Path, browser) -> None:
    lib, _items = _lib()
    path = tmp_path / "map.html"
    write_map(lib, path, model_id=MODEL_ID, state_dir=tmp_path, neighbours=5)
    page = browser.new_page(viewport={"width": 1200, "height": 800})
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.as_uri())
    page.wait_for_selector("body[data-ready='1']", timeout=20000)
    assert errors == []
    assert requests == [path.as_uri()]  # nothing else is loaded
    # N points drawn, and the canvas really has coloured pixels
    assert page.evaluate("deepsimMap.count") == 36
    assert page.evaluate("deepsimMap.drawn") == 36
    coloured = page.evaluate(
        """() => { const c = document.getElementById('map');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] + d[i+1] + d[i+2] > 120) n++;
        return n; }"""
    )
    assert coloured > 36
    # search finds a track
    page.fill("#search", "green song 7")
    page.press("#search", "Enter")
    assert page.locator("#results li").all_inner_texts() == [
        "Artist 1 \u2013 Green song 7 \u2013 Green"
    ]
    # a click on a point lists its nearest neighbours (first: the same album)
    page.fill("#search", "")
    page.press("#search", "Enter")
    target = page.evaluate(
        "() => { for (let i = 0; i < deepsimMap.count; i++) {"
        " const [x, y] = deepsimMap.screen(i); if (x > 400 && y > 20 && y < 780) return i; }"
        " return -1; }"
    )
    assert target >= 0
    x, y = page.evaluate(f"deepsimMap.screen({target})")
    page.mouse.click(x, y)
    assert page.evaluate("deepsimMap.selected") == target
    listed = page.locator("#neighbours li").all_inner_texts()
    assert len(listed) == 5
    album = page.evaluate(f"deepsimMap.label({target})").rsplit(" \u2013 ", 1)[1]
    assert listed[0].endswith(album)
    sims = [float(t[:5]) for t in listed]
    assert sims == sorted(sims, reverse=True)
    # hover shows artist - title - album
    page.mouse.move(x + 1, y)
    assert page.locator("#tip").inner_text() == page.evaluate(f"deepsimMap.label({target})")


def test_many_points_in_a_headless_browser(tmp_path: Path, browser) -> None:
    """5,000 generated points: the pixel-buffer drawing path, search and hit tests."""
    from deepsim.mapview import PALETTE, render_html

    n, k = 5000, 3
    rng = np.random.default_rng(0)
    xy = rng.normal(size=(n, 2))
    data = {
        "color_by": "album", "k": k, "ids": list(range(n)),
        "x": xy[:, 0].round(3).tolist(), "y": xy[:, 1].round(3).tolist(),
        "title": [f"song {i}" for i in range(n)], "artist": [0] * n,
        "album": [i % 3 for i in range(n)],
        "artists": ["A"], "albums": ["X", "Y", "Z"], "color": [i % 3 for i in range(n)],
        "colors": list(PALETTE[:3]), "names": ["X", "Y", "Z"],
        "nn": [(i + j + 1) % n for i in range(n) for j in range(k)], "nns": [0.9, 0.8, 0.7] * n,
    }  # fmt: skip
    path = tmp_path / "many.html"
    path.write_text(render_html(data), encoding="utf-8")
    page = browser.new_page(viewport={"width": 1200, "height": 800})
    page.goto(path.as_uri())
    page.wait_for_selector("body[data-ready='1']", timeout=30000)
    assert page.evaluate("deepsimMap.drawn") == n
    colours = page.evaluate(
        """() => { const c = document.getElementById('map');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data, seen = new Set();
        for (let i = 0; i < d.length; i += 4) seen.add(d[i] << 16 | d[i+1] << 8 | d[i+2]);
        return seen.size; }"""
    )
    assert colours >= 4  # background + the three album colours
    page.fill("#search", "song 4321")
    page.press("#search", "Enter")
    assert page.locator("#results li").all_inner_texts() == ["A \u2013 song 4321 \u2013 Y"]
    assert page.evaluate("deepsimMap.selected") == 4321
    x, y = page.evaluate("deepsimMap.screen(4321)")
    assert page.evaluate(f"deepsimMap.hit({x}, {y})") == 4321
    assert page.locator("#neighbours li").count() == k
