"""The embedding pipeline's mechanics, with a tiny deterministic model.

The model here is a fixed spectral summary (not a trained network): it only
exercises ordering, batching, worker processes and per-file errors.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from audiogen import tone, write_audio

from deepsim.embed import embed_files, resolve_device
from deepsim.errors import AudioError
from deepsim.frontend import FrontendParams
from deepsim.models.base import Model


class SpectralModel(Model):
    """Mean log-mel per band, as a vector (no learned weights)."""

    model_id = "test-spectral"
    frontend = FrontendParams(
        sample_rate=8000, n_fft=256, hop_length=128, n_mels=16, clip_seconds=4.0
    )
    dim = 16
    patch_frames = 50

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def embed_patches(self, patches: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls.append(patches.shape[0])
        return {"embedding": patches.mean(dim=1)}

    def pool(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return outputs["embedding"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("embed")
    paths = []
    for i, freq in enumerate([200.0, 400.0, 800.0, 1600.0, 3000.0]):
        paths.append(write_audio(root / f"{i}.flac", tone(6.0, freqs=(freq,), seed=i), rate=22050))
    bad = root / "bad.mp3"
    bad.write_text("not audio")
    paths.insert(2, bad)
    paths.insert(5, root / "missing.ogg")
    return paths


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_outcomes_in_order_with_errors_as_values(files, workers, batch_size) -> None:
    model = SpectralModel()
    outcomes = list(embed_files(files, model, workers=workers, batch_size=batch_size))
    assert [o.index for o in outcomes] == list(range(len(files)))
    assert [Path(o.path) for o in outcomes] == files
    for outcome in outcomes:
        if files[outcome.index].suffix == ".flac":
            assert outcome.error is None
            assert outcome.vector.shape == (16,)
            assert np.linalg.norm(outcome.vector) == pytest.approx(1.0, abs=1e-5)
        else:
            assert isinstance(outcome.error, AudioError)
            assert outcome.vector is None
            assert str(files[outcome.index]) in str(outcome.error)


def test_results_do_not_depend_on_batching_or_workers(files) -> None:
    single = [o.vector for o in embed_files(files, SpectralModel(), workers=0, batch_size=1)]
    pooled = [o.vector for o in embed_files(files, SpectralModel(), workers=2, batch_size=4)]
    for a, b in zip(single, pooled, strict=True):
        if a is None:
            assert b is None
        else:
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_different_sounds_give_different_vectors(files) -> None:
    vectors = [
        o.vector for o in embed_files(files, SpectralModel(), workers=0) if o.vector is not None
    ]
    sims = np.array(vectors) @ np.array(vectors).T
    assert sims[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert sims[0, 4] < 0.999


def test_batches_cover_several_tracks(files) -> None:
    model = SpectralModel()
    list(embed_files(files, model, workers=0, batch_size=8))
    # 5 decodable 4-s clips (4 s = 251 frames = 5 patches each) in one network call
    assert model.calls == [25]


def test_a_batch_runs_when_the_next_file_is_not_decoded_yet(files, monkeypatch) -> None:
    # Inference never waits for decoding while it has tracks: a batch runs when it
    # is full or when the decoders say the next file is not ready yet.
    import deepsim.embed
    from deepsim.decoders import decoded

    ready_after = {0: False, 1: True, 3: False}  # index -> is the next one ready

    def scripted(paths, **kwargs):
        for index, (result, _) in enumerate(decoded(paths, **kwargs)):
            yield result, ready_after.get(index, True)

    monkeypatch.setattr(deepsim.embed, "decoded_files", scripted)
    good = [f for f in files if f.suffix == ".flac"]
    model = SpectralModel()
    outcomes = list(embed_files(good, model, workers=0, batch_size=8))
    assert [o.index for o in outcomes] == list(range(len(good)))
    assert all(o.error is None for o in outcomes)
    # 5 patches a clip: [clip 0] (next not ready), [clips 1-3] (next not ready), [clip 4]
    assert model.calls == [5, 15, 5]


def test_short_clip_is_tiled_to_one_patch(tmp_path) -> None:
    path = write_audio(tmp_path / "short.wav", tone(0.3, rate=8000), rate=8000)
    (outcome,) = embed_files([path], SpectralModel(), workers=0)
    assert outcome.error is None and outcome.vector.shape == (16,)


def test_model_failure_is_a_per_file_error(files) -> None:
    class Failing(SpectralModel):
        def embed_patches(self, patches):
            raise RuntimeError("boom")

    outcomes = list(embed_files(files[:2], Failing(), workers=0, batch_size=2))
    assert all(o.error is not None and "boom" in o.error.reason for o in outcomes)


def test_invalid_arguments(files) -> None:
    with pytest.raises(ValueError, match="-1"):
        list(embed_files(files, SpectralModel(), workers=-1))
    with pytest.raises(ValueError, match="0"):
        list(embed_files(files, SpectralModel(), batch_size=0))
    with pytest.raises(ValueError, match="'gpu'"):
        resolve_device("gpu")
    assert resolve_device("auto") in {"cpu", "cuda", "mps"}


# --------------------------------------------------------------------------------------------
# embed_items: items in, vectors stored, with the audio each one follows


@pytest.fixture
def library(tmp_path: Path):
    from beets.library import Item, Library

    music = tmp_path / "music"
    music.mkdir()
    lib = Library(str(tmp_path / "lib.db"), str(music))
    for k, freq in enumerate((200.0, 800.0, 2000.0)):
        path = write_audio(
            music / f"{k}.flac",
            tone(3.0, rate=8000, channels=1, freqs=(freq,), seed=k),
            rate=8000,
            tags={"title": f"t{k}"},
        )
        lib.add(Item(title=f"t{k}", path=str(path).encode()))
    (music / "bad.mp3").write_text("not audio\n" * 50)
    lib.add(Item(title="bad", path=str(music / "bad.mp3").encode()))
    yield lib
    lib._close()


def test_embed_items_plans_stores_and_remembers(library, tmp_path: Path) -> None:
    import shutil

    import mediafile

    from deepsim import store
    from deepsim.embed import embed_items, plan_embedding

    model = SpectralModel()
    plan = plan_embedding(library, model.model_id)
    assert plan.todo == [1, 2, 3, 4] and plan.done == 0
    loads: list[int] = []

    def loader() -> Model:
        loads.append(1)
        return model

    summary = embed_items(library, plan, loader, workers=0, batch_size=2)
    assert summary.embedded == 3 and [f[0] for f in summary.failures] == [4]
    assert summary.rate is not None and summary.rate > 0
    assert store.ids_with_vectors(library, model.model_id) == {1, 2, 3}
    assert "not a readable audio file" in library.get_item(4)[store.FAILED_FIELD]
    # nothing to do: the model is not even loaded; the broken file is not retried
    again = plan_embedding(library, model.model_id)
    assert again.todo == [] and again.done == 3 and again.failed_before == 1
    embed_items(library, again, loader)
    assert loads == [1]
    assert plan_embedding(library, model.model_id, retry_failed=True).todo == [4]
    # a tag edit changes size and mtime but not the audio: the vector is kept
    path = library.get_item(1).path.decode()
    tagged = mediafile.MediaFile(path)
    tagged.title = "a much longer title than before " * 4
    tagged.save()
    retag = plan_embedding(library, model.model_id)
    assert retag.todo == [] and 1 in retag.retagged
    embed_items(library, retag, loader)  # records the new identity
    assert plan_embedding(library, model.model_id).retagged == {}
    # another song at the same path: stale, recomputed
    shutil.copyfile(library.get_item(3).path.decode(), path)
    stale = plan_embedding(library, model.model_id)
    assert stale.todo == [1] and stale.stale == 1
    embed_items(library, stale, model, workers=0)
    vectors = dict(zip(*store.read_vectors(library, model.model_id), strict=True))
    np.testing.assert_allclose(vectors[1], vectors[3], atol=2e-3)
    # a vanished file is listed, never embedded; a fixed file is tried again
    Path(library.get_item(2).path.decode()).unlink()
    shutil.copyfile(library.get_item(3).path.decode(), library.get_item(4).path.decode())
    last = plan_embedding(library, model.model_id)
    assert [i for i, _ in last.missing] == [2] and last.todo == [4]


def test_a_plan_split_between_processes_is_the_plan_here(
    library, forkable: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every case of the plan, in runs of ids decided side by side in forked children
    (each with a database connection of its own), gives the plan of one process."""
    import shutil

    import mediafile
    from beets.library import Item

    from deepsim import embed, store, threads
    from deepsim.embed import embed_items, plan_embedding

    music = Path(
        library.directory.decode() if isinstance(library.directory, bytes) else library.directory
    )
    for k in range(9):  # 13 items in all
        path = shutil.copyfile(library.get_item(1 + k % 3).path.decode(), music / f"c{k}.flac")
        library.add(Item(title=f"c{k}", path=str(path).encode()))
    model = SpectralModel()
    embed_items(library, plan_embedding(library, model.model_id), model, workers=0)
    tagged = mediafile.MediaFile(library.get_item(6).path.decode())  # retagged
    tagged.title = "a much longer title than before " * 4
    tagged.save()
    shutil.copyfile(library.get_item(3).path.decode(), library.get_item(8).path.decode())  # stale
    Path(library.get_item(10).path.decode()).unlink()  # missing
    extra = shutil.copyfile(library.get_item(2).path.decode(), music / "new.flac")
    library.add(Item(title="new", path=str(extra).encode()))  # no vector yet
    monkeypatch.setattr(embed, "SPLIT_MIN_ITEMS", 0)
    seen = tmp_path / "pids"
    split = threads.in_processes

    def recorded(fn, parts):  # which process decided each run of ids
        def marked(part, child):
            with open(seen, "a") as out:
                out.write(f"{os.getpid()}\n")
            return fn(part, child)

        return split(marked, parts)

    monkeypatch.setattr(threads, "in_processes", recorded)

    def fields(plan: embed.EmbedPlan) -> tuple:
        return (
            plan.todo,
            plan.paths,
            plan.done,
            plan.stale,
            plan.failed_before,
            plan.missing,
            plan.retagged,
        )

    here = plan_embedding(library, model.model_id, processes=1)
    assert here.todo == [8, 14] and here.stale == 1 and here.failed_before == 1
    assert 6 in here.retagged and [i for i, _ in here.missing] == [10] and here.done == 10
    seen.unlink()
    for ids in (None, range(1, 15), [2, 6, 8, 10, 14, 4]):
        for processes in (2, 3, 4):
            plan = plan_embedding(library, model.model_id, ids, processes=processes)
            want = (
                here
                if ids is None or len(ids) == 14
                else plan_embedding(library, model.model_id, ids, processes=1)
            )
            assert fields(plan) == fields(want), (ids, processes)
    pids = {int(line) for line in seen.read_text().split()}
    assert os.getpid() in pids and len(pids) > 3  # children decided runs of ids
    seen.unlink()
    with library.transaction():  # inside a transaction of this process: no child
        assert store.in_transaction(library)
        inside = plan_embedding(library, model.model_id, processes=3)
    assert fields(inside) == fields(here) and not store.in_transaction(library)
    assert {int(line) for line in seen.read_text().split()} == {os.getpid()}
    with pytest.raises(ValueError, match="processes"):
        plan_embedding(library, model.model_id, processes=0)
    assert store.split_items(library, None, 3, min_items=100) == [(None, 0, None)]


