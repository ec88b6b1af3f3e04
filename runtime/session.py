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
import operator
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from qwenvl_edge.errors import BundleError, OptionError, PromptError
from qwenvl_edge.runtime import memory
from qwenvl_edge.runtime.boxes import parse_boxes
from qwenvl_edge.runtime.bundle import Bundle, check_gguf_facts
from qwenvl_edge.runtime.decoder import Cancel, Decoder, Tokenizer, check_cancel, check_grammar, load_model
from qwenvl_edge.runtime.image_encoder import ImageEncoder
from qwenvl_edge.runtime.preprocess import ImageData, read_image
from qwenvl_edge.runtime.prompt import ImageRef, PromptBuilder, Turn, Unit, n_positions
from qwenvl_edge.runtime.results import GenerationResult, Request, Timings
from qwenvl_edge.runtime.store import Expect, Store, entry_key
from qwenvl_edge.runtime.structured import log_softmax, token_entry
from qwenvl_edge.validate import DEFAULT_N_CTX

log = logging.getLogger(__name__)

STATE = Expect("uint8", (None,))
PROMPT_FORMAT = "qwen-vl-chatml-1"  # bump when PromptBuilder changes how a prompt is laid out


class Session:
    """One bundle's engines, loaded on first need, and the prompt logic between them."""

    def __init__(self, bundle: Bundle, store: Store, n_ctx: int = DEFAULT_N_CTX, n_threads: int | None = None,
                 keep_vision: bool = True, verbose: bool = False, use_mmap: bool = False, overlap: bool = True,
                 repack: bool = True, encoder: ImageEncoder | None = None, decoder: Decoder | None = None):
        """``encoder`` / ``decoder``: engines shared with other sessions (one sequence each of a batched
        context, one vision session), instead of this session's own."""
        self.bundle = bundle
        self.info = bundle.model
        self.store = store
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.verbose = verbose
        self.use_mmap = use_mmap
        self.repack = repack
        self.encoder = encoder or ImageEncoder(bundle.vision_path, bundle.vision_sha256, self.info.hidden_size,
                                               self.info.n_queries, self.info.image_spec, store, n_threads,
                                               keep_vision)
        self._decoder: Decoder | None = decoder
        self._loader: threading.Thread | None = None  # a background GGUF load (see start_loading)
        self._loaded: tuple[Decoder | None, BaseException | None] = (None, None)
        self.overlap = overlap
        self._vocab: Tokenizer | None = None
        self.prompts = PromptBuilder(self.info, lambda text: self.tokenizer(text))
        self.boxes_size: tuple[int, int] | None = None  # boxes refer to the newest turn's first image
        self._saver: threading.Thread | None = None
        self.fingerprint = self._fingerprint()
        # whose prefix states are ours: the decoder's and the vision model's checksums (the key holds them
        # too; the entry's header must say the same, so a state from another bundle is never restored)
        self.owner = f"llm:{self._llm_sha256()}/vision:{self.encoder.model}"  # vision: its model and pixels

    # --- engines ---------------------------------------------------------------------------

    def _fingerprint(self) -> str:
        """The GGUF's identity: its manifest checksum, size and modification time (no 5 GB hash per run)."""
        st = self.bundle.llm_path.stat()
        return f"{self._llm_sha256()}:{st.st_size}:{st.st_mtime_ns}"

    def _llm_sha256(self) -> str:
        """The manifest's sha256 of llm.gguf."""
        return self.bundle.manifest["files"].get(self.bundle.llm_path.name, {}).get("sha256", "")

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
        """The llama.cpp decoder, loaded on first use (or collected from the background load)."""
        if self._decoder is None:
            started = time.perf_counter()
            loader, self._loader = self._loader, None
            if loader is not None:
                loader.join()
                decoder, error = self._loaded
                self._loaded = (None, None)
                if error is not None:
                    raise error
            else:
                decoder = self._load()
            self._decoder = decoder
            self._drop_vocab()
            if timings:
                timings.load_s += time.perf_counter() - started
        return self._decoder

    def _load(self) -> Decoder:
        decoder = Decoder(self.bundle.llm_path, n_ctx=self.n_ctx, n_threads=self.n_threads,
                          verbose=self.verbose, use_mmap=self.use_mmap, repack=self.repack)
        if decoder.n_embd != self.info.hidden_size or decoder.n_vocab != self.info.vocab_size:
            decoder.close()
            raise BundleError(f"{self.bundle.llm_path}: width {decoder.n_embd} / vocab {decoder.n_vocab}, "
                              f"manifest says {self.info.hidden_size} / {self.info.vocab_size}: "
                              "parts from different exports")
        return decoder

    def start_loading(self) -> bool:
        """Read the GGUF in the background while images are encoded, when memory allows both at once.

        On a small device (or when the memory cannot be known) the low-memory order stays: encode,
        free the vision session, then load. Returns whether a background load was started.
        """
        if self._decoder is not None or self._loader is not None or not self.overlap:
            return self._loader is not None
        if not memory.fits_together(self.bundle, self.n_ctx):
            return False

        def load() -> None:
            try:
                self._loaded = (self._load(), None)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread by decoder()
                self._loaded = (None, e)

        self._loader = threading.Thread(target=load, name="qwenvl-gguf-load", daemon=True)
        self._loader.start()
        return True

    # --- prompts ---------------------------------------------------------------------------

    def read(self, images: Sequence[Any], datas: dict[str, ImageData]) -> tuple[ImageRef, ...]:
        """Refs of ``images`` (``ImageRef``s pass through); each new image's data goes into ``datas``."""
        refs = []
        for i, image in enumerate(images, 1):
            if isinstance(image, ImageRef):
                refs.append(image)
                continue
            data = read_image(image, f"image {i}", self.info.image_size)  # a path names itself
            datas.setdefault(data.key, data)
            refs.append(ImageRef(data.key, self.info.n_queries, data.size))
        return tuple(refs)

    def read_turn(self, images: Sequence[Any], history: Sequence[Turn]
                  ) -> tuple[tuple[ImageRef, ...], list[Turn], dict[str, ImageData]]:
        """This turn's refs, the history with refs, and the data of every image read (each read once)."""
        need = len(images) * self.info.positions_per_image
        if need > self.n_ctx:
            raise PromptError(f"{len(images)} image(s) need {need} positions but the context holds {self.n_ctx}")
        datas: dict[str, ImageData] = {}
        refs = self.read(images, datas)
        turns = [Turn(t.question, self.read(t.images, datas), t.answer) for t in history]
        return refs, turns, datas

    def build(self, images: Sequence[Any], question: str, history: Sequence[Turn], system: str | None = None,
              reserve: int = 0) -> list[Unit]:
        """The prompt's units (with the decoder's tokenizer, or a vocab-only one when it is not loaded)."""
        refs, turns, _ = self.read_turn(images, history)
        return self.prompts.build(Turn(question, refs), turns, system=system, n_ctx=self.n_ctx, reserve=reserve)

    # --- prefill ---------------------------------------------------------------------------

    def prefix_key(self, system: str | None, turns: Sequence[Turn], refs: Sequence[ImageRef]) -> str:
        """The store key of a prompt's prefix up to the rows of ``refs[-1]``, without tokenizing it.

        The prefix is fixed by the system prompt, the earlier turns (text and image hashes) and this
        turn's images so far; the GGUF's fingerprint fixes how that text tokenizes.
        """
        import llama_cpp

        described = {"format": PROMPT_FORMAT, "system": self.info.system_prompt if system is None else system,
                     "history": [[t.question, [r.key for r in t.images], t.answer or ""] for t in turns],
                     "images": [r.key for r in refs], "rows": self.info.n_queries}
        return entry_key("prefix", self.fingerprint, self.encoder.model, llama_cpp.__version__,
                         json.dumps(described, ensure_ascii=False))

    def prefill(self, refs: tuple[ImageRef, ...], turns: list[Turn], datas: dict[str, ImageData], question: str,
                system: str | None, timings: Timings, reserve: int = 0, limit: int | None = None,
                cancel: Cancel = None) -> list[Unit]:
        """Bring the decoder's KV cache to the prompt: reuse, restore, encode and evaluate only what is new.

        In a fresh process the stored prefix states are looked up before anything loads, so only the
        images after the restored prefix are encoded (while the GGUF is read, if memory allows).
        ``cancel()`` is asked before each image encode and each prefill batch. Returns the prompt's units.
        """
        restore = next((j for j in range(len(refs), 0, -1)
                        if self.store.has("prefix", self.prefix_key(system, turns, refs[:j]))), 0)
        rows: dict[str, np.ndarray] = {}
        if self._decoder is None:
            todo = {r.key: r for r in refs[restore:]}
            if not restore:
                todo.update({r.key: r for t in turns for r in t.images})
            if any(self.encoder.cached(key) is None for key in todo):
                self.start_loading()  # the GGUF is read while the encoder runs, if memory allows
            rows = {key: self._rows(ref, datas, timings, cancel) for key, ref in todo.items()}
        decoder = self.decoder(timings)
        full = self.prompts.build(Turn(question, refs), turns, system=system, n_ctx=self.n_ctx, reserve=reserve)
        units = full if limit is None else cut_units(full, limit)
        # the cut after each of this turn's images (its images are the prompt's last ImageRefs); a stored
        # state applies only when no earlier turn was left out to fit the context
        kept_all = sum(1 for u in full if u == self.info.im_start_id) == 3 + 2 * len(turns)
        image_ends = [i + 1 for i, u in enumerate(full) if isinstance(u, ImageRef)]
        ends = image_ends[len(image_ends) - len(refs):]
        cut = {j: ends[j - 1] for j in range(1, len(refs) + 1)} if refs and kept_all else {}
        if restore and restore in cut and cut[restore] <= len(units) and decoder.common_prefix(units) < cut[restore]:
            key = self.prefix_key(system, turns, refs[:restore])
            state = self.store.get("prefix", key, STATE, self.owner)
            if state is not None and decoder.load_state(state, units[:cut[restore]]):
                timings.restored_positions = n_positions(units[:cut[restore]])
            elif state is not None:  # checked fine but llama.cpp refused it (another llama.cpp build)
                self.store.drop("prefix", key)
                log.warning("llama.cpp refused a stored prefix state; evaluating the prompt instead")

        def rows_of(ref: ImageRef) -> np.ndarray:
            if ref.key not in rows:
                rows[ref.key] = self._rows(ref, datas, timings, cancel)
            return rows[ref.key]

        started = time.perf_counter()
        evaluated_before = decoder.n_evaluated
        last = cut.get(len(refs))
        if (last is not None and self.store.folder is not None and last < len(units)
                and decoder.common_prefix(units) < last):
            decoder.prefill(units[:last], rows_of, cancel)
            self._save_state(self.prefix_key(system, turns, refs), decoder.save_state())
        decoder.prefill(units, rows_of, cancel)
        evaluated = decoder.n_evaluated - evaluated_before
        timings.reused_positions = n_positions(units) - evaluated
        timings.prefill_positions += evaluated
        timings.prefill_s += time.perf_counter() - started
        return units

    def _rows(self, ref: ImageRef, datas: dict[str, ImageData], timings: Timings, cancel: Cancel = None
              ) -> np.ndarray:
        data = datas.get(ref.key)
        if data is not None:
            check_cancel(cancel)  # an encode is the longest step a turn takes before its prefill
            return self.encoder.rows(data, timings)
        rows = self.encoder.cached(ref.key)
        if rows is None:
            raise PromptError("an image of an earlier turn is no longer cached; pass it again or start a new chat")
        return rows

    def _save_state(self, key: str, state: np.ndarray) -> None:
        """Write a prefix state in the background (it is copied already; the KV cache moves on)."""
        self.wait_saved()
        self._saver = threading.Thread(target=self.store.put, args=("prefix", key, state, self.owner), daemon=True,
                                       name="qwenvl-prefix-save")
        self._saver.start()

    def wait_saved(self) -> None:
        if self._saver is not None:
            self._saver.join()
            self._saver = None

    # --- turns -----------------------------------------------------------------------------

    def logits(self, images: Sequence[Any], question: str, history: Sequence[Turn],
               n_positions_limit: int | None = None) -> np.ndarray:
        """Logits after the prompt's first ``n_positions_limit`` positions (all of them when None)."""
        limit = None if n_positions_limit is None else positions_limit(n_positions_limit, self.n_ctx)
        refs, turns, datas = self.read_turn(images, history)
        self.prefill(refs, turns, datas, question, None, Timings(), limit=limit)
        return self.decoder().last_logits()

    def start(self, r: Request, cancel: Cancel = None) -> tuple[Iterator[str], dict]:
        """Encode and prefill now (errors raise here); return the decoding iterator and its result holder.

        ``cancel()`` is asked between images, prefill batches and tokens: when it says stop, the call
        raises ``CancelledError`` there, and the decoder is ready for the next call.
        """
        started = time.perf_counter()
        timings = Timings()
        if r.grammar is not None:  # a grammar llama.cpp refuses is the caller's error: say so before any work
            check_grammar(self.tokenizer.model, r.grammar, self.verbose)
        refs, turns, datas = self.read_turn(r.images, r.history)
        newest = refs or next((t.images for t in reversed(turns) if t.images), ())
        boxes_size = newest[0].size if newest else self.boxes_size
        units = self.prefill(refs, turns, datas, r.prompt, r.system, timings, reserve=1, cancel=cancel)
        self.boxes_size = boxes_size
        sampler = self.decoder().make_sampler(r.temperature, r.top_p, r.top_k, r.seed, r.grammar,
                                              self.info.stop_ids)
        holder: dict = {}
        return self._decode(r, units, sampler, timings, started, refs, holder, cancel), holder

    def _decode(self, r: Request, units: list[Unit], sampler, timings: Timings, started: float,
                refs: tuple[ImageRef, ...], holder: dict, cancel: Cancel = None) -> Iterator[str]:
        decoder = self.decoder()
        utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        stop_ids = self.info.stop_ids
        ids: list[int] = []
        finish = "length"
        decode_started = None
        stop = r.stop
        while len(ids) < r.max_tokens:
            check_cancel(cancel)
            token = decoder.sample(sampler)
            if decode_started is None:
                decode_started = time.perf_counter()
                timings.ttft_s = decode_started - started
            if token in stop_ids:
                finish = "stop"
                break
            ids.append(token)
            if r.logprobs is not None:  # the model's distribution at this step (logits are still the sampler's)
                r.logprob_entries.append(token_entry(token, log_softmax(decoder.last_logits()), r.logprobs,
                                                     decoder.tokenizer.token_bytes))
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
        boxes = parse_boxes(stop.text, *self.boxes_size, self.info.grounding) if self.boxes_size else []
        holder["result"] = GenerationResult(stop.text, ids, boxes, timings, n_positions(units), finish,
                                            [ref.size for ref in refs], refs,
                                            None if r.logprobs is None else list(r.logprob_entries))

    def reset(self) -> None:
        """Forget the KV cache and the boxes' image."""
        self.boxes_size = None
        if self._decoder is not None:
            self._decoder.keep(0)

    def close(self) -> None:
        if self._loader is not None:  # a background load must finish before its memory can be freed
            self.decoder()
        self.wait_saved()
        self.encoder.release()
        self._drop_vocab()
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None


def positions_limit(value: object, n_ctx: int) -> int:
    """``n_positions_limit`` checked before anything is evaluated: an int in 1..n_ctx (0 would evaluate
    nothing, and the logits read then would be an earlier call's)."""
    try:
        limit = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        limit = None
    if limit is None:
        raise OptionError(f"n_positions_limit must be an integer, got {type(value).__name__}")
    if not 1 <= limit <= n_ctx:
        raise OptionError(f"n_positions_limit must be in 1..{n_ctx} (the context), got {limit}")
    return limit


def cut_units(units: list[Unit], limit: int) -> list[Unit]:
    """The leading units that cover exactly ``limit`` positions (an image is never cut in two)."""
    total = n_positions(units)
    if not 1 <= limit <= total:
        raise PromptError(f"n_positions_limit must be in 1..{total} (the prompt's positions), got {limit}")
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
    check_gguf_facts(meta, info, path)
