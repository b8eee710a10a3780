"""deepsim.util: parameter checks, atomic writes, device resolution, looping."""

from __future__ import annotations

import os

import numpy as np
import pytest

from deepsim.errors import DeepsimError, ParameterError
from deepsim.util import (
    atomic_write,
    check_choice,
    check_float,
    check_int,
    get_logger,
    loop_to_length,
    resolve_device,
)


def test_parameter_error_is_both_deepsim_and_value_error() -> None:
    assert issubclass(ParameterError, DeepsimError)
    assert issubclass(ParameterError, ValueError)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "3", None])
def test_check_int_refuses(bad: object) -> None:
    with pytest.raises(ParameterError, match=r"n_trees must be an integer >= 1, got"):
        check_int("n_trees", bad, minimum=1)


def test_check_int_accepts_numpy_and_range() -> None:
    assert check_int("k", np.int64(3), minimum=1, maximum=5) == 3
    with pytest.raises(ParameterError, match=r"in \[1, 5\]"):
        check_int("k", 6, minimum=1, maximum=5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1.0, 0.0, True, "0.5"])
def test_check_float_refuses(bad: object) -> None:
    with pytest.raises(ParameterError, match=r"w must be a number in \(0, 1\)"):
        check_float("w", bad, low=0, high=1, low_open=True, high_open=True)


def test_check_float_and_choice_accept() -> None:
    assert check_float("w", 1, low=0, high=1) == 1.0
    assert check_choice("format", "m3u", ("m3u", "extm3u")) == "m3u"
    with pytest.raises(ParameterError, match="format must be one of m3u, extm3u, got 'x'"):
        check_choice("format", "x", ("m3u", "extm3u"))


def test_atomic_write_replaces_and_cleans_up(tmp_path) -> None:
    target = tmp_path / "sub" / "file.txt"
    with atomic_write(target, "w") as handle:
        handle.write("one")
    assert target.read_text() == "one"
    with pytest.raises(RuntimeError), atomic_write(target, "w") as handle:
        handle.write("half")
        raise RuntimeError("boom")
    assert target.read_text() == "one"
    assert os.listdir(target.parent) == ["file.txt"]
    assert (target.stat().st_mode & 0o777) == 0o644 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_resolve_device() -> None:
    torch = pytest.importorskip("torch")
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda", "mps")
    with pytest.raises(ParameterError, match="device must be"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ParameterError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_loop_to_length_numpy_and_torch() -> None:
    torch = pytest.importorskip("torch")
    clip = np.arange(6, dtype=np.float32).reshape(3, 2)
    looped = loop_to_length(clip, 7)
    assert looped.shape == (7, 2)
    np.testing.assert_array_equal(looped[3:6], clip)
    assert loop_to_length(clip, 2) is clip
    tensor = loop_to_length(torch.from_numpy(clip), 7)
    np.testing.assert_array_equal(tensor.numpy(), looped)
    with pytest.raises(ParameterError):
        loop_to_length(np.zeros((0, 2)), 3)


def test_get_logger_is_under_deepsim() -> None:
    assert get_logger("deepsim.store").name == "deepsim.store"
    assert get_logger("x").name == "deepsim.x"


def test_torch_is_imported_once_with_its_objects_out_of_the_collectors_view() -> None:
    from fresh import run_fresh

    run_fresh(
        "import gc, sys\n"
        "from deepsim.util import import_torch, resolve_device\n"
        "assert 'torch' not in sys.modules\n"
        "assert resolve_device('cpu') == 'cpu'  # the first step to a model imports torch\n"
        "frozen = gc.get_freeze_count()\n"
        "assert 'torch' in sys.modules and frozen > 10_000 and gc.isenabled(), frozen\n"
        "import_torch()  # once only\n"
        "assert gc.get_freeze_count() == frozen\n"
    )
    # a collector the caller turned off stays off
    run_fresh(
        "import gc; gc.disable()\nfrom deepsim.util import import_torch\nimport_torch()\n"
        "assert not gc.isenabled() and gc.get_freeze_count() > 10_000\n"
    )
