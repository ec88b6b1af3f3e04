"""Structured answers and log-probabilities: OpenAI's ``response_format`` and ``logprobs`` for the engine.

``response_format`` becomes a llama.cpp grammar (GBNF): ``json_object`` is llama-cpp-python's JSON
grammar (an object at the top), ``json_schema`` goes through llama-cpp-python's own schema converter
(``json_schema_to_gbnf``, the one ``Llama`` uses). The decoder's sampler chain then starts with
llama.cpp's grammar sampler, so every token keeps the answer a prefix of a valid document and the
stop token is only allowed once it is complete. Log-probabilities are of the model's own
distribution (the raw logits, before temperature, top-k/top-p and the grammar), as OpenAI gives them.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from qwenvl_edge.errors import OptionError

MAX_TOP_LOGPROBS = 20  # OpenAI's limit


def grammar_for(response_format: Any) -> str | None:
    """The GBNF grammar ``response_format`` asks for (None: free text); a bad one raises ``OptionError``."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise OptionError(f"response_format must be an object, got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":  # llama-cpp-python also takes a "schema" here: honour it the same way
        schema = response_format.get("schema")
        return _json_grammar() if schema is None else schema_grammar(schema, "response_format.schema")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise OptionError("response_format.json_schema must be an object {name, schema, strict}")
        if not isinstance(spec.get("name", ""), str):
            raise OptionError("response_format.json_schema.name must be a string")
        if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
            raise OptionError("response_format.json_schema.strict must be true or false")
        schema = spec.get("schema")
        where = "response_format.json_schema.schema"
        if spec.get("strict") and isinstance(schema, dict):  # strict: the answer must validate, so every
            loose = sorted(unenforced(schema))                  # keyword must be one the grammar enforces
            if loose:
                raise OptionError(f"{where} uses {', '.join(loose)}, which the grammar cannot enforce: "
                                  "drop them or send strict: false")
        return _json_grammar() if schema is None else schema_grammar(schema, where)
    raise OptionError(f"response_format.type must be text, json_object or json_schema, got {kind!r}")


def schema_grammar(schema: Any, where: str = "the JSON schema") -> str:
    """A JSON schema -> GBNF with llama-cpp-python's converter; what it cannot convert is the caller's error."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    if not isinstance(schema, (dict, bool)):
        raise OptionError(f"{where} must be a JSON object, got {type(schema).__name__}")
    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as e:  # noqa: BLE001 -- the converter raises assertion/type/value errors on bad schemas
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise OptionError(f"{where} cannot be turned into a grammar: {reason}") from None


UNENFORCED = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "uniqueItems",
                        "minProperties", "maxProperties", "not", "if", "then", "else", "patternProperties",
                        "propertyNames", "contains", "dependentRequired", "dependentSchemas"})


def unenforced(schema: Any) -> set[str]:
    """The keywords of ``schema`` (and its sub-schemas) that llama-cpp-python's converter ignores: an
    answer may break them and still follow the grammar."""
    if not isinstance(schema, dict):
        return set()
    found = set(schema) & UNENFORCED
    subs: list[Any] = [schema.get("items"), schema.get("additionalProperties")]
    for key in ("properties", "$defs", "definitions"):
        if isinstance(schema.get(key), dict):
            subs += list(schema[key].values())
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if isinstance(schema.get(key), list):
            subs += schema[key]
    for sub in subs:
        found |= unenforced(sub)
    return found


def _json_grammar() -> str:
    from llama_cpp.llama_grammar import JSON_GBNF

    return JSON_GBNF


def logprob_count(logprobs: Any, top_logprobs: Any) -> int | None:
    """How many alternatives to report per token (None: no log-probabilities), checked as OpenAI does."""
    if logprobs is not None and not isinstance(logprobs, bool):
        raise OptionError(f"logprobs must be true or false, got {type(logprobs).__name__}")
    if top_logprobs is None:
        return 0 if logprobs else None
    if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int):
        raise OptionError(f"top_logprobs must be an integer, got {type(top_logprobs).__name__}")
    if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise OptionError(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {top_logprobs}")
    if not logprobs:
        raise OptionError("top_logprobs needs logprobs: true")
    return top_logprobs


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities of raw logits, in float64 (float32 loses the small ones)."""
    x = logits.astype(np.float64)
    x -= x.max()
    return x - np.log(np.exp(x).sum())


def token_entry(token: int, logprobs: np.ndarray, top: int, spell) -> dict:
    """OpenAI's ``{token, logprob, bytes, top_logprobs}`` for one sampled token; ``spell(id)`` gives its bytes."""
    def one(t: int) -> dict:
        raw = spell(t)
        return {"token": raw.decode("utf-8", "replace"), "logprob": float(logprobs[t]), "bytes": list(raw)}

    best: list[int] = []
    if top:
        part = np.argpartition(-logprobs, top - 1)[:top]
        best = sorted(part.tolist(), key=lambda t: -logprobs[t])
    return {**one(token), "top_logprobs": [one(t) for t in best]}


def schema_file_format(path: Any) -> dict:
    """``run --json-schema FILE``: the file's schema as a ``response_format``, checked (and turned into a
    grammar once) before any model loads; a file that is missing, not JSON or not convertible is one line."""
    from pathlib import Path

    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise OptionError(f"--json-schema {path}: cannot read it ({e.strerror or e})") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise OptionError(f"--json-schema {path}: not a JSON file ({str(e).splitlines()[0][:120]})") from None
    schema_grammar(schema, f"--json-schema {path}")
    return {"type": "json_schema", "json_schema": {"name": Path(path).stem, "schema": schema}}
