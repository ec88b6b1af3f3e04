"""``QwenVL``: a bundle that answers questions about photos on a CPU.

Flow of one turn: images -> rows (onnxruntime, or the embedding cache) -> prompt units
(``PromptBuilder``) -> prefill (``LlamaRunner``: token runs and image rows at their
positions) -> sampling until a stop token. The units already in the KV cache are
remembered, so a follow-up turn re-evaluates only what differs; images are compared by
content hash, never by their placeholder ids.
"""

from __future__ import annotations

import codecs
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from qwenvl_edge.errors import BundleError, PromptError
from qwenvl_edge.runtime.boxes import Box, parse_boxes
from qwenvl_edge.runtime.bundle import Bundle
from qwenvl_edge.runtime.embedding_cache import ImageEmbeddingCache, default_cache_dir, image_key
from qwenvl_edge.runtime.llm import LlamaRunner
from qwenvl_edge.runtime.prompt import ImageRef, PromptBuilder, Turn, Unit, n_positions

log = logging.getLogger(__name__)

ImageInput = Path | str | Image.Image
DEFAULT_CACHE = object()  # sentinel: the user's cache folder


@dataclass
class Timings:
    """Where the time of one answer went (seconds), and how much was re-used."""

    image_encode_s: float = 0.0
    images_encoded: int = 0
    images_from_cache: int = 0
    prefill_s: float = 0.0
    prefill_positions: int = 0
    reused_positions: int = 0
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
    text: str
    token_ids: list[int]
    boxes: list[Box]
    timings: Timings
    prompt_positions: int
    stop_reason: str  # "stop_token" | "max_tokens" | "context_full"
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    images: tuple[ImageRef, ...] = ()  # this turn's images, as a chat history remembers them

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "boxes": [b.to_dict() for b in self.boxes],
                "timings": self.timings.to_dict(), "prompt_positions": self.prompt_positions,
                "stop_reason": self.stop_reason}


