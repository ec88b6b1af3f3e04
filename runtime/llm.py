"""The decoder in llama.cpp: token runs and image embedding rows into one KV cache.

``LlamaRunner`` owns a ``llama_cpp.Llama`` (which loads the GGUF, tokenizes and keeps the
context) and does its own decoding so that image rows can go in between tokens:
- token runs go through ``llama_batch`` in pieces of at most ``n_batch`` (a larger batch
  aborts the whole process inside llama.cpp);
- image rows go through a batch made with ``embd = n_embd``, at the positions right after
  the ``<img>`` token, exactly where the original model overwrites its placeholder ids;
- after either, ``Llama.n_tokens`` and ``Llama.input_ids`` are advanced (placeholder ids
  for image rows) so the ``Llama`` object's own bookkeeping stays true.
Nothing here reuses llama-cpp-python's token-keyed prompt cache: two different images
behind the same placeholder ids would look identical to it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qwenvl_edge.errors import BundleError, PromptError

log = logging.getLogger(__name__)

IMAGE_PLACEHOLDER_ID = 151859  # <imgpad>: what input_ids shows at image-row positions


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@contextlib.contextmanager
def _quiet_stderr(enabled: bool):
    """llama.cpp logs model loading to fd 2; keep the user's terminal clean unless verbose."""
    if not enabled:
        yield
        return
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class LlamaRunner:
    """One llama.cpp model + context; evaluates tokens and embedding rows at ``n_past``."""

    def __init__(self, gguf_path: Path, n_ctx: int = 2048, n_threads: int | None = None,
                 n_batch: int = 512, seed: int = 0, verbose: bool = False, use_mmap: bool = False):
        import llama_cpp

        self._llama_cpp = llama_cpp
        path = Path(gguf_path)
        if not path.is_file():
            raise BundleError(f"{path}: missing GGUF file")
        threads = n_threads or default_threads()
        try:
            with _quiet_stderr(not verbose):
                self.llama = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_batch, n_ctx),
                                             n_ubatch=min(n_batch, n_ctx), n_threads=threads,
                                             n_threads_batch=threads, seed=seed, verbose=verbose,
                                             # off, as the golden parity was measured: flash attention
                                             # reorders sums and flips near-ties (one_image, step 9)
                                             flash_attn=False,
                                             # read, not mapped: llama.cpp repacks the k-quant weights into
                                             # its own buffers, and a mapping would keep the file's pages
                                             # counted too (measured at full size: 8.6 -> 6.0 GB, same speed)
                                             use_mmap=use_mmap)
        except (ValueError, RuntimeError) as e:
            raise BundleError(f"{path}: llama.cpp cannot load it ({e})") from None
        self.seed = seed
        self.n_ctx = self.llama.n_ctx()
        self.n_batch = self.llama.n_batch
        self.n_vocab = self.llama.n_vocab()
        self.n_embd = llama_cpp.llama_model_n_embd_inp(self.llama._model.model)
        self.n_evaluated = 0  # positions decoded since load: tells tests what a turn re-used

    # --- bookkeeping -----------------------------------------------------------------------

    @property
    def n_past(self) -> int:
        return self.llama.n_tokens

    def truncate(self, n_keep: int) -> None:
        """Forget KV entries at positions >= n_keep (a new turn diverging from the cached one)."""
        if n_keep < self.n_past:
            self.llama._ctx.kv_cache_seq_rm(-1, n_keep, -1)
            self.llama.n_tokens = n_keep

    def _check_room(self, n: int, what: str) -> None:
        if self.n_past + n > self.n_ctx:
            raise PromptError(f"{what} needs positions {self.n_past}..{self.n_past + n - 1} but the context "
                              f"holds {self.n_ctx} (use a larger n_ctx, fewer images or a shorter prompt)")

    # --- decoding --------------------------------------------------------------------------

    def _decode(self, batch, n: int) -> None:
        batch.n_tokens = n
        rc = self._llama_cpp.llama_decode(self.llama._ctx.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} at position {self.n_past}")
        self.n_evaluated += n

    def eval_tokens(self, tokens: Sequence[int]) -> None:
        """Decode ``tokens`` at ``n_past``; logits are kept for the last one only."""
        if not tokens:
            return
        self._check_room(len(tokens), f"{len(tokens)} tokens")
        bad = [t for t in tokens if not 0 <= t < self.n_vocab]
        if bad:
            raise PromptError(f"token id {bad[0]} is outside the vocabulary (0..{self.n_vocab - 1})")
        self.truncate(self.n_past)
        batch = self._llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        try:
            for start in range(0, len(tokens), self.n_batch):
                piece = tokens[start:start + self.n_batch]
                for i, tok in enumerate(piece):
                    batch.token[i] = tok
                    self._fill_position(batch, i, self.n_past + i, last=start + i == len(tokens) - 1)
                self._decode(batch, len(piece))
                self._advance(piece)
        finally:
            self._llama_cpp.llama_batch_free(batch)

    def eval_embeddings(self, rows: np.ndarray) -> None:
        """Decode image rows ``(n, n_embd)`` float32 at ``n_past``, in pieces of at most ``n_batch``."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)  # (256, n_embd)
        if rows.ndim != 2 or rows.shape[1] != self.n_embd:
            raise BundleError(f"image rows are {rows.shape[-1]} wide but the GGUF decoder takes {self.n_embd}: "
                              "vision.onnx and llm.gguf come from different checkpoints")
        self._check_room(len(rows), f"an image ({len(rows)} rows)")
        self.truncate(self.n_past)
        batch = self._llama_cpp.llama_batch_init(self.n_batch, self.n_embd, 1)
        try:
            embd = np.ctypeslib.as_array(batch.embd, shape=(self.n_batch * self.n_embd,))
            for start in range(0, len(rows), self.n_batch):
                piece = rows[start:start + self.n_batch]
                embd[:piece.size] = piece.reshape(-1)
                for i in range(len(piece)):
                    self._fill_position(batch, i, self.n_past + i, last=start + i == len(rows) - 1)
                self._decode(batch, len(piece))
                self._advance([IMAGE_PLACEHOLDER_ID] * len(piece))
        finally:
            self._llama_cpp.llama_batch_free(batch)

    @staticmethod
    def _fill_position(batch, i: int, pos: int, last: bool) -> None:
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = last

    def _advance(self, ids: Sequence[int]) -> None:
        n = self.llama.n_tokens
        self.llama.input_ids[n:n + len(ids)] = ids
        self.llama.n_tokens = n + len(ids)

    # --- reading out -----------------------------------------------------------------------

    def last_logits(self) -> np.ndarray:
        """A copy of the logits of the last decoded position that asked for them, ``(n_vocab,)``."""
        ptr = self._llama_cpp.llama_get_logits_ith(self.llama._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def make_sampler(self, temperature: float, top_p: float, top_k: int = 0):
        """llama.cpp's own sampler chain: greedy at temperature 0, else top-k/top-p/temperature."""
        from llama_cpp._internals import LlamaSampler

        sampler = LlamaSampler()
        if temperature <= 0:
            sampler.add_greedy()
            return sampler
        if top_k > 0:
            sampler.add_top_k(top_k)
        if top_p < 1.0:
            sampler.add_top_p(top_p, 1)
        sampler.add_temp(temperature)
        sampler.add_dist(self.seed)
        return sampler

    def sample(self, sampler) -> int:
        token = sampler.sample(self.llama._ctx, -1)
        sampler.accept(token)
        return token

    def tokenize_plain(self, text: str) -> list[int]:
        """Ordinary text -> ids; anything that spells a special token stays plain text."""
        if not text:
            return []
        return self.llama.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token, special tokens (grounding tags) spelled out."""
        buf = ctypes.create_string_buffer(256)
        n = self._llama_cpp.llama_token_to_piece(self.llama._model.vocab, token, buf, len(buf), 0, True)
        return buf.raw[:max(n, 0)]

    def close(self) -> None:
        llama = getattr(self, "llama", None)
        if llama is not None:
            llama.close()
            self.llama = None

    def __enter__(self) -> LlamaRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
