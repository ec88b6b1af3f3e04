"""qwenvl_edge.validate: every external option and argument is checked in one place, one-line errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from qwenvl_edge import validate
from qwenvl_edge.errors import ImageError, OptionError, PromptError, QwenVLError


def _one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


@pytest.mark.parametrize("value", [256, 512, 2048, np.int64(1024)])
def test_n_ctx_accepts_multiples_of_256(value):
    assert validate.n_ctx(value) == int(value)
    assert type(validate.n_ctx(value)) is int


@pytest.mark.parametrize("value", [100, 300, 64, 10, 0, -256, 257])
def test_n_ctx_refuses_non_multiples_with_a_hint(value):
    with pytest.raises(OptionError) as e:
        validate.n_ctx(value)
    assert "multiple of 256" in _one_line_error(e) and "try" in str(e.value)


@pytest.mark.parametrize("value", ["2048", 2048.0, True, [2048]])
def test_n_ctx_refuses_non_integers(value):
    with pytest.raises(OptionError):
        validate.n_ctx(value)


def test_n_ctx_bounded_by_the_model_and_by_memory():
    with pytest.raises(OptionError, match="over"):
        validate.n_ctx(100_000_000 // 256 * 256)
    assert validate.n_ctx(8192, seq_length=2048) == 8192
    with pytest.raises(OptionError, match="seq_length 2048"):
        validate.n_ctx(8448, seq_length=2048)
    # Qwen-7B: 32 layers x 2 (K, V) x 4096 x 2 bytes per position
    kv = 32 * 2 * 4096 * 2
    assert validate.n_ctx(2048, kv_bytes_per_position=kv) == 2048
    mem = validate.physical_memory()
    big = (mem // kv) // 256 * 256 + 256  # the whole memory in KV cache
    with pytest.raises(OptionError, match="KV cache"):
        validate.n_ctx(big, kv_bytes_per_position=kv)


def test_n_threads_bounded_by_cores():
    limit = 4 * validate.usable_cores()
    assert validate.n_threads(1) == 1 and validate.n_threads(limit) == limit
    assert validate.n_threads(None) is None
    for bad in (0, -1, limit + 1, 1000):
        with pytest.raises(OptionError, match="usable CPU cores") as e:
            validate.n_threads(bad)
        _one_line_error(e)
    for bad in ("4", 2.0, False):
        with pytest.raises(OptionError):
            validate.n_threads(bad)


def test_temperature():
    assert validate.temperature(0) == 0.0 and validate.temperature(0.7) == 0.7
    assert validate.temperature(np.float32(1.5)) == 1.5
    for bad in (math.nan, -0.1, math.inf, -math.inf, "1.0", True, object()):
        with pytest.raises(OptionError):
            validate.temperature(bad)


def test_top_p():
    assert validate.top_p(1) == 1.0 and validate.top_p(0.3) == 0.3 and validate.top_p(None) is None
    for bad in (0, -0.5, 1.0001, 2, math.nan, math.inf, "0.3"):
        with pytest.raises(OptionError, match="top_p"):
            validate.top_p(bad)


def test_top_k_and_max_tokens():
    assert validate.top_k(0) == 0 and validate.top_k(40) == 40
    assert validate.max_tokens(1) == 1 and validate.max_tokens(np.int32(7)) == 7
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(OptionError, match="top_k"):
            validate.top_k(bad)
    for bad in (0, -3, "3", 3.0, True, [3]):
        with pytest.raises(OptionError, match="max_tokens"):
            validate.max_tokens(bad)


def test_seed():
    assert validate.seed(None) is None and validate.seed(0) == 0 and validate.seed(2**32 - 1) == 2**32 - 1
    for bad in (-1, 2**32, 2**80, "1", 1.0, True):
        with pytest.raises(OptionError, match="seed"):
            validate.seed(bad)


def test_question():
    assert validate.question("What is it?") == "What is it?"
    assert validate.question(" ü ") == " ü "
    invalid_argv = b"what \xff is it".decode("utf-8", "surrogateescape")  # how Python hands over bad argv bytes
    for bad in (invalid_argv, "\udc80", "x\ud800y"):
        with pytest.raises(PromptError, match="UTF-8") as e:
            validate.question(bad)
        _one_line_error(e)
    for bad in ("", "   ", "\n\t"):
        with pytest.raises(PromptError, match="empty"):
            validate.question(bad)
    for bad in (None, b"bytes", 3, ["a"]):
        with pytest.raises(PromptError, match="must be a string"):
            validate.question(bad)


def test_image_list():
    assert validate.image_list(None) == []
    assert validate.image_list(("a.jpg", Path("b.png"))) == ["a.jpg", Path("b.png")]
    items = ["a.jpg"]
    assert validate.image_list(items) == items and validate.image_list(items) is not items
    for bad in ("photo.jpg", Path("photo.jpg"), b"\x89PNG"):
        with pytest.raises(ImageError, match="single") as e:
            validate.image_list(bad)
        _one_line_error(e)
    for bad in (3, {"a": 1}, {"a.jpg"}):
        with pytest.raises(ImageError, match="list or tuple"):
            validate.image_list(bad)


def test_every_error_is_a_qwenvl_error():
    for fn, bad in [(validate.n_ctx, 1), (validate.n_threads, 0), (validate.temperature, -1),
                    (validate.top_p, 0), (validate.top_k, -1), (validate.max_tokens, 0), (validate.seed, -1),
                    (validate.question, ""), (validate.image_list, "x")]:
        with pytest.raises(QwenVLError):
            fn(bad)
