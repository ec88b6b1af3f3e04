"""The public API: create_chat_completion (OpenAI shapes), image inputs, seeds, stop strings, threads, close."""

from __future__ import annotations

import base64
import io
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import qwenvl_edge
from qwenvl_edge.errors import ImageError, PromptError, QwenVLError
from qwenvl_edge.runtime.pipeline import QwenVL
from qwenvl_edge.runtime.serial import StreamEndedError

CASES = ["one_image", "two_images", "text_only", "grounding", "chinese", "injection"]


@pytest.fixture(scope="module")
def model(f32_bundle: Path):
    with QwenVL(f32_bundle, n_threads=2, cache_dir=None) as m:
        yield m


def messages_for(golden, case: dict, as_data_uri: bool = False) -> list[dict]:
    parts: list[dict] = []
    for name in case["images"]:
        path = golden.images[name]
        url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode() if as_data_uri else str(path)
        parts.append({"type": "image_url", "image_url": {"url": url}})
    return [{"role": "user", "content": [*parts, {"type": "text", "text": case["text"]}]}]


@pytest.mark.parametrize("name", CASES)
def test_chat_completion_greedy_is_golden(model: QwenVL, golden, name: str) -> None:
    case = golden.cases[name]
    out = model.create_chat_completion(messages_for(golden, case, as_data_uri=name == "two_images"),
                                       max_tokens=golden.max_new_tokens, temperature=0)
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    assert isinstance(out["created"], int) and out["model"].endswith("llm.gguf")
    [choice] = out["choices"]
    assert choice["index"] == 0 and choice["message"] == {"role": "assistant", "content": case["generated_text"]}
    assert choice["finish_reason"] == "length" and isinstance(choice["boxes"], list)
    usage = out["usage"]
    assert usage["prompt_tokens"] == len(case["input_ids"]) and usage["completion_tokens"] == golden.max_new_tokens
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]


def test_chat_completion_stream_chunks(model: QwenVL, golden) -> None:
    case = golden.cases["one_image"]
    chunks = list(model.create_chat_completion(messages_for(golden, case), stream=True, max_tokens=10,
                                               temperature=0))
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 10 and "usage" not in chunks[0]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert case["generated_text"].startswith(text) and len(text) > 5
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_stop_string_ends_the_answer(model: QwenVL, golden) -> None:
    case = golden.cases["text_only"]
    full = case["generated_text"]
    stop = full[10:14]
    out = model.create_chat_completion(messages_for(golden, case), max_tokens=golden.max_new_tokens,
                                       temperature=0, stop=[stop, "never there"])
    assert out["choices"][0]["message"]["content"] == full[:full.index(stop)]
    assert out["choices"][0]["finish_reason"] == "stop"
    streamed = model.create_chat_completion(messages_for(golden, case), max_tokens=golden.max_new_tokens,
                                            temperature=0, stop=stop, stream=True)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in streamed) == full[:full.index(stop)]


def test_resent_conversation_reuses_the_kv_prefix(model: QwenVL, golden) -> None:
    case = golden.cases["one_image"]
    messages = messages_for(golden, case)
    first = model.create_chat_completion(messages, max_tokens=6, temperature=0)
    answer = first["choices"][0]["message"]["content"]
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And the colour?"}]
    second = model.create_chat_completion(messages, max_tokens=3, temperature=0)
    reused = model.last_result.timings.reused_positions
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == reused
    assert reused >= first["usage"]["prompt_tokens"]  # the image and the question were not evaluated again
    assert model.last_result.timings.images_encoded == 0
    assert second["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"]


def test_image_inputs_of_every_kind_give_the_same_rows(model: QwenVL, golden) -> None:
    path = golden.images["sign"]
    reference = model.encode_image(path)
    pil = Image.open(path).convert("RGB")
    for image in (str(path), path.read_bytes(), io.BytesIO(path.read_bytes()), np.asarray(pil), pil):
        np.testing.assert_allclose(model.encode_image(image), reference, atol=1e-5)
    handle = io.BytesIO(path.read_bytes())
    model.encode_image(handle)
    assert not handle.closed  # the caller's file object stays theirs


@pytest.mark.parametrize("bad", [None, 0, 3.5, np.zeros((4, 4, 3), np.float32), b"",
                                 io.StringIO("text")])
