"""Structured answers (``response_format``) and ``logprobs``: the official ``openai`` client against a real
``qwenvl-edge serve`` of the tiny trained model, the Python API, and ``run --json-schema``.

The grammar makes every answer that ends with the stop token parse and validate (``jsonschema`` checks
it); an answer cut by ``max_tokens`` says ``length``.
"""

from __future__ import annotations

import json
import math

import jsonschema
import openai
import pytest

from qwenvl_edge.errors import QwenVLError
from qwenvl_edge.runtime.pipeline import QwenVL
from tests.cli_helpers import run_cli, temp_home  # noqa: F401 -- temp_home: the CLI test's HOME
from tests.server_harness import data_uri, module_server

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def image_part(golden, name: str) -> dict:
    return {"type": "image_url", "image_url": {"url": data_uri(golden.images[name])}}

MODEL = "qwen-vl-chat"
SHAPE = {"type": "object", "additionalProperties": False, "required": ["colour", "shape"],
         "properties": {"colour": {"enum": ["red", "green", "blue"]},
                        "shape": {"type": "string", "enum": ["circle", "square", "triangle"]}}}
BOX = "<ref>the sign</ref><box>(100,200),(500,600)</box>"


def fmt(schema: dict, strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": strict}}


@pytest.fixture(scope="module")
def server(trained_default_bundle, tmp_path_factory):
    yield from module_server(trained_default_bundle, tmp_path_factory, "structured")


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client, question="What colour is it?", **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}], **kw)


@pytest.mark.parametrize(("temperature", "seed"), [(0, None), (1.0, 1), (1.0, 7)])
def test_json_schema_answers_validate(client, temperature, seed):
    r = ask(client, temperature=temperature, seed=seed, max_tokens=40, response_format=fmt(SHAPE))
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    jsonschema.validate(json.loads(r.choices[0].message.content), SHAPE)


def test_json_schema_streamed_validates(client):
    chunks = list(ask(client, temperature=0, max_tokens=40, response_format=fmt(SHAPE), stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), SHAPE)


def test_json_object_answers_are_objects(client):
    """Every answer that ends on its own is one JSON object (the tiny model often writes a string past
    max_tokens: then the answer says ``length``)."""
    finishes = []
    for seed in range(4):
        r = ask(client, "Answer in JSON.", temperature=1.0, top_p=1.0, seed=seed, max_tokens=24,
                response_format={"type": "json_object"})
        choice = r.choices[0]
        assert choice.message.content.startswith("{")
        finishes.append(choice.finish_reason)
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
    assert "stop" in finishes and set(finishes) <= {"stop", "length"}


def test_max_tokens_cuts_a_structured_answer(client):
    """``max_tokens`` still bounds the answer: a cut document is not valid JSON and says ``length``."""
    schema = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
    r = ask(client, temperature=0, max_tokens=6, response_format=fmt(schema))
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.choices[0].message.content)


def test_boxes_of_a_structured_answer(client, golden):
    """A box the schema makes the model write comes back in ``boxes``, in the photo's pixels."""
    schema = {"type": "object", "properties": {"where": {"const": BOX}}, "required": ["where"]}
    messages = [{"role": "user", "content": [image_part(golden, "sign"),
                                             {"type": "text", "text": "Where is the sign?"}]}]
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=60,
                                       response_format=fmt(schema))
    assert json.loads(r.choices[0].message.content) == {"where": BOX}
    boxes = r.choices[0].model_extra["boxes"]
    assert [b["label"] for b in boxes] == ["the sign"] and boxes[0]["norm"] == [100, 200, 500, 600]


@pytest.mark.parametrize(("response_format", "words"), [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "colour"}}}, "cannot be turned into"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "http://example.com/s.json"}}},
     "cannot be turned into"),
    ({"type": "json_schema", "json_schema": {"name": "x", "strict": True,
                                             "schema": {"type": "integer", "minimum": 3}}}, "minimum"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}, "must be a JSON object"),
    ({"type": "xml"}, "json_object or json_schema"),
])
def test_bad_response_format_is_400(client, server, response_format, words):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, max_tokens=4, response_format=response_format)
    error = e.value.body
    assert e.value.status_code == 400 and error["param"] == "response_format", error
    assert words in error["message"] and error["type"] == "invalid_request_error"


