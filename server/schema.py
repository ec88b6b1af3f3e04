"""The request body of ``POST /v1/chat/completions``, checked for shape before anything else runs.

Only the structure is checked here (types, which roles and part types exist); the values the
engine owns (temperature range, max_tokens, the question text) are checked by the engine's
validation before it touches the model. Fields OpenAI clients send that do not change the
answer (``user``, ...) are accepted and ignored, as llama-cpp-python does.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

Number = StrictFloat | StrictInt


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Strict):
    url: StrictStr
    detail: StrictStr | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL | StrictStr

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: StrictStr | list[Part] | None = None
    name: StrictStr | None = None


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class ChatRequest(_Strict):
    model: StrictStr | None = None
    messages: list[Message] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    n: StrictInt | None = None
    response_format: dict[str, Any] | None = None  # checked (and made a grammar) by the engine's structured.py
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None

    def engine_args(self) -> dict[str, Any]:
        """The sampling arguments in ``QwenVL.create_chat_completion``'s names."""
        return {"max_tokens": self.max_completion_tokens if self.max_tokens is None else self.max_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "stop": self.stop, "seed": self.seed, "response_format": self.response_format,
                "logprobs": self.logprobs, "top_logprobs": self.top_logprobs}

    def image_parts(self) -> list[tuple[str, ImagePart]]:
        """Every image part with its ``param`` path, in order."""
        return [(f"messages[{i}].content[{j}]", part) for i, m in enumerate(self.messages)
                if isinstance(m.content, list) for j, part in enumerate(m.content) if isinstance(part, ImagePart)]


def engine_messages(request: ChatRequest, urls: dict[int, str]) -> list[dict[str, Any]]:
    """The messages as plain OpenAI dicts, each image's URL replaced by the one the server resolved
    (keyed by ``id`` of the part): the engine only ever sees images the server has checked."""
    out = []
    for m in request.messages:
        if isinstance(m.content, list):
            content: Any = [{"type": "text", "text": p.text} if isinstance(p, TextPart)
                            else {"type": "image_url", "image_url": {"url": urls[id(p)]}} for p in m.content]
        else:
            content = m.content
        out.append({"role": m.role, "content": content})
    return out


FIELD_NAMES = frozenset(name for cls in (ChatRequest, Message, TextPart, ImagePart, ImageURL, StreamOptions)
                        for name in cls.model_fields)
