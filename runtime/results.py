"""What one turn asks for (``Request``) and what it gives back (``GenerationResult`` with ``Timings``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from qwenvl_edge.runtime.boxes import Box
from qwenvl_edge.runtime.prompt import ImageRef, Turn


@dataclass
class Timings:
    """Where the time of one answer went (seconds), and how much was re-used."""

    image_encode_s: float = 0.0
    images_encoded: int = 0
    images_from_cache: int = 0
    load_s: float = 0.0  # decoder load during this turn (the first one only)
    prefill_s: float = 0.0
    prefill_positions: int = 0
    reused_positions: int = 0  # kept in the KV cache or restored from a stored prefix state
    restored_positions: int = 0  # of which restored from the store (another process's work)
    ttft_s: float = 0.0
    decode_s: float = 0.0
    decode_tokens: int = 0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill_positions / self.prefill_s if self.prefill_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "decode_tok_s": self.decode_tok_s, "prefill_tok_s": self.prefill_tok_s}


@dataclass
class GenerationResult:
    """One answer. ``finish_reason`` is ``stop`` (stop token or stop string) or ``length``."""

    text: str
    token_ids: list[int]
    boxes: list[Box]
    timings: Timings
    prompt_positions: int
    finish_reason: str
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    images: tuple[ImageRef, ...] = ()  # this turn's images, as a chat history remembers them
    logprobs: list[dict] | None = None  # OpenAI's logprobs.content entries, when asked for

    def to_dict(self) -> dict:
        out = {"text": self.text, "token_ids": self.token_ids, "boxes": [b.to_dict() for b in self.boxes],
               "timings": self.timings.to_dict(), "prompt_positions": self.prompt_positions,
               "finish_reason": self.finish_reason}
        if self.logprobs is not None:
            out["logprobs"] = self.logprobs
        return out


@dataclass
class Request:
    """A validated generation request (``QwenVL._request`` makes it)."""

    images: list[Any]
    prompt: str
    history: list[Turn]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: Any  # chat_api.StopStrings
    system: str | None = None
    grammar: str | None = None  # GBNF the answer must follow (structured.grammar_for)
    logprobs: int | None = None  # alternatives per token to report; None: no log-probabilities
    logprob_entries: list[dict] = field(default_factory=list)  # filled token by token while decoding
