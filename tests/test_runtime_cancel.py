"""The engine's own edges that the server leans on: a ``cancel`` check that stops a call between images,
prefill batches and tokens (streamed or not) and leaves the decoder right for the next call, and
``next_token_logits``'s ``n_positions_limit`` refused outside 1..n_ctx (never the previous call's logits).

Real engines on the golden F32 bundle; "right for the next call" is checked against the golden answers.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from qwenvl_edge.errors import OptionError, PromptError, QwenVLError
from qwenvl_edge.runtime.pipeline import QwenVL
from qwenvl_edge.runtime.serial import CancelledError
from tests.test_runtime_golden import LOGITS_ATOL

LONG = 1500  # tokens the tiny model would go on for (it rarely stops by itself)


@pytest.fixture(scope="module")
def model(f32_bundle: Path):
    with QwenVL(f32_bundle, n_threads=2, cache_dir=None) as m:
        yield m


def after(n: int):
    """A cancel check that says stop from its ``n``-th question on (counts how often it was asked)."""
    asked = [0]

    def check() -> bool:
        asked[0] += 1
        return asked[0] >= n
    check.asked = asked
    return check


def golden_messages(golden, name: str = "one_image") -> list[dict]:
    case = golden.cases[name]
    parts = [{"type": "image_url", "image_url": {"url": str(golden.images[i])}} for i in case["images"]]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": case["text"]}]}]


def assert_golden_next(model: QwenVL, golden, name: str = "one_image") -> None:
    """The decoder is free and right: the next call answers the golden ids."""
    out = model.create_chat_completion(golden_messages(golden, name), max_tokens=golden.max_new_tokens,
                                       temperature=0)
    assert model.last_result.token_ids == golden.cases[name]["generated_ids"], out


@pytest.mark.parametrize("n", [1, 2, 40], ids=["first-check", "second-check", "mid-decode"])
def test_a_blocking_call_stops_at_its_cancel_check(model, golden, n) -> None:
    check = after(n)
    started = time.monotonic()
    with pytest.raises(CancelledError):
        model.create_chat_completion(golden_messages(golden), max_tokens=LONG, temperature=0, cancel=check)
    assert check.asked[0] == n  # stopped at the first check that said so, not at the end
    assert time.monotonic() - started < 30
    assert_golden_next(model, golden)


def test_a_stream_stops_at_its_cancel_event_and_frees_the_model(model, golden) -> None:
    stop = threading.Event()
    stream = model.create_chat_completion(golden_messages(golden, "text_only"), stream=True, max_tokens=LONG,
                                          temperature=0, cancel=stop.is_set)
    got = [next(stream) for _ in range(4)]
    assert got[0]["choices"][0]["delta"] == {"role": "assistant"}
    stop.set()
    with pytest.raises(CancelledError):
        for _ in stream:
            pass
    assert_golden_next(model, golden, "text_only")  # no wait for the stream: the lock was given back


def test_cancel_during_a_long_prefill_stops_between_batches(f32_bundle, golden) -> None:
    """A prompt of several prefill batches (n_batch 512): a stop after the first batch evaluates no more."""
    with QwenVL(f32_bundle, n_threads=2, n_ctx=2048, cache_dir=None) as m:
        decoder = m.session.decoder()
        check = after(2)  # the first batch passes its check, the second does not
        with pytest.raises(CancelledError):
            m.create_chat_completion([{"role": "user", "content": "word " * 1500}], max_tokens=4, cancel=check)
        assert 0 < decoder.n_evaluated <= decoder.n_batch
        assert_golden_next(m, golden, "text_only")


def test_a_cancel_that_never_says_stop_changes_nothing(model, golden) -> None:
    model.create_chat_completion(golden_messages(golden), max_tokens=golden.max_new_tokens, temperature=0,
                                 cancel=lambda: False)
    assert model.last_result.token_ids == golden.cases["one_image"]["generated_ids"]


# --- next_token_logits(n_positions_limit=...) ------------------------------------------------------------

@pytest.mark.parametrize("limit", [0, -1, -300, "n_ctx + 1", 10**9, True, 2.5, "12"])
def test_a_limit_outside_the_context_is_refused_never_stale(model, golden, limit) -> None:
    case = golden.cases["one_image"]
    limit = model.n_ctx + 1 if limit == "n_ctx + 1" else limit
    model.next_token_logits([golden.images["sign"]], case["text"])  # logits of a previous call are there
    with pytest.raises(OptionError, match="n_positions_limit"):
        model.next_token_logits([golden.images["sign"]], case["text"], n_positions_limit=limit)


def test_a_limit_past_the_prompt_or_inside_an_image_is_refused(model, golden) -> None:
    case = golden.cases["one_image"]
    n = len(case["input_ids"])
    with pytest.raises(PromptError, match="1..290"):
        model.next_token_logits([golden.images["sign"]], case["text"], n_positions_limit=n + 1)
    with pytest.raises(QwenVLError, match="inside an image"):
        model.next_token_logits([golden.images["sign"]], case["text"], n_positions_limit=100)


@pytest.mark.parametrize("name", ["one_image", "two_images", "grounding"])
def test_a_limit_inside_what_the_cache_holds_is_computed_again(model, golden, name) -> None:
    """After the whole prompt is evaluated, a limit that admits no new position still gives its own logits."""
    case = golden.cases[name]
    images = [golden.images[i] for i in case["images"]]
    model.next_token_logits(images, case["text"])
    logits = model.next_token_logits(images, case["text"], n_positions_limit=case["after_img_index"] + 1)
    assert np.abs(logits - golden.logits_after_img(name)).max() < LOGITS_ATOL
    one = model.next_token_logits(images, case["text"], n_positions_limit=1)  # <|im_start|> alone
    again = model.next_token_logits([], "Hello", n_positions_limit=1)
    np.testing.assert_allclose(one, again, atol=1e-5)
    assert np.abs(one - logits).max() > LOGITS_ATOL
