"""Every request ends at its deadline, when its client leaves, or when the server stops, streamed or not,
and the decoder is free for the next request right after.

Real servers (the command line, the tiny F32 bundle, one thread) and real generations: a greedy answer of
1500 tokens takes about a minute here and the tiny model does not stop by itself, so a request that ends
within seconds was stopped, not finished. Shutdown: SIGTERM and SIGINT while requests run end open streams
with an SSE error event then ``[DONE]``, blocking requests with a 503 in OpenAI's shape, no traceback in the
log, and the process exits 0 within seconds.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import openai
import pytest

from tests.server_harness import ServerProcess, module_server
from tests.test_server import MODEL, assert_error, user

LONG = 1500
TIMEOUT_S = 1.5
SLACK_S = 4.0  # a token, a prefill batch and the reply, on a shared, busy CPU


@pytest.fixture(scope="module")
def timed(f32_bundle, tmp_path_factory):
    s = ServerProcess(f32_bundle, tmp_path_factory.mktemp("timed"), "--request-timeout", str(TIMEOUT_S))
    yield s
    assert s.stop() == 0
    assert "Traceback" not in s.log(), s.log()


@pytest.fixture(scope="module")
def patient(f32_bundle, tmp_path_factory):
    """The default time limit (600 s): only a client's leaving can end a long request early."""
    yield from module_server(f32_bundle, tmp_path_factory, "patient")


def long_body(stream: bool = False) -> dict:
    return {"model": MODEL, "messages": user("Tell me a long story."), "max_tokens": LONG, "temperature": 0,
            "stream": stream}


def assert_free(server: ServerProcess, within_s: float = SLACK_S) -> None:
    """The decoder takes the next request at once."""
    started = time.monotonic()
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": user("hi"), "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert time.monotonic() - started < within_s, server.log()


def sse_lines(r: httpx.Response) -> list[str]:
    return [line for line in r.iter_lines() if line]


def sse_error(lines: list[str]) -> dict:
    """The error event before ``[DONE]``."""
    assert lines[-1] == "data: [DONE]", lines[-4:]
    assert lines[-3] == "event: error", lines[-4:]
    return json.loads(lines[-2][len("data: "):])["error"]


# --- the deadline -------------------------------------------------------------------------------------------

def test_a_blocking_request_ends_at_its_deadline_with_504(timed) -> None:
    started = time.monotonic()
    r = httpx.post(timed.url + "/v1/chat/completions", json=long_body(), timeout=120)
    took = time.monotonic() - started
    err = assert_error(r, 504, "timeout")
    assert err["type"] == "timeout" and f"{TIMEOUT_S:g} s" in err["message"]
    assert TIMEOUT_S <= took < TIMEOUT_S + SLACK_S, took
    assert_free(timed)


def test_the_openai_client_gets_the_timeout_as_an_error(timed) -> None:
    client = openai.OpenAI(base_url=timed.url + "/v1", api_key="none", max_retries=0, timeout=120)
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError, match="limit") as e:
        client.chat.completions.create(model=MODEL, messages=user("Tell me a long story."), max_tokens=LONG,
                                       temperature=0)
    assert e.value.status_code == 504
    assert time.monotonic() - started < TIMEOUT_S + SLACK_S
    assert_free(timed)


def test_a_stream_ends_at_its_deadline_with_an_error_event(timed) -> None:
    started = time.monotonic()
    with httpx.stream("POST", timed.url + "/v1/chat/completions", json=long_body(stream=True), timeout=120) as r:
        assert r.status_code == 200
        lines = sse_lines(r)
    assert sse_error(lines)["code"] == "timeout"
    assert time.monotonic() - started < TIMEOUT_S + SLACK_S
    assert_free(timed)


def test_a_waiting_request_gets_its_own_full_time(timed) -> None:
    """The deadline counts from when the decoder starts a request: one behind a request that times out still
    runs (and here times out itself, a time limit later)."""
    results: list[httpx.Response] = []
    first = threading.Thread(target=lambda: results.append(
        httpx.post(timed.url + "/v1/chat/completions", json=long_body(), timeout=120)))
    first.start()
    time.sleep(0.3)
    started = time.monotonic()
    second = httpx.post(timed.url + "/v1/chat/completions", json=long_body(), timeout=120)
    first.join()
    assert_error(results[0], 504, "timeout")
    assert_error(second, 504, "timeout")
    assert time.monotonic() - started < 2 * (TIMEOUT_S + SLACK_S)


# --- the client leaves -----------------------------------------------------------------------------------

def test_a_blocking_client_that_leaves_frees_the_decoder_at_once(patient) -> None:
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after a second
        httpx.post(patient.url + "/v1/chat/completions", json=long_body(), timeout=1.0)
    assert_free(patient)


def test_a_streaming_client_that_leaves_frees_the_decoder_at_once(patient) -> None:
    with httpx.stream("POST", patient.url + "/v1/chat/completions", json=long_body(stream=True), timeout=60) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n == 4:
                break  # the connection closes with the block
    assert_free(patient)


def test_two_blocking_clients_that_leave_are_both_dropped(patient) -> None:
    for _ in range(2):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(patient.url + "/v1/chat/completions", json=long_body(), timeout=0.5)
    assert_free(patient)


# --- shutdown --------------------------------------------------------------------------------------------

def wait_generating(server: ServerProcess) -> None:
    """Until the server has a request in hand (``/health`` counts the admitted ones)."""
    deadline = time.monotonic() + 30
    while httpx.get(server.url + "/health", timeout=10).json()["waiting"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)  # past its prefill: decoding


def assert_stopped_cleanly(server: ServerProcess, signalled: float) -> None:
    code = server.proc.wait(timeout=30)
    assert time.monotonic() - signalled < 6, server.log()
    assert code == 0, server.log()
    server.stop()
    assert "Traceback" not in server.log(), server.log()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_shutdown_ends_an_open_stream_with_an_error_event(f32_bundle, tmp_path, sig) -> None:
    s = ServerProcess(f32_bundle, tmp_path)
    try:
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=long_body(stream=True), timeout=60) as r:
            lines, signalled = [], None
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                if len(lines) == 3 and signalled is None:  # the role chunk and two pieces: it is decoding
                    s.proc.send_signal(sig)  # once: a second SIGINT is uvicorn's forced exit
                    signalled = time.monotonic()
        assert sse_error(lines)["code"] == "shutting_down"
        assert_stopped_cleanly(s, signalled)
    finally:
        s.stop()


def test_shutdown_answers_blocking_requests_503(f32_bundle, tmp_path) -> None:
    """One request decoding, one waiting behind it: both get 503 in OpenAI's shape."""
    s = ServerProcess(f32_bundle, tmp_path)
    try:
        results: list[httpx.Response] = []

        def ask() -> None:
            results.append(httpx.post(s.url + "/v1/chat/completions", json=long_body(), timeout=60))
        threads = [threading.Thread(target=ask) for _ in range(2)]
        for t in threads:
            t.start()
        wait_generating(s)
        s.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        for t in threads:
            t.join(timeout=30)
        assert len(results) == 2
        for r in results:
            assert_error(r, 503, "shutting_down")
        assert_stopped_cleanly(s, signalled)
    finally:
        s.stop()