def test_logprobs(client):
    r = ask(client, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token and t.logprob <= 0
        assert len(t.top_logprobs) == 3
        tops = [a.logprob for a in t.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert t.top_logprobs[0].token == t.token and math.isclose(tops[0], t.logprob)  # greedy: the best one
        assert sum(math.exp(x) for x in tops) <= 1 + 1e-6


def test_logprobs_streamed_match_the_answer(client):
    plain = ask(client, temperature=0, max_tokens=6, logprobs=True)
    chunks = list(ask(client, temperature=0, max_tokens=6, logprobs=True, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in plain.choices[0].logprobs.content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in plain.choices[0].logprobs.content])
    assert all(t.top_logprobs == [] for t in streamed)
    assert ask(client, max_tokens=2).choices[0].logprobs is None  # not asked: none


@pytest.mark.parametrize(("kw", "param"), [({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                                           ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
                                           ({"top_logprobs": 2}, "top_logprobs")])
def test_bad_logprobs_are_400(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, max_tokens=2, **kw)
    assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body


# --- the Python API and the command line ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(trained_default_bundle):
    with QwenVL(trained_default_bundle, n_threads=1, cache_dir=None) as m:
        yield m


def test_api_generate_with_a_schema(model):
    r = model.generate(prompt="What shape is it?", max_tokens=40, temperature=0, response_format=fmt(SHAPE))
    assert r.finish_reason == "stop"
    jsonschema.validate(json.loads(r.text), SHAPE)
    out = model.create_chat_completion([{"role": "user", "content": "Colour?"}], max_tokens=40, temperature=0,
                                       response_format=fmt(SHAPE, strict=False), logprobs=True)
    jsonschema.validate(json.loads(out["choices"][0]["message"]["content"]), SHAPE)
    assert len(out["choices"][0]["logprobs"]["content"]) == out["usage"]["completion_tokens"]


def _greedy(model, sampler, n: int) -> list[int]:
    """Up to ``n`` tokens of a text-only prompt, sampled with ``sampler`` straight from the decoder."""
    decoder = model.session.decoder()
    decoder.prefill(model.build_prompt([], "What colour is it?"), lambda ref: None)
    ids: list[int] = []
    while len(ids) < n:
        token = decoder.sample(sampler)
        if token in model.info.stop_ids:
            break
        ids.append(token)
        decoder.eval_tokens([token])
    return ids


@pytest.mark.parametrize("response_format", [{"type": "json_object"}, fmt(SHAPE)])
def test_grammar_after_sampling_equals_grammar_first(model, response_format):
    """The engine checks the grammar after the chain picks (resampling only when it refuses): greedy, that
    picks exactly the tokens of llama.cpp's grammar-first chain, which filters the whole vocabulary each step."""
    from llama_cpp._internals import LlamaSampler
    from llama_cpp.llama_grammar import LlamaGrammar

    from qwenvl_edge.runtime.structured import grammar_for

    gbnf = grammar_for(response_format)
    decoder = model.session.decoder()
    first = LlamaSampler()
    banned = decoder.eog_tokens() - set(model.info.stop_ids)
    first.add_logit_bias(decoder.n_vocab, dict.fromkeys(banned, float("-inf")))
    first.add_grammar(decoder.model, LlamaGrammar.from_string(gbnf))
    first.add_greedy()
    after = decoder.make_sampler(0.0, 1.0, 0, 0, gbnf, model.info.stop_ids)
    assert _greedy(model, after, 30) == _greedy(model, first, 30)
    assert after.resampled > 0  # the tiny model's first choice was refused at least once: both paths ran


@pytest.mark.parametrize("bad", [{"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}},
                                 {"type": "json_schema", "json_schema": "x"}, "json"])
def test_api_bad_schema_raises(model, bad):
    with pytest.raises(QwenVLError, match="response_format"):
        model.generate(prompt="hi", max_tokens=2, response_format=bad)
    assert model.generate(prompt="hi", max_tokens=2, temperature=0).finish_reason  # still usable


def test_run_json_schema(trained_default_bundle, tmp_path, capsys):
    schema = tmp_path / "shape.json"
    schema.write_text(json.dumps(SHAPE))
    rc, out, err = run_cli(["run", "--bundle", str(trained_default_bundle), "--threads", "1", "--greedy",
                            "--max-tokens", "40", "--json-schema", str(schema), "-q", "What shape is it?"], capsys)
    assert rc == 0, err
    jsonschema.validate(json.loads(out), SHAPE)


@pytest.mark.parametrize(("content", "words"), [(None, "cannot read it"), ("{not json", "not a JSON file"),
                                                ('{"type": "shape"}', "cannot be turned into a grammar")])
def test_run_bad_json_schema_is_one_line(trained_default_bundle, tmp_path, capsys, content, words):
    schema = tmp_path / "schema.json"
    if content is not None:
        schema.write_text(content)
    rc, out, err = run_cli(["run", "--bundle", str(trained_default_bundle), "--json-schema", str(schema), "hi"],
                           capsys)
    assert rc != 0 and out == ""
    assert err.startswith("qwenvl-edge: error: --json-schema") and words in err and err.count("\n") == 1, err
