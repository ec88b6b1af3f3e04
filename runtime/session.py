"""A session: builds prompts and runs turns over an ``ImageEncoder`` and a ``Decoder``.

Order of one turn (the low-memory order: the vision session and the decoder never need to be
resident together): read each image once (content key, size) -> build the prompt with a
vocab-only tokenizer -> find what is already evaluated (the decoder's KV cache in this process,
else the longest stored prefix state up to an image, from an earlier process) -> encode only
the images after that -> load the decoder -> restore / evaluate -> sample.
After an image prefix is evaluated its KV state is written to the store (in the background),
keyed by the GGUF's fingerprint, the vision model and the exact prefix units.
"""

from __future__ import annotations

import codecs
import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from qwenvl_edge import contract
from qwenvl_edge.errors import BundleError, PromptError
from qwenvl_edge.runtime.boxes import parse_boxes
from qwenvl_edge.runtime.bundle import Bundle
from qwenvl_edge.runtime.decoder import Decoder, Tokenizer, load_model
from qwenvl_edge.runtime.image_encoder import ImageEncoder
from qwenvl_edge.runtime.preprocess import ImageData, read_image
from qwenvl_edge.runtime.prompt import ImageRef, PromptBuilder, Turn, Unit, n_positions
from qwenvl_edge.runtime.results import GenerationResult, Request, Timings
from qwenvl_edge.runtime.store import Expect, Store, entry_key

log = logging.getLogger(__name__)

STATE = Expect("uint8", (None,))


def image_cuts(units: Sequence[Unit]) -> list[int]:
    """Unit counts that end right after an image's rows: where a prefix state is worth keeping.

    Cutting there keeps the evaluation in the same batches as one uninterrupted prefill.
    """
    return [i + 1 for i, unit in enumerate(units) if isinstance(unit, ImageRef)]


