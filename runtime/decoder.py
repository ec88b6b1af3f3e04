"""The decoder in llama.cpp: token runs and image rows into one KV cache whose contents it tracks.

Built on llama-cpp-python's own resource classes (``_internals.LlamaModel`` / ``LlamaContext`` /
``LlamaBatch``), not on ``Llama``: image rows must go in between tokens, which ``Llama`` cannot do
without writing its privates. Two batches are allocated once (token ids, and rows of ``n_embd``
floats) and refilled for every decode. ``units`` mirrors the KV cache position by position
(token ids and ``ImageRef``s), so ``prefill`` keeps the longest common prefix with a new prompt and
evaluates only the rest; ``save_state`` / ``load_state`` move a prefix's KV state in and out
(``llama_state_seq_get_data`` / ``set_data``) so another process can start from it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import numpy as np

from qwenvl_edge.errors import BundleError, OptionError, PromptError
from qwenvl_edge.runtime.prompt import ImageRef, Unit, n_positions
from qwenvl_edge.validate import DEFAULT_N_CTX

# llama.cpp's CPU threads are an OpenMP team, and libgomp spins 300,000 rounds at every barrier before it
# sleeps: with one more busy process on the cores, the decoder's threads wait on each other's time slices
# (the tiny model: 2.5 tok/s beside the test suite, 30-47 with this). libgomp reads it once, when llama_cpp
# loads it (imported lazily, below); the user's own GOMP_SPINCOUNT or OMP_WAIT_POLICY wins. qwenvl-native
# sets the same value.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

SEQ = 0  # one sequence per context
Cancel = Callable[[], bool] | None  # asked between evaluation steps: True means stop


def check_cancel(cancel: Cancel) -> None:
    """Raise ``CancelledError`` when the caller's check says stop (called between evaluation steps)."""
    if cancel is not None and cancel():
        from qwenvl_edge.runtime.serial import CancelledError

        raise CancelledError("the call was cancelled")


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@contextlib.contextmanager
def quiet_stderr(enabled: bool):
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


def load_model(path: Path, *, vocab_only: bool = False, use_mmap: bool = False, repack: bool = True,
               verbose: bool = False):
    """A ``LlamaModel`` (vocab only: metadata and tokenizer in a fraction of a second)."""
    import llama_cpp
    from llama_cpp._internals import LlamaModel
    from llama_cpp._logger import set_verbose

    set_verbose(verbose)  # llama.cpp's log (model load, context free) goes to stderr only when verbose
    if not path.is_file():
        raise BundleError(f"{path}: missing GGUF file")
    params = LlamaModel.default_params()
    params.vocab_only = vocab_only
    # read, not mapped, by default: llama.cpp repacks the k-quant weights into its own buffers, and a
    # mapping would keep the file's pages counted too (measured at full size: 8.6 -> 6.0 GB, same speed);
    # mapped without repacking (``run``): load 2 s instead of 10 s, prefill the same, decode ~15 % slower
    params.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP if use_mmap or vocab_only else llama_cpp.LLAMA_LOAD_MODE_NONE
    params.use_extra_bufts = repack
    try:
        with quiet_stderr(not verbose):
            return LlamaModel(path_model=str(path), params=params, verbose=verbose)
    except (ValueError, RuntimeError) as e:
        raise BundleError(f"{path}: llama.cpp cannot load it ({e})") from None


def make_context(model, path: Path, n_ctx: int, n_batch: int, n_threads: int | None, verbose: bool,
                 n_seq: int = 1):
    """A ``LlamaContext`` of ``n_ctx`` positions per sequence for ``n_seq`` sequences, each in its own KV
    stream (a sequence's attention never sees another's cells, so its numbers are a lone sequence's)."""
    import llama_cpp
    from llama_cpp._internals import LlamaContext

    threads = n_threads or default_threads()
    params = LlamaContext.default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = n_ctx * n_seq, n_batch, n_batch
    params.n_seq_max, params.kv_unified = n_seq, False
    params.n_threads = params.n_threads_batch = threads
    # off, as the golden parity was measured: flash attention reorders sums and flips near-ties
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    params.no_perf = True
    try:
        with quiet_stderr(not verbose):
            return LlamaContext(model=model, params=params, verbose=verbose)
    except ValueError as e:
        size = f"{n_ctx} positions" if n_seq == 1 else f"{n_seq} sequences of {n_ctx} positions"
        raise BundleError(f"{path}: llama.cpp cannot make a context of {size} ({e})") from None


