"""Continuous batching: ``serve --parallel 4`` decodes four requests together in one llama.cpp context.

The engine (``ParallelQwenVL`` over ``Batcher``) answers from four threads exactly as one ``QwenVL`` answers
one request at a time (greedy and seeded sampling, images and text, streamed or not), and its sequences
really share decode steps. The server, driven by the official ``openai`` client: four concurrent greedy
clients get the golden texts, ``n`` answers come from that many sequences, ``/metrics`` shows the
sequences, a fifth request waits or gets 503, and a client that leaves frees its sequence at once.
"""

from __future__ import annotations

import json
import threading
import time

import jsonschema
import openai
import pytest

from qwenvl_edge.runtime.parallel import ParallelQwenVL
from qwenvl_edge.runtime.pipeline import QwenVL
from tests.cli_helpers import run_process
from tests.server_harness import ServerProcess, data_uri
from tests.test_server import MODEL, assert_error, case_messages, post, user
from tests.test_server_metrics import one, parse
from tests.test_server_queue import first_content, open_stream

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def requests(golden) -> list[tuple[list[dict], dict]]:
    """(messages, arguments): the golden cases greedy, long text answers (one with a stop string), and two
    seeded samples; each with the model's log-probabilities (top 2), which tell a near tie from a bug."""
    lp = {"logprobs": True, "top_logprobs": 2}
    out = [(case_messages(golden, name), {"temperature": 0, "max_tokens": golden.max_new_tokens, **lp})
           for name in ("one_image", "two_images", "text_only")]
    out.append((user("Tell me a long story about the sea."), {"temperature": 0, "max_tokens": 48, **lp}))
    out.append((case_messages(golden, "one_image"), {"temperature": 0.8, "seed": 11, "max_tokens": 24, **lp}))
    out.append((user("hello there"), {"temperature": 1.0, "top_p": 0.9, "seed": 5, "max_tokens": 24, **lp}))
    out.append((user("Name three colours."), {"temperature": 0, "max_tokens": 6, **lp}))
    out.append((user("Tell me a long story about the sea."), {"temperature": 0, "max_tokens": 48, "stop": ["e"], **lp}))
    return out


def text_of(answer) -> tuple[str, str, list[dict]]:
    """The answer's text, finish reason and log-probability entries (streamed or not)."""
    if isinstance(answer, dict):
        choice = answer["choices"][0]
        return choice["message"]["content"], choice["finish_reason"], (choice.get("logprobs") or {}).get("content", [])
    chunks = list(answer)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    entries = [e for c in chunks for e in ((c["choices"][0].get("logprobs") or {}).get("content") or [])]
    return text, chunks[-1]["choices"][0]["finish_reason"], entries


# nats: a batch of several rows sums in another order (F32); a quantized GGUF's batched kernels also lay the
# activations' blocks out otherwise (llama.cpp's repacked Q4_K GEMM against its one-row GEMV)
TOLERANCE = {"f32_bundle": 1e-3, "default_bundle": 0.5}


def assert_as_alone(got: tuple, alone: tuple, greedy: bool, tol: float) -> None:
    """Batched = one at a time: the same tokens, log-probabilities within ``tol``; a greedy answer may part
    only where the lone run's best two tokens were tied within ``tol`` (then the rest may differ)."""
    for mine, theirs in zip(got[2], alone[2], strict=False):
        if mine["token"] != theirs["token"]:
            top = theirs["top_logprobs"]
            assert greedy and top[0]["logprob"] - top[1]["logprob"] < tol, (mine, theirs)
            return
        assert mine["logprob"] == pytest.approx(theirs["logprob"], abs=tol)
    assert got[:2] == alone[:2]


def at_once(ask, n: int) -> list:
    """``ask(i)`` for i in 0..n-1, each on its own thread, all at once; their results, or the first error."""
    out: list = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            out[i] = ask(i)
        except BaseException as e:  # noqa: BLE001 - raised below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a request hung"
    if errors:
        raise errors[0]
    return out


@pytest.mark.parametrize("bundle_name", ["f32_bundle", "default_bundle"])
def test_four_threads_answer_as_one_at_a_time(request, golden, bundle_name) -> None:
    """Eight requests on four sequences from eight threads (four wait for a free one): every answer (greedy,
    seeded, with stop strings, streamed or not) is the one-at-a-time answer (``assert_as_alone``), the golden
    cases exactly, and the sequences shared decode steps (steps that carried several of them)."""
    bundle = request.getfixturevalue(bundle_name)
    asks = requests(golden)
    with QwenVL(bundle, cache_dir=None) as alone:
        expected = [text_of(alone.create_chat_completion(m, **kw)) for m, kw in asks]
    with ParallelQwenVL(bundle, 4, cache_dir=None) as engine:
        def ask(i: int) -> str:
            messages, kw = asks[i]
            return text_of(engine.create_chat_completion(messages, stream=bool(i % 2), **kw))

        got = at_once(ask, len(asks))
        shared = engine.batcher.shared_steps
    for (_, kw), g, e in zip(asks, got, expected, strict=True):
        assert_as_alone(g, e, kw["temperature"] == 0, TOLERANCE[bundle_name])
    if bundle_name == "f32_bundle":
        assert [g[0] for g in got[:3]] == [golden.cases[n]["generated_text"]
                                           for n in ("one_image", "two_images", "text_only")]
    assert got[7][1] == "stop" and all(g[2] for g in got)
    assert shared > 0


