"""deepsim.settings: the defaults pass their own rules, bad values are named, train keys
default as TrainConfig does."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from deepsim import settings
from deepsim.errors import ParameterError


def test_the_defaults_pass_the_check_and_every_rule_names_a_key() -> None:
    settings.check(settings.DEFAULTS)

    def leaves(block: dict, prefix: str = "") -> list[str]:
        out = []
        for key, value in block.items():
            out += leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key]
        return out

    assert sorted(leaves(settings.DEFAULTS)) == sorted(settings.RULES)


@pytest.mark.parametrize(
    ("key", "bad", "message"),
    [
        ("auto", "maybe", "auto must be yes or no, got 'maybe'"),
        ("index.n_trees", 0, "index.n_trees must be an integer >= 1, got 0"),
        ("index", None, "index must be a collection, not NoneType"),
        ("device", "gpu", "device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
        ("train.listens", 5, "train.listens must be a file name or a list of them, got 5"),
    ],
)
def test_a_bad_value_is_named(key: str, bad: object, message: str) -> None:
    config = copy.deepcopy(settings.DEFAULTS)
    *blocks, last = key.split(".")
    node = config
    for block in blocks:
        node = node[block]
    node[last] = bad
    with pytest.raises(ParameterError) as exc:
        settings.check(config)
    assert str(exc.value) == message


def test_train_keys_default_as_train_config_does() -> None:
    from deepsim.train import TrainConfig

    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for key, default in settings.TRAIN_DEFAULTS.items():
        if key in fields and key != "threads":  # beets trains on one thread unless told
            assert default == fields[key], key


def test_defaults_written_here_are_the_library_constants() -> None:
    from deepsim.recommend import HALF_LIFE_DAYS

    assert settings.DEFAULTS["recommend"]["half_life"] == HALF_LIFE_DAYS


def test_option_or_and_positive_int() -> None:
    assert settings.option_or(settings.DEFAULTS, None, "index.n_trees") == 20
    assert settings.option_or(settings.DEFAULTS, 0, "count") == 0  # 0 is an answer, not "unset"
    assert settings.positive_int("count", 3) == 3
    with pytest.raises(ParameterError, match="count must be a positive integer, got 0"):
        settings.positive_int("count", 0)


@pytest.mark.parametrize("precision", ["auto", "fp32", "bf16", "int8"])
def test_every_precision_the_models_take_is_a_valid_setting(precision: str) -> None:
    config = copy.deepcopy(settings.DEFAULTS)
    config["precision"] = precision
    settings.check(config)
