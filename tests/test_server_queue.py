"""One decoder, many clients: the bounded line (503 + Retry-After), a client that leaves cancels its
generation, a generation past its time ends with an SSE error event, 503 while the model loads,
image sources switched off by default, and the command's own start-up errors.
"""

from __future__ import annotations

import re
import shutil
import socket
import threading
import time

import httpx
import openai
import pytest

from qwenvl_edge.server.options import Limits, ServeConfig
from tests.server_harness import InProcessServer, ServerProcess, data_uri
from tests.test_server import MODEL, assert_error, post, user

LONG = 1500  # tokens: far more than the tests wait for; the random model rarely stops by itself


@pytest.fixture(scope="module")
def strict(f32_bundle, tmp_path_factory):
    """Defaults for image sources (data: only), no API key, one request at a time (--parallel 1) and one
    may wait behind it."""
    s = ServerProcess(f32_bundle, tmp_path_factory.mktemp("strict"), "--max-queue", "1", "--parallel", "1")
    yield s
    assert s.stop() == 0
    assert "Traceback" not in s.log(), s.log()


def open_stream(url: str, max_tokens: int = LONG) -> openai.Stream:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    return client.chat.completions.create(model=MODEL, messages=user("Tell me a long story."), stream=True,
                                          max_tokens=max_tokens, temperature=0)


def first_content(stream) -> str:
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            return chunk.choices[0].delta.content
    raise AssertionError("the stream ended without content")


def stopped_counts(log: str) -> list[int]:
    return [int(n) for n in re.findall(r"client gone: generation stopped after (\d+) chunks", log)]


def test_the_line_busy_503_and_clients_that_leave(strict) -> None:
    """One request decodes, one waits (--max-queue 1), the next is told 503 with Retry-After. The waiting
    client gives up: its request is skipped, never run. The streaming client leaves: its generation stops
    long before its max_tokens. Then the server answers again."""
    before = len(stopped_counts(strict.log()))
    stream = open_stream(strict.url)
    first_content(stream)  # the decoder is now busy with this request
    with pytest.raises(httpx.ReadTimeout):  # waits in line, then gives up; its place is held until skipped
        httpx.post(strict.url + "/v1/chat/completions", json={"model": MODEL, "messages": user("hi"), "max_tokens": 2},
                   timeout=1.0)
    r = post(strict, {"model": MODEL, "messages": user("hi"), "max_tokens": 2}, key=None)
    assert_error(r, 503, "server_busy")
    assert int(r.headers["retry-after"]) >= 1
    with pytest.raises(openai.InternalServerError) as e:  # what an OpenAI client sees
        open_stream(strict.url)
    assert e.value.status_code == 503
    stream.close()  # the client leaves mid-stream
    deadline = time.monotonic() + 60
    while "skipped: the client left while waiting" not in strict.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    counts = stopped_counts(strict.log())[before:]
    assert counts and counts[0] < LONG, strict.log()  # stopped long before its max_tokens
    assert "skipped: the client left while waiting" in strict.log()
    r = post(strict, {"model": MODEL, "messages": user("hi"), "max_tokens": 2}, key=None)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_local_and_remote_images_are_off_by_default(strict, golden) -> None:
    for url, code in [("sign.png", "local_images_disabled"), (str(golden.images["sign"]), "local_images_disabled"),
                      ("http://127.0.0.1:9/sign.png", "remote_images_disabled")]:
        assert_error(post(strict, {"model": MODEL, "messages": user("what?", url)}, key=None), 400, code)
    r = post(strict, {"model": MODEL, "messages": user("what?", data_uri(golden.images["sign"])), "max_tokens": 2},
             key=None)
    assert r.status_code == 200


@pytest.fixture(scope="module")
def held_model(f32_bundle):
    """An in-process server whose model load waits for the test (a slow load, on the tiny bundle)."""
    from qwenvl_edge.server.main import open_engine

    gate = threading.Event()

    def load():
        gate.wait(60)
        return open_engine(f32_bundle, n_threads=1, cache_dir=None)

    config = ServeConfig(limits=Limits(request_timeout_s=2.0))
    server = InProcessServer(config, load)
    yield server, gate
    gate.set()
    server.close()


