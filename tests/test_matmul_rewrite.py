"""The tensor-by-tensor INT8 rewrite against onnxruntime's own quantizer: same weights, same rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from qwenvl_edge.quant.matmul_rewrite import block_quantize, quantize_weight, rewrite_model
from qwenvl_edge.quant.registry import SCHEMES

DYNAMIC = [name for name, s in SCHEMES.items() if s.method == "dynamic"]
NBITS = [name for name, s in SCHEMES.items() if s.method == "nbits"]


def _weight(k: int, n: int, seed: int) -> np.ndarray:
    """Columns a real ViT has: ordinary, an outlier column, all zero, all negative, all positive, one value."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    w[:, 1] *= 40
    w[:, 2] = 0
    w[:, 3] = -np.abs(w[:, 3])
    w[:, 4] = np.abs(w[:, 4])
    w[:, 5] = 0.3
    w[7, 6] = 9.0  # one outlier weight
    return w


def _matmul_model(w: np.ndarray, path: Path) -> Path:
    k, n = w.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="/blk/mlp/MatMul")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "t", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "t", n])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def _run(path_or_model, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    source = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("scheme", DYNAMIC)
@pytest.mark.parametrize("shape", [(64, 48), (200, 33), (17, 8)])
def test_weights_equal_quantize_dynamic(tmp_path: Path, scheme: str, shape: tuple[int, int]) -> None:
    s = SCHEMES[scheme]
    w = _weight(*shape, seed=shape[0])
    src = _matmul_model(w, tmp_path / "fp32.onnx")
    quantize_dynamic(src, tmp_path / "ort.onnx", per_channel=s.per_channel, weight_type=QuantType[s.weight_type],
                     reduce_range=s.reduce_range)
    theirs = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "ort.onnx")).graph.initializer}
    q, scale, zero = quantize_weight(w, s)
    np.testing.assert_array_equal(q, theirs["w_quantized"])
    np.testing.assert_array_equal(scale.reshape(-1), theirs["w_scale"].reshape(-1))
    np.testing.assert_array_equal(zero.reshape(-1), theirs["w_zero_point"].reshape(-1))

    x = np.random.default_rng(1).standard_normal((1, 9, shape[0])).astype(np.float32)
    ours = rewrite_model(onnx.load(str(src)), {"/blk/mlp/MatMul"}, s)
    assert [n.op_type for n in ours.graph.node] == ["DynamicQuantizeMatMul"]
    np.testing.assert_allclose(_run(ours, x), _run(tmp_path / "ort.onnx", x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("scheme", NBITS)
@pytest.mark.parametrize("k", [256, 200])
def test_nbits_blocks_hold_the_weight(tmp_path: Path, scheme: str, k: int) -> None:
    """Each block's values come back within a step of its own scale (half a step but at the clipped end of
    the symmetric range: -128 .. 127 holds -absmax, not +absmax), and the operator's rows follow
    the float product as closely as the bits allow (K not a multiple of the block is padded)."""
    s = SCHEMES[scheme]
    w = _weight(k, 40, seed=k)
    packed, scales = block_quantize(w, s.bits, s.block_size)
    blocks = scales.shape[1]
    assert scales.shape == (40, -(-k // s.block_size)) and packed.shape[:2] == (40, blocks)
    per_byte = 8 // s.bits
    raw = packed.reshape(40, -1)
    if s.bits == 4:
        values = np.stack([raw & 15, raw >> 4], -1).reshape(40, -1).astype(np.int16) - 8
    else:
        values = raw.astype(np.int16) - 128
    assert values.shape[1] == blocks * s.block_size and per_byte in (1, 2)
    back = (values.reshape(40, blocks, s.block_size) * scales[..., None]).reshape(40, -1)[:, :k].T
    step = np.abs(np.repeat(scales.T, s.block_size, axis=0)[:k])  # symmetric: the scale may be negative
    error = np.abs(back - w)
    assert np.all(error <= step + 1e-7) and np.mean(error <= step * 0.5 + 1e-7) > 0.98

    x = np.random.default_rng(2).standard_normal((1, 12, k)).astype(np.float32)
    model = onnx.load(str(_matmul_model(w, tmp_path / "fp32.onnx")))
    got = _run(rewrite_model(model, {"/blk/mlp/MatMul"}, s), x)
    want = x @ w
    cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert cos.min() > (0.999 if s.bits == 8 else 0.95)  # 4 bits: the outlier weight coarsens its block


def test_untouched_model_is_unchanged(tmp_path: Path) -> None:
    model = onnx.load(str(_matmul_model(_weight(32, 16, 0), tmp_path / "fp32.onnx")))
    same = rewrite_model(model, set(), SCHEMES["dynamic-u8"])
    assert same.SerializeToString() == model.SerializeToString()
