"""Tests of deepsim.train: the head on planted structure, early stopping, the
held-out protocol, and run_training end to end on a small beets library."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from audiogen import tone, write_audio
from beets.library import Item, Library
from modelgen import tiny_backbone, tiny_config

from deepsim import store
from deepsim.cf import factorise_split, filter_counts, split_tracks
from deepsim.errors import TrainingError
from deepsim.listening import KEY_SEP, Listens, TrackKey
from deepsim.metrics import RANDOM_ROW, evaluate_heldout
from deepsim.models import active_model, load_model, set_active_model
from deepsim.models import model_id as model_id_of
from deepsim.models.checkpoint import load_tensors
from deepsim.models.head import HeadModel
from deepsim.taste import layout_of, split_parts
from deepsim.train import (
    UNTRAINED_ROW,
    TrainConfig,
    choose_head,
    choose_taste_weight,
    finetune_head,
    fit_ridge,
    reembed_from_store,
    run_training,
    train_head,
)

#: A tiny Dieleman network used as the backbone (32-d output, 8 kHz front end).
TINY = tiny_config(factors=32, clip_seconds=2.0)


def planted(
    *,
    n_tracks: int = 300,
    n_users: int = 200,
    dim: int = 400,
    clusters: int = 4,
    noise: float = 1.5,
    nuisance: float = 0.0,
    plays_per_user: int = 20,
    in_cluster: float = 0.9,
    shuffle: bool = False,
    seed: int = 0,
) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Tracks in taste clusters whose features differ by cluster; users who keep to one cluster.

    ``nuisance`` adds a second, stronger clustering of the features that has
    nothing to do with taste (tracks that *sound* alike to the backbone but
    are liked by different people), so the raw backbone cosine is a poor
    recommender and a trained head has something to learn.  ``shuffle``
    moves every play to a random track: listening data without structure.

    Returns play counts (users × tracks), unit feature rows and each track's cluster.
    """
    rng = np.random.default_rng(seed)
    cluster = rng.integers(0, clusters, n_tracks)
    means = rng.standard_normal((clusters, dim))
    features = means[cluster] + noise * rng.standard_normal((n_tracks, dim))
    if nuisance:
        other = rng.standard_normal((clusters, dim))
        features += nuisance * other[rng.integers(0, clusters, n_tracks)]
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    taste = rng.integers(0, clusters, n_users)
    rows: list[int] = []
    cols: list[int] = []
    for u in range(n_users):
        n = 1 + rng.poisson(plays_per_user)
        own = np.flatnonzero(cluster == taste[u])
        pick = np.where(
            rng.random(n) < in_cluster, rng.choice(own, n), rng.integers(0, n_tracks, n)
        )
        rows += [u] * n
        cols += pick.tolist()
    if shuffle:
        cols = rng.integers(0, n_tracks, len(cols)).tolist()
    counts = sp.csr_matrix(
        (np.ones(len(rows), np.float32), (rows, cols)), shape=(n_users, n_tracks)
    )
    return counts, features.astype(np.float32), cluster


# --------------------------------------------------------------------------------------------
# The core: WMF on training tracks, a head, held-out metrics


def test_head_beats_random_on_planted_structure() -> None:
    counts, features, _ = planted()
    users, tracks = filter_counts(counts)
    counts, features = counts[users][:, tracks], features[tracks]
    train, held = split_tracks(len(tracks), heldout_fraction=0.2, seed=0)
    split = factorise_split(counts, train, held, factors=16, seed=0)
    fit = train_head(features[train], split.train_factors, hidden=128, seed=0)
    with torch.no_grad():
        raw = fit.head(torch.from_numpy(features[held]))
    predicted = torch.nn.functional.normalize(raw, dim=1).numpy()
    m = evaluate_heldout(split.user_factors, counts[:, held], predicted, split.heldout_factors)
    assert m.n_tracks == len(held) and m.n_users > 100
    assert m.predicted.auc >= 0.65
    assert 0.35 < m.random.auc < 0.65
    assert m.predicted.auc - m.random.auc >= 0.15
    assert m.predicted.map_at_k > m.random.map_at_k
    assert m.wmf.auc > m.random.auc + 0.2
    assert m.cosine > m.row(RANDOM_ROW).cosine + 0.1


