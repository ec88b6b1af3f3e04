"""``qwenvl-edge serve`` driven by the official ``openai`` client: golden answers, streaming, usage,
and every refusal with its status and OpenAI's error shape.

The servers are the real command line in a child process (F32 bundle of the golden checkpoint, so
greedy answers equal the original's), on free ports of 127.0.0.1.
"""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from tests.server_harness import API_KEY, ImageHost, ServerProcess, data_uri

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

MODEL = "qwen-vl-chat"


@pytest.fixture(scope="module")
def media(golden, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("media")
    for name, path in golden.images.items():
        shutil.copy(path, folder / f"{name}.png")
    (folder / "sub").mkdir()
    shutil.copy(golden.images["sign"], folder / "sub" / "sign.png")
    (folder / "big.bin").write_bytes(b"\0" * (3 * 2**20))  # over the 2 MB remote cap
    return folder


@pytest.fixture(scope="module")
def server(f32_bundle, media, tmp_path_factory):
    """The permissive server: API key, a media folder, remote images, small limits to test."""
    s = ServerProcess(f32_bundle, tmp_path_factory.mktemp("server"), "--api-key", API_KEY, "--media-dir", str(media),
                      "--allow-remote-images", "--max-images", "2", "--max-image-pixels", "4000000",
                      "--max-body-mb", "1", "--remote-max-mb", "2", "--remote-timeout", "1")
    yield s
    assert s.stop() == 0
    assert "Traceback" not in s.log(), s.log()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def host(media):
    h = ImageHost(media)
    yield h
    h.close()


def user(text: str, *urls: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}] if urls else text}]


def case_messages(golden, name: str) -> list[dict]:
    case = golden.cases[name]
    return user(case["text"], *(data_uri(golden.images[i]) for i in case["images"]))


