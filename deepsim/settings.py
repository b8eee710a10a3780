"""deepsim's configuration: every key's default, the rule its value follows, one check.

The beets face passes :data:`DEFAULTS` to ``self.config.add`` and, when the
plugin loads, :func:`check` over the resolved ``deepsim`` block (confuse's
``flatten()``): a bad value stops beets with one line naming the key.  The
defaults come from the library modules that use them (the index's tree count,
the versions threshold...), so a default is written once.  The command
routines (:mod:`deepsim.commands`) read the same plain mapping at run time:
:func:`value` looks a dotted key up, :func:`option_or` lets a command-line
option win over its key.

No beets or confuse import here: the mapping is plain data.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from deepsim import dupes, index, outliers
from deepsim.errors import ParameterError
from deepsim.util import check_choice, check_float, check_int

__all__ = ["DEFAULTS", "RULES", "check", "option_or", "positive_int", "value"]

#: ``beet deepsim-train``'s keys (the training options of :class:`deepsim.train.TrainConfig`
#: a user sets; tests/test_settings.py checks these equal TrainConfig's own defaults).
TRAIN_DEFAULTS: dict[str, Any] = {
    "listens": [],
    "format": "auto",
    "playlists": [],
    "library": False,
    "backbone": "default",
    "min_plays": 2,
    "min_tracks": 50,
    "factors": 40,
    "alpha": None,
    "epsilon": None,
    "regularization": None,
    "iterations": None,
    "heldout": 0.2,
    "head": "auto",
    "taste_weight": None,
    "epochs": 200,
    "threads": 1,  # beets runs one training thread unless told otherwise (TrainConfig: torch's)
}

DEFAULTS: dict[str, Any] = {
    "auto": True,
    "model": "auto",
    "device": "auto",
    "precision": "auto",
    "workers": "auto",
    "batch_size": 8,
    "commit_every": 32,
    "store_tags": True,
    "state_dir": "deepsim",
    # beet similar
    "count": 20,
    "format": None,
    "album_format": None,
    "max_per_artist": 0,
    "max_per_album": 0,
    "relative": False,
    "index": {"n_trees": index.DEFAULT_N_TREES, "exact_below": index.EXACT_THRESHOLD},
    # versions, outliers, map, MPD radio
    "dupes": {"threshold": dupes.DEFAULT_THRESHOLD, "tags": True},
    "outliers": {
        "threshold": outliers.DEFAULT_THRESHOLD,
        "min_tracks": outliers.DEFAULT_MIN_TRACKS,
    },
    "map": {"method": "opentsne", "color_by": "album", "neighbours": 10},
    "radio": {"ahead": 3, "batch": 5, "history": 3, "avoid": 3600, "interval": 2.0},
    "train": TRAIN_DEFAULTS,
    # beet similar --taste-weight / beet recommend
    "taste_weight": None,
    "recommend": {"half_life": 90.0},  # = deepsim.recommend.HALF_LIFE_DAYS (not imported: scipy)
}

Rule = Callable[[str, Any], Any]


def _bool(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ParameterError(f"{key} must be yes or no, got {value!r}")


def _text(key: str, value: Any, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value.strip():
        what = "a beets format string" if "format" in key else "a non-empty string"
        raise ParameterError(f"{key} must be {what}{' or null' if optional else ''}, got {value!r}")


def _texts(key: str, value: Any) -> None:
    if isinstance(value, str):
        return
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ParameterError(f"{key} must be a file name or a list of them, got {value!r}")


def _device(key: str, value: Any) -> None:
    if not isinstance(value, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        raise ParameterError(f"{key} must be auto, cpu, cuda, cuda:N or mps, got {value!r}")


def _workers(key: str, value: Any) -> None:
    if value != "auto":
        check_int(key, value, minimum=0)


def _optional(rule: Rule) -> Rule:
    return lambda key, value: None if value is None else rule(key, value)


def _int(minimum: int, maximum: int | None = None) -> Rule:
    return lambda key, value: check_int(key, value, minimum=minimum, maximum=maximum)


def _float(low: float, high: float | None = None, *, low_open: bool = False) -> Rule:
    return lambda key, value: check_float(key, value, low=low, high=high, low_open=low_open)


def _optional_text(key: str, value: Any) -> None:
    _text(key, value, optional=True)


_POSITIVE = _float(0, low_open=True)
_WEIGHT = _optional(_float(0, 1))

#: The rule of every key (dotted for nested blocks), checked in this order.
RULES: dict[str, Rule] = {
    "auto": _bool,
    "model": _text,
    "device": _device,
    "precision": lambda k, v: check_choice(k, v, ("auto", "fp32", "bf16", "int8")),
    "workers": _workers,
    "batch_size": _int(1),
    "commit_every": _int(1),
    "store_tags": _bool,
    "state_dir": _text,
    "count": _int(1),
    "format": _optional_text,
    "album_format": _optional_text,
    "max_per_artist": _int(0),
    "max_per_album": _int(0),
    "relative": _bool,
    "index.n_trees": _int(1),
    "index.exact_below": _int(0),
    "train.listens": _texts,
    "train.format": _text,  # the formats are checked by deepsim-train (deepsim.listening)
    "train.playlists": _texts,
    "train.library": _bool,
    "train.backbone": _text,
    "train.min_plays": _float(0),
    "train.min_tracks": _int(1),
    "train.factors": _int(1),
    "train.alpha": _optional(_POSITIVE),
    "train.epsilon": _optional(_POSITIVE),
    "train.regularization": _optional(_float(0)),
    "train.iterations": _optional(_int(1)),
    "train.heldout": lambda k, v: check_float(k, v, low=0, high=1, high_open=True),
    "train.epochs": _int(1),
    "train.threads": _optional(_int(1)),
    "train.head": _text,
    "train.taste_weight": _WEIGHT,
    "taste_weight": _WEIGHT,
    "recommend.half_life": _optional(_POSITIVE),
    "dupes.threshold": _optional(_float(-1, 1)),
    "dupes.tags": _bool,
    "outliers.threshold": _float(0),
    "outliers.min_tracks": _int(3),
    "map.method": _text,
    "map.color_by": _text,
    "map.neighbours": _int(1, 100),
    "radio.ahead": _int(1),
    "radio.batch": _int(1),
    "radio.history": _int(1),
    "radio.avoid": _float(0),
    "radio.interval": _float(0),
}


def value(settings: Mapping[str, Any], key: str) -> Any:
    """The value of a dotted ``key`` (``"index.n_trees"``) in the ``deepsim`` block.

    Raises
    ------
    ParameterError
        A block on the way is not a mapping (``index:`` left empty).
    """
    node: Any = settings
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, Mapping):
            block = ".".join(parts[:depth])
            raise ParameterError(f"{block} must be a collection, not {type(node).__name__}")
        node = node.get(part)
    return node


def check(settings: Mapping[str, Any]) -> None:
    """Check every key of the ``deepsim`` block; raise ParameterError naming the first bad one."""
    for key, rule in RULES.items():
        rule(key, value(settings, key))


def option_or(settings: Mapping[str, Any], option: Any, key: str) -> Any:
    """A command-line option when given (not None), else the configured ``key``."""
    return value(settings, key) if option is None else option


def positive_int(key: str, number: Any) -> int:
    """``number`` as a count (an option or a key's value), or a ParameterError naming ``key``."""
    try:
        return check_int(key, number, minimum=1)
    except ParameterError:
        raise ParameterError(f"{key} must be a positive integer, got {number!r}") from None
