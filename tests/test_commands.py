"""deepsim.commands: what the command routines decide and say, without beets' command line
(tests/plugin/ runs them through `beet`)."""

from __future__ import annotations

from optparse import Values
from pathlib import Path

import numpy as np
import pytest
from libgen import make_library

from deepsim import settings
from deepsim.commands import Context, caps, result_format, seed_items
from deepsim.commands.embed import plan_notes, rate, report, top_tags
from deepsim.commands.features import dupes
from deepsim.embed import EmbedPlan, EmbedSummary
from deepsim.errors import DeepsimError
from deepsim.paths import PathResult, PathStep

MODEL = "test-model-1"


def context(**overrides: object) -> Context:
    config = {**settings.DEFAULTS, **overrides}
    return Context(
        settings=config, state_dir=Path("/nonexistent"), resolve_model=lambda: (MODEL, MODEL)
    )


@pytest.fixture
def lib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)  # beets' migration backups of an in-memory library land here
    tracks = [
        {"title": "Blue in Green", "artist": "Miles", "album": "Kind", "vector": [1, 0, 0]},
        {"title": "Blue in Green", "artist": "Miles", "album": "Live", "vector": [1, 0.01, 0]},
        {"title": "So What", "artist": "Miles", "album": "Kind", "vector": [0, 1, 0]},
    ]
    library, _items = make_library(tracks, model_id=MODEL)
    return library


def test_embed_report_lines_and_error() -> None:
    plan = EmbedPlan(MODEL, todo=[1, 2, 3], done=4, stale=1, missing=[(9, "/x.mp3")])
    summary = EmbedSummary(plan, MODEL, embedded=2, seconds=2.0, timed=2)
    summary.failures.append((3, "/c.mp3", "not a readable audio file"))
    outcome = report(summary)
    assert outcome.lines == [
        "deepsim-embed: embedded 2, skipped 4 (already embedded), failed 1; 1 with changed "
        f"audio, 1 missing on disk — {MODEL}, 1 tracks/s",
        "  1 × not a readable audio file",
    ]
    assert outcome.error is not None and outcome.error.startswith("1 track(s) could not be")
    summary.interrupted = True
    assert "interrupted; 2 vector(s) saved, 0 left" in (report(summary).error or "")
    assert plan_notes(EmbedPlan(MODEL)) == ""


def test_rate_and_top_tags() -> None:
    assert [rate(0.04), rate(3.14), rate(123.4)] == ["0.04", "3.1", "123"]
    names = ["msd:rock", "msd:jazz", "mtt:piano", "mtt:drums"]
    assert top_tags(names, np.array([0.1, 0.9, 0.3, 0.2]), per_group=1) == "msd:jazz, mtt:piano"


def test_formats_and_caps_follow_options_then_keys() -> None:
    ctx = context(format="$title")
    assert result_format(ctx, "$id", album=False) == "$id"
    assert result_format(ctx, None, album=False) == "$title"
    assert result_format(context(), None, album=True) == "$deepsim_similarity  " + ctx.album_format
    assert caps(context(max_per_artist=2), Values({"max_per_album": 1})) == {
        "max_per_artist": 2,
        "max_per_album": 1,
    }
    with pytest.raises(DeepsimError, match="max-per-album must be >= 0, got -1"):
        caps(ctx, Values({"max_per_album": -1}))


def test_seed_items_reads_a_quoted_query_again_as_terms(lib) -> None:  # type: ignore[no-untyped-def]
    assert [i.album for i in seed_items(lib, ["album:Kind title:So"])] == ["Kind"]
    assert len(seed_items(lib, "title:Blue artist:Miles", "--to query")) == 2
    with pytest.raises(DeepsimError, match="no tracks match --to query 'title:zzz'"):
        seed_items(lib, "title:zzz", "--to query")


def test_dupes_lines(lib) -> None:  # type: ignore[no-untyped-def]
    opts = Values({"threshold": None, "no_tags": False, "format": "$album"})
    lines = dupes(lib, [], opts, context()).lines
    assert lines[0] == "== 2 versions"
    assert [line.split("  ")[1] for line in lines[1:3]] == ["Kind", "Live"]
    assert lines[-1] == "deepsim-dupes: 1 group(s), 2 tracks, 1 would be folded"


def test_path_lines_verbose(lib) -> None:  # type: ignore[no-untyped-def]
    start, end = next(iter(lib.items("title:Blue"))), next(iter(lib.items("title:So")))
    path = PathResult(steps=[PathStep(start, 1.0, 0.5, 1.0), PathStep(end, 0.5, 1.0, 1.0)])
    assert path.lines("$title") == ["Blue in Green", "So What"]
    assert path.lines("$title", verbose=True) == [
        "start    end  track",
        "1.000  0.500  Blue in Green",
        "0.500  1.000  So What",
    ]


def test_outliers_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    base = np.array([1.0, 0, 0, 0])
    tracks = [
        {"title": f"t{k}", "artist": "A", "album": "Alb", "vector": base + 0.05 * rng.random(4)}
        for k in range(6)
    ]
    tracks.append({"title": "intruder", "artist": "A", "album": "Alb", "vector": [0, 0, 0, 1]})
    library, _items = make_library(tracks, model_id=MODEL)
    from deepsim.commands.features import outliers

    opts = Values({"threshold": None, "all": False, "format": "$title"})
    lines = outliers(library, [], opts, context()).lines
    assert lines[0] == "score    fit  track" and lines[1].endswith("  intruder")
    assert lines[-1] == (
        "deepsim-outliers: 1 outlier(s) (score <= -3.5) among 7 tracks of 1 album(s)"
    )
    with pytest.raises(DeepsimError, match="no tracks match query 'title:zzz'"):
        outliers(library, ["title:zzz"], opts, context())