# --- answers -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["one_image", "two_images", "text_only"])
def test_greedy_answers_equal_the_golden(client, golden, name) -> None:
    case = golden.cases[name]
    r = client.chat.completions.create(model=MODEL, messages=case_messages(golden, name), temperature=0,
                                       max_tokens=golden.max_new_tokens)
    assert r.choices[0].message.content == case["generated_text"]
    assert r.choices[0].finish_reason == ("length" if len(case["generated_ids"]) == golden.max_new_tokens else "stop")
    assert r.model == MODEL
    assert r.usage.prompt_tokens == len(case["input_ids"])
    assert r.usage.completion_tokens == len(case["generated_ids"])
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_gives_the_same_text(client, golden) -> None:
    case = golden.cases["one_image"]
    stream = client.chat.completions.create(model=MODEL, messages=case_messages(golden, "one_image"), temperature=0,
                                            max_tokens=golden.max_new_tokens, stream=True)
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces) == case["generated_text"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert isinstance(chunks[-1].choices[0].model_extra["boxes"], list)


def test_stream_usage_comes_last_with_include_usage(client, golden) -> None:
    case = golden.cases["one_image"]
    chunks = list(client.chat.completions.create(model=MODEL, messages=case_messages(golden, "one_image"),
                                                 temperature=0, max_tokens=golden.max_new_tokens, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == len(case["input_ids"])
    assert chunks[-1].usage.completion_tokens == len(case["generated_ids"])
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_include_usage_has_no_usage(client, golden) -> None:
    chunks = list(client.chat.completions.create(model=MODEL, messages=case_messages(golden, "text_only"),
                                                 temperature=0, max_tokens=4, stream=True))
    assert chunks and all(c.usage is None for c in chunks) and all(c.choices for c in chunks)


def test_raw_stream_ends_with_done(server, golden) -> None:
    body = {"model": MODEL, "messages": case_messages(golden, "text_only"), "temperature": 0, "max_tokens": 3,
            "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)


def test_stop_and_seed(client, golden) -> None:
    case = golden.cases["text_only"]
    cut = case["generated_text"][10:16]
    r = client.chat.completions.create(model=MODEL, messages=user(case["text"]), temperature=0,
                                       max_tokens=golden.max_new_tokens, stop=[cut])
    assert r.choices[0].message.content == case["generated_text"][:case["generated_text"].index(cut)]
    assert r.choices[0].finish_reason == "stop"
    sampled = [client.chat.completions.create(model=MODEL, messages=user(case["text"]), temperature=1.0, top_p=0.9,
                                              max_tokens=12, seed=seed).choices[0].message.content
               for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_image_from_media_dir_and_remote_equal_the_data_uri(client, golden, host, media) -> None:
    case = golden.cases["one_image"]
    for url in ["sign.png", "sub/sign.png", f"file://{media}/sign.png", f"{host.url}/sign.png"]:
        r = client.chat.completions.create(model=MODEL, messages=user(case["text"], url), temperature=0,
                                           max_tokens=golden.max_new_tokens)
        assert r.choices[0].message.content == case["generated_text"], url


def test_boxes_in_an_extra_field(client, golden) -> None:
    """The grounding case: the text as written plus ``boxes`` (OpenAI clients keep unknown fields)."""
    case = golden.cases["grounding"]
    r = client.chat.completions.create(model=MODEL, messages=case_messages(golden, "grounding"), temperature=0,
                                       max_tokens=golden.max_new_tokens)
    assert r.choices[0].message.content == case["generated_text"]
    boxes = r.choices[0].model_extra["boxes"]
    assert isinstance(boxes, list)
    for box in boxes:
        assert set(box) >= {"label", "norm", "pixels"}


def test_models_and_health(server, client) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(server.url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_page_is_served(server) -> None:
    page = httpx.get(server.url + "/", timeout=10)
    assert page.status_code == 200 and "photo-input" in page.text
    for name in ("app.js", "style.css"):
        assert httpx.get(f"{server.url}/static/{name}", timeout=10).status_code == 200


# --- refusals ------------------------------------------------------------------------------------------

def assert_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


def post(server, body, key: str | None = API_KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if not isinstance(body, dict):
        return httpx.post(server.url + "/v1/chat/completions", content=body, timeout=60,
                          headers={**headers, "Content-Type": "application/json"}, **kwargs)
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60, headers=headers, **kwargs)


def png_bytes(size: tuple[int, int], fmt: str = "PNG", mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, fmt)
    return buf.getvalue()


def b64(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def test_api_key_is_required(server, client) -> None:
    body = {"model": MODEL, "messages": user("hi")}
    assert_error(post(server, body, key=None), 401, "invalid_api_key")
    assert_error(post(server, body, key="wrong"), 401, "invalid_api_key")
    assert_error(httpx.get(server.url + "/v1/models", timeout=10), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_unknown_model_and_path_are_404(server, client) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=user("hi"))
    assert e.value.body["code"] == "model_not_found"
    assert_error(httpx.get(server.url + "/v1/nothing", timeout=10), 404, "not_found")
    assert_error(httpx.get(server.url + "/v1/models/gpt-4o", timeout=10,
                           headers={"Authorization": f"Bearer {API_KEY}"}), 404, "model_not_found")


def test_body_over_the_limit_is_413(server) -> None:
    big = b64(b"\0" * (2 * 2**20))
    assert_error(post(server, {"model": MODEL, "messages": user("hi", big)}), 413, "request_too_large")

    def chunked():  # no Content-Length: counted as it arrives
        yield b'{"model": "qwen-vl-chat", "messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"a" * 100_000
        yield b'"}]}'
    assert_error(post(server, chunked()), 413, "request_too_large")


SHAPE_CASES = {
    "not json": (b"{not json", None, "invalid_json"),
    "no messages": ({"model": MODEL}, "messages", None),
    "empty messages": ({"model": MODEL, "messages": []}, "messages", None),
    "bad role": ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", None),
    "bad part": ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "audio", "x": 1}]}]},
                 "messages[0].content[0]", None),
    "temperature string": ({"model": MODEL, "messages": user("hi"), "temperature": "hot"}, "temperature", None),
    "max_tokens float": ({"model": MODEL, "messages": user("hi"), "max_tokens": 2.5}, "max_tokens", None),
    "stream string": ({"model": MODEL, "messages": user("hi"), "stream": "yes"}, "stream", None),
    "n=0": ({"model": MODEL, "messages": user("hi"), "n": 0}, "n", None),
    "n past --parallel": ({"model": MODEL, "messages": user("hi"), "n": 99}, "n", None),
    "n=2 streamed": ({"model": MODEL, "messages": user("hi"), "n": 2, "stream": True}, "n", None),
}


@pytest.mark.parametrize("name", list(SHAPE_CASES))
def test_malformed_requests_are_400(server, name) -> None:
    body, param, code = SHAPE_CASES[name]
    err = assert_error(post(server, body), 400, code)
    if param is not None:
        assert err["param"] == param, err


@pytest.mark.parametrize("args", [{"temperature": -1}, {"top_p": 0}, {"max_tokens": 0}, {"seed": -5},
                                  {"top_k": -1}])
def test_out_of_range_sampling_is_400(server, args) -> None:
    assert_error(post(server, {"model": MODEL, "messages": user("hi"), **args}), 400)


def test_conversation_errors_are_400(server) -> None:
    for messages in ([{"role": "assistant", "content": "hi"}], [{"role": "user", "content": "   "}],
                     [*user("hi"), {"role": "assistant", "content": "hello"}]):
        assert_error(post(server, {"model": MODEL, "messages": messages}), 400)


def test_context_exceeded_is_400_with_the_numbers(server) -> None:
    err = assert_error(post(server, {"model": MODEL, "messages": user("word " * 3000)}), 400,
                       "context_length_exceeded")
    assert "2048" in err["message"]


IMAGE_CASES = {
    "data uri not base64": ("data:image/png;base64,@@@", "invalid_image_url"),
    "data uri without base64": ("data:image/png,abc", "invalid_image_url"),
    "data uri of text": (b64(b"hello", "text/plain"), "invalid_image"),
    "not an image": (b64(b"hello there, not a picture"), "invalid_image"),
    "type mismatch": (b64(png_bytes((8, 8), "JPEG"), "image/png"), "invalid_image"),
    "unsupported type": (b64(png_bytes((8, 8), "TIFF"), "image/tiff"), "unsupported_image_type"),
    "too many pixels": (b64(png_bytes((4000, 1001), mode="1")), "image_too_large"),
    "outside media dir": ("../../etc/passwd", "image_not_allowed"),
    "absolute outside": ("/etc/hostname", "image_not_allowed"),
    "missing file": ("nothing.png", "image_not_found"),
    "odd scheme": ("ftp://127.0.0.1/sign.png", "invalid_image_url"),
}


@pytest.mark.parametrize("name", list(IMAGE_CASES))
def test_bad_images_are_400_and_named(server, name) -> None:
    url, code = IMAGE_CASES[name]
    err = assert_error(post(server, {"model": MODEL, "messages": user("what is it?", url)}), 400, code)
    assert err["param"] == "messages[0].content[0]"


def test_remote_image_limits(server, host) -> None:
    for url, code in [(f"{host.url}/big.bin", "image_too_large"), (f"{host.url}/nothing.png", "image_fetch_failed"),
                      (f"{host.url}/slow/sign.png", "image_fetch_failed")]:
        assert_error(post(server, {"model": MODEL, "messages": user("what?", url)}), 400, code)


def test_too_many_images_is_400(server, golden) -> None:
    uri = data_uri(golden.images["sign"])
    assert_error(post(server, {"model": MODEL, "messages": user("what?", uri, uri, uri)}), 400, "too_many_images")


def test_wrong_method_is_405_in_the_same_shape(server) -> None:
    assert_error(httpx.get(server.url + "/v1/chat/completions", timeout=10), 405)


def test_refused_requests_never_reach_the_model(server, client, golden) -> None:
    """Refusals between two equal requests change nothing: the same answer, and the second request reuses
    the whole prompt but its last position (evaluated again for its logits)."""
    case = golden.cases["one_image"]
    messages = case_messages(golden, "one_image")
    first = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=4)
    for body in ({"messages": user("hi"), "temperature": -1}, {"messages": user("word " * 3000)},
                 {"messages": user("what?", b64(b"not an image"))}, {"messages": user("hi"), "max_tokens": 0}):
        assert post(server, {"model": MODEL, **body}).status_code == 400
    again = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=4)
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.usage.prompt_tokens == len(case["input_ids"])
    assert again.usage.prompt_tokens_details.cached_tokens == len(case["input_ids"]) - 1


def test_follow_up_evaluates_only_its_new_tokens(client, golden) -> None:
    """A chat app resends the whole conversation: only the new turn is evaluated (counted by the engine)."""
    messages = case_messages(golden, "one_image")
    first = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=8)
    follow = [*messages, {"role": "assistant", "content": first.choices[0].message.content},
              {"role": "user", "content": "And what colour is it?"}]
    r = client.chat.completions.create(model=MODEL, messages=follow, temperature=0, max_tokens=4)
    cached = r.usage.prompt_tokens_details.cached_tokens
    evaluated = r.usage.prompt_tokens - cached
    assert cached >= first.usage.prompt_tokens  # the system prompt, the image rows and the first question
    assert 0 < evaluated <= r.usage.prompt_tokens - first.usage.prompt_tokens  # the new turn, nothing more
    print(f"follow-up: {r.usage.prompt_tokens} prompt tokens, {cached} reused, {evaluated} evaluated")