# --------------------------------------------------------------------------------------------
# train_head


def test_early_stopping_keeps_the_best_epoch() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 20)).astype(np.float32)  # features unrelated to targets:
    y = rng.standard_normal((200, 4)).astype(np.float32)  # training can only overfit
    xv = rng.standard_normal((100, 20)).astype(np.float32)
    yv = rng.standard_normal((100, 4)).astype(np.float32)
    fit = train_head(
        x, y, validation=(xv, yv), hidden=256, dropout=0.0, lr=3e-3, epochs=300, patience=5
    )
    assert fit.stopped_early
    assert fit.epochs == fit.best_epoch + 5 < 300
    assert fit.val_loss[fit.best_epoch - 1] == min(fit.val_loss)
    assert fit.train_loss[-1] < fit.train_loss[0]
    with torch.no_grad():
        kept = torch.nn.functional.mse_loss(fit.head(torch.from_numpy(xv)), torch.from_numpy(yv))
    assert float(kept) == pytest.approx(fit.best_val_loss, rel=1e-5)  # best weights restored
    assert (fit.n_train, fit.n_val) == (200, 100)


def test_train_head_without_validation_runs_all_epochs_and_is_seeded() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 10)).astype(np.float32)
    y = rng.standard_normal((64, 3)).astype(np.float32)
    a = train_head(x, y, val_fraction=0.0, epochs=7, hidden=8, seed=4)
    b = train_head(x, y, val_fraction=0.0, epochs=7, hidden=8, seed=4)
    assert a.epochs == 7 and not a.stopped_early and a.val_loss == [] and a.n_val == 0
    for (ka, va), (kb, vb) in zip(
        a.head.state_dict().items(), b.head.state_dict().items(), strict=True
    ):
        assert ka == kb and torch.equal(va, vb)
    split = train_head(x, y, val_fraction=0.25, epochs=2, hidden=8)
    assert (split.n_train, split.n_val) == (48, 16)


def test_train_head_rejects_bad_parameters() -> None:
    x = np.zeros((10, 4), np.float32)
    y = np.zeros((10, 2), np.float32)
    for kwargs, word in (
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"patience": 0}, "patience"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"lr": 0.0}, "lr"),
        ({"lr": "fast"}, "lr"),
    ):
        with pytest.raises(ValueError, match=word):
            train_head(x, y, **kwargs)
    with pytest.raises(ValueError, match="one row per track"):
        train_head(x, y[:5])
    with pytest.raises(ValueError, match="NaN"):
        train_head(np.full((10, 4), np.nan, np.float32), y)


def test_callback_interrupt_propagates() -> None:
    seen: list[int] = []

    def stop(epoch: int, train: float, val: float) -> None:
        seen.append(epoch)
        if epoch == 2:
            raise KeyboardInterrupt

    x = np.random.default_rng(0).standard_normal((30, 4)).astype(np.float32)
    with pytest.raises(KeyboardInterrupt):
        train_head(x, x[:, :2], callback=stop, epochs=10)
    assert seen == [1, 2]


# --------------------------------------------------------------------------------------------
# Ridge and the head choice


def test_ridge_recovers_a_linear_map_and_picks_lambda_by_cross_validation() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 30)).astype(np.float32)
    w = rng.standard_normal((30, 5))
    clean = ridge = fit_ridge(x, (x @ w).astype(np.float32), folds=5)
    pred = ridge.predict(x)
    assert np.corrcoef(pred.ravel(), (x @ w).ravel())[0, 1] > 0.99
    assert ridge.lam == ridge.lambdas.min()  # no noise: the least penalty wins
    # targets unrelated to the features: cross-validation wants a large penalty
    noise = fit_ridge(x, rng.standard_normal((120, 5)).astype(np.float32), folds=5)
    assert noise.lam > 100 * clean.lam and noise.cv_mse.argmin() == len(noise.lambdas) - 1
    # the same map as a Standardise → Linear head, saved like any head
    with torch.no_grad():
        out = ridge.module()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, pred, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="ridge needs"):
        fit_ridge(x[:1], pred[:1])