def test_a_second_model_keeps_the_first_ones_vectors(library) -> None:
    from deepsim import store
    from deepsim.embed import embed_items, plan_embedding

    first, second = SpectralModel(), SpectralModel()
    second.model_id = "test-spectral-2"
    embed_items(library, plan_embedding(library, first.model_id), first, workers=0)
    before = store.read_vectors(library, first.model_id)
    embed_items(library, plan_embedding(library, second.model_id), second, workers=0)
    after = store.read_vectors(library, first.model_id)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])
    # switching back: nothing to do; the second model's own slot is current too
    assert plan_embedding(library, first.model_id).todo == []
    again = plan_embedding(library, second.model_id)
    assert again.todo == [] and again.done == 3 and again.failed_before == 1


def test_decoding_starts_before_the_model_loads(library) -> None:
    """With the front end known up front, the decoding workers are decoding while the
    loader runs; the vectors are those of a run that decodes after loading, and a
    front end that turns out different after loading starts decoding again."""
    import multiprocessing

    from deepsim import store
    from deepsim.embed import embed_items, plan_embedding

    model = SpectralModel()
    children: list[int] = []

    def loader() -> Model:
        children.append(len(multiprocessing.active_children()))
        return model

    plan = plan_embedding(library, model.model_id)
    summary = embed_items(
        library, plan, loader, workers=1, batch_size=2, frontend=SpectralModel.frontend
    )
    assert children[0] >= 1  # a decoding worker was running while the model loaded
    assert summary.embedded == 3 and [f[0] for f in summary.failures] == [4]
    early = dict(zip(*store.read_vectors(library, model.model_id), strict=True))
    other = SpectralModel()
    other.model_id = "test-spectral-late"
    wrong = FrontendParams(sample_rate=16000, clip_seconds=2.0)  # not the model's
    plan = plan_embedding(library, other.model_id)
    embed_items(library, plan, lambda: other, workers=1, batch_size=2, frontend=wrong)
    late = dict(zip(*store.read_vectors(library, other.model_id), strict=True))
    assert early.keys() == late.keys() == {1, 2, 3}
    for k in early:
        np.testing.assert_allclose(early[k], late[k], atol=1e-6)
    assert multiprocessing.active_children() == []  # the workers stopped


