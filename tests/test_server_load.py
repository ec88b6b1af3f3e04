"""A bounded load test, one request at a time and four decoded together (--parallel 4): 16 clients at
once for 5 rounds, images and text mixed, streamed and not, some leaving mid-stream. Every request gets
a full answer or a 503; the server keeps answering (the golden answer, exactly, afterwards); its
resident memory after round 5 is within 64 MB of round 2; nothing is logged as an unhandled exception.

Bounded: 16 x 5 = 80 requests of at most 8 tokens each, on 127.0.0.1 only.
"""

from __future__ import annotations

import random
import re
import threading

import openai
import pytest

from tests.server_harness import ServerProcess, data_uri
from tests.test_server import MODEL, case_messages, user

pytestmark = pytest.mark.long  # its own step of .ci/run (python -m pytest -m long)

CLIENTS = 16
ROUNDS = 5
RSS_GROWTH_LIMIT = 64 * 2**20


@pytest.fixture(scope="module", params=["1", "4"], ids=["one-at-a-time", "parallel-4"])
def server(request, f32_bundle, tmp_path_factory):
    """One request at a time, and four decoded together (continuous batching), each under the same load."""
    s = ServerProcess(f32_bundle, tmp_path_factory.mktemp("load"), "--max-queue", "10", "--parallel", request.param)
    yield s
    s.stop()


def one_request(client: openai.OpenAI, rng: random.Random, images: list[str]) -> str:
    """One request of a random kind; returns ``ok``, ``busy`` or ``left`` (this client disconnected)."""
    kind = rng.choice(["image", "text", "two_images"])
    urls = {"image": [rng.choice(images)], "text": [], "two_images": images}[kind]
    messages = user(rng.choice(["What is in the picture?", "Describe it.", "Hello!"]), *urls)
    stream = rng.random() < 0.6
    leave = stream and rng.random() < 0.35
    args = {"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": rng.choice([0, 0.8]),
            "seed": rng.randrange(1000)}
    try:
        if not stream:
            r = client.chat.completions.create(**args)
            assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1
            return "ok"
        chunks = client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
        finish = None
        for chunk in chunks:
            if leave and chunk.choices and chunk.choices[0].delta.content:
                chunks.close()
                return "left"
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.usage is not None:  # the last chunk, as asked with include_usage
                assert finish in ("stop", "length") and chunk.usage.completion_tokens >= 1
                return "ok"
        raise AssertionError("the stream ended without a finish reason and usage")
    except openai.InternalServerError as e:
        assert e.status_code == 503 and int(e.response.headers["retry-after"]) >= 1, e
        return "busy"


def test_sixteen_clients_five_rounds(server, golden) -> None:
    images = [data_uri(golden.images["sign"]), data_uri(golden.images["noise"])]
    clients = [openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)
               for _ in range(CLIENTS)]
    outcomes: list[str] = []
    failures: list[BaseException] = []
    rss = []
    for round_no in range(ROUNDS):
        barrier = threading.Barrier(CLIENTS)

        def client_run(i: int, round_no: int = round_no, barrier: threading.Barrier = barrier) -> None:
            rng = random.Random(round_no * 100 + i)
            barrier.wait()
            try:
                outcomes.append(one_request(clients[i], rng, images))
            except BaseException as e:  # collected: every request must end well
                failures.append(e)

        threads = [threading.Thread(target=client_run, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert not any(t.is_alive() for t in threads), "a client hung"
        assert not failures, failures[:3]
        rss.append(server.rss_bytes())

    assert len(outcomes) == CLIENTS * ROUNDS
    assert outcomes.count("ok") >= CLIENTS, outcomes  # most are answered, not turned away
    assert "left" in outcomes
    growth = rss[4] - rss[1]
    print(f"load: {dict((k, outcomes.count(k)) for k in set(outcomes))}; RSS by round (MB): "
          f"{[round(r / 2**20, 1) for r in rss]}; round 5 - round 2 = {growth / 2**20:.1f} MB")
    assert growth <= RSS_GROWTH_LIMIT, rss

    # still answering, and exactly: no state of the load is left in the engine
    case = golden.cases["one_image"]
    r = clients[0].chat.completions.create(model=MODEL, messages=case_messages(golden, "one_image"), temperature=0,
                                           max_tokens=golden.max_new_tokens)
    assert r.choices[0].message.content == case["generated_text"]
    log = server.log()
    for sign in ("Traceback", "Exception in ASGI application"):
        assert sign not in log, log[-4000:]
    assert not re.search(r"(?im)^(qwenvl-edge: )?error:", log), log[-4000:]  # nothing logged as an error
