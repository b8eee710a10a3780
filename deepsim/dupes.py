"""Versions of one recording: the same track in another format, master or album.

Two tracks are *versions* when

* their normalised artist and title are equal (:func:`version_key`: case,
  accents, punctuation, "feat." credits and qualifiers such as
  "(Remastered 2011)", "[Mono]" or "- Single Version" are ignored; "live",
  "remix", "edit" and other qualifiers are kept, since those are other
  recordings), or
* their vectors' cosine is at least ``threshold``
  (:data:`DEFAULT_THRESHOLD`, measured on re-encoded corpus excerpts: see
  :func:`measure_threshold` and docs/usage.md).

:class:`VersionFolder` folds versions in a ranked list (``beet similar``,
paths, the radio): a track is dropped when it is a version of a seed or of a
track kept before it.  :func:`find_versions` groups a whole library
(``beet deepsim-dupes``).  No torch here.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from deepsim import store
from deepsim.errors import ParameterError
from deepsim.util import check_float, get_logger

if TYPE_CHECKING:
    from beets.library import Library

log = get_logger(__name__)

#: Cosine at or above which two vectors are taken for one recording.  Measured
#: with tools/corpus_versions.py on the musicnn-msd-mtt-1 vectors of the corpus
#: (docs/usage.md, "Versions"): 67 re-encodings (mp3/flac/m4a/opus) of 21 excerpts
#: beside the 56 originals give 142 same-recording pairs with cosines of 0.9804 and
#: up (mean 0.9960), while the 7,361 pairs of different recordings reach 0.9482 at
#: most.  0.975 sits in that gap, nearer the same-recording side: folding a
#: different song would be worse than keeping a duplicate (tags catch most of those).
DEFAULT_THRESHOLD = 0.975

_QUALIFIERS = (
    r"(?:\d{4} )?(?:digital(?:ly)? )?re-?master(?:ed)?(?: \d{4})?(?: version)?",
    r"mono(?: version| mix)?",
    r"stereo(?: version| mix)?",
    r"(?:album|single|lp|original|radio) version",
    r"explicit(?: version)?",
    r"clean(?: version)?",
    r"bonus track",
    r"deluxe(?: edition)?",
)
_QUALIFIER = "|".join(_QUALIFIERS)
_BRACKETED = re.compile(rf"\s*[(\[]\s*(?:{_QUALIFIER})\s*[)\]]", re.IGNORECASE)
_DASHED = re.compile(rf"\s+-\s+(?:{_QUALIFIER})\s*$", re.IGNORECASE)
_FEAT = re.compile(r"\s+(?:feat\.?|featuring|ft\.)\s.*$", re.IGNORECASE)
_FEAT_BRACKET = re.compile(r"\s*[(\[]\s*(?:feat\.?|featuring|ft\.)\s[^)\]]*[)\]]", re.IGNORECASE)
_NON_WORD = re.compile(r"[\W_]+")


def _fold(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    plain = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(_NON_WORD.sub(" ", plain.casefold()).split())


def version_key(artist: Any, title: Any) -> str | None:
    """Normalised ``artist|title``, or None when either is empty (never matched by tags).

    Examples
    --------
    >>> version_key("Björk feat. X", "Jóga (Remastered 2011)")
    'bjork|joga'
    >>> version_key("The Band", "Song - Live") == version_key("The Band", "Song")
    False
    """
    artist_text = _FEAT.sub("", _FEAT_BRACKET.sub("", str(artist or "")))
    title_text = str(title or "")
    while True:
        stripped = _DASHED.sub("", _BRACKETED.sub("", title_text))
        if stripped == title_text:
            break
        title_text = stripped
    title_text = _FEAT_BRACKET.sub("", title_text)
    a, t = _fold(artist_text), _fold(title_text)
    if not a or not t:
        return None
    return f"{a}|{t}"


@dataclass
class _Facts:
    keys: dict[int, str | None]
    vectors: dict[int, np.ndarray]


class VersionFolder:
    """Tells, for a ranked list of item ids, which ones repeat a recording already kept.

    Facts (tags and vectors) are fetched in bulk with :meth:`fetch` and
    cached; each pass over a ranked list starts with :meth:`start`.

    Parameters
    ----------
    lib
        The beets library.
    model_id
        The active model (whose vectors are compared).
    threshold
        Cosine at or above which two tracks are versions (None: tags only).
    use_tags
        Also fold tracks whose :func:`version_key` is equal.
    """

    def __init__(
        self,
        lib: Library,
        model_id: str,
        *,
        threshold: float | None = DEFAULT_THRESHOLD,
        use_tags: bool = True,
    ) -> None:
        self.lib = lib
        self.model_id = model_id
        self.threshold = (
            None if threshold is None else check_float("threshold", threshold, low=-1, high=1)
        )
        self.use_tags = use_tags
        self._facts = _Facts({}, {})

    def fetch(self, ids: Iterable[int]) -> None:
        """Read the tags and vectors of these ids (those not read yet), in bulk."""
        unknown = sorted({int(i) for i in ids} - self._facts.keys.keys())
        for start in range(0, len(unknown), 500):
            chunk = unknown[start : start + 500]
            if self.use_tags:
                fields = store.read_item_fields(self.lib, chunk, ("artist", "title"))
                for item_id in chunk:
                    row = fields.get(item_id)
                    self._facts.keys[item_id] = None if row is None else version_key(*row)
            else:
                self._facts.keys.update(dict.fromkeys(chunk))
            if self.threshold is not None:
                vec_ids, matrix = store.read_vectors(self.lib, self.model_id, ids=chunk)
                self._facts.vectors.update(zip(vec_ids.tolist(), matrix, strict=True))

    def start(self, kept: Iterable[int] = ()) -> FoldPass:
        """A fresh pass over a ranked list, with ``kept`` (e.g. the seeds) already kept."""
        kept = [int(i) for i in kept]
        self.fetch(kept)
        fold = FoldPass(self)
        for item_id in kept:
            fold.keep(item_id)
        return fold


class FoldPass:
    """One pass of a :class:`VersionFolder` over a ranked list (see :meth:`VersionFolder.start`)."""

    def __init__(self, folder: VersionFolder) -> None:
        self.folder = folder
        self.ids: set[int] = set()
        self.keys: set[str] = set()
        self.vectors: list[np.ndarray] = []
        self._matrix: np.ndarray | None = None

    def is_version(self, item_id: int) -> bool:
        """True when ``item_id`` repeats a recording kept in this pass."""
        facts = self.folder._facts
        if item_id in self.ids:
            return False  # kept itself (a seed allowed in the results)
        if item_id not in facts.keys:
            self.folder.fetch([item_id])
        key = facts.keys.get(item_id)
        if key is not None and key in self.keys:
            return True
        vector = facts.vectors.get(item_id)
        if self.folder.threshold is None or vector is None or not self.vectors:
            return False
        if self._matrix is None:
            self._matrix = np.stack(self.vectors)
        return bool((self._matrix @ vector).max() >= self.folder.threshold)

    def keep(self, item_id: int) -> None:
        """Record ``item_id`` as kept: its versions are folded from now on."""
        facts = self.folder._facts
        self.ids.add(item_id)
        key = facts.keys.get(item_id)
        if key is not None:
            self.keys.add(key)
        vector = facts.vectors.get(item_id)
        if vector is not None:
            self.vectors.append(vector)
            self._matrix = None


# --------------------------------------------------------------------------- whole library


def find_versions(
    lib: Library,
    model_id: str,
    *,
    ids: Sequence[int] | None = None,
    threshold: float | None = DEFAULT_THRESHOLD,
    use_tags: bool = True,
    block: int = 2048,
) -> list[list[tuple[int, float]]]:
    """Groups of versions among ``ids`` (all items with a vector when None).

    Returns
    -------
    list of groups
        Each group is ``[(item_id, similarity to the group's first item), ...]``
        with at least two members, the first being the lowest id; groups are
        ordered by their first id.  Items without a vector join groups by tags
        only (similarity ``nan``).
    """
    if threshold is not None:
        threshold = check_float("threshold", threshold, low=-1, high=1)
    vec_ids, matrix = store.read_vectors(lib, model_id, ids=ids)
    wanted = sorted({int(i) for i in ids}) if ids is not None else vec_ids.tolist()
    parent = {i: i for i in wanted}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    if use_tags:
        by_key: dict[str, int] = {}
        for start in range(0, len(wanted), 900):
            chunk = wanted[start : start + 900]
            fields = store.read_item_fields(lib, chunk, ("artist", "title"))
            for item_id, row in fields.items():
                key = version_key(*row)
                if key is not None:
                    union(by_key.setdefault(key, item_id), item_id)
    if threshold is not None and len(vec_ids) > 1:
        id_list = vec_ids.tolist()
        for start in range(0, len(id_list), block):
            sims = matrix[start : start + block] @ matrix.T
            rows, cols = np.nonzero(sims >= threshold)
            for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
                if start + r < c:
                    union(id_list[start + r], id_list[c])
    members: dict[int, list[int]] = {}
    for item_id in wanted:
        members.setdefault(find(item_id), []).append(item_id)
    position = {i: k for k, i in enumerate(vec_ids.tolist())}
    groups = []
    for root in sorted(members):
        group = members[root]
        if len(group) < 2:
            continue
        first = position.get(group[0])
        out = []
        for item_id in group:
            k = position.get(item_id)
            sim = (
                float(matrix[first] @ matrix[k])
                if first is not None and k is not None
                else float("nan")
            )
            out.append((item_id, sim))
        groups.append(out)
    return groups


@dataclass(frozen=True)
class ThresholdReport:
    """What :func:`measure_threshold` found (cosines)."""

    same_min: float
    same_mean: float
    same_pairs: int
    other_max: float
    other_p999: float
    other_pairs: int

    @property
    def suggested(self) -> float:
        """A threshold halfway in the gap (or the lowest same-recording cosine, without one)."""
        if self.same_min > self.other_max:
            return round((self.same_min + self.other_max) / 2, 4)
        return round(self.same_min, 4)


def measure_threshold(matrix: np.ndarray, groups: Sequence[Any]) -> ThresholdReport:
    """Cosines within known groups of one recording vs. between different recordings.

    ``groups[i]`` labels row ``i`` of ``matrix`` (rows with equal labels are
    versions of one recording).
    """
    labels = np.asarray(groups)
    sims = matrix @ matrix.T
    upper = np.triu(np.ones_like(sims, dtype=bool), k=1)
    same = upper & (labels[:, None] == labels[None, :])
    other = upper & ~same
    if not same.any() or not other.any():
        raise ParameterError("measure_threshold needs at least one pair of each kind")
    return ThresholdReport(
        same_min=float(sims[same].min()),
        same_mean=float(sims[same].mean()),
        same_pairs=int(same.sum()),
        other_max=float(sims[other].max()),
        other_p999=float(np.quantile(sims[other], 0.999)),
        other_pairs=int(other.sum()),
    )
