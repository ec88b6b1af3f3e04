"""Qwen's tiktoken ranks -> the GGUF BPE vocabulary llama.cpp tokenizes with (model ``gpt2``, pre ``qwen2``).

``qwen.tiktoken`` holds only ``base64(bytes) rank`` lines: no merges and no special tokens.
llama.cpp wants byte-level BPE in the GPT-2 form: every token's bytes spelled through the
GPT-2 ``bytes_to_unicode`` table, plus one merge ``"left right"`` per multi-byte token, ordered
by the token's rank so that llama.cpp's merge priority equals tiktoken's rank priority. The
merge of a token of rank r is the last step of replaying BPE over its own bytes with only the
ranks below r (the pair the trainer joined to create it). Special tokens follow the ranks as
CONTROL tokens; ids from there up to the config's ``vocab_size`` are UNUSED padding rows.
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import gguf

from qwenvl_edge import contract
from qwenvl_edge.errors import CheckpointError

log = logging.getLogger(__name__)

TOKENIZER_MODEL = "gpt2"  # byte-level BPE with merges
TOKENIZER_PRE = "qwen2"  # llama.cpp's name for Qwen's split pattern (the same in Qwen v1)

# The special tokens of Qwen-VL-Chat, in id order, right after the last tiktoken rank.
SPECIAL_TOKENS: tuple[str, ...] = contract.SPECIAL_TOKENS
ENDOFTEXT, IM_START, IM_END = contract.ENDOFTEXT, contract.IM_START, contract.IM_END
PAD_TOKEN_FORMAT = "[PAD{id}]"  # names of the rows past the tokenizer (they never occur in text)


def parse_tiktoken_ranks(data: bytes) -> dict[bytes, int]:
    """``base64(bytes) rank`` lines -> {bytes: rank}; ranks must be exactly 0..n-1 (they become llama.cpp ids).

    Raises ValueError naming the line; ``read_tiktoken_ranks`` adds the file name.
    """
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token_b64, rank_text = line.split()
            token, rank = base64.b64decode(token_b64, validate=True), int(rank_text)
        except (ValueError, binascii.Error):
            raise ValueError(f"line {lineno}: not a 'base64 rank' line") from None
        if token in ranks:
            raise ValueError(f"line {lineno}: token {token!r} listed twice")
        ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"ranks are not exactly 0..{len(ranks) - 1}")
    return ranks


def _read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the tokenizer ({e.strerror})") from None


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """The ranks of a ``qwen.tiktoken`` file; a malformed line is a one-line CheckpointError naming it."""
    try:
        return parse_tiktoken_ranks(_read_bytes(path))
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what llama.cpp's gpt2 vocab decodes): gguf's own."""
    return gguf.vocab.bytes_to_unicode()


def last_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two parts BPE joins last when it rebuilds ``token`` from bytes using only ranks below ``rank``.

    Plain replay: join the adjacent pair of lowest rank until two parts are left. Tokens are
    short (6.4 bytes on average), so the quadratic scan costs about 1 s for the whole vocabulary.
    """
    parts = [token[i:i + 1] for i in range(len(token))]
    get = ranks.get
    while len(parts) > 2:
        best, at = rank, -1
        for i in range(len(parts) - 1):
            r = get(parts[i] + parts[i + 1])
            if r is not None and r < best:
                best, at = r, i
        if at < 0:
            raise ValueError(f"token {token!r} (rank {rank}) cannot be built from lower ranks")
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    return parts[0], parts[1]


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One merge per multi-byte token, in rank order (llama.cpp's merge priority = tiktoken's rank)."""
    by_rank = sorted(ranks.items(), key=lambda item: item[1])
    return [last_merge(token, rank, ranks) for token, rank in by_rank if len(token) > 1]


@dataclass(frozen=True)
class GGUFVocab:
    """Everything llama.cpp's BPE vocabulary reads from the GGUF header."""

    tokens: list[str]  # n_vocab entries, id order
    token_types: list[int]  # gguf.TokenType per token
    merges: list[str]  # "left right" in priority order
    special_ids: dict[str, int]  # special token text -> id
    n_text_tokens: int  # tiktoken ranks (ids below this are ordinary BPE tokens)

    @property
    def eos_id(self) -> int:
        return self.special_ids[ENDOFTEXT]

    @property
    def im_end_id(self) -> int:
        return self.special_ids[IM_END]


@functools.lru_cache(maxsize=1)
def _bpe_tables(data: bytes) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(spelled tokens in rank order, merges) of one tiktoken file's contents.

    Cached by content, so writing several GGUF files from copies of the same ``qwen.tiktoken``
    in one process (F32 then F16, or the test suite) replays the merges once (~1.5 s).
    """
    ranks = parse_tiktoken_ranks(data)
    byte_char = bytes_to_unicode()

    def spell(b: bytes) -> str:
        return "".join(byte_char[x] for x in b)

    tokens = tuple(spell(t) for t, _ in sorted(ranks.items(), key=lambda item: item[1]))
    merges = tuple(f"{spell(a)} {spell(b)}" for a, b in recover_merges(ranks))
    return tokens, merges


def build_gguf_vocab(tiktoken_path: Path, vocab_size: int) -> GGUFVocab:
    """The GGUF vocabulary of a Qwen checkpoint, padded with UNUSED rows to ``vocab_size``."""
    try:
        text_tokens, merges = _bpe_tables(_read_bytes(tiktoken_path))
    except ValueError as e:
        raise CheckpointError(f"{tiktoken_path}: {e}") from None
    n_text = len(text_tokens)
    n_needed = n_text + len(SPECIAL_TOKENS)
    if vocab_size < n_needed:
        raise CheckpointError(f"config.json vocab_size {vocab_size} is smaller than the {n_needed} tokens "
                              f"{Path(tiktoken_path).name} and the special tokens need")
    special_ids = {text: n_text + i for i, text in enumerate(SPECIAL_TOKENS)}
    tokens = [*text_tokens, *SPECIAL_TOKENS, *(PAD_TOKEN_FORMAT.format(id=i) for i in range(n_needed, vocab_size))]
    clash = len(tokens) - len(set(tokens))
    if clash:
        raise CheckpointError(f"{tiktoken_path}: {clash} special or padding token(s) spell an ordinary token")
    token_types = ([gguf.TokenType.NORMAL] * n_text + [gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS)
                   + [gguf.TokenType.UNUSED] * (vocab_size - n_needed))
    log.info("vocabulary: %d BPE tokens, %d merges, %d special, %d padding",
             n_text, len(merges), len(SPECIAL_TOKENS), vocab_size - n_needed)
    return GGUFVocab(tokens=tokens, token_types=[int(t) for t in token_types], merges=list(merges),
                     special_ids=special_ids, n_text_tokens=n_text)


def add_vocab(writer: gguf.GGUFWriter, vocab: GGUFVocab) -> None:
    """The tokenizer keys: BPE tables, bos = eos = pad = <|endoftext|>, eot = <|im_end|>, no BOS added.

    llama.cpp also marks ``<|im_end|>`` and ``<|endoftext|>`` end-of-generation by their text;
    ``<|im_start|>`` is not, so a runtime must stop on it itself.
    """
    writer.add_tokenizer_model(TOKENIZER_MODEL)
    writer.add_tokenizer_pre(TOKENIZER_PRE)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(vocab.eos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_pad_token_id(vocab.eos_id)
    writer.add_eot_token_id(vocab.im_end_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
