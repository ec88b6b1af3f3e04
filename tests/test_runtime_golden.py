"""The runtime against the original implementation: prompt ids, logits and greedy ids on every golden case.

F32 LLM + FP32 vision bundle from the tiny golden checkpoint. Tolerances (golden/README.md):
logits within LOGITS_ATOL max abs (llama.cpp F32 weights, F16 KV cache, vs torch F32), greedy ids equal.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qwenvl_edge.runtime.pipeline import QwenVL

LOGITS_ATOL = 0.02  # measured: at most 0.0072 (text_only, llama.cpp F16 KV cache); most cases ~0.001


@pytest.fixture(scope="module")
def model(f32_bundle: Path):
    with QwenVL(f32_bundle, n_threads=2, cache_dir=None) as m:
        yield m


def case_images(golden, case: dict) -> list[Path]:
    return [golden.images[name] for name in case["images"]]


CASES = ["one_image", "two_images", "text_only", "grounding", "chinese", "injection"]


@pytest.mark.parametrize("name", CASES)
def test_prompt_ids_equal_the_original(model: QwenVL, golden, name: str) -> None:
    case = golden.cases[name]
    assert model.prompt_ids(case_images(golden, case), case["text"]) == case["input_ids"]


@pytest.mark.parametrize("name", CASES)
def test_last_logits_match(model: QwenVL, golden, name: str) -> None:
    case = golden.cases[name]
    logits = model.next_token_logits(case_images(golden, case), case["text"])
    expected = golden.logits_last(name)
    assert np.abs(logits - expected).max() < LOGITS_ATOL
    assert int(logits.argmax()) == int(expected.argmax())


@pytest.mark.parametrize("name", [c for c in CASES if c != "text_only"])
def test_logits_after_image_match(model: QwenVL, golden, name: str) -> None:
    case = golden.cases[name]
    logits = model.next_token_logits(case_images(golden, case), case["text"],
                                     n_positions_limit=case["after_img_index"] + 1)
    assert np.abs(logits - golden.logits_after_img(name)).max() < LOGITS_ATOL


@pytest.mark.parametrize("name", CASES)
def test_greedy_ids_equal_the_original(model: QwenVL, golden, name: str) -> None:
    case = golden.cases[name]
    result = model.generate(case_images(golden, case), case["text"], max_tokens=golden.max_new_tokens,
                            temperature=0.0)
    assert result.token_ids == case["generated_ids"]
    assert result.text == case["generated_text"]


def test_streaming_gives_the_same_text(model: QwenVL, golden) -> None:
    case = golden.cases["one_image"]
    pieces = list(model.generate(case_images(golden, case), case["text"], max_tokens=12, temperature=0.0,
                                 stream=True))
    assert len(pieces) > 1
    assert "".join(pieces) == model.last_result.text
    assert model.last_result.token_ids == case["generated_ids"][:12]
