"""The LLM GGUF: llama.cpp's ``qwen`` graph on our file reproduces the original model.

References: the golden logits and greedy ids of the original implementation (tiny checkpoint),
and, for other sizes (``odd_ckpt``: 4 heads of 64, 3 layers), an independent float64 numpy
implementation of the spec's decoder math below.
"""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import pytest

from qwenvl_edge import contract
from qwenvl_edge.errors import CheckpointError, QwenVLError
from qwenvl_edge.export.checkpoint import CheckpointReader
from qwenvl_edge.export.llm_gguf import convert_tensor, expected_gguf_names, write_llm_gguf
from qwenvl_edge.export.safetensors_io import read_safetensors, write_safetensors
from qwenvl_edge.export.synthetic_checkpoint import write_checkpoint
from qwenvl_edge.export.tensor_record import f32_to_bf16_bits
from tests.gguf_builds import float_gguf, greedy, load_llama, read_gguf_metadata, read_gguf_tensors

GOLDEN_CASE = "text_only"
TOL_F32_CACHE = 2e-3  # F32 weights and F32 K/V cache: only summation order differs from the original
TOL_F16_CACHE = 0.03  # llama.cpp's default F16 K/V cache ("a few hundredths" in golden/README.md)
ODD_TOKENS = [9707, 0, 10479, 525, 498, 30, 198, contract.IM_START_ID, 872, 198, 108386, 3837, 99489, 1773,
              contract.IM_END_ID, 77091]


@pytest.fixture(scope="session")
def tiny_f32(tmp_path_factory: pytest.TempPathFactory, tiny_ckpt: Path) -> Path:
    return float_gguf(tmp_path_factory, tiny_ckpt, "F32")


@pytest.fixture(scope="session")
def odd_f32(tmp_path_factory: pytest.TempPathFactory, odd_ckpt: Path) -> Path:
    return float_gguf(tmp_path_factory, odd_ckpt, "F32")


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def neox_rotary(x: np.ndarray, base: float) -> np.ndarray:
    """x [n, heads, head_dim]: dim i pairs with i + head_dim / 2, position p rotates by p * base^(-2i/head_dim)."""
    n, _, d = x.shape
    angle = np.arange(n)[:, None] * base ** (-np.arange(0, d, 2) / d)[None, :]  # (n, d/2)
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def reference_logits(reader: CheckpointReader, ids: list[int]) -> np.ndarray:
    """The spec's LLM in float64, all positions: (n, vocab). Independent of llama.cpp and of the GGUF writer."""
    cfg = reader.config
    h, n_head, eps = cfg.hidden_size, cfg.num_attention_heads, cfg.layer_norm_epsilon
    d = h // n_head

    def w(name: str) -> np.ndarray:
        return reader.tensor(name).astype(np.float64)

    n = len(ids)
    x = reader.tensor("transformer.wte.weight")[ids].astype(np.float64)  # (n, h)
    causal = np.triu(np.full((n, n), -np.inf), k=1)
    for i in range(cfg.num_hidden_layers):
        p = f"transformer.h.{i}."
        qkv = rms_norm(x, w(p + "ln_1.weight"), eps) @ w(p + "attn.c_attn.weight").T + w(p + "attn.c_attn.bias")
        q, k, v = (t.reshape(n, n_head, d) for t in np.split(qkv, 3, axis=-1))
        q, k = neox_rotary(q, cfg.rotary_emb_base), neox_rotary(k, cfg.rotary_emb_base)
        scores = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(d) + causal
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = np.einsum("hqk,khd->qhd", probs, v).reshape(n, h)
        x = x + attn @ w(p + "attn.c_proj.weight").T
        hn = rms_norm(x, w(p + "ln_2.weight"), eps)
        up, gate = hn @ w(p + "mlp.w1.weight").T, hn @ w(p + "mlp.w2.weight").T
        x = x + (up * gate / (1 + np.exp(-gate))) @ w(p + "mlp.c_proj.weight").T
    x = rms_norm(x, w("transformer.ln_f.weight"), eps)
    return x @ w("lm_head.weight").T


def test_header_holds_what_the_qwen_loader_reads(tiny_f32: Path, tiny_ckpt: Path) -> None:
    """Catches a missing key (the qwen loader needs the RMS epsilon) or a halved feed-forward length."""
    cfg = CheckpointReader(tiny_ckpt).config
    meta = read_gguf_metadata(tiny_f32)
    qwen = {key.format(arch="qwen"): value for key, value in {
        gguf.Keys.LLM.CONTEXT_LENGTH: "2048", gguf.Keys.LLM.EMBEDDING_LENGTH: "256",
        gguf.Keys.LLM.BLOCK_COUNT: "2", gguf.Keys.LLM.FEED_FORWARD_LENGTH: "1024",
        gguf.Keys.Attention.HEAD_COUNT: "2", gguf.Keys.Attention.HEAD_COUNT_KV: "2",
        gguf.Keys.Attention.LAYERNORM_RMS_EPS: "0.000001", gguf.Keys.Rope.DIMENSION_COUNT: "128",
        gguf.Keys.Rope.FREQ_BASE: "10000.000000", gguf.Keys.LLM.VOCAB_SIZE: str(cfg.vocab_size)}.items()}
    expected = {gguf.Keys.General.ARCHITECTURE: "qwen",
                gguf.Keys.General.FILE_TYPE: str(int(gguf.LlamaFileType.ALL_F32)),
                gguf.Keys.Tokenizer.MODEL: "gpt2", gguf.Keys.Tokenizer.PRE: "qwen2", **qwen}
    assert {k: meta.get(k) for k in expected} == expected


