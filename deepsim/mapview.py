"""``beet deepsim-map``: the library as one self-contained HTML page (or a PNG picture).

The page (``map_template.html``, package data) holds its data and script
inline and loads nothing: it opens from disk, offline.  The points are drawn
on one canvas (no DOM node per track), so 100k tracks stay responsive; a
uniform grid answers hover and click hit tests.  Hovering shows artist –
title – album, the search box lists matching tracks and centres the first,
and clicking a track lists its nearest neighbours in the vector space
(computed here: exact below :data:`EXACT_NEIGHBOURS` tracks, Annoy above).

The 2-D layout comes from :func:`deepsim.projection.cached_projection` over
all of the model's vectors, so the map of a query is the same layout as the
whole library's.  ``--color-by``: ``genre`` (the first genre), ``album``,
``artist``, ``year`` (by decade), or ``cluster`` (spherical k-means of the
vectors); the 19 largest groups get a colour, the rest is grey.

A ``.png`` output is drawn with matplotlib (an optional dependency, in the
``map`` extra).  No torch here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deepsim import store
from deepsim.errors import DeepsimError
from deepsim.projection import Method, cached_projection
from deepsim.util import atomic_write, check_choice, check_int, get_logger

if TYPE_CHECKING:
    from collections.abc import Sequence

    from beets.library import Library

log = get_logger(__name__)

COLOR_BY: tuple[str, ...] = ("genre", "album", "artist", "year", "cluster")
#: Below this many tracks, neighbours are exact; above, from an Annoy index.
EXACT_NEIGHBOURS = 20_000
#: tab20 without its greys; the 20th colour is "other".
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
    "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5",
    "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5", "#e7ba52",
)  # fmt: skip
OTHER = "#7f7f7f"
_FIELDS = ("artist", "title", "album", "albumartist", "genres", "year")


@dataclass(frozen=True)
class MapWritten:
    """What :func:`write_map` wrote."""

    path: str
    count: int
    action: str
    color_by: str


def neighbours(matrix: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` nearest other rows (indices, cosines), best first; -1 pads."""
    n = len(matrix)
    k_eff = min(k, n - 1)
    nn = np.full((n, k), -1, np.int64)
    sims = np.zeros((n, k), np.float32)
    if k_eff <= 0:
        return nn, sims
    if n <= EXACT_NEIGHBOURS:
        for start in range(0, n, 1024):
            block = matrix[start : start + 1024] @ matrix.T
            block[np.arange(len(block)), np.arange(start, start + len(block))] = -np.inf
            part = np.argpartition(-block, k_eff - 1, axis=1)[:, :k_eff]
            part_sims = np.take_along_axis(block, part, axis=1)
            order = np.argsort(-part_sims, axis=1)
            nn[start : start + len(block), :k_eff] = np.take_along_axis(part, order, axis=1)
            sims[start : start + len(block), :k_eff] = np.take_along_axis(part_sims, order, axis=1)
        return nn, sims
    from deepsim.index import AnnoyIndex

    index = AnnoyIndex(n_trees=10).build(np.arange(n), matrix)
    for row in range(n):
        found, found_sims = index.query(matrix[row], k_eff, exclude=[row])
        nn[row, : len(found)] = found
        sims[row, : len(found)] = found_sims
    return nn, sims


def spherical_kmeans(
    matrix: np.ndarray, k: int, *, iterations: int = 20, seed: int = 0
) -> np.ndarray:
    """Cluster labels of unit rows (k-means on the sphere: cosine to unit centroids)."""
    n = len(matrix)
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    # farthest-first start: each new centre is the row least like the chosen ones
    chosen = [int(rng.integers(n))]
    closest = matrix @ matrix[chosen[0]]
    for _ in range(1, k):
        chosen.append(int(np.argmin(closest)))
        closest = np.maximum(closest, matrix @ matrix[chosen[-1]])
    centres = matrix[chosen].copy()
    labels = np.zeros(n, np.int64)
    for _ in range(iterations):
        new = np.concatenate(
            [np.argmax(matrix[s : s + 8192] @ centres.T, axis=1) for s in range(0, n, 8192)]
        )
        if np.array_equal(new, labels) and _ > 0:
            break
        labels = new
        for c in range(k):
            members = matrix[labels == c]
            if len(members):
                mean = members.sum(axis=0)
                centres[c] = mean / max(float(np.linalg.norm(mean)), 1e-12)
    return labels