class Tokenizer:
    """Text <-> ids with a model's vocabulary (a vocab-only model before the decoder loads)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, text: str) -> list[int]:
        """Ordinary text -> ids; anything that spells a special token stays plain text."""
        return self.model.tokenize(text.encode("utf-8"), add_bos=False, special=False) if text else []

    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token, special tokens (grounding tags) spelled out."""
        import llama_cpp

        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.model.vocab, token, buf, len(buf), 0, True)
        return buf.raw[:max(n, 0)]

    def metadata(self) -> dict[str, str]:
        return self.model.metadata()


def grammar_sampler(model, grammar: str, verbose: bool = False):
    """llama.cpp's grammar sampler for ``model``'s vocabulary (a raw pointer for a chain to own), or
    ``OptionError`` when llama.cpp cannot parse the grammar (its own log of why stays quiet)."""
    import llama_cpp

    with quiet_stderr(not verbose):
        sampler = llama_cpp.llama_sampler_init_grammar(model.vocab, grammar.encode("utf-8"), b"root")
    if not sampler:
        raise OptionError("response_format: llama.cpp cannot use the grammar made from this schema")
    return sampler


def check_grammar(model, grammar: str, verbose: bool = False) -> None:
    """Raise ``OptionError`` now, before any evaluation, when llama.cpp would refuse ``grammar``."""
    import llama_cpp

    llama_cpp.llama_sampler_free(grammar_sampler(model, grammar, verbose))


TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])  # llama_token_data


def pick(sampler, logits: np.ndarray) -> int:
    """What ``llama_sampler_sample`` does, on a copy of the logits: every token a candidate, the sampler
    applied, its choice accepted (a raw ``llama_sampler*``)."""
    import llama_cpp

    data = np.empty(len(logits), dtype=TOKEN_DATA)
    data["id"] = np.arange(len(logits), dtype=np.int32)
    data["logit"] = logits
    data["p"] = 0.0
    arr = apply_sampler(sampler, data.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)), len(logits))
    token = int(arr.data[arr.selected].id)
    llama_cpp.llama_sampler_accept(sampler, token)
    return token


def apply_sampler(sampler, data, size: int):
    """``sampler`` (a raw ``llama_sampler*``) applied to ``size`` candidates at ``data``; the array it filled."""
    import llama_cpp

    arr = llama_cpp.llama_token_data_array(data=data, size=size, selected=-1, sorted=False)
    llama_cpp.llama_sampler_apply(sampler, ctypes.byref(arr))
    return arr


def sample_logits(sampler, logits: np.ndarray) -> int:
    """A ``LlamaSampler``'s or ``GrammarChain``'s next token from a copy of one position's logits."""
    if isinstance(sampler, GrammarChain):
        return sampler.sample_logits(logits)
    return pick(sampler.sampler, logits)


