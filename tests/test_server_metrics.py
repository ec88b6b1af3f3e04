"""``/metrics`` (Prometheus' text format, parsed here by a small parser of that format) and
``--cors-origin`` (browser preflights), against a real ``qwenvl-edge serve`` of the tiny trained model."""

from __future__ import annotations

import re
import subprocess
import sys

import httpx
import openai
import pytest

from tests.server_harness import API_KEY, ServerProcess, data_uri

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def image_part(golden, name: str) -> dict:
    return {"type": "image_url", "image_url": {"url": data_uri(golden.images[name])}}

ALLOWED = "http://app.example:3000"
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})? (\S+)$')


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus' text format: ``# HELP`` / ``# TYPE`` lines, then ``name{label="v",...} value``. Every
    sample's metric must have been declared with a type first."""
    typed: dict[str, str] = {}
    out: dict[tuple[str, frozenset], float] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert kind in ("counter", "gauge"), line
            typed[name] = kind
            continue
        if line.startswith("# HELP ") or not line:
            continue
        m = SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        assert m.group(1) in typed, f"{m.group(1)} has no # TYPE"
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(3) or ""))
        out[(m.group(1), labels)] = float(m.group(4))
    return out


def one(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def server(trained_default_bundle, tmp_path_factory):
    s = ServerProcess(trained_default_bundle, tmp_path_factory.mktemp("metrics"), "--api-key", API_KEY,
                      "--cors-origin", ALLOWED, "--cors-origin", "https://other.example")
    yield s
    assert s.stop() == 0
    assert "Traceback" not in s.log(), s.log()


def scrape(server) -> dict:
    r = httpx.get(server.url + "/metrics", timeout=10)  # no API key: /metrics is open, as /health
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(r.text)


def test_metrics_count_requests_and_engine_work(server, golden):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    before = scrape(server)
    messages = [{"role": "user", "content": [image_part(golden, "sign"),
                                             {"type": "text", "text": "What is it?"}]}]
    r = client.chat.completions.create(model="qwen-vl-chat", messages=messages, temperature=0, max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="qwen-vl-chat", messages=messages, max_tokens=0)
    assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401
    after = scrape(server)

    def grew(name: str, **labels: str) -> float:
        return one(after, name, **labels) - one(before, name, **labels)

    assert grew("qwenvl_requests_total", endpoint="/v1/chat/completions", code="200") == 1
    assert grew("qwenvl_requests_total", endpoint="/v1/chat/completions", code="400") == 1
    assert grew("qwenvl_requests_total", endpoint="/v1/models", code="401") == 1
    assert grew("qwenvl_requests_total", endpoint="/metrics", code="200") == 1  # the first scrape
    assert grew("qwenvl_generations_total") == 1
    assert grew("qwenvl_decode_tokens_total") == r.usage.completion_tokens
    evaluated = r.usage.prompt_tokens - r.usage.prompt_tokens_details.cached_tokens
    assert grew("qwenvl_prefill_tokens_total") == evaluated > 256  # the image's rows were evaluated
    assert grew("qwenvl_images_encoded_total") == 1 and grew("qwenvl_image_encode_seconds_total") > 0
    assert grew("qwenvl_prefill_seconds_total") > 0 and grew("qwenvl_decode_seconds_total") > 0
    assert ("qwenvl_cache_hits_total", frozenset({("kind", "rows")})) in after
    assert one(after, "qwenvl_queue_depth") == 0 and one(after, "qwenvl_sequences_running") == 0
    assert 20 * 2**20 < one(after, "qwenvl_resident_memory_bytes") < 8 * 2**30


def test_metrics_cache_hits(server, golden):
    """The same photo in a new conversation: its rows come from the cache (the KV cache holds another prompt)."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)

    def ask(system: str):
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": [image_part(golden, "noise"),
                                                 {"type": "text", "text": "What is it?"}]}]
        client.chat.completions.create(model="qwen-vl-chat", messages=messages, temperature=0, max_tokens=1)

    ask("You are helpful.")
    before = scrape(server)
    ask("You are brief.")
    assert one(scrape(server), "qwenvl_cache_hits_total", kind="rows") - one(before, "qwenvl_cache_hits_total",
                                                                             kind="rows") == 1


@pytest.mark.parametrize(("origin", "allowed"), [(ALLOWED, True), ("https://other.example", True),
                                                 ("https://evil.example", False)])
def test_cors_preflight(server, origin, allowed):
    r = httpx.options(server.url + "/v1/chat/completions", timeout=10, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    if allowed:
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        assert "POST" in r.headers["access-control-allow-methods"]
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
    else:
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    # an actual request from the page carries the header too (a refusal included, so the page can read it)
    r = httpx.get(server.url + "/v1/models", headers={"Origin": origin}, timeout=10)
    assert r.status_code == 401 and (r.headers.get("access-control-allow-origin") == origin) == allowed


def test_no_cors_by_default(trained_default_bundle, tmp_path):
    s = ServerProcess(trained_default_bundle, tmp_path / "plain")
    try:
        r = httpx.options(s.url + "/v1/chat/completions", timeout=10, headers={
            "Origin": ALLOWED, "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in r.headers and r.status_code == 405
        r = httpx.get(s.url + "/health", headers={"Origin": ALLOWED}, timeout=10)
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    finally:
        assert s.stop() == 0


@pytest.mark.parametrize("origin", ["http://app.example/path", "app.example", "http://a.example/"])
def test_bad_cors_origin_is_one_line(trained_default_bundle, origin):
    p = subprocess.run([sys.executable, "-m", "qwenvl_edge", "serve", "--bundle", str(trained_default_bundle),
                        "--port", "0", "--cors-origin", origin], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith("qwenvl-edge: error: --cors-origin") and p.stderr.count("\n") == 1, p.stderr