def _group_names(color_by: str, rows: Sequence[tuple[Any, ...]], matrix: np.ndarray) -> list[str]:
    if color_by == "cluster":
        labels = spherical_kmeans(matrix, max(2, min(12, len(matrix) // 8)))
        return [f"cluster {int(c) + 1}" for c in labels]
    names = []
    for artist, _title, album, albumartist, genres, year in rows:
        if color_by == "genre":
            first = str(genres or "").split("\u2400")[0].strip()
            names.append(first or "(no genre)")
        elif color_by == "album":
            names.append(str(album or "").strip() or "(no album)")
        elif color_by == "artist":
            names.append(str(albumartist or artist or "").strip() or "(no artist)")
        else:
            names.append(f"{int(year) // 10 * 10}s" if year else "(no year)")
    return names


def map_data(
    lib: Library,
    *,
    model_id: str,
    state_dir: str | os.PathLike[str],
    ids: Sequence[int] | None = None,
    color_by: str = "album",
    method: Method = "opentsne",
    neighbours_k: int = 10,
    force: bool = False,
) -> tuple[dict[str, Any], str]:
    """The page's data (JSON-ready) and what the projection cache did."""
    check_choice("color_by", color_by, COLOR_BY)
    neighbours_k = check_int("neighbours", neighbours_k, minimum=1, maximum=100)
    all_ids, all_matrix = store.read_vectors(lib, model_id)
    if not all_ids.size:
        raise DeepsimError(f"no {model_id} vectors yet; run `beet deepsim-embed`")
    projection = cached_projection(
        all_ids, all_matrix, state_dir=state_dir, model_id=model_id, method=method, force=force
    )
    keep = np.ones(len(all_ids), bool) if ids is None else np.isin(all_ids, np.asarray(ids))
    shown_ids, matrix, points = all_ids[keep], all_matrix[keep], projection.points[keep]
    if not shown_ids.size:
        raise DeepsimError("none of the matching tracks has a vector yet")
    fields = store.read_item_fields(lib, shown_ids.tolist(), _FIELDS)
    present = np.array([int(i) in fields for i in shown_ids.tolist()], bool)
    shown_ids, matrix, points = shown_ids[present], matrix[present], points[present]
    rows = [fields[int(i)] for i in shown_ids.tolist()]
    names = _group_names(color_by, rows, matrix)
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    ranked = sorted(counts, key=lambda g: (-counts[g], g))
    coloured = ranked[: len(PALETTE)]
    group_index = {name: g for g, name in enumerate(coloured)}
    colors = [PALETTE[g] for g in range(len(coloured))]
    legend = list(coloured)
    if len(ranked) > len(coloured):
        group_index.update({name: len(coloured) for name in ranked[len(coloured) :]})
        colors.append(OTHER)
        legend.append(f"{len(ranked) - len(coloured)} others")
    artist_table: dict[str, int] = {}
    album_table: dict[str, int] = {}
    artist_col = [artist_table.setdefault(str(r[0] or ""), len(artist_table)) for r in rows]
    album_col = [album_table.setdefault(str(r[2] or ""), len(album_table)) for r in rows]
    nn, nn_sims = neighbours(matrix, neighbours_k)
    data = {
        "color_by": color_by,
        "k": neighbours_k,
        "ids": shown_ids.tolist(),
        "x": np.round(points[:, 0].astype(np.float64), 3).tolist(),
        "y": np.round(-points[:, 1].astype(np.float64), 3).tolist(),
        "title": [str(r[1] or "") for r in rows],
        "artist": artist_col,
        "album": album_col,
        "artists": list(artist_table),
        "albums": list(album_table),
        "color": [group_index[name] for name in names],
        "colors": colors,
        "names": legend,
        "nn": nn.ravel().tolist(),
        "nns": np.round(nn_sims.ravel().astype(np.float64), 3).tolist(),
    }
    return data, projection.action


def render_html(data: dict[str, Any]) -> str:
    """The self-contained page for :func:`map_data`'s data."""
    template = resources.files("deepsim").joinpath("map_template.html").read_text("utf-8")
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    # inside <script>: no "</" may end the element early
    payload = payload.replace("</", "<\\/").replace("<!--", "<\\!--")
    return template.replace("/*__DEEPSIM_DATA__*/", payload)


def render_png(data: dict[str, Any], path: str | os.PathLike[str], *, size: float = 10.0) -> None:
    """A picture of the map with matplotlib (legend of the coloured groups)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError:
        raise DeepsimError(
            "a .png map needs matplotlib (pip install 'beets-deepsim[map]'); or write a .html map"
        ) from None
    x, y = np.asarray(data["x"]), -np.asarray(data["y"])
    colors = np.asarray(data["colors"])[np.asarray(data["color"])]
    fig, ax = plt.subplots(figsize=(size, size * 0.75), dpi=120)
    try:
        ax.scatter(x, y, c=colors, s=max(1.0, min(30.0, 6000.0 / max(len(x), 1))), linewidths=0)
        ax.set_axis_off()
        ax.set_title(f"deepsim map: {len(x)} tracks, coloured by {data['color_by']}")
        handles = [
            Line2D([], [], marker="o", linestyle="", color=c, label=n)
            for c, n in zip(data["colors"], data["names"], strict=True)
        ]
        ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
        fig.tight_layout()
        with atomic_write(path, "wb") as fh:
            fig.savefig(fh, format="png")
    finally:
        plt.close(fig)


def write_map(
    lib: Library,
    path: str | os.PathLike[str],
    *,
    model_id: str,
    state_dir: str | os.PathLike[str],
    ids: Sequence[int] | None = None,
    color_by: str = "album",
    method: Method = "opentsne",
    neighbours: int = 10,
    force: bool = False,
) -> MapWritten:
    """Write the map of ``ids`` (all tracks with a vector when None) to ``path``.

    ``path`` ending in ``.png`` gets a picture, anything else the HTML page.
    """
    data, action = map_data(
        lib,
        model_id=model_id,
        state_dir=state_dir,
        ids=ids,
        color_by=color_by,
        method=method,
        neighbours_k=neighbours,
        force=force,
    )
    target = Path(path)
    try:
        if target.suffix.lower() == ".png":
            render_png(data, target)
        else:
            with atomic_write(target, "w") as fh:
                fh.write(render_html(data))
    except OSError as exc:
        raise DeepsimError(f"cannot write {target}: {exc.strerror or exc}") from exc
    return MapWritten(os.fspath(target), len(data["x"]), action, color_by)