def test_bad_image_inputs_are_one_line_errors(model: QwenVL, bad) -> None:
    with pytest.raises(ImageError) as e:
        model.generate([bad], "what?", max_tokens=1)
    assert "\n" not in str(e.value)


def test_bad_messages(model: QwenVL) -> None:
    for messages in ([], [{"role": "assistant", "content": "x"}], [{"role": "user", "content": 5}],
                     [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                     [{"role": "robot", "content": "a"}]):
        with pytest.raises(PromptError):
            model.create_chat_completion(messages, max_tokens=1)
    with pytest.raises(ImageError, match="remote"):
        model.create_chat_completion([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
            {"type": "text", "text": "what?"}]}], max_tokens=1)


def test_sampled_answers_vary_unless_seeded(model: QwenVL) -> None:
    messages = [{"role": "user", "content": "Hello! Who are you?"}]
    seeded = {model.create_chat_completion(messages, max_tokens=8, temperature=1.5, top_p=1.0,
                                           seed=7)["choices"][0]["message"]["content"] for _ in range(2)}
    assert len(seeded) == 1
    free = {model.create_chat_completion(messages, max_tokens=8, temperature=1.5,
                                         top_p=1.0)["choices"][0]["message"]["content"] for _ in range(4)}
    assert len(free) > 1


def test_two_threads_give_the_answers_of_one_after_the_other(model: QwenVL, golden) -> None:
    jobs = [golden.cases[n] for n in ("one_image", "text_only", "chinese", "grounding")]

    def ask(case: dict, stream: bool) -> str:
        if stream:
            pieces = model.create_chat_completion(messages_for(golden, case), stream=True, max_tokens=8,
                                                  temperature=0)
            return "".join(c["choices"][0]["delta"].get("content", "") for c in pieces)
        out = model.create_chat_completion(messages_for(golden, case), max_tokens=8, temperature=0)
        return out["choices"][0]["message"]["content"]

    sequential = [ask(case, False) for case in jobs]
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            results[i] = ask(jobs[i], stream=i % 2 == 0)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and [results[i] for i in range(len(jobs))] == sequential


def test_a_new_call_in_the_streams_thread_ends_the_stream(model: QwenVL, golden) -> None:
    case = golden.cases["text_only"]
    stream = model.generate([], case["text"], max_tokens=10, temperature=0, stream=True)
    first = next(stream)
    other = model.generate([], case["text"], max_tokens=golden.max_new_tokens, temperature=0)
    assert other.text == case["generated_text"]  # the new call is not disturbed
    with pytest.raises(StreamEndedError, match="new call"):
        next(stream)
    assert case["generated_text"].startswith(first)


def test_public_types_and_history(model: QwenVL, golden) -> None:
    case = golden.cases["one_image"]
    first = model.generate([golden.images["sign"]], case["text"], max_tokens=4, temperature=0)
    history = [qwenvl_edge.Turn(case["text"], (golden.images["sign"],), first.text)]
    by_path = model.generate([], "And the colour?", history=history, max_tokens=4, temperature=0)
    history = [qwenvl_edge.Turn(case["text"], first.images, first.text)]
    by_ref = model.generate([], "And the colour?", history=history, max_tokens=4, temperature=0)
    assert by_path.token_ids == by_ref.token_ids and by_ref.finish_reason == "length"
    assert isinstance(first, qwenvl_edge.GenerationResult) and first.images[0].size == Image.open(
        golden.images["sign"]).size


def test_closed_model_raises(f32_bundle: Path) -> None:
    m = QwenVL(f32_bundle, n_threads=2, cache_dir=None)
    m.generate([], "hi", max_tokens=1, temperature=0)
    m.close()
    m.close()
    for call in (lambda: m.generate([], "hi", max_tokens=1),
                 lambda: m.create_chat_completion([{"role": "user", "content": "hi"}])):
        with pytest.raises(QwenVLError, match="closed"):
            call()


def test_tilde_in_the_bundle_path(f32_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "b").symlink_to(f32_bundle)
    with QwenVL("~/b", n_threads=2, cache_dir="~/cache") as m:
        assert m.bundle.folder == tmp_path / "b"
        m.encode_image(Path(__file__).parent / "golden" / "tiny" / "images" / "sign.png")
    assert any((tmp_path / "cache").rglob("*.qvl"))