def test_choose_head_prefers_ridge_on_small_linear_data_and_reports_both() -> None:
    counts, features, _ = planted(n_tracks=80, n_users=120, dim=32, noise=0.6)
    users, tracks = filter_counts(counts)
    split = factorise_split(
        counts[users][:, tracks], np.arange(len(tracks)), np.zeros(0, int), factors=8
    )
    cfg = TrainConfig(hidden=64, epochs=60, folds=3)
    choice = choose_head(features[tracks], split.train_factors, cfg)
    assert choice.kind == "ridge" and choice.mlp_cv_mse > choice.ridge.best_cv_mse
    assert "ridge (" in choice.line() and "mlp 0." in choice.line()
    forced = choose_head(
        features[tracks], split.train_factors, TrainConfig(head="mlp", hidden=16, epochs=5, folds=2)
    )
    assert forced.kind == "mlp" and forced.fit is not None
    only = choose_head(features[tracks], split.train_factors, TrainConfig(head="ridge"))
    assert only.kind == "ridge" and np.isnan(only.mlp_cv_mse) and "not tried" in only.line()


# --------------------------------------------------------------------------------------------
# Fine-tuning (tiny, on the CPU)


def _tiny_head(tmp_path: Path, *, out_dim: int = 3) -> tuple[HeadModel, Path]:
    path = tmp_path / "tiny.safetensors"
    backbone = tiny_backbone(path, TINY)
    model = HeadModel(
        backbone=str(path), in_dim=32, out_dim=out_dim, hidden=16, backbone_model=backbone
    )
    return model, path


def test_finetune_trains_backbone_and_head(tmp_path: Path) -> None:
    model, _ = _tiny_head(tmp_path)
    rng = np.random.default_rng(0)
    # two kinds of "audio": the target depends on which band is loud
    mels = rng.random((24, 40, 16)).astype(np.float32)
    kind = np.arange(24) % 2
    mels[kind == 1, :, :4] += 2.0
    targets = np.where(kind[:, None] == 1, [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]).astype(np.float32)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    fit = finetune_head(model, mels, targets, epochs=6, batch_size=8, lr=1e-2, head_lr=1e-2)
    assert model.finetune and fit.epochs >= 1 and fit.head is None
    assert fit.train_loss[-1] < fit.train_loss[0]
    after = model.backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    out = model.save(tmp_path / "ft.safetensors")
    assert any(k.startswith("backbone.") for k in load_tensors(out))


# --------------------------------------------------------------------------------------------
# run_training on a beets library