def test_tensors_round_trip_exactly(tiny_f32: Path, tiny_ckpt: Path) -> None:
    """GGUF write -> ggml's parser -> equal: catches a transpose, a swapped name, or a tensor written twice."""
    ckpt = CheckpointReader(tiny_ckpt)
    stored = read_gguf_tensors(tiny_f32)
    assert set(stored) == expected_gguf_names(ckpt.config.num_hidden_layers)
    pairs = {"token_embd.weight": "transformer.wte.weight", "output.weight": "lm_head.weight",
             "output_norm.weight": "transformer.ln_f.weight"}
    for i in range(ckpt.config.num_hidden_layers):
        b, p = f"blk.{i}.", f"transformer.h.{i}."
        pairs.update({b + "attn_norm.weight": p + "ln_1.weight", b + "attn_qkv.weight": p + "attn.c_attn.weight",
                      b + "attn_qkv.bias": p + "attn.c_attn.bias", b + "attn_output.weight": p + "attn.c_proj.weight",
                      b + "ffn_norm.weight": p + "ln_2.weight", b + "ffn_up.weight": p + "mlp.w1.weight",
                      b + "ffn_gate.weight": p + "mlp.w2.weight", b + "ffn_down.weight": p + "mlp.c_proj.weight"})
    assert set(pairs) == set(stored)
    for gguf_name, source in pairs.items():
        t = stored[gguf_name]
        assert t.type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(t.array(), ckpt.tensor(source), err_msg=gguf_name)


@pytest.mark.parametrize("f32_cache, tol", [(True, TOL_F32_CACHE), (False, TOL_F16_CACHE)], ids=["f32kv", "f16kv"])
def test_golden_logits_and_greedy_ids(tiny_f32: Path, golden, f32_cache: bool, tol: float) -> None:
    case = golden.cases[GOLDEN_CASE]
    llm = load_llama(tiny_f32, f32_cache=f32_cache)
    logits, generated = greedy(llm, case["input_ids"], len(case["generated_ids"]))
    err = float(np.abs(logits - golden.logits_last(GOLDEN_CASE)).max())
    print(f"golden {GOLDEN_CASE} ({'F32' if f32_cache else 'F16'} K/V cache): max |logit diff| = {err:.2e}")
    assert err < tol
    assert generated == case["generated_ids"]


def test_odd_sizes_match_numpy_reference(odd_f32: Path, odd_ckpt: Path) -> None:
    """4 heads of 64 over 3 layers, all positions: catches wrong rope style/base, head split or w1/w2 swap."""
    ckpt = CheckpointReader(odd_ckpt)
    assert (ckpt.config.num_attention_heads, ckpt.config.num_hidden_layers) == (4, 3)
    llm = load_llama(odd_f32, f32_cache=True, logits_all=True)
    llm.eval(ODD_TOKENS)
    got = np.asarray(llm.scores[: len(ODD_TOKENS)], dtype=np.float64)
    want = reference_logits(ckpt, ODD_TOKENS)
    err = float(np.abs(got - want).max())
    print(f"odd_ckpt vs float64 reference, {len(ODD_TOKENS)} positions: max |logit diff| = {err:.2e}")
    assert err < TOL_F32_CACHE
    assert (got.argmax(-1) == want.argmax(-1)).all()


def check_runs_near_golden(path: Path, golden, tol: float) -> float:
    """Loads in llama.cpp, last-position logits within ``tol`` of the golden, same top-1; returns the error."""
    case = golden.cases[GOLDEN_CASE]
    logits, generated = greedy(load_llama(path), case["input_ids"], 1)
    err = float(np.abs(logits - golden.logits_last(GOLDEN_CASE)).max())
    assert err < tol
    assert generated == case["generated_ids"][:1]
    return err


def test_f16_from_bin_checkpoint(tmp_path_factory, tiny_ckpt_bin: Path, tiny_f32: Path, golden) -> None:
    """The torch-zip ``.bin`` reader feeds the writer the same tensors as safetensors; F16 rounds them once.

    Every tensor is compared with the F32 file written from the safetensors copy: 2-D weights
    as float16(F32 value), 1-D norms and the qkv bias bit-identical and still F32.
    """
    f16 = read_gguf_tensors(float_gguf(tmp_path_factory, tiny_ckpt_bin, "F16"))
    f32 = read_gguf_tensors(tiny_f32)
    assert set(f16) == set(f32)
    for name, t in f16.items():
        want = f32[name].array()
        if want.ndim == 2:
            assert t.type == gguf.GGMLQuantizationType.F16, name
            np.testing.assert_array_equal(t.array(), want.astype(np.float16), err_msg=name)
        else:
            assert t.type == gguf.GGMLQuantizationType.F32, name
            np.testing.assert_array_equal(t.array(), want, err_msg=name)
    path = float_gguf(tmp_path_factory, tiny_ckpt_bin, "F16")
    assert read_gguf_metadata(path)[gguf.Keys.General.FILE_TYPE] == str(int(gguf.LlamaFileType.MOSTLY_F16))
    print(f"golden {GOLDEN_CASE} F16 GGUF: max |logit diff| = {check_runs_near_golden(path, golden, 0.05):.2e}")


