"""``QwenVL``: the public face of the engine, a bundle that answers questions about photos on a CPU.

The work is done by a ``Session`` (prompts and turns) over an ``ImageEncoder`` (onnxruntime, rows
cache) and a ``Decoder`` (llama.cpp, KV prefix); this class validates arguments, serializes calls
(``CallGuard``: one call at a time, streams included), keeps a chat history, and shapes answers
as ``GenerationResult``s or, through ``create_chat_completion``, as llama-cpp-python's dicts.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qwenvl_edge import validate
from qwenvl_edge.errors import PromptError
from qwenvl_edge.runtime import chat_api, structured
from qwenvl_edge.runtime.bundle import Bundle
from qwenvl_edge.runtime.preprocess import ImageSource, read_image
from qwenvl_edge.runtime.prompt import ImageRef, Turn, Unit
from qwenvl_edge.runtime.results import GenerationResult, Request, Timings
from qwenvl_edge.runtime.serial import CallGuard
from qwenvl_edge.runtime.session import Session
from qwenvl_edge.runtime.store import Store, default_store_dir

__all__ = ["GenerationResult", "ImageRef", "QwenVL", "Timings", "Turn"]

log = logging.getLogger(__name__)

DEFAULT_CACHE = object()  # sentinel: the user's cache folder


class QwenVL:
    """Vision (onnxruntime) + decoder (llama.cpp) over one bundle folder.

    ``keep_vision=False`` releases the ONNX session after each encode, before the decoder loads
    (low-memory devices); ``cache_dir``: the checked store of image rows and prefix states
    (default ``$XDG_CACHE_HOME/qwenvl-edge``; ``None``: nothing on disk); ``use_mmap=True`` maps the
    GGUF (faster start when it is in the page cache) and ``repack=False`` uses its Q4_K weights as they
    are instead of llama.cpp's repacked copy: with both, the load is about 2 s instead of 10 s at full size,
    decoding about 15 % slower (benchmarks/RESULTS.md); ``qwenvl-edge run`` does that, a long-lived
    ``QwenVL`` (chat, serve) reads and repacks. ``seed=None``: sampled answers
    vary from call to call; a seed makes them repeatable (a call's own ``seed`` wins).
    One ``QwenVL`` runs one call at a time: another thread's call waits (see ``serial.py``).
    """

    def __init__(self, bundle_dir: Path | str | None = None, n_threads: int | None = None,
                 n_ctx: int = validate.DEFAULT_N_CTX,
                 *, keep_vision: bool = True, cache_dir=DEFAULT_CACHE, seed: int | None = None,
                 verbose: bool = False, use_mmap: bool = False, repack: bool = True, engines: tuple = (None, None)):
        """``engines``: an ``(ImageEncoder, Decoder)`` pair to use instead of this object's own (a batched
        server's shared vision session and one sequence of its context; see ``runtime/parallel.py``)."""
        self.bundle = Bundle.open(Path(bundle_dir).expanduser() if bundle_dir is not None else None)
        self.info = self.bundle.model
        n_ctx = validate.n_ctx(n_ctx, self.info.seq_length)
        if n_ctx > self.info.seq_length:
            log.warning("n_ctx %d > seq_length %d: llama.cpp has no logn/NTK scaling, answers past %d "
                        "positions differ from the original", n_ctx, self.info.seq_length, self.info.seq_length)
        self.seed = validate.seed(seed)
        self.store = Store(default_store_dir() if cache_dir is DEFAULT_CACHE else cache_dir)
        self.session = Session(self.bundle, self.store, n_ctx=n_ctx, n_threads=validate.n_threads(n_threads),
                               keep_vision=keep_vision, verbose=verbose, use_mmap=use_mmap, repack=repack,
                               encoder=engines[0], decoder=engines[1])
        self.history: list[Turn] = []
        self._guard = CallGuard("QwenVL")
        self.last_result: GenerationResult | None = None

    @property
    def n_ctx(self) -> int:
        return self.session.n_ctx

    def encode_image(self, image: ImageSource) -> np.ndarray:
        """The image's rows ``(n_queries, hidden)`` float32, from the cache when this image was seen before."""
        with self._guard.call():
            return self.session.encoder.rows(read_image(image, "the image", self.info.image_size))

    def release_vision(self) -> None:
        """Free the ONNX session (it is reopened when another image comes)."""
        with self._guard.call():
            self.session.encoder.release()

    def build_prompt(self, images: Sequence[ImageSource], prompt: str, history: Sequence[Turn] = (),
                     reserve: int = 0) -> list[Unit]:
        """Prompt units for a question about ``images`` after ``history``, checked against ``n_ctx``."""
        with self._guard.call():
            return self.session.build(validate.image_list(images), prompt, history, reserve=reserve)

    # --- public API ------------------------------------------------------------------------

    def next_token_logits(self, images: Sequence[ImageSource] = (), prompt: str = "",
                          history: Sequence[Turn] = (), n_positions_limit: int | None = None) -> np.ndarray:
        """Logits ``(vocab,)`` after the prompt (or after its first ``n_positions_limit`` positions)."""
        with self._guard.call():
            return self.session.logits(validate.image_list(images), prompt, history, n_positions_limit)

    def prompt_ids(self, images: Sequence[ImageSource] = (), prompt: str = "",
                   history: Sequence[Turn] = ()) -> list[int]:
        """The prompt's ids with -1 at image-row positions (no evaluation)."""
        from qwenvl_edge.runtime.prompt import ids_with_image_slots

        return ids_with_image_slots(self.build_prompt(images, prompt, history))

    def _request(self, images: Any, prompt: Any, history: Any, max_tokens: Any, temperature: Any, top_p: Any,
                 top_k: Any, stop: Any, seed: Any, system: str | None = None, response_format: Any = None,
                 logprobs: Any = None, top_logprobs: Any = None) -> Request:
        images = validate.image_list(images)
        prompt = validate.question(prompt, "the question")
        if not isinstance(history, (list, tuple)) or not all(isinstance(t, Turn) for t in history):
            raise PromptError("history must be a list of qwenvl_edge.Turn")
        seed = validate.seed(seed)
        if seed is None:
            seed = self.seed if self.seed is not None else secrets.randbits(32)
        temperature = validate.temperature(temperature)
        return Request(images, prompt, list(history),
                        validate.max_tokens(max_tokens) or self.info.max_new_tokens,
                        1.0 if temperature is None else temperature,
                        validate.top_p(top_p) or self.info.top_p,
                        self.info.top_k if top_k is None else validate.top_k(top_k),
                        seed, chat_api.StopStrings(stop), system, structured.grammar_for(response_format),
                        structured.logprob_count(logprobs, top_logprobs))

    def generate(self, images: Sequence[ImageSource] = (), prompt: str = "", history: Sequence[Turn] = (),
                 max_tokens: int | None = None, temperature: float = 1.0, top_p: float | None = None,
                 stream: bool = False, *, top_k: int | None = None, stop: str | Sequence[str] | None = None,
                 seed: int | None = None, response_format: dict | None = None, logprobs: bool = False,
                 top_logprobs: int | None = None) -> GenerationResult | Iterator[str]:
        """Answer ``prompt`` about ``images``; greedy when ``temperature`` is 0.

        Returns a ``GenerationResult``, or with ``stream=True`` an iterator of text pieces
        whose result is in ``self.last_result`` once it is exhausted. ``response_format`` (OpenAI's
        ``json_object`` / ``json_schema``) makes the answer follow a grammar; ``logprobs`` fills
        ``result.logprobs`` with the model's log-probability of each token (and ``top_logprobs`` others).
        """
        request = self._request(images, prompt, history, max_tokens, temperature, top_p, top_k, stop, seed,
                                None, response_format, logprobs, top_logprobs)
        if not stream:
            with self._guard.call():
                pieces = self._start(request)
                for _ in pieces:
                    pass
                return self.last_result
        return self._streamed(lambda: self._start(request))

    def _streamed(self, start) -> Iterator:
        """Run ``start()`` under the lock (errors raise here), then hand the lock to the stream it returns."""
        self._guard.acquire_for_stream()
        try:
            inner = start()
        except BaseException:
            self._guard.release_unstreamed()
            raise
        return self._guard.stream(inner)

    def create_chat_completion(self, messages: list[dict], stream: bool = False, max_tokens: int | None = None,
                               temperature: float | None = None, top_p: float | None = None,
                               top_k: int | None = None, stop: str | list[str] | None = None,
                               seed: int | None = None, cancel: Callable[[], bool] | None = None,
                               response_format: dict | None = None, logprobs: bool | None = None,
                               top_logprobs: int | None = None,
                               on_result: Callable[[GenerationResult], None] | None = None) -> dict | Iterator[dict]:
        """OpenAI-style chat, shaped as ``llama_cpp.Llama.create_chat_completion`` returns it.

        ``messages``: system/user/assistant dicts; content a string or ``text`` / ``image_url`` parts.
        Earlier assistant turns are history (their KV prefix is reused when a conversation is resent
        with one more turn). Each choice carries ``boxes``: grounding boxes in pixels of the newest
        user message's first image. ``temperature`` None: the model's sampling (1.0, top_p 0.3).
        ``cancel``: asked between images, prefill batches and tokens; when it returns True the call
        (or the stream) raises ``CancelledError`` there and the model is free for the next call.
        ``response_format``: ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema":
        {"name", "schema", "strict"}}``, enforced by a llama.cpp grammar; ``logprobs`` / ``top_logprobs``
        (0..20): OpenAI's ``choices[0].logprobs.content``, of the model's own distribution.
        ``on_result``: called with the finished ``GenerationResult`` (its timings), before the last chunk.
        """
        conv = chat_api.parse_messages(messages)
        request = self._request(conv.images, conv.question, conv.history, max_tokens, temperature, top_p, top_k,
                                stop, seed, conv.system, response_format, logprobs, top_logprobs)
        ident = chat_api.new_id()
        model = str(self.bundle.llm_path)
        if not stream:
            with self._guard.call():
                for _ in self._start(request, cancel):
                    pass
                r = self.last_result
            if on_result is not None:
                on_result(r)
            return chat_api.completion(ident, model, r.text, r.finish_reason, [b.to_dict() for b in r.boxes],
                                       _usage(r), r.logprobs)

        def chunks(pieces: Iterator[str]) -> Iterator[dict]:
            sent = 0

            def new_logprobs() -> list[dict] | None:  # the tokens decoded since the last chunk
                nonlocal sent
                entries, sent = request.logprob_entries[sent:], len(request.logprob_entries)
                return None if request.logprobs is None else entries

            yield chat_api.chunk(ident, model, {"role": "assistant"})
            for piece in pieces:
                yield chat_api.chunk(ident, model, {"content": piece}, logprobs=new_logprobs())
            r = self.last_result
            if on_result is not None:
                on_result(r)
            yield chat_api.chunk(ident, model, {}, r.finish_reason, [b.to_dict() for b in r.boxes], _usage(r),
                                 new_logprobs())

        return self._streamed(lambda: chunks(self._start(request, cancel)))

    def chat(self, prompt: str, images: Sequence[ImageSource] = (), **kwargs) -> GenerationResult | Iterator[str]:
        """One turn of a conversation that remembers earlier turns (and keeps their KV cache)."""
        stream = kwargs.pop("stream", False)
        request = self._request(images, prompt, self.history, kwargs.pop("max_tokens", None),
                                kwargs.pop("temperature", 1.0), kwargs.pop("top_p", None), kwargs.pop("top_k", None),
                                kwargs.pop("stop", None), kwargs.pop("seed", None))
        if kwargs:
            raise TypeError(f"chat() got unexpected arguments {sorted(kwargs)}")

        def remembered() -> Iterator[str]:
            pieces = self._start(request)

            def run() -> Iterator[str]:
                yield from pieces
                self.history.append(Turn(request.prompt, self.last_result.images, self.last_result.text))
            return run()

        if not stream:
            with self._guard.call():
                for _ in remembered():
                    pass
                return self.last_result
        return self._streamed(remembered)

    def reset(self) -> None:
        """Forget the conversation (history and KV cache)."""
        with self._guard.call():
            self.history.clear()
            self.session.reset()

    def _start(self, r: Request, cancel: Callable[[], bool] | None = None) -> Iterator[str]:
        """Encode and prefill now (errors raise here); the iterator decodes and sets ``last_result`` at its end."""
        pieces, holder = self.session.start(r, cancel)

        def run() -> Iterator[str]:
            yield from pieces
            self.last_result = holder["result"]
        return run()

    def close(self) -> None:
        """Free both engines; a later call raises ``QwenVLError`` (safe to call twice)."""
        self._guard.close(self.session.close)

    def __enter__(self) -> QwenVL:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _usage(r: GenerationResult) -> dict:
    return chat_api.usage(r.prompt_positions, len(r.token_ids), r.timings.reused_positions)