class QwenVL:
    """Vision (onnxruntime) + decoder (llama.cpp) over one bundle folder.

    ``keep_vision=False`` releases the ONNX session after each encode, before the decoder loads
    (low-memory devices); ``cache_dir=None`` keeps image rows in memory only; ``use_mmap=True``
    maps the GGUF (faster start when it is in the page cache, higher RSS).
    """

    def __init__(self, bundle_dir: Path | str | None = None, n_threads: int | None = None, n_ctx: int = 2048,
                 *, keep_vision: bool = True, cache_dir=DEFAULT_CACHE, seed: int = 0, verbose: bool = False,
                 use_mmap: bool = False):
        self.bundle = Bundle.open(bundle_dir)
        self.info = self.bundle.model
        self.n_threads = n_threads
        self.keep_vision = keep_vision
        if n_ctx > self.info.seq_length:
            log.warning("n_ctx %d > seq_length %d: llama.cpp has no logn/NTK scaling, answers past %d "
                        "positions differ from the original", n_ctx, self.info.seq_length, self.info.seq_length)
        self.n_ctx = n_ctx
        self.seed = seed
        self.verbose = verbose
        self.use_mmap = use_mmap  # False: lower RSS (no double-counted pages); True: faster load from page cache
        self._llm: LlamaRunner | None = None  # loaded on first use: images of a turn are encoded first
        self._prompts: PromptBuilder | None = None
        folder = default_cache_dir() if cache_dir is DEFAULT_CACHE else cache_dir
        self.cache = ImageEmbeddingCache(self.bundle.vision_sha256, folder)
        self.history: list[Turn] = []
        self._vision = None
        self._context: list[Unit] = []  # what the KV cache holds, position by position
        self._boxes_size: tuple[int, int] | None = None  # boxes refer to the newest turn's first image

    # --- the decoder, loaded on first use --------------------------------------------------

    @property
    def llm(self) -> LlamaRunner:
        """The llama.cpp decoder; loaded after the first turn's images are encoded, so that with
        ``keep_vision=False`` the vision session is gone before the decoder's weights arrive."""
        if self._llm is None:
            llm = LlamaRunner(self.bundle.llm_path, n_ctx=self.n_ctx, n_threads=self.n_threads, seed=self.seed,
                              verbose=self.verbose, use_mmap=self.use_mmap)
            if llm.n_embd != self.info.hidden_size or llm.n_vocab != self.info.vocab_size:
                llm.close()
                raise BundleError(f"{self.bundle.llm_path}: width {llm.n_embd} / vocab {llm.n_vocab}, manifest says "
                                  f"{self.info.hidden_size} / {self.info.vocab_size}: parts from different exports")
            self._llm = llm
        return self._llm

    @property
    def prompts(self) -> PromptBuilder:
        if self._prompts is None:
            self._prompts = PromptBuilder(self.info, self.llm.tokenize_plain)
        return self._prompts

    # --- images ----------------------------------------------------------------------------

    def _vision_encoder(self):
        if self._vision is None:
            from qwenvl_edge.runtime.vision import VisionEncoder

            self._vision = VisionEncoder(self.bundle.vision_path, n_threads=self.n_threads)
            if self._vision.hidden_size != self.info.hidden_size:
                width = self._vision.hidden_size
                self._vision.close()
                self._vision = None
                raise BundleError(f"{self.bundle.vision_path}: rows are {width} wide but the decoder takes "
                                  f"{self.info.hidden_size}: bundle parts from different checkpoints")
        return self._vision

    def _load(self, image: ImageInput) -> Image.Image:
        from qwenvl_edge.runtime.preprocess import load_image

        return load_image(image)

    def encode_image(self, image: ImageInput, timings: Timings | None = None) -> np.ndarray:
        """The image's rows ``(256, hidden)`` float32, from the cache when this image was seen before."""
        return self._encode(self._key(image), image, timings)

    def _encode(self, key: str, image: ImageInput, timings: Timings | None) -> np.ndarray:
        rows = self.cache.get(key)
        if rows is not None:
            if timings:
                timings.images_from_cache += 1
            return rows
        from qwenvl_edge.runtime.preprocess import preprocess_image

        started = time.perf_counter()
        pixels = preprocess_image(self._load(image), self.info.image_size)  # (3, S, S)
        rows = self._vision_encoder().encode(pixels[None])[0]  # (256, hidden)
        if not self.keep_vision:
            self.release_vision()
        self.cache.put(key, rows)
        if timings:
            timings.image_encode_s += time.perf_counter() - started
            timings.images_encoded += 1
        return rows

    def _key(self, image: ImageInput) -> str:
        try:
            return image_key(image)
        except OSError as e:
            from qwenvl_edge.errors import ImageError

            raise ImageError(f"{image}: cannot read ({e.strerror or e})") from None

    def release_vision(self) -> None:
        """Free the ONNX session (it is reopened when another image comes)."""
        if self._vision is not None:
            self._vision.close()
            self._vision = None

    # --- prompt and prefill ----------------------------------------------------------------

    def _ref(self, image: ImageInput) -> ImageRef:
        return ImageRef(self._key(image), self.info.n_queries)

    def _units(self, refs: tuple[ImageRef, ...], prompt: str, history: Sequence[Turn], reserve: int) -> list[Unit]:
        return self.prompts.build(Turn(prompt, refs), history, n_ctx=self.llm.n_ctx, reserve=reserve)

    def build_prompt(self, images: Sequence[ImageInput], prompt: str, history: Sequence[Turn] = (),
                     reserve: int = 0) -> list[Unit]:
        """Prompt units for a question about ``images`` after ``history``, checked against ``n_ctx``."""
        return self._units(tuple(self._ref(image) for image in images), prompt, history, reserve)

    def _encode_turn(self, images: Sequence[ImageInput],
                     timings: Timings) -> tuple[tuple[ImageRef, ...], dict[str, np.ndarray]]:
        """This turn's image refs and rows, before the decoder loads (fails fast if they cannot fit)."""
        need = len(images) * (self.info.n_queries + 2)
        if need > self.n_ctx:
            raise PromptError(f"{len(images)} image(s) need {need} positions but the context holds {self.n_ctx}")
        refs = tuple(self._ref(image) for image in images)
        return refs, {ref.key: self._encode(ref.key, image, timings) for ref, image in zip(refs, images, strict=True)}

    def _prefill(self, units: list[Unit], encoded: dict[str, np.ndarray], timings: Timings) -> None:
        """Bring the KV cache to ``units``: keep the common prefix, evaluate the rest.

        ``encoded`` holds this turn's rows; an earlier turn's image comes from the rows cache.
        """
        keep = 0
        for have, want in zip(self._context, units, strict=False):
            if have != want:
                break
            keep += 1
        if keep == len(units):  # identical prompt: re-evaluate the last token to get its logits
            keep -= 1
        reused = n_positions(units[:keep])
        self.llm.truncate(reused)
        self._context = units[:keep]  # until the rest is in: a failure below leaves a true prefix
        timings.reused_positions = reused
        rows = {u.key: encoded[u.key] if u.key in encoded else self._cached_rows(u.key)
                for u in units[keep:] if isinstance(u, ImageRef)}
        started = time.perf_counter()
        run: list[int] = []
        for unit in units[keep:]:
            if isinstance(unit, ImageRef):
                self.llm.eval_tokens(run)
                run = []
                self.llm.eval_embeddings(rows[unit.key])
            else:
                run.append(unit)
        self.llm.eval_tokens(run)
        self._context = list(units)
        timings.prefill_s += time.perf_counter() - started
        timings.prefill_positions += n_positions(units) - reused

    def _cached_rows(self, key: str) -> np.ndarray:
        rows = self.cache.get(key)
        if rows is None:
            raise PromptError("an image of an earlier turn is no longer cached; start a new chat")
        return rows

    # --- public API ------------------------------------------------------------------------

    def next_token_logits(self, images: Sequence[ImageInput] = (), prompt: str = "",
                          history: Sequence[Turn] = (), n_positions_limit: int | None = None) -> np.ndarray:
        """Logits ``(vocab,)`` after the prompt (or after its first ``n_positions_limit`` positions)."""
        timings = Timings()
        refs, encoded = self._encode_turn(images, timings)
        units = self._units(refs, prompt, history, reserve=0)
        if n_positions_limit is not None:
            units = _cut_units(units, n_positions_limit)
        self._prefill(units, encoded, timings)
        return self.llm.last_logits()

    def prompt_ids(self, images: Sequence[ImageInput] = (), prompt: str = "",
                   history: Sequence[Turn] = ()) -> list[int]:
        """The prompt's ids with -1 at image-row positions (no evaluation)."""
        from qwenvl_edge.runtime.prompt import ids_with_image_slots

        return ids_with_image_slots(self.build_prompt(images, prompt, history))

    def generate(self, images: Sequence[ImageInput] = (), prompt: str = "", history: Sequence[Turn] = (),
                 max_tokens: int | None = None, temperature: float = 1.0, top_p: float | None = None,
                 stream: bool = False) -> GenerationResult | Iterator[str]:
        """Answer ``prompt`` about ``images``; greedy when ``temperature`` is 0.

        Returns a ``GenerationResult``, or with ``stream=True`` an iterator of text pieces
        whose result is in ``self.last_result`` once it is exhausted.
        """
        pieces = self._generate(list(images), prompt, list(history), max_tokens, temperature, top_p)
        if stream:
            return pieces
        for _ in pieces:
            pass
        return self.last_result

    def chat(self, prompt: str, images: Sequence[ImageInput] = (), **kwargs) -> GenerationResult | Iterator[str]:
        """One turn of a conversation that remembers earlier turns (and keeps their KV cache)."""
        kwargs.setdefault("stream", False)
        stream = kwargs["stream"]
        result = self.generate(images, prompt, self.history, **kwargs)

        def remember(answer: str) -> None:
            self.history.append(Turn(prompt, self.last_result.images, answer))

        if not stream:
            remember(result.text)
            return result

        def streamed() -> Iterator[str]:
            yield from result
            remember(self.last_result.text)
        return streamed()

    def reset(self) -> None:
        """Forget the conversation (history and KV cache)."""
        self.history.clear()
        self._context.clear()
        self._boxes_size = None
        if self._llm is not None:
            self._llm.truncate(0)

    def _generate(self, images: list[ImageInput], prompt: str, history: list[Turn], max_tokens: int | None,
                  temperature: float, top_p: float | None) -> Iterator[str]:
        started = time.perf_counter()
        timings = Timings()
        budget = max_tokens if max_tokens is not None else self.info.max_new_tokens
        if budget < 1:
            raise PromptError(f"max_tokens must be at least 1, got {budget}")
        if not prompt.strip():
            raise PromptError("the question is empty")
        refs, encoded = self._encode_turn(images, timings)
        units = self._units(refs, prompt, history, reserve=1)
        sizes = [display_size(image) for image in images]
        if sizes:
            self._boxes_size = sizes[0]
        self._prefill(units, encoded, timings)
        sampler = self.llm.make_sampler(temperature, self.info.top_p if top_p is None else top_p, self.info.top_k)
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        ids: list[int] = []
        text: list[str] = []
        stop_reason = "max_tokens"
        decode_started = None
        while len(ids) < budget:
            token = self.llm.sample(sampler)
            if decode_started is None:
                decode_started = time.perf_counter()
                timings.ttft_s = decode_started - started
            if token in self.info.stop_ids:
                stop_reason = "stop_token"
                break
            ids.append(token)
            piece = decoder.decode(self.llm.token_bytes(token))
            if piece:
                text.append(piece)
                yield piece
            if self.llm.n_past >= self.llm.n_ctx:
                stop_reason = "context_full"
                break
            if len(ids) < budget:
                self.llm.eval_tokens([token])
                self._context.append(token)
        tail = decoder.decode(b"", final=True)
        if tail:
            text.append(tail)
            yield tail
        timings.decode_tokens = len(ids)
        timings.decode_s = time.perf_counter() - decode_started if decode_started else 0.0
        answer = "".join(text)
        boxes = parse_boxes(answer, *self._boxes_size) if self._boxes_size else []
        self.last_result = GenerationResult(answer, ids, boxes, timings, n_positions(units), stop_reason, sizes, refs)

    def close(self) -> None:
        self.release_vision()
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    def __enter__(self) -> QwenVL:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def display_size(image: ImageInput) -> tuple[int, int]:
    """Width and height as the model sees the image: after EXIF rotation, without decoding pixels."""
    if isinstance(image, Image.Image):
        return image.size
    try:
        with Image.open(image) as im:
            width, height = im.size
            orientation = im.getexif().get(0x0112, 1)
    except (OSError, ValueError, Image.DecompressionBombError):
        return (0, 0)  # load_image reports the real problem when the image is encoded
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _cut_units(units: list[Unit], limit: int) -> list[Unit]:
    """The leading units that cover exactly ``limit`` positions (an image is never cut in two)."""
    out: list[Unit] = []
    for unit in units:
        if n_positions(out) >= limit:
            break
        out.append(unit)
    if n_positions(out) != limit:
        raise PromptError(f"position {limit} falls inside an image")
    return out
