"""The decoding workers: results in order, errors as values, whether the next one is ready."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from audiogen import tone, write_audio

from deepsim.audio import decode_middle
from deepsim.decoders import decode_job, decoded
from deepsim.errors import AudioError


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("decoders")
    paths = [
        write_audio(root / f"{i}.flac", tone(5.0, freqs=(300.0 * (i + 1),), seed=i), rate=22050)
        for i in range(4)
    ]
    (root / "bad.ogg").write_text("not audio")
    paths.insert(1, root / "bad.ogg")
    return paths


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_results_in_order_equal_to_decoding_here(files: list[Path], workers: int) -> None:
    results = list(decoded(files, sample_rate=8000, seconds=4.0, workers=workers, window=2))
    assert len(results) == len(files)
    for path, ((wave, audio), next_ready) in zip(files, results, strict=True):
        assert isinstance(next_ready, bool)
        if path.name == "bad.ogg":
            assert isinstance(wave, AudioError) and str(path) in str(wave)
        else:
            np.testing.assert_array_equal(wave, decode_middle(path, sample_rate=8000, seconds=4.0))
            assert audio is not None and audio == decode_job(path, 8000, 4.0)[1]
    assert results[-1][1] is True  # nothing after the last one to wait for
    if workers == 0:
        assert all(ready for _, ready in results)  # decoded here, when asked for


def test_next_ready_says_whether_a_result_waits(files: list[Path]) -> None:
    # With one worker and a window of every file, the worker runs ahead of a slow
    # consumer: after a pause, the next result is there.
    import time

    stream = iter(decoded(files, sample_rate=8000, seconds=4.0, workers=1, window=len(files)))
    first = next(stream)
    assert first[0][0] is not None
    time.sleep(3.0)
    _, ready = next(stream)
    assert ready is True
    stream.close()


def test_decoding_runs_before_anything_is_asked_for(files: list[Path]) -> None:
    # The workers start when the decoding is made (the caller loads its model meanwhile).
    import multiprocessing
    import time

    decoding = decoded(files, sample_rate=8000, seconds=4.0, workers=1, window=len(files))
    time.sleep(3.0)
    stream = iter(decoding)
    _, ready = next(stream)
    assert ready is True  # the second file was decoded before the first was asked for
    decoding.close()
    assert list(stream) == []  # closed: nothing more
    assert list(decoding) == []  # not even decoded here
    assert multiprocessing.active_children() == []
    here = decoded(files, sample_rate=8000, seconds=4.0, workers=0, window=1)
    stream = iter(here)
    next(stream)
    here.close()
    assert list(stream) == []