def test_a_run_with_nothing_to_do_never_imports_torch(library) -> None:
    import os
    import subprocess
    import sys

    from deepsim.embed import embed_items, plan_embedding

    model = SpectralModel()
    embed_items(library, plan_embedding(library, model.model_id), model, workers=0)
    code = (
        "import sys\n"
        "from beets.library import Library\n"
        "from deepsim.embed import embed_items, plan_embedding\n"
        f"lib = Library({os.fsdecode(library.path)!r}, {os.fsdecode(library.directory)!r})\n"
        f"plan = plan_embedding(lib, {model.model_id!r})\n"
        "assert plan.todo == [] and plan.done == 3 and plan.failed_before == 1, plan\n"
        "embed_items(lib, plan, lambda: 1 / 0)  # the loader is never called\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("ext", ["flac", "opus", "mp3", "m4a"])
def test_a_file_cut_to_30_percent(tmp_path: Path, ext: str) -> None:
    """docs/usage.md: FLAC, Opus and MP3 cut to 30 % are embedded from what can be
    decoded; a cut M4A whose index was at the end is unreadable — then it is one
    per-file error that says why, never a crash."""
    full = write_audio(tmp_path / f"full.{ext}", tone(40.0, rate=8000, channels=1), rate=8000)
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size * 3 // 10])
    (outcome,) = list(embed_files([cut], SpectralModel(), workers=0))
    if ext == "m4a" and outcome.error is not None:
        assert "truncated MP4/M4A file: its index" in outcome.error.reason
    else:
        assert outcome.error is None and outcome.vector is not None
    assert outcome.audio is not None and outcome.audio.count(":") == 2
