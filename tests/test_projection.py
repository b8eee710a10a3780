from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from libgen import unit

from deepsim.errors import ParameterError
from deepsim.projection import cache_path, cached_projection, project


def _clusters(n_per: int = 15, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 24)) * 3
    labels = np.repeat(np.arange(3), n_per)
    rows = np.stack([unit(centres[c] + rng.normal(size=24)) for c in labels])
    return rows, labels


def _separation(points: np.ndarray, labels: np.ndarray) -> float:
    """Share of points whose nearest other point (2-D) has their label."""
    d = ((points[:, None] - points[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return float((labels[d.argmin(1)] == labels).mean())


@pytest.mark.parametrize("method", ["opentsne", "umap"])
def test_project_keeps_clusters_apart(method: str) -> None:
    pytest.importorskip("openTSNE" if method == "opentsne" else "umap")
    matrix, labels = _clusters()
    points = project(matrix, method=method)
    assert points.shape == (len(matrix), 2) and points.dtype == np.float32
    assert np.isfinite(points).all()
    assert _separation(points, labels) > 0.9


def test_project_tiny_and_bad_input() -> None:
    assert project(np.eye(3, dtype=np.float32)).shape == (3, 2)
    with pytest.raises(ParameterError, match="method"):
        project(np.eye(5, dtype=np.float32), method="pca")


def test_cache_reused_updated_and_recomputed(tmp_path: Path) -> None:
    pytest.importorskip("openTSNE")
    matrix, labels = _clusters()
    ids = np.arange(1, len(matrix) + 1)
    first = cached_projection(ids, matrix, state_dir=tmp_path, model_id="m/1")
    assert first.action == "computed" and cache_path(tmp_path, "m/1", "opentsne").is_file()
    again = cached_projection(ids, matrix, state_dir=tmp_path, model_id="m/1")
    assert again.action == "cached" and np.array_equal(again.points, first.points)
    # one track removed, one re-embedded (now like cluster 2), one new (like cluster 0)
    changed = matrix.copy()
    changed[0] = matrix[40]
    new_ids = np.concatenate([ids[:-1], [100]])
    new_matrix = np.concatenate([changed[:-1], matrix[[1]]])
    upd = cached_projection(new_ids, new_matrix, state_dir=tmp_path, model_id="m/1")
    assert (upd.action, upd.placed, upd.dropped) == ("updated", 2, 2)
    assert np.array_equal(upd.points[1:-1], first.points[1:-1])  # unchanged points stay
    centre = {c: first.points[labels == c].mean(0) for c in range(3)}

    def closest(p: np.ndarray) -> int:
        return min(centre, key=lambda c: float(((p - centre[c]) ** 2).sum()))

    assert closest(upd.points[0]) == 2 and closest(upd.points[-1]) == 0
    # too many changes: computed again; force too
    shuffled = np.roll(matrix, 1, axis=0)
    assert cached_projection(ids, shuffled, state_dir=tmp_path, model_id="m/1").action == "computed"
    forced = cached_projection(ids, shuffled, state_dir=tmp_path, model_id="m/1", force=True)
    assert forced.action == "computed"


def test_damaged_cache_is_recomputed(tmp_path: Path) -> None:
    pytest.importorskip("openTSNE")
    matrix, _ = _clusters(5)
    ids = np.arange(len(matrix))
    cache_path(tmp_path, "m", "opentsne").write_bytes(b"not a zip")
    assert cached_projection(ids, matrix, state_dir=tmp_path, model_id="m").action == "computed"