class Session:
    """One bundle's engines, loaded on first need, and the prompt logic between them."""

    def __init__(self, bundle: Bundle, store: Store, n_ctx: int = 2048, n_threads: int | None = None,
                 keep_vision: bool = True, verbose: bool = False, use_mmap: bool = False):
        self.bundle = bundle
        self.info = bundle.model
        self.store = store
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.verbose = verbose
        self.use_mmap = use_mmap
        self.encoder = ImageEncoder(bundle.vision_path, bundle.vision_sha256, self.info.hidden_size,
                                    self.info.n_queries, self.info.image_size, store, n_threads, keep_vision)
        self._decoder: Decoder | None = None
        self._vocab: Tokenizer | None = None
        self.prompts = PromptBuilder(self.info, lambda text: self.tokenizer(text))
        self.boxes_size: tuple[int, int] | None = None  # boxes refer to the newest turn's first image
        self._saver: threading.Thread | None = None
        self.fingerprint = self._fingerprint()

    # --- engines ---------------------------------------------------------------------------

    def _fingerprint(self) -> str:
        """The GGUF's identity: its manifest checksum, size and modification time (no 5 GB hash per run)."""
        path = self.bundle.llm_path
        st = path.stat()
        sha = self.bundle.manifest["files"].get(path.name, {}).get("sha256", "")
        return f"{sha}:{st.st_size}:{st.st_mtime_ns}"

    @property
    def tokenizer(self) -> Tokenizer:
        """The decoder's vocabulary, or a vocab-only model until the decoder is loaded."""
        if self._decoder is not None:
            return self._decoder.tokenizer
        if self._vocab is None:
            model = load_model(self.bundle.llm_path, vocab_only=True, verbose=self.verbose)
            self._vocab = Tokenizer(model)
            if model.n_vocab() != self.info.vocab_size:
                self._drop_vocab()
                raise BundleError(f"{self.bundle.llm_path}: vocab {model.n_vocab()}, manifest says "
                                  f"{self.info.vocab_size}: parts from different exports")
            check_metadata(self._vocab.metadata(), self.info, self.bundle.llm_path)
        return self._vocab

    def _drop_vocab(self) -> None:
        if self._vocab is not None:
            self._vocab.model.close()
            self._vocab = None

    @property
    def loaded(self) -> bool:
        return self._decoder is not None

    def decoder(self, timings: Timings | None = None) -> Decoder:
        """The llama.cpp decoder, loaded on first use (after this turn's images are encoded)."""
        if self._decoder is None:
            started = time.perf_counter()
            decoder = Decoder(self.bundle.llm_path, n_ctx=self.n_ctx, n_threads=self.n_threads,
                              verbose=self.verbose, use_mmap=self.use_mmap)
            if decoder.n_embd != self.info.hidden_size or decoder.n_vocab != self.info.vocab_size:
                decoder.close()
                raise BundleError(f"{self.bundle.llm_path}: width {decoder.n_embd} / vocab {decoder.n_vocab}, "
                                  f"manifest says {self.info.hidden_size} / {self.info.vocab_size}: "
                                  "parts from different exports")
            self._decoder = decoder
            self._drop_vocab()
            if timings:
                timings.load_s += time.perf_counter() - started
        return self._decoder

    # --- prompts ---------------------------------------------------------------------------

    def read(self, images: Sequence[Any], datas: dict[str, ImageData]) -> tuple[ImageRef, ...]:
        """Refs of ``images`` (``ImageRef``s pass through); each new image's data goes into ``datas``."""
        refs = []
        for image in images:
            if isinstance(image, ImageRef):
                refs.append(image)
                continue
            data = read_image(image)
            datas.setdefault(data.key, data)
            refs.append(ImageRef(data.key, self.info.n_queries, data.size))
        return tuple(refs)

    def build(self, images: Sequence[Any], question: str, history: Sequence[Turn], system: str | None = None,
              reserve: int = 0) -> tuple[list[Unit], tuple[ImageRef, ...], list[Turn], dict[str, ImageData]]:
        """The prompt's units, this turn's refs, the history with refs, and the data of images read."""
        need = len(images) * contract.POSITIONS_PER_IMAGE
        if need > self.n_ctx:
            raise PromptError(f"{len(images)} image(s) need {need} positions but the context holds {self.n_ctx}")
        datas: dict[str, ImageData] = {}
        refs = self.read(images, datas)
        turns = [Turn(t.question, self.read(t.images, datas), t.answer) for t in history]
        units = self.prompts.build(Turn(question, refs), turns, system=system, n_ctx=self.n_ctx, reserve=reserve)
        return units, refs, turns, datas

    # --- prefill ---------------------------------------------------------------------------

    def prefix_key(self, units: Sequence[Unit]) -> str:
        import llama_cpp

        flat = [u if isinstance(u, int) else f"img:{u.key}:{u.n_rows}" for u in units]
        return entry_key("prefix", self.fingerprint, self.bundle.vision_sha256, llama_cpp.__version__,
                         str(self.n_ctx), json.dumps(flat))

    def prefill(self, units: list[Unit], datas: dict[str, ImageData], timings: Timings) -> None:
        """Bring the decoder's KV cache to ``units``: reuse, restore, encode and evaluate only what is new."""
        kept = self._decoder.common_prefix(units) if self._decoder is not None else 0
        cuts = [c for c in image_cuts(units) if c > kept]
        restore = next((c for c in reversed(cuts) if self.store.has("prefix", self.prefix_key(units[:c]))), None)
        start = max(kept, restore or 0)
        rows = {u.key: self._rows(u, datas, timings) for u in units[start:] if isinstance(u, ImageRef)}
        decoder = self.decoder(timings)
        if restore is not None:
            key = self.prefix_key(units[:restore])
            state = self.store.get("prefix", key, STATE)
            if state is not None and decoder.load_state(state, units[:restore]):
                timings.restored_positions = n_positions(units[:restore])
            elif state is not None:  # checked fine but llama.cpp refused it (another llama.cpp build)
                self.store.drop("prefix", key)
                log.warning("llama.cpp refused a stored prefix state; evaluating the prompt instead")

        def rows_of(ref: ImageRef) -> np.ndarray:
            if ref.key not in rows:
                rows[ref.key] = self._rows(ref, datas, timings)
            return rows[ref.key]

        started = time.perf_counter()
        evaluated_before = decoder.n_evaluated
        save = next((c for c in reversed(cuts) if c > decoder.common_prefix(units)), None)
        if save is not None and self.store.folder is not None and save < len(units):
            decoder.prefill(units[:save], rows_of)
            self._save_state(self.prefix_key(units[:save]), decoder.save_state())
        decoder.prefill(units, rows_of)
        evaluated = decoder.n_evaluated - evaluated_before
        timings.reused_positions = n_positions(units) - evaluated
        timings.prefill_positions += evaluated
        timings.prefill_s += time.perf_counter() - started

    def _rows(self, ref: ImageRef, datas: dict[str, ImageData], timings: Timings) -> np.ndarray:
        data = datas.get(ref.key)
        if data is not None:
            return self.encoder.rows(data, timings)
        rows = self.encoder.cached(ref.key)
        if rows is None:
            raise PromptError("an image of an earlier turn is no longer cached; pass it again or start a new chat")
        return rows

    def _save_state(self, key: str, state: np.ndarray) -> None:
        """Write a prefix state in the background (it is copied already; the KV cache moves on)."""
        self.wait_saved()
        self._saver = threading.Thread(target=self.store.put, args=("prefix", key, state), daemon=True,
                                       name="qwenvl-prefix-save")
        self._saver.start()

    def wait_saved(self) -> None:
        if self._saver is not None:
            self._saver.join()
            self._saver = None

    # --- turns -----------------------------------------------------------------------------

    def logits(self, images: Sequence[Any], question: str, history: Sequence[Turn],
               n_positions_limit: int | None = None) -> np.ndarray:
        timings = Timings()
        units, _, _, datas = self.build(images, question, history)
        if n_positions_limit is not None:
            units = cut_units(units, n_positions_limit)
        self.prefill(units, datas, timings)
        return self.decoder().last_logits()

    def start(self, r: Request) -> tuple[Iterator[str], dict]:
        """Encode and prefill now (errors raise here); return the decoding iterator and its result holder."""
        started = time.perf_counter()
        timings = Timings()
        units, refs, turns, datas = self.build(r.images, r.prompt, r.history, r.system, reserve=1)
        newest = refs or next((t.images for t in reversed(turns) if t.images), ())
        boxes_size = newest[0].size if newest else self.boxes_size
        self.prefill(units, datas, timings)
        self.boxes_size = boxes_size
        sampler = self.decoder().make_sampler(r.temperature, r.top_p, r.top_k, r.seed)
        holder: dict = {}
        return self._decode(r, units, sampler, timings, started, refs, holder), holder

    def _decode(self, r: Request, units: list[Unit], sampler, timings: Timings, started: float,
                refs: tuple[ImageRef, ...], holder: dict) -> Iterator[str]:
        decoder = self.decoder()
        utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        stop_ids = self.info.stop_ids
        ids: list[int] = []
        finish = "length"
        decode_started = None
        stop = r.stop
        while len(ids) < r.max_tokens:
            token = decoder.sample(sampler)
            if decode_started is None:
                decode_started = time.perf_counter()
                timings.ttft_s = decode_started - started
            if token in stop_ids:
                finish = "stop"
                break
            ids.append(token)
            piece = stop.feed(utf8.decode(decoder.tokenizer.token_bytes(token)))
            if piece:
                yield piece
            if stop.hit:
                finish = "stop"
                break
            if decoder.n_past >= decoder.n_ctx:
                break
            if len(ids) < r.max_tokens:
                decoder.eval_tokens([token])
        if not stop.hit:
            tail = stop.feed(utf8.decode(b"", final=True)) + stop.flush()
            if tail:
                yield tail
        timings.decode_tokens = len(ids)
        timings.decode_s = time.perf_counter() - decode_started if decode_started else 0.0
        boxes = parse_boxes(stop.text, *self.boxes_size) if self.boxes_size else []
        holder["result"] = GenerationResult(stop.text, ids, boxes, timings, n_positions(units), finish,
                                            [ref.size for ref in refs], refs)

    def reset(self) -> None:
        """Forget the KV cache and the boxes' image."""
        self.boxes_size = None
        if self._decoder is not None:
            self._decoder.keep(0)

    def close(self) -> None:
        self.wait_saved()
        self.encoder.release()
        self._drop_vocab()
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None


def cut_units(units: list[Unit], limit: int) -> list[Unit]:
    """The leading units that cover exactly ``limit`` positions (an image is never cut in two)."""
    out: list[Unit] = []
    for unit in units:
        if n_positions(out) >= limit:
            break
        out.append(unit)
    if n_positions(out) != limit:
        raise PromptError(f"position {limit} falls inside an image")
    return out


def check_metadata(meta: dict[str, str], info, path) -> None:
    """The GGUF's ``qwenvl.*`` facts must be the manifest's (``Bundle.open`` checked the architecture and sizes)."""
    expected = contract.gguf_metadata(image_start_id=info.image_start_id, n_queries=info.n_queries,
                                      image_size=info.image_size, system_prompt=info.system_prompt,
                                      top_p=info.top_p, top_k=info.top_k, max_new_tokens=info.max_new_tokens,
                                      eos_id=info.eos_token_id)
    for key, want in expected.items():
        if key not in meta or isinstance(want, (list, float)):
            continue  # older bundles lack the keys; float text is llama.cpp's rounding
        if str(want) != meta[key]:
            raise BundleError(f"{path}: {key} is {meta[key]!r}, the manifest says {want!r}: parts of different models")
