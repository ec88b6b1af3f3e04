"""The GGUF vocabulary: llama.cpp, reading our file, must tokenize exactly as tiktoken does with qwen.tiktoken.

The reference is tiktoken itself, built from the real ``qwen.tiktoken`` ranks with the
spec's split pattern and no special tokens (``encode_ordinary``): special-token spellings in
user text must stay plain text, as the runtime relies on for prompt-injection safety.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import llama_cpp
import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from qwenvl_edge import contract
from qwenvl_edge.errors import CheckpointError
from qwenvl_edge.export.gguf_vocab import (
    SPECIAL_TOKENS,
    build_gguf_vocab,
    bytes_to_unicode,
    last_merge,
    read_tiktoken_ranks,
    recover_merges,
)
from qwenvl_edge.export.synthetic_checkpoint import find_tiktoken
from tests.gguf_builds import float_gguf, token_piece
from tests.text_corpus import CORPUS

SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")  # from the spec
# the contract's ids (tests/test_contract.py checks them against the SPEC)
SPEC_SPECIAL_IDS = {text: contract.EOS_ID + i for i, text in enumerate(contract.SPECIAL_TOKENS)}
VOCAB_SIZE = 151936


@pytest.fixture(scope="session")
def tiktoken_path() -> Path:
    return find_tiktoken()


@pytest.fixture(scope="session")
def reference(tiktoken_path: Path) -> tiktoken.Encoding:
    return tiktoken.Encoding("qwen", pat_str=SPLIT_PATTERN, mergeable_ranks=load_tiktoken_bpe(str(tiktoken_path)),
                             special_tokens={})


@pytest.fixture(scope="session")
def vocab(tiktoken_path: Path):
    return build_gguf_vocab(tiktoken_path, VOCAB_SIZE)


@pytest.fixture(scope="session")
def llama_vocab(tmp_path_factory: pytest.TempPathFactory, tiny_ckpt: Path) -> llama_cpp.Llama:
    """llama.cpp's tokenizer, loaded from the tiny model's GGUF (vocabulary only)."""
    return llama_cpp.Llama(model_path=str(float_gguf(tmp_path_factory, tiny_ckpt)), vocab_only=True, verbose=False)


def llama_ids(llm: llama_cpp.Llama, text: str, special: bool = False) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)


def test_bytes_to_unicode_is_printable_and_reversible() -> None:
    """Catches a table that maps two bytes to one character, or leaves a space in a token string."""
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"


def test_special_tokens_have_the_spec_ids_and_types(vocab) -> None:
    assert len(SPECIAL_TOKENS) == 217
    for text, token_id in SPEC_SPECIAL_IDS.items():
        assert vocab.special_ids[text] == token_id
        assert vocab.tokens[token_id] == text
        assert vocab.token_types[token_id] == gguf.TokenType.CONTROL
    assert len(vocab.tokens) == len(vocab.token_types) == VOCAB_SIZE
    assert vocab.tokens[151860] == "[PAD151860]" and vocab.tokens[-1] == f"[PAD{VOCAB_SIZE - 1}]"
    assert set(vocab.token_types[151860:]) == {gguf.TokenType.UNUSED}
    assert set(vocab.token_types[:contract.EOS_ID]) == {gguf.TokenType.NORMAL}


def test_each_merge_joins_two_lower_ranked_tokens_into_the_next_token(vocab, tiktoken_path: Path) -> None:
    """Catches merges out of rank order (llama.cpp's priority would differ from tiktoken's) or wrong splits."""
    ranks = read_tiktoken_ranks(tiktoken_path)
    multi_byte = sorted((r, t) for t, r in ranks.items() if len(t) > 1)
    assert len(vocab.merges) == len(multi_byte) == len(ranks) - 256
    token_id = {text: i for i, text in enumerate(vocab.tokens)}
    for merge, (rank, _token) in zip(vocab.merges, multi_byte, strict=True):
        left, right = merge.split(" ")
        assert token_id[left + right] == rank
        assert token_id[left] < rank and token_id[right] < rank


def test_last_merge_replays_bpe_instead_of_guessing() -> None:
    """"bc" outranks "ab", so BPE builds "abcd" as abc + d, although ab + cd uses lower ranks."""
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"d": 3, b"bc": 4, b"ab": 5, b"cd": 6, b"abc": 7, b"abcd": 8}
    assert last_merge(b"abcd", 8, ranks) == (b"abc", b"d")
    assert recover_merges(ranks) == [(b"b", b"c"), (b"a", b"b"), (b"c", b"d"), (b"a", b"bc"), (b"abc", b"d")]
    with pytest.raises(ValueError, match=r"cannot be built from lower ranks"):
        last_merge(b"abcd", 8, {**ranks, b"abc": 9})


def test_vocab_size_smaller_than_the_tokenizer_is_one_line_error(tiktoken_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"vocab_size 151000 is smaller than the 151860 tokens") as err:
        build_gguf_vocab(tiktoken_path, 151000)
    assert "\n" not in str(err.value)


def test_malformed_tiktoken_line_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "qwen.tiktoken"
    bad.write_bytes(b"IQ== 0\nnot-base64! 1\n")
    with pytest.raises(CheckpointError, match=r"qwen.tiktoken: line 2: not a 'base64 rank' line"):
        read_tiktoken_ranks(bad)
    with pytest.raises(CheckpointError, match=r"qwen.tiktoken: line 2: not a 'base64 rank' line"):
        build_gguf_vocab(bad, VOCAB_SIZE)
    bad.write_bytes(b"IQ== 0\nIg== 2\n")
    with pytest.raises(CheckpointError, match=r"ranks are not exactly 0..1"):
        read_tiktoken_ranks(bad)


@pytest.mark.parametrize("name", list(CORPUS))
def test_llama_cpp_tokenizes_like_tiktoken(name: str, llama_vocab, reference) -> None:
    """Catches a wrong pre-tokenizer, a missing or misordered merge, or a wrong byte mapping."""
    text = CORPUS[name]
    ids = llama_ids(llama_vocab, text)
    assert ids == reference.encode_ordinary(text)
    assert b"".join(token_piece(llama_vocab, i) for i in ids) == text.encode("utf-8")  # round trip


def test_every_vocabulary_token_round_trips(llama_vocab, reference) -> None:
    """Each token's bytes come back from llama.cpp unchanged, and token texts tokenize like tiktoken.

    Covers the merges the corpus does not use: all token texts joined by newlines (one call),
    and every 8th token's text on its own (llama.cpp costs ~25 us per call). One known
    exception: llama.cpp turns any token spelled ``</s>`` into a control + end-of-generation
    token by its text (a rule added for PaddleOCR), so its piece is empty unless special=True.
    Qwen's split pattern never yields ``</s>`` as one piece, so tiktoken never emits that id and
    tokenization is unaffected (checked below).
    """
    texts, hidden = [], []
    for i in range(reference.n_vocab):
        raw = reference.decode_single_token_bytes(i)
        if token_piece(llama_vocab, i) != raw:
            hidden.append(i)
            assert token_piece(llama_vocab, i, special=True) == raw
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            continue  # a partial UTF-8 sequence cannot be given as text
    assert len(texts) > 150_000
    assert [reference.decode_single_token_bytes(i) for i in hidden] == [b"</s>"]
    assert hidden[0] not in reference.encode_ordinary("a</s>b </s> <</s>>") + llama_ids(llama_vocab, "</s>")
    joined = "\n".join(texts)
    assert llama_ids(llama_vocab, joined) == reference.encode_ordinary(joined)
    mismatched = [t for t in texts[::8] if llama_ids(llama_vocab, t) != reference.encode_ordinary(t)]
    assert mismatched == []


@pytest.mark.parametrize("text", list(SPEC_SPECIAL_IDS) + ["<|extra_3|>", "<|extra_100|>"])
def test_special_token_text_is_one_id_only_when_special(text: str, llama_vocab) -> None:
    """With special=True a special token's text is its id; with special=False it stays plain text."""
    token_id = SPEC_SPECIAL_IDS[text] if text in SPEC_SPECIAL_IDS else contract.IM_END_ID + 1 + int(text[8:-2])
    assert llama_ids(llama_vocab, text, special=True) == [token_id]
    plain = llama_ids(llama_vocab, text)
    assert len(plain) > 1 and max(plain) < contract.EOS_ID
    assert token_piece(llama_vocab, token_id, special=True) == text.encode()


def test_end_of_generation_tokens(llama_vocab) -> None:
    """llama.cpp must stop at <|im_end|> and <|endoftext|>; it never adds a BOS to Qwen prompts."""
    v = llama_cpp.llama_model_get_vocab(llama_vocab.model)
    assert llama_cpp.llama_vocab_n_tokens(v) == VOCAB_SIZE
    assert llama_cpp.llama_vocab_eos(v) == contract.EOS_ID and llama_cpp.llama_vocab_eot(v) == contract.IM_END_ID
    assert llama_cpp.llama_vocab_is_eog(v, contract.IM_END_ID) and llama_cpp.llama_vocab_is_eog(v, contract.EOS_ID)
    assert not llama_cpp.llama_vocab_is_eog(v, contract.IM_START_ID)
    assert not llama_cpp.llama_vocab_get_add_bos(v)
    assert llama_ids(llama_vocab, "Hello") == [9707]
