"""OpenAI-style chat messages in, llama-cpp-python-shaped completions out.

``parse_messages`` turns ``[{"role": "system"|"user"|"assistant", "content": str | parts}]`` into a
``Conversation`` (system prompt, earlier turns as ``Turn``s, the open question and its images);
parts are ``{"type": "text", "text": ...}`` and ``{"type": "image_url", "image_url": {"url": ...}}``
with a ``data:`` URI, a ``file://`` URL or a local path (``{"type": "image", "image": obj}`` takes any
image object the Python API takes). ``completion`` and ``chunk`` build the dicts exactly as
``llama_cpp.Llama.create_chat_completion`` returns them, plus ``boxes`` per choice.
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from qwenvl_edge.errors import ImageError, PromptError
from qwenvl_edge.runtime.prompt import Turn


@dataclass
class Conversation:
    """Messages as the engine takes them: the system prompt, the earlier turns, the open question."""

    system: str | None
    history: list[Turn]
    question: str
    images: list[Any] = field(default_factory=list)


def image_from_url(url: Any) -> Any:
    """``data:`` URI -> bytes, ``file://`` URL or plain path -> Path; remote URLs are refused (no network)."""
    if not isinstance(url, str) or not url:
        raise ImageError(f"image_url must be a non-empty string, got {type(url).__name__}")
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ImageError("image_url: a data URI must be base64 encoded (data:image/png;base64,...)")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ImageError("image_url: the data URI is not valid base64") from None
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme in ("http", "https", "ftp"):
        raise ImageError(f"image_url: {url[:80]}: remote images are not fetched; pass a data URI or a local path")
    return Path(url)


def _content(content: Any, role: str, where: str) -> tuple[str, list[Any]]:
    """A message's text and images; images are allowed in user messages only."""
    if isinstance(content, str):
        return content, []
    if content is None:
        return "", []
    if not isinstance(content, (list, tuple)):
        raise PromptError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}")
    texts: list[str] = []
    images: list[Any] = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("image_url", "image") and role == "user":
            value = part.get(kind)
            images.append(image_from_url(value.get("url") if isinstance(value, dict) else value)
                          if kind == "image_url" else value)
        else:
            raise PromptError(f"{where}: part {i} is not a text part or (in a user message) an image part")
    return "".join(texts), images


def parse_messages(messages: Any) -> Conversation:
    """OpenAI-style messages -> ``Conversation``; the last message must be the user's."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise PromptError("messages must be a non-empty list of {'role', 'content'} dicts")
    system: str | None = None
    history: list[Turn] = []
    pending: tuple[str, list[Any]] | None = None
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise PromptError(f"messages[{i}] must be a dict with 'role' and 'content'")
        role, where = message["role"], f"messages[{i}]"
        text, images = _content(message.get("content"), role, where)
        if role == "system":
            if i != 0:
                raise PromptError(f"{where}: a system message may only come first")
            system = text
        elif role == "user":
            if pending is not None:  # two user messages in a row: one turn, as the original joins them
                text, images = pending[0] + "\n" + text, pending[1] + images
            pending = (text, images)
        elif role == "assistant":
            if pending is None:
                raise PromptError(f"{where}: an assistant message must follow a user message")
            history.append(Turn(pending[0], tuple(pending[1]), text))
            pending = None
        else:
            raise PromptError(f"{where}: role must be system, user or assistant, got {role!r}")
    if pending is None:
        raise PromptError("the last message must be the user's question")
    return Conversation(system, history, pending[0], pending[1])


def new_id() -> tuple[str, int]:
    """A completion id and creation time, as llama-cpp-python makes them."""
    return f"chatcmpl-{uuid.uuid4()}", int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """Token counts (image rows count as prompt positions); ``cached_tokens``: positions the KV cache re-used."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion(request: tuple[str, int], model: str, text: str, finish_reason: str, boxes: Sequence[dict],
               counts: dict, logprobs: list[dict] | None = None) -> dict:
    """One ``chat.completion`` object (``counts`` from ``usage``; ``logprobs``: the tokens' entries, if asked)."""
    return {"id": request[0], "object": "chat.completion", "created": request[1], "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None if logprobs is None else {"content": logprobs},
                         "finish_reason": finish_reason, "boxes": list(boxes)}],
            "usage": counts}


def chunk(request: tuple[str, int], model: str, delta: dict, finish_reason: str | None = None,
          boxes: Sequence[dict] | None = None, counts: dict | None = None, logprobs: list[dict] | None = None
          ) -> dict:
    """One ``chat.completion.chunk``: the role first, then content pieces, then ``{}`` with the finish reason
    (and, on that last chunk, ``boxes`` and ``usage``); ``logprobs``: the entries of the tokens since the last."""
    choice: dict[str, Any] = {"index": 0, "delta": delta,
                              "logprobs": None if logprobs is None else {"content": logprobs},
                              "finish_reason": finish_reason}
    if boxes is not None:
        choice["boxes"] = list(boxes)
    out = {"id": request[0], "model": model, "created": request[1], "object": "chat.completion.chunk",
           "choices": [choice]}
    if counts is not None:
        out["usage"] = counts
    return out


class StopStrings:
    """Cuts the answer at the first stop string (not included), holding back text that may start one."""

    def __init__(self, stop: str | Sequence[str] | None):
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        elif not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise PromptError("stop must be a string or a list of strings")
        self.stop = [s for s in stop if s]
        self.text = ""
        self.sent = 0
        self.hit = False

    def feed(self, piece: str) -> str:
        """Add decoded text; return what may be sent now."""
        self.text += piece
        if not self.stop:
            return self._send(len(self.text))
        cut = min((i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.hit = True
            self.text = self.text[:cut]
            return self._send(cut)
        hold = max((n for s in self.stop for n in range(1, len(s)) if self.text.endswith(s[:n])), default=0)
        return self._send(len(self.text) - hold)

    def flush(self) -> str:
        return self._send(len(self.text))

    def _send(self, end: int) -> str:
        out = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out