class GrammarChain:
    """A sampler chain with a grammar checked after it, in llama.cpp's own (``common_sampler``) order: the
    chain picks a token, the grammar is asked about that one token, and only when it refuses is the whole
    vocabulary filtered by the grammar and the chain run again on what is left.

    Filtering 152k candidates costs ~70-100 ms per token on a small CPU (measured); most tokens pass the
    one-token check. Greedy picks exactly what grammar-first would; sampling draws from the chain's
    distribution renormalised over the tokens the grammar allows. Same ``sample(ctx, idx)`` as ``LlamaSampler``.
    """

    def __init__(self, chain, grammar, n_vocab: int):
        import llama_cpp

        self._llama_cpp = llama_cpp
        self.chain = chain
        self.grammar = grammar  # a raw llama_sampler*, freed in close
        self.n_vocab = n_vocab
        self._one = (llama_cpp.llama_token_data * 1)()
        self._all = np.zeros(n_vocab, dtype=TOKEN_DATA)
        self._all["id"] = np.arange(n_vocab, dtype=np.int32)
        self.resampled = 0  # tokens the grammar refused (tells tests the slow path ran)

    def _allows(self, token: int) -> bool:
        self._one[0].id, self._one[0].logit, self._one[0].p = token, 0.0, 0.0
        apply_sampler(self.grammar, self._one, 1)
        return self._one[0].logit != float("-inf")

    def sample(self, ctx, idx: int = -1) -> int:
        lib = self._llama_cpp
        token = self.chain.sample(ctx, idx)
        return self._checked(token, lambda: np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx.ctx, idx),
                                                                  shape=(self.n_vocab,)))

    def sample_logits(self, logits: np.ndarray) -> int:
        """``sample`` from a copy of one position's logits (a sequence of a shared context keeps its own)."""
        return self._checked(pick(self.chain.sampler, logits), lambda: logits)

    def _checked(self, token: int, logits: Callable[[], np.ndarray]) -> int:
        """``token`` if the grammar allows it, else the chain's pick among the tokens it allows."""
        lib = self._llama_cpp
        if not self._allows(token):
            self.resampled += 1
            self._all["logit"] = logits()
            self._all["p"] = 0.0
            data = self._all.ctypes.data_as(ctypes.POINTER(lib.llama_token_data))
            arr = apply_sampler(self.grammar, data, self.n_vocab)
            arr = apply_sampler(self.chain.sampler, arr.data, arr.size)
            token = arr.data[arr.selected].id
        lib.llama_sampler_accept(self.grammar, token)
        return token

    def close(self) -> None:
        if self.grammar is not None:
            self._llama_cpp.llama_sampler_free(self.grammar)
            self.grammar = None
        self.chain.close()

    def __del__(self) -> None:
        self.close()


