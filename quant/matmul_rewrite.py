"""Weight MatMuls quantized tensor by tensor, straight into onnxruntime's fused INT8 operators.

onnxruntime's ``quantize_dynamic`` rewrites a graph in whole-graph passes and quantizes per output
channel in a Python loop over channels (8,192 calls for one full-size MLP weight): about 150 s per
600 MB piece at full size, 23 x the FP32 export itself. The graph it makes is fused by the session
into one ``DynamicQuantizeMatMul`` per MatMul anyway. So each weight MatMul is written here as that
fused operator (or as ``MatMulNBits``) directly, its weight quantized alone, vectorized:

- ``DynamicQuantizeMatMul`` (the ``dynamic`` schemes): the weight per output channel (or per tensor)
  with the same scale, zero point and rounding as ``onnxruntime.quantization.quantize_data`` (tested
  equal to ``quantize_dynamic``'s weights), activations quantized to uint8 at run time.
- ``MatMulNBits`` (the ``nbits`` schemes): blocks of ``block_size`` along K, packed by onnxruntime's
  own ``quantize_matmul_8bits`` / ``quantize_matmul_4bits``; ``accuracy_level`` 4 asks for int8
  activations (per block) in the product.

Every other node and initializer passes through unchanged, so FP32 stays exact where nothing is quantized.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

from qwenvl_edge.quant.registry import Int8Scheme

MS_DOMAIN = "com.microsoft"

# (qmin, qmax) as onnxruntime.quantization.quant_utils.get_qmin_qmax_for_qType gives them
_RANGES: dict[tuple[str, bool, bool], tuple[int, int]] = {  # (weight type, symmetric, reduce_range)
    ("QUInt8", False, False): (0, 255),
    ("QUInt8", False, True): (0, 127),
    ("QInt8", True, False): (-127, 127),
    ("QInt8", True, True): (-64, 64),
}


def quantize_weight(w: np.ndarray, s: Int8Scheme) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(quantized [K, N], scale [N] or [], zero point like scale) of a MatMul weight [K, N] for a dynamic scheme.

    The arithmetic of ``quant_utils.compute_scale_zp`` + ``quantize_nparray``, one column at a time in
    onnxruntime, here all columns at once: the range is widened to hold 0, made symmetric for int8, the
    scale is computed in float64 and stored as float32, values are divided by the stored scale in float32,
    rounded half to even, shifted and clipped.
    """
    symmetric = s.weight_type == "QInt8"
    qmin, qmax = _RANGES[(s.weight_type, symmetric, s.reduce_range)]
    axis = 0 if s.per_channel else None
    rmin = np.minimum(w.min(axis=axis), np.float32(0))
    rmax = np.maximum(w.max(axis=axis), np.float32(0))
    if symmetric:
        rmax = np.maximum(np.abs(rmin), np.abs(rmax))
        rmin = -rmax
    scale64 = (rmax.astype(np.float64) - rmin.astype(np.float64)) / float(qmax - qmin)
    tiny = scale64 < np.finfo(np.float32).tiny  # an all-zero column: scale 1, zero point 0
    scale = np.where(tiny, 1.0, scale64).astype(np.float32)
    if symmetric:
        zero = np.zeros_like(scale64)
    else:
        zero = np.where(tiny, 0.0, np.round(qmin - rmin.astype(np.float64) / np.where(tiny, 1.0, scale64)))
    dtype = np.int8 if symmetric else np.uint8
    q = np.clip((w.astype(np.float32) / scale).round() + zero.astype(np.float32), qmin, qmax).astype(dtype)
    return q, scale, zero.astype(dtype)


def block_quantize(w: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(packed [N, K/block, block*bits/8] uint8, scales [N, K/block]) of a weight [K, N], symmetric,
    by onnxruntime's C++ packer (the layout ``MatMulNBits`` reads)."""
    k, n = w.shape
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, n), np.float32)
    padded[:k] = w
    per_byte = 8 // bits
    packed = np.zeros((n, blocks, -(-block_size // per_byte)), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    zero_points = np.zeros((n, -(-blocks // per_byte)), np.uint8)  # unused: symmetric
    pack = quantize_matmul_8bits if bits == 8 else quantize_matmul_4bits
    pack(packed, padded, scales, zero_points, block_size, n, blocks * block_size, True)
    return packed, scales


def quantized_matmul(node: onnx.NodeProto, w: np.ndarray, s: Int8Scheme
                     ) -> tuple[onnx.NodeProto, list[tuple[str, np.ndarray]]]:
    """The fused INT8 operator that replaces ``node`` (a MatMul of weight ``w``), and its new initializers.

    Same output name, so every reader of the MatMul reads the operator; the weight keeps its name with a
    suffix, so names stay unique in any graph the MatMul came from."""
    a, b = node.input[0], node.input[1]
    if w.ndim != 2:
        raise ValueError(f"{node.name}: weight {b} has shape {w.shape}; only 2-D MatMul weights are quantized")
    if s.method == "nbits":
        packed, scales = block_quantize(w, s.bits, s.block_size)
        inits = [(f"{b}_q{s.bits}", packed), (f"{b}_scales", scales)]
        out = helper.make_node("MatMulNBits", [a, *(name for name, _ in inits)], list(node.output),
                               name=f"{node.name}_Q{s.bits}", domain=MS_DOMAIN, K=w.shape[0], N=w.shape[1],
                               bits=s.bits, block_size=s.block_size, accuracy_level=s.accuracy_level)
        return out, inits
    q, scale, zero = quantize_weight(w, s)
    inits = [(f"{b}_quantized", q), (f"{b}_scale", scale), (f"{b}_zero_point", zero)]
    out = helper.make_node("DynamicQuantizeMatMul", [a, *(name for name, _ in inits)], list(node.output),
                           name=f"{node.name}_quant", domain=MS_DOMAIN)
    return out, inits


def rewrite_nodes(graph: onnx.GraphProto, quantize: set[str], weight: Callable[[str], np.ndarray], s: Int8Scheme
                  ) -> Iterator[tuple[onnx.NodeProto, list[tuple[str, np.ndarray]]]]:
    """(node, new initializers) for every node of ``graph`` in order, the MatMuls named in ``quantize``
    replaced; ``weight(name)`` reads one FP32 weight when it is needed, so one tensor is in memory at a time."""
    for node in graph.node:
        if node.name in quantize:
            yield quantized_matmul(node, weight(node.input[1]), s)
        else:
            yield node, []


def ensure_ms_opset(model: onnx.ModelProto) -> None:
    """The contrib operators live in the ``com.microsoft`` domain, version 1."""
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def rewrite_model(model: onnx.ModelProto, quantize: set[str], s: Int8Scheme,
                  weight: Callable[[str], np.ndarray] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` with the MatMuls in ``quantize`` as fused INT8 operators; the FP32 weights they
    read are dropped unless another node reads them too. ``weight`` reads one weight (default: inline ones);
    the initializers that stay are copied as they are, external references included."""
    inits = {t.name: t for t in model.graph.initializer}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    del g.node[:], g.initializer[:]
    added: list[TensorProto] = []
    read_weight = weight or (lambda name: numpy_helper.to_array(inits[name]))
    for node, new in rewrite_nodes(model.graph, quantize, read_weight, s):
        g.node.append(node)
        added.extend(numpy_helper.from_array(array, name) for name, array in new)
    read = {i for n in g.node for i in n.input}
    g.initializer.extend(t for t in model.graph.initializer if t.name in read)
    g.initializer.extend(added)
    if quantize:
        ensure_ms_opset(out)
    return out