def test_health_is_503_while_loading(held_model) -> None:
    server, gate = held_model
    r = httpx.get(server.url + "/health", timeout=10)
    assert_error(r, 503, "model_loading")
    assert r.headers["retry-after"]
    assert_error(httpx.post(server.url + "/v1/chat/completions", json={"messages": user("hi")}, timeout=10), 503,
                 "model_loading")
    gate.set()
    wait_healthy(server)


def wait_healthy(server: InProcessServer) -> None:
    deadline = time.monotonic() + 60
    while httpx.get(server.url + "/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline and not server.load_errors, server.load_errors
        time.sleep(0.05)


def test_generation_past_the_time_limit_ends_with_an_sse_error_event(held_model) -> None:
    server, gate = held_model
    gate.set()
    wait_healthy(server)
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                      json={"messages": user("Tell me a long story."), "max_tokens": LONG, "stream": True,
                            "temperature": 0}) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert lines[-3] == "event: error"
    error = httpx.Response(200, content=lines[-2][len("data: "):]).json()["error"]
    assert error["code"] == "timeout" and "2 s" in error["message"]
    with pytest.raises(openai.APIError, match="limit"):  # the openai client raises it mid-stream
        for _ in open_stream(server.url):
            pass


def test_engine_failure_is_500_and_the_server_goes_on(f32_bundle, tmp_path, golden) -> None:
    """The bundle's vision model removed under a running server (it opens on the first image): that
    request gets 500 in the error shape, text questions are still answered."""
    bundle = tmp_path / "bundle"
    shutil.copytree(f32_bundle, bundle)
    s = ServerProcess(bundle, tmp_path / "server")
    try:
        (bundle / "vision.onnx").unlink()
        r = post(s, {"model": MODEL, "messages": user("what?", data_uri(golden.images["sign"])), "max_tokens": 2},
                 key=None)
        assert_error(r, 500)
        assert r.json()["error"]["type"] == "server_error"
        r = post(s, {"model": MODEL, "messages": user("hi"), "max_tokens": 2}, key=None)
        assert r.status_code == 200
    finally:
        assert s.stop() == 0


def test_follow_up_about_the_same_photo_evaluates_only_its_new_tokens(held_model, golden) -> None:
    """A chat app resends the whole conversation with one more question: the engine, behind the server,
    evaluates only the new turn (counted by its own prefill counters) and reuses the photo's rows."""
    server, gate = held_model
    gate.set()
    wait_healthy(server)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    messages = user(golden.cases["one_image"]["text"], data_uri(golden.images["sign"]))
    first = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=8)
    timings = server.state.model.last_result.timings
    assert timings.prefill_positions + timings.reused_positions == first.usage.prompt_tokens
    follow = [*messages, {"role": "assistant", "content": first.choices[0].message.content},
              {"role": "user", "content": "And what colour is it?"}]
    second = client.chat.completions.create(model=MODEL, messages=follow, temperature=0, max_tokens=4)
    timings = server.state.model.last_result.timings
    new = second.usage.prompt_tokens - first.usage.prompt_tokens  # the answer, then the new question
    assert timings.reused_positions >= first.usage.prompt_tokens  # system, image rows, first question reused
    assert 0 < timings.prefill_positions <= new  # only the new turn evaluated
    assert timings.images_encoded == 0
    assert timings.reused_positions + timings.prefill_positions == second.usage.prompt_tokens


def test_serve_start_up_errors_are_one_line(f32_bundle, tmp_path, capsys) -> None:
    """Everything the command can check before it listens is one line and exit code 2 (no server starts)."""
    from qwenvl_edge.cli import main

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        for args in (["--bundle", str(tmp_path / "nothing")],
                     ["--bundle", str(f32_bundle), "--port", str(taken.getsockname()[1])],
                     ["--bundle", str(f32_bundle), "--max-images", "0"],
                     ["--bundle", str(f32_bundle), "--n-ctx", "1000"],
                     ["--bundle", str(f32_bundle), "--threads", "0"],
                     ["--bundle", str(f32_bundle), "--remote-timeout", "nan"],
                     ["--bundle", str(f32_bundle), "--media-dir", str(tmp_path / "nothing")]):
            assert main(["serve", *args]) == 2, args
            err = capsys.readouterr().err
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("qwenvl-edge: error: "), (args, err)
    finally:
        taken.close()