def test_a_conversation_returns_to_the_sequence_that_holds_it(f32_bundle) -> None:
    """A follow-up question takes the sequence whose cache holds the conversation: its earlier turn's
    positions are reused (``cached_tokens``), as with one sequence."""
    with ParallelQwenVL(f32_bundle, 3, cache_dir=None) as engine:
        first = user("Tell me about the sea.")
        answer = engine.create_chat_completion(first, temperature=0, max_tokens=8)
        engine.create_chat_completion(user("Something else entirely, about mountains."), temperature=0, max_tokens=8)
        follow = [*first, {"role": "assistant", "content": answer["choices"][0]["message"]["content"]},
                  {"role": "user", "content": "And then?"}]
        again = engine.create_chat_completion(follow, temperature=0, max_tokens=4)
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= answer["usage"]["prompt_tokens"], again["usage"]


def test_an_engine_error_frees_the_sequence(f32_bundle) -> None:
    """A refused request (prompt past the context) gives its sequence back: four more still run."""
    with ParallelQwenVL(f32_bundle, 2, cache_dir=None) as engine:
        for _ in range(3):
            with pytest.raises(Exception, match="context"):
                engine.create_chat_completion(user("word " * 3000), max_tokens=2)
        texts = [text_of(engine.create_chat_completion(user("hi"), temperature=0, max_tokens=3))[0] for _ in range(4)]
    assert len(set(texts)) == 1


# --- the server ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-3", "257", "100000", "four"])
def test_a_bad_parallel_is_one_line_before_the_port_opens(f32_bundle, value) -> None:
    r = run_process(["serve", "--bundle", str(f32_bundle), "--port", "0", "--parallel", value], timeout=60)
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert err.count("\n") == 1 and "--parallel" in err and "Traceback" not in err, err
    assert "serving" not in err


@pytest.fixture(scope="module")
def server(f32_bundle, tmp_path_factory):
    """Four sequences, nobody waits behind them (--max-queue 0): the fifth request is told 503."""
    s = ServerProcess(f32_bundle, tmp_path_factory.mktemp("parallel"), "--parallel", "4", "--max-queue", "0",
                      "--threads", "2")
    yield s
    assert s.stop() == 0
    assert "Traceback" not in s.log(), s.log()


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def scrape(server) -> dict:
    import httpx

    return parse(httpx.get(server.url + "/metrics", timeout=10).text)


def test_four_concurrent_clients_get_the_golden_texts(server, golden) -> None:
    names = ["one_image", "two_images", "text_only", "one_image"]

    def ask(i: int) -> str:
        kw = {"model": MODEL, "messages": case_messages(golden, names[i]), "temperature": 0,
              "max_tokens": golden.max_new_tokens}
        if i == 3:
            return "".join(c.choices[0].delta.content or "" for c in
                           client(server).chat.completions.create(stream=True, **kw) if c.choices)
        return client(server).chat.completions.create(**kw).choices[0].message.content

    texts = at_once(ask, 4)
    assert texts == [golden.cases[n]["generated_text"] for n in names]
    assert "4 requests decoded together" in server.log()


def test_n_answers_from_parallel_sequences(server, golden) -> None:
    case = golden.cases["one_image"]
    r = client(server).chat.completions.create(model=MODEL, messages=case_messages(golden, "one_image"), n=3,
                                               temperature=0, max_tokens=golden.max_new_tokens)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content == case["generated_text"] for c in r.choices)
    assert r.usage.completion_tokens == 3 * len(case["generated_ids"])
    sampled = [client(server).chat.completions.create(model=MODEL, messages=user("hello"), n=2, temperature=1.0,
                                                      seed=3, max_tokens=12) for _ in range(2)]
    first, second = ([c.message.content for c in r.choices] for r in sampled)
    assert first == second  # a seed makes the set repeatable
    assert first[0] != first[1]  # answer i is drawn with seed + i


def test_a_fifth_request_is_refused_and_a_leaving_client_frees_its_sequence(server) -> None:
    """Four long streams hold the four sequences (/metrics: 4 running); a fifth request gets 503. One
    client leaves: its sequence is free at once and the next request is answered while three still stream."""
    streams = [open_stream(server.url) for _ in range(4)]
    try:
        for s in streams:
            first_content(s)
        samples = scrape(server)
        assert one(samples, "qwenvl_sequences_max") == 4
        assert one(samples, "qwenvl_sequences_running") == 4
        assert_error(post(server, {"model": MODEL, "messages": user("hi"), "max_tokens": 2}, key=None), 503,
                     "server_busy")
        streams[0].close()  # the client leaves
        deadline = time.monotonic() + 60
        while one(scrape(server), "qwenvl_sequences_running") > 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        r = post(server, {"model": MODEL, "messages": user("hi"), "max_tokens": 2}, key=None)
        assert r.status_code == 200, r.text
        for s in streams[1:]:  # the others were never disturbed: they still stream
            assert first_content(s)
    finally:
        for s in streams:
            s.close()
    deadline = time.monotonic() + 60
    while one(scrape(server), "qwenvl_sequences_running") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert one(scrape(server), "qwenvl_sequences_running") == 0


def test_json_schema_answers_validate_when_batched(server, golden) -> None:
    """Two schema-constrained answers beside two plain ones, at once: each parses and fits its schema."""
    schema = {"type": "object", "additionalProperties": False, "required": ["colour", "shape"],
              "properties": {"colour": {"enum": ["red", "green", "blue"]},
                             "shape": {"type": "string", "enum": ["circle", "square", "triangle"]}}}

    def ask(i: int) -> tuple[str, str]:
        kw = {"model": MODEL, "messages": user("What colour is it?", data_uri(golden.images["sign"])),
              "temperature": 0, "max_tokens": 60}
        if i < 2:
            kw["response_format"] = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
        choice = client(server).chat.completions.create(**kw).choices[0]
        return choice.finish_reason, choice.message.content

    out = at_once(ask, 4)
    for finish, text in out[:2]:
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), schema)
    assert all(finish in ("stop", "length") for finish, _ in out[2:])