def test_bf16_keeps_the_checkpoint_bits(tmp_path_factory, tiny_ckpt: Path, golden) -> None:
    """BF16 output is the checkpoint's own bits, no rounding; llama.cpp runs it (bf16 activations: looser)."""
    path = float_gguf(tmp_path_factory, tiny_ckpt, "BF16")
    ckpt = CheckpointReader(tiny_ckpt)
    stored = read_gguf_tensors(path)
    for name, source in [("blk.1.attn_qkv.weight", "transformer.h.1.attn.c_attn.weight"),
                         ("token_embd.weight", "transformer.wte.weight"), ("output.weight", "lm_head.weight")]:
        assert stored[name].type == gguf.GGMLQuantizationType.BF16
        np.testing.assert_array_equal(stored[name].array(), ckpt.record(source).bf16_bits(), err_msg=name)
    assert stored["blk.1.attn_qkv.bias"].type == gguf.GGMLQuantizationType.F32
    assert read_gguf_metadata(path)[gguf.Keys.General.FILE_TYPE] == str(int(gguf.LlamaFileType.MOSTLY_BF16))
    print(f"golden {GOLDEN_CASE} BF16 GGUF: max |logit diff| = {check_runs_near_golden(path, golden, 0.25):.2e}")


def test_f16_refuses_values_it_cannot_hold(tmp_path: Path) -> None:
    """bf16 reaches ~3e38, float16 only 65504: silently writing inf would poison every logit."""
    values = np.array([[1.0, -2.5, 7e4], [0.0, 3.0, -1.0]], dtype=np.float32)
    path = tmp_path / "w.safetensors"
    write_safetensors(path, {"big": values.shape}, lambda _name: f32_to_bf16_bits(values))
    record = read_safetensors(path)["big"]
    with pytest.raises(CheckpointError, match=r"w.safetensors: tensor big has values beyond float16's range"):
        convert_tensor(record, gguf.GGMLQuantizationType.F16)
    np.testing.assert_array_equal(convert_tensor(record, gguf.GGMLQuantizationType.BF16), record.bf16_bits())


def small_vocab_checkpoint(folder: Path) -> Path:
    """A fast checkpoint whose vocab_size (512) is far below what qwen.tiktoken needs."""
    return write_checkpoint(folder, "tiny", seed=3, overrides={"vocab_size": 512})


def test_missing_layer_tensor_is_one_line_error(tmp_path: Path) -> None:
    ckpt = small_vocab_checkpoint(tmp_path / "ckpt")
    reader = CheckpointReader(ckpt)
    shapes = {n: s for n, s in reader.config.tensor_shapes().items() if n != "transformer.h.1.mlp.w2.weight"}
    bits = {n: reader.record(n).bf16_bits().copy() for n in shapes}  # the file is about to be replaced
    (weights,) = reader.files
    del reader
    write_safetensors(weights, shapes, bits.__getitem__)
    with pytest.raises(CheckpointError, match=r"tensor transformer.h.1.mlp.w2.weight is missing") as err:
        write_llm_gguf(CheckpointReader(ckpt), tmp_path / "out" / "llm.gguf")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_vocab_size_too_small_leaves_nothing(tmp_path: Path) -> None:
    reader = CheckpointReader(small_vocab_checkpoint(tmp_path / "ckpt"))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CheckpointError, match=r"vocab_size 512 is smaller than the 151860 tokens") as err:
        write_llm_gguf(reader, out / "llm.gguf", "F32")
    assert "\n" not in str(err.value)
    assert list(out.iterdir()) == []


def test_unknown_out_type(tmp_path: Path, tiny_ckpt: Path) -> None:
    with pytest.raises(QwenVLError, match=r"unknown GGUF output type 'Q4_K_M'; choose F32, F16, BF16"):
        write_llm_gguf(CheckpointReader(tiny_ckpt), tmp_path / "llm.gguf", "Q4_K_M")
    assert list(tmp_path.iterdir()) == []


def test_failure_mid_write_leaves_no_partial_file(tmp_path: Path, tiny_ckpt: Path) -> None:
    """An interruption after some tensors are on disk (here: from the progress callback) removes the temp file."""
    messages: list[str] = []

    def progress(msg: str) -> None:
        messages.append(msg)
        if msg.startswith("[3/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_llm_gguf(CheckpointReader(tiny_ckpt), tmp_path / "llm.gguf", "F16", progress=progress)
    assert messages[0].startswith("vocabulary: 151936 tokens, 151387 merges")
    assert list(tmp_path.iterdir()) == []
