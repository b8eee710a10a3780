"""A small beets library with planted vectors, for the library tests of paths, versions,
outliers, the map and the radio (no audio decoding, no torch)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from beets.library import Item, Library

from deepsim import store

MODEL_ID = "test-model-1"


def unit(v: Sequence[float] | np.ndarray) -> np.ndarray:
    a = np.asarray(v, np.float64)
    return (a / np.linalg.norm(a)).astype(np.float32)


def make_library(
    tracks: Sequence[dict[str, Any]], *, music: Path | None = None, model_id: str = MODEL_ID
) -> tuple[Library, dict[str, Item]]:
    """A library of ``tracks`` (dicts of item fields plus ``vector``), keyed by title.

    With ``music``, each track gets a file there (``<title>.<ext>``, or the
    track's ``path`` relative to it) so playlists and MPD can see it.
    """
    lib = Library(":memory:", str(music or "/music"))
    items: dict[str, Item] = {}
    rows = []
    for spec in tracks:
        fields = {k: v for k, v in spec.items() if k not in ("vector", "file")}
        fields.setdefault("path", f"/music/{fields['title']}.mp3")
        if music is not None:
            fields["path"] = str(music / spec.get("file", f"{fields['title']}.mp3"))
        item = Item(**fields)
        lib.add(item)
        items[item.title] = item
        if spec.get("vector") is not None:
            rows.append((item.id, unit(spec["vector"])))
    store.write_vectors(lib, rows, model_id)
    return lib, items