class World:
    """A library whose items carry planted 32-d backbone vectors, plus matching listens."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        n_tracks: int = 200,
        n_audio: int = 3,
        broken: bool = True,
        shuffle: bool = False,
        never_played: int = 0,
        noise: float = 0.6,
    ) -> None:
        self.backbone_path = tmp_path / "backbone.safetensors"
        tiny_backbone(self.backbone_path, TINY)
        self.backbone = str(self.backbone_path)
        self.backbone_id = model_id_of(self.backbone)
        self.state = tmp_path / "state"
        # the last `never_played` tracks are in the library but in nobody's listening
        counts, features, self.cluster = planted(
            n_tracks=n_tracks + never_played,
            n_users=160,
            dim=32,
            noise=noise,
            nuisance=3.0,
            shuffle=shuffle,
        )
        counts = counts[:, :n_tracks]
        self.features = features
        self.lib = Library(str(tmp_path / "library.db"))
        self.ids: list[int] = []
        for j in range(n_tracks + never_played):
            item = Item(artist=f"Artist {j % 7}", title=f"Song {j}", path=f"/m/{j}.mp3".encode())
            self.ids.append(self.lib.add(item))
        self.never_ids = self.ids[n_tracks:]
        # a few tracks have audio and no stored vector: they are embedded from audio
        audio_dir = tmp_path / "audio"
        audio_dir.mkdir()
        self.audio_ids = self.ids[:n_audio]
        for j, item_id in enumerate(self.audio_ids):
            path = write_audio(
                audio_dir / f"{j}.wav",
                tone(1.5, rate=8000, channels=1, freqs=(200.0 + 100 * j,), seed=j),
                rate=8000,
            )
            item = self.lib.get_item(item_id)
            item.path = str(path).encode()
            item.store()
        # and one has neither a vector nor a readable file: it is left out
        self.broken_ids = self.ids[n_audio : n_audio + 1] if broken else []
        store.write_vectors(
            self.lib,
            [
                (i, features[j])
                for j, i in enumerate(self.ids)
                if i not in self.audio_ids and i not in self.broken_ids
            ],
            self.backbone_id,
        )
        # the listening data names tracks by artist and title, plus tracks not in the library
        tracks = [
            TrackKey(f"artist {j % 7}{KEY_SEP}song {j}", f"Artist {j % 7}", f"Song {j}")
            for j in range(n_tracks)
        ]
        tracks += [TrackKey(f"x{KEY_SEP}{k}", "Nobody", f"Unknown {k}") for k in range(10)]
        extra = sp.random(counts.shape[0], 10, density=0.05, random_state=0, format="csr")
        self.listens = Listens(
            sp.hstack([counts, extra]).tocsr(), [f"u{u}" for u in range(counts.shape[0])], tracks
        )

    def train(self, *, listens: Listens | None = None, on_epoch=None, **kwargs):  # type: ignore[no-untyped-def]
        options = {
            "backbone": self.backbone,
            "factors": 16,
            "hidden": 64,
            "epochs": 60,
            "min_tracks": 20,
            "workers": 0,
            "seed": 0,
        }
        options.update(kwargs)
        return run_training(
            self.lib,
            self.listens if listens is None else listens,
            TrainConfig(**options),
            state_dir=self.state,
            on_epoch=on_epoch,
        )


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


@pytest.fixture
def progress() -> Iterator[list[str]]:
    """The lines logged by deepsim.train (the plugin routes that logger into beets' log)."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("deepsim.train")
    handler, level = Collect(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_run_training_end_to_end(world: World, progress: list[str]) -> None:
    lines = progress
    report = world.train()
    assert report.n_listened_tracks == 210 and report.n_matched == 200
    assert report.match_rate == pytest.approx(200 / 210)
    assert report.n_embedded == 3 and report.n_failed == 1
    assert report.n_tracks <= 199
    assert any("/m/3.mp3" in line and "left out" in line for line in lines)
    assert report.n_train + report.n_heldout == report.n_tracks
    assert report.n_heldout == round(0.2 * report.n_tracks)
    m = report.metrics
    assert m is not None and m.predicted.auc > m.random.auc + 0.1
    # the trained model beats the untrained backbone on the never-played (held-out) tracks
    untrained = m.row(UNTRAINED_ROW).scores
    assert m.predicted.auc > untrained.auc + 0.05 and m.predicted.map_at_k > untrained.map_at_k
    assert report.evaluation is not None and report.evaluation.comparison.beats
    assert report.model_id.startswith("head-") and report.activated
    assert report.activation.startswith("activated: it beats the untrained model")
    assert report.path == world.state / "models" / f"{report.model_id}.safetensors"
    assert active_model("auto", state_dir=world.state) == str(report.path.resolve())
    table = report.format_table()
    assert report.model_id in table and "wmf (upper bound)" in table and "mAP@500" in table
    for name in ("untrained: sound profile", "popularity", "random", "sound+taste profile"):
        assert name in table
    assert "head: ridge" in table or "head: mlp" in table
    assert any("matched 200 of 210" in line for line in lines)
    # the audio-embedded vectors were cached for items that had none
    assert set(world.audio_ids) <= store.ids_with_vectors(world.lib, world.backbone_id)

    model = load_model(report.path)
    assert isinstance(model, HeadModel) and model.model_id == report.model_id
    assert report.model is not None and report.model.model_id == report.model_id
    assert not report.model.training
    x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    np.testing.assert_allclose(model.apply_to_vectors(x), report.model.apply_to_vectors(x))
    info = model.config["info"]["heldout"]
    assert info["trained: taste (x_u · predicted)"]["auc"] == pytest.approx(
        m.predicted.auc, abs=1e-4
    )
    # one vector: sound and predicted taste, weighted by the chosen taste weight
    layout = layout_of(report.path)
    assert layout is not None and (layout.sound_dim, layout.taste_dim) == (32, 16)
    assert layout.weight == report.taste_weight and 0 < layout.weight < 1
    assert model.dim == 48
    assert model.extra["cf_item_factors"].shape == (report.n_tracks, 16)

    # re-embedding from the store: every item with a backbone vector, no audio needed
    no_vector = world.lib.add(Item(artist="New", title="Song", path=b"/m/new.mp3"))
    missing = reembed_from_store(world.lib, model, batch_size=50)
    assert sorted(missing.tolist()) == sorted([no_vector, *world.broken_ids])
    head_ids, head_vectors = store.read_vectors(world.lib, model.model_id)
    assert len(head_ids) == len(world.ids) - 1 and head_vectors.shape[1] == 48
    _, base = store.read_vectors(world.lib, world.backbone_id, ids=[world.ids[5]])
    assert len(base) == 1  # the backbone vector moved to the backbone slot, still readable
    sound, _taste = split_parts(head_vectors[head_ids == world.ids[5]], layout)
    assert float(sound[0] @ base[0]) > 0.999  # the sound part is the backbone vector
    again = reembed_from_store(world.lib, model)  # nothing left but the two without vectors
    assert sorted(again.tolist()) == sorted(missing.tolist())


def _same_group_p_at_5(world: World, model_id: str, queries: list[int]) -> float:
    """Same-cluster P@5 of the 5 nearest stored vectors by cosine (what `similar -c 5` ranks)."""
    ids, matrix = store.read_vectors(world.lib, model_id)
    assert len(ids) == len(world.ids)
    group = dict(zip(world.ids, world.cluster.tolist(), strict=True))
    groups = np.asarray([group[int(i)] for i in ids.tolist()])
    unit = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    rows = np.flatnonzero(np.isin(ids, queries))
    sim = unit[rows] @ unit.T
    sim[np.arange(len(rows)), rows] = -np.inf  # the query itself
    top = np.argsort(-sim, axis=1, kind="stable")[:, :5]
    return float(np.mean(groups[top] == groups[rows, None]))


def test_trained_vectors_beat_untrained_on_never_played_tracks(tmp_path: Path) -> None:
    """Item 7: at its chosen taste weight the trained model's `similar` beats the untrained
    backbone for tracks nobody played (their place comes from their audio alone)."""
    # noisy sound: the backbone's nearest neighbours are often of another taste group
    world = World(tmp_path, n_tracks=160, n_audio=0, broken=False, never_played=40, noise=1.5)
    report = world.train()
    assert report.activated and report.model is not None
    ev = report.evaluation
    assert ev is not None and 0.1 <= report.taste_weight <= 0.9
    assert report.taste_weight == ev.weight.weight
    # the weight was chosen item to item on the held-out tracks, with a surer gain than 0
    mean, se = ev.weight.gain[report.taste_weight]
    assert mean - se > 0 and "surest gain" in ev.weight.rule
    assert ev.weight.scan[report.taste_weight].p_at_k > ev.weight.scan[0.0].p_at_k
    assert reembed_from_store(world.lib, report.model).tolist() == []
    never = _same_group_p_at_5(world, world.backbone_id, world.never_ids)
    never_trained = _same_group_p_at_5(world, report.model_id, world.never_ids)
    assert never_trained > never + 0.1, (never, never_trained)
    everyone = _same_group_p_at_5(world, world.backbone_id, world.ids)
    everyone_trained = _same_group_p_at_5(world, report.model_id, world.ids)
    assert everyone_trained > everyone + 0.1, (everyone, everyone_trained)


def test_choose_taste_weight_keeps_sound_when_taste_does_not_help() -> None:
    rng = np.random.default_rng(0)
    group = np.repeat(np.arange(4), 15)
    sound = rng.standard_normal((4, 8))[group] + 0.5 * rng.standard_normal((60, 8))
    queries = np.arange(0, 60, 3)
    relevance = sp.csr_matrix(group[queries][:, None] == group[None, :], dtype=np.float32)
    noise = rng.standard_normal((60, 6))
    useless = choose_taste_weight(sound, noise, queries, relevance)
    assert useless.weight == 0.1 and "no weight surely improves" in useless.rule
    # a taste part that knows the groups better than the sound does is given weight
    taste = rng.standard_normal((4, 6))[group] + 0.1 * rng.standard_normal((60, 6))
    blurred = rng.standard_normal((4, 8))[group] + 1.5 * rng.standard_normal((60, 8))
    useful = choose_taste_weight(blurred, taste, queries, relevance)
    assert useful.weight > 0.1 and useful.scan[useful.weight].map_at_k > useful.scan[0.0].map_at_k
    mean, se = useful.gain[useful.weight]
    assert mean - se == max(m - s for m, s in useful.gain.values())
    fixed = choose_taste_weight(blurred, taste, queries, relevance, fixed=0.4)
    assert fixed.weight == 0.4 and set(fixed.scan) == {0.0, *useful.gain, 1.0}
    empty = choose_taste_weight(sound, noise, queries, sp.csr_matrix(relevance.shape))
    assert empty.weight == 0.5 and "no held-out track" in empty.rule


def test_training_errors(world: World) -> None:
    with pytest.raises(TrainingError, match="empty"):
        world.train(listens=Listens.empty())
    strangers = Listens(
        sp.csr_matrix(np.ones((2, 3), np.float32)),
        ["a", "b"],
        [TrackKey(f"n{KEY_SEP}{k}", "Nobody", f"Nothing {k}") for k in range(3)],
    )
    with pytest.raises(TrainingError, match="0 of 3 listened tracks matched the library"):
        world.train(listens=strangers)
    with pytest.raises(TrainingError, match=r"only \d+ of the 200 .* at least 5000"):
        world.train(min_tracks=5000)
    assert not (world.state / "models").exists()


def test_interrupt_leaves_previous_model_active(world: World, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    first = world.train()
    models = world.state / "models"
    before = sorted(models.iterdir())

    def interrupt(epoch: int, train: float, val: float) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        world.train(on_epoch=interrupt, seed=1)
    assert active_model("auto", state_dir=world.state) == str(first.path.resolve())
    assert sorted(models.iterdir()) == before

    # interrupted while activating: the new, complete file is removed again
    def no_activate(path: object, *, state_dir: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("deepsim.models.set_active_model", no_activate)
    with pytest.raises(KeyboardInterrupt):
        world.train(seed=2)
    assert active_model("auto", state_dir=world.state) == str(first.path.resolve())
    assert sorted(models.iterdir()) == before
    monkeypatch.setattr("deepsim.models.set_active_model", set_active_model)


def test_run_training_with_finetuning(tmp_path: Path) -> None:
    """Fine-tuning end to end on a small library of real (generated) audio files."""
    world = World(tmp_path, n_tracks=24, n_audio=24, broken=False)
    report = world.train(
        finetune=True,
        finetune_epochs=2,
        finetune_batch_size=8,
        min_tracks=10,
        heldout=0.25,
        epochs=20,
    )
    assert report.config.finetune and report.n_embedded == 24 and report.fit is not None
    assert report.metrics is not None and report.metrics.n_tracks == 6
    tensors = load_tensors(report.path)
    assert any(k.startswith("backbone.") for k in tensors)
    model = load_model(report.path)
    assert isinstance(model, HeadModel) and model.finetune
    assert model.embed([np.zeros(4000, np.float32) + 0.1]).vectors.shape == (1, 48)
    # a fine-tuned backbone cannot reuse stored vectors: everything needs audio
    assert len(reembed_from_store(world.lib, model)) == len(world.ids)


def test_structureless_listening_is_saved_but_not_activated(tmp_path: Path) -> None:
    """The activation rule refuses a model trained on shuffled listening data."""
    world = World(tmp_path, shuffle=True)
    report = world.train()
    assert not report.activated and report.path.is_file()
    assert report.activation.startswith("not activated: it does not clearly beat")
    assert "--activate" in report.activation and "AUC" in report.activation
    assert active_model("auto", state_dir=world.state) == "default"
    assert "(not active)" in report.format_table()
    forced = world.train(activate=True, seed=1)
    assert forced.activated and forced.activation.startswith("activated as asked")
    assert active_model("auto", state_dir=world.state) == str(forced.path.resolve())


def test_train_config_validates() -> None:
    for kwargs, word in (
        ({"head": "svm"}, "head"),
        ({"heldout": 1.0}, "heldout"),
        ({"folds": 1}, "folds"),
        ({"taste_weight": 1.0}, "taste_weight"),
        ({"activate": "yes"}, "activate"),
    ):
        with pytest.raises(ValueError, match=word):
            TrainConfig(**kwargs)