class Decoder:
    """One llama.cpp model + context; ``units`` is what its KV cache holds (sequence ``seq`` of it)."""

    seq = SEQ

    def __init__(self, gguf_path: Path, n_ctx: int = DEFAULT_N_CTX, n_threads: int | None = None, n_batch: int = 512,
                 verbose: bool = False, use_mmap: bool = False, repack: bool = True):
        import llama_cpp
        from llama_cpp._internals import LlamaBatch

        self._llama_cpp = llama_cpp
        self._stack = contextlib.ExitStack()
        self.path = Path(gguf_path)
        self.model = self._stack.enter_context(contextlib.closing(
            load_model(self.path, use_mmap=use_mmap, repack=repack, verbose=verbose)))
        n_batch = min(n_batch, n_ctx)
        try:
            self.ctx = self._stack.enter_context(contextlib.closing(
                make_context(self.model, self.path, n_ctx, n_batch, n_threads, verbose)))
        except BundleError:
            self.close()
            raise
        self.n_ctx = self.ctx.n_ctx()
        self.n_batch = n_batch
        self.n_vocab = self.model.n_vocab()
        self.n_embd = llama_cpp.llama_model_n_embd_inp(self.model.model)
        self._tokens = self._stack.enter_context(contextlib.closing(LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1)))
        self._rows = self._stack.enter_context(contextlib.closing(
            LlamaBatch(n_tokens=n_batch, embd=self.n_embd, n_seq_max=1)))
        self._embd = np.ctypeslib.as_array(self._rows.batch.embd, shape=(n_batch * self.n_embd,))
        self.tokenizer = Tokenizer(self.model)
        self.units: list[Unit] = []  # what the KV cache holds, in order
        self.n_evaluated = 0  # positions decoded since load: tells tests what a turn re-used
        self._eog: frozenset[int] | None = None

    # --- the KV prefix ---------------------------------------------------------------------

    @property
    def n_past(self) -> int:
        return n_positions(self.units)

    def keep(self, n_units: int) -> None:
        """Forget everything after the first ``n_units`` units."""
        if n_units < len(self.units):
            self._seq_rm(n_positions(self.units[:n_units]))
            self.units = self.units[:n_units]

    def _seq_rm(self, start: int) -> None:
        """Drop this sequence's KV cells from position ``start`` on (-1: all of them)."""
        self.ctx.kv_cache_seq_rm(self.seq, start, -1)

    def common_prefix(self, units: Sequence[Unit]) -> int:
        """How many leading units of ``units`` the KV cache already holds."""
        keep = 0
        for have, want in zip(self.units, units, strict=False):
            if have != want:
                break
            keep += 1
        return keep

    def prefill(self, units: Sequence[Unit], rows: Callable[[ImageRef], np.ndarray], cancel: Cancel = None) -> int:
        """Bring the KV cache to ``units`` (keeping the common prefix) with logits for the last one.

        Returns the positions re-used. ``rows(ref)`` gives an image's rows when it must be evaluated;
        ``cancel()`` is asked before each batch (a long prompt can be stopped between two).
        """
        if not units:  # nothing to evaluate: the logits left behind would be an earlier call's
            raise PromptError("nothing to evaluate: the prompt is empty")
        keep = self.common_prefix(units)
        if keep == len(units):  # identical prompt: re-evaluate the last unit to get its logits
            keep -= 1
        self.keep(keep)
        reused = self.n_past
        run: list[int] = []
        for unit in units[keep:]:
            if isinstance(unit, ImageRef):
                self.eval_tokens(run, cancel)
                run = []
                self.eval_rows(unit, rows(unit), cancel)
            else:
                run.append(unit)
        self.eval_tokens(run, cancel)
        return reused

    def _check_room(self, n: int, what: str) -> None:
        if self.n_past + n > self.n_ctx:
            raise PromptError(f"{what} needs positions {self.n_past}..{self.n_past + n - 1} but the context "
                              f"holds {self.n_ctx} (use a larger n_ctx, fewer images or a shorter prompt)")

    # --- decoding --------------------------------------------------------------------------

    def _decode(self, batch, n: int, start: int, logits: bool) -> None:
        """Decode the first ``n`` entries of ``batch`` at positions ``start..``; logits for the last if asked."""
        raw = batch.batch  # the llama_batch struct, filled in place (allocated once)
        raw.n_tokens = n
        for i in range(n):
            raw.pos[i] = start + i
            raw.n_seq_id[i] = 1
            raw.seq_id[i][0] = self.seq
            raw.logits[i] = False
        raw.logits[n - 1] = logits
        rc = self._llama_cpp.llama_decode(self.ctx.ctx, raw)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} at position {start}")
        self.n_evaluated += n

    def eval_tokens(self, tokens: Sequence[int], cancel: Cancel = None) -> None:
        """Decode ``tokens`` at ``n_past``; logits are kept for the last one only."""
        if not tokens:
            return
        self._check_room(len(tokens), f"{len(tokens)} tokens")
        bad = [t for t in tokens if not 0 <= t < self.n_vocab]
        if bad:
            raise PromptError(f"token id {bad[0]} is outside the vocabulary (0..{self.n_vocab - 1})")
        self._seq_rm(self.n_past)  # what a failed call may have left past the mirror
        for start in range(0, len(tokens), self.n_batch):
            piece = tokens[start:start + self.n_batch]
            check_cancel(cancel)  # the mirror holds every batch decoded so far: a stop here leaves it true
            self._decode_ids(piece, self.n_past, start + len(piece) == len(tokens))
            self.units.extend(piece)

    def _decode_ids(self, ids: Sequence[int], start: int, logits: bool) -> None:
        """Decode token ``ids`` at positions ``start..``; logits for the last if asked."""
        buf = self._tokens.batch.token
        for i, tok in enumerate(ids):
            buf[i] = tok
        self._decode(self._tokens, len(ids), start, logits)

    def _decode_rows(self, rows: np.ndarray, start: int, logits: bool) -> None:
        """Decode image rows ``(n, n_embd)`` at positions ``start..``; logits for the last if asked."""
        self._embd[:rows.size] = rows.reshape(-1)
        self._decode(self._rows, len(rows), start, logits)

    def eval_rows(self, ref: ImageRef, rows: np.ndarray, cancel: Cancel = None) -> None:
        """Decode one image's rows ``(n, n_embd)`` float32 at ``n_past``, in pieces of at most ``n_batch``."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape != (ref.n_rows, self.n_embd):
            raise BundleError(f"image rows are {list(rows.shape)}, the GGUF decoder takes [{ref.n_rows}, "
                              f"{self.n_embd}]: vision.onnx and llm.gguf come from different checkpoints")
        self._check_room(len(rows), f"an image ({len(rows)} rows)")
        start_pos = self.n_past
        self._seq_rm(start_pos)
        for start in range(0, len(rows), self.n_batch):
            piece = rows[start:start + self.n_batch]
            check_cancel(cancel)  # a half-evaluated image is past the mirror: the next eval removes it
            self._decode_rows(piece, start_pos + start, start + len(piece) == len(rows))
        self.units.append(ref)

    # --- reading out -----------------------------------------------------------------------

    def last_logits(self) -> np.ndarray:
        """A copy of the logits of the last decoded position that asked for them, ``(n_vocab,)``."""
        ptr = self.ctx.get_logits_ith(-1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def make_sampler(self, temperature: float, top_p: float, top_k: int, seed: int, grammar: str | None = None,
                     stop_ids: Collection[int] = ()):
        """llama.cpp's own sampler chain: greedy at temperature 0, else top-k/top-p/temperature; a GBNF
        ``grammar`` goes first, so only tokens that keep the answer valid are left to choose from. Once the
        grammar is complete it allows only the vocabulary's end-of-generation tokens: those that are not
        ``stop_ids`` (a plain "</s>" that llama.cpp counts as one) are banned, or they would end up in the text."""
        from llama_cpp._internals import LlamaSampler

        sampler = LlamaSampler()
        if grammar is not None:
            banned = self.eog_tokens() - set(stop_ids)
            if banned:
                sampler.add_logit_bias(self.n_vocab, dict.fromkeys(sorted(banned), float("-inf")))
        if temperature <= 0:
            sampler.add_greedy()
        else:
            if top_k > 0:
                sampler.add_top_k(top_k)
            if top_p < 1.0:
                sampler.add_top_p(top_p, 1)
            sampler.add_temp(temperature)
            sampler.add_dist(seed)
        return sampler if grammar is None else GrammarChain(sampler, grammar_sampler(self.model, grammar), self.n_vocab)

    def eog_tokens(self) -> frozenset[int]:
        """The tokens llama.cpp treats as end of generation (asked once per decoder)."""
        if self._eog is None:
            vocab = self.model.vocab
            self._eog = frozenset(t for t in range(self.n_vocab) if self._llama_cpp.llama_vocab_is_eog(vocab, t))
        return self._eog

    def sample(self, sampler) -> int:
        """The next token; ``llama_sampler_sample`` has already accepted it (a second accept would move a
        grammar on twice)."""
        return sampler.sample(self.ctx, -1)

    # --- prefix states ---------------------------------------------------------------------

    def save_state(self) -> np.ndarray:
        """The KV state of what the cache holds, as bytes (``llama_state_seq_get_data``)."""
        size = self._llama_cpp.llama_state_seq_get_size(self.ctx.ctx, self.seq)
        out = np.empty(size, dtype=np.uint8)
        written = self._llama_cpp.llama_state_seq_get_data(
            self.ctx.ctx, out.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), size, self.seq)
        return out[:written]

    def load_state(self, state: np.ndarray, units: Sequence[Unit]) -> bool:
        """Replace the cache with a saved state of ``units``; False (cache empty) if llama.cpp refuses it."""
        self.keep(0)
        self._seq_rm(-1)
        state = np.ascontiguousarray(state, dtype=np.uint8)
        read = self._llama_cpp.llama_state_seq_set_data(
            self.ctx.ctx, state.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), state.size, self.seq)
        if read == 0 or self._max_pos() != n_positions(units) - 1:
            self._seq_rm(-1)
            return False
        self.units = list(units)
        return True

    def _max_pos(self) -> int:
        return self._llama_cpp.llama_memory_seq_pos_max(self.ctx.memory, self.seq)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Decoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
