"""The Qwen-VL vision tower (ViT + cross-attention adapter) as one FP32 ONNX graph.

Input ``pixel_values`` float32 [N, 3, S, S] (N dynamic, S = ``visual.image_size``), output
``image_embeds`` float32 [N, 256, hidden]. The math is SPEC "Vision forward"; the graph is shaped
for onnxruntime's CPU kernels: opset 17 ``LayerNormalization`` (ORT's SkipLayerNormalization
fusion does not apply: in pre-norm blocks the residual sum has two readers), the erf-GELU pattern
that ORT fuses with the c_fc bias into BiasGelu, and the ViT's self-attention as
``com.microsoft.MultiHeadAttention`` (49 ms against 65 ms for MatMul/Softmax/MatMul at 1024 tokens,
width 1664, 16 heads, 2 threads). Everything that does not depend on the image is folded at export time: the bicubic
resize of both position tables and the adapter's whole query side.

Weights are read one tensor at a time; above ``external_threshold`` bytes they are appended to
``<out>.data`` as they are made, so the 1.94 B-parameter tower builds in well under 1 GB of RAM
(0.6 GB peak measured with the full-size adapter, whose in_proj is the largest tensor).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from qwenvl_edge import contract
from qwenvl_edge.export.checkpoint import CheckpointReader
from qwenvl_edge.export.config import VisualConfig
from qwenvl_edge.export.onnx_builder import GraphBuilder
from qwenvl_edge.onnx_files import ExternalDataWriter, external_data_path, staged_model_files

log = logging.getLogger(__name__)

INPUT_NAME = contract.VISION_INPUT
OUTPUT_NAME = contract.VISION_OUTPUT
OPSET = 17  # LayerNormalization is opset 17; ORT's fusions match the opset-13/14 element-wise ops
MS_DOMAIN = "com.microsoft"
LN_EPS = 1e-6
ADAPTER_HEAD_DIM = 128
BICUBIC_A = -0.75  # torch's cubic convolution coefficient
EXTERNAL_THRESHOLD_BYTES = 2_000_000_000  # below protobuf's 2 GiB limit, with room for the graph
FORMAT_VERSION = 1
PREFIX = "transformer.visual."


def _cubic_weights(t: float) -> list[float]:
    """torch's ``get_cubic_upsample_coefficients`` for the 4 taps around a source point."""
    a = BICUBIC_A

    def near(x: float) -> float:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: float) -> float:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] float64 matrix of 1-D bicubic interpolation, align_corners=False.

    As ``torch.nn.functional.interpolate(mode="bicubic")``: source x = (i + 0.5) * n_in / n_out - 0.5,
    not clamped at 0; taps floor(x) - 1 .. floor(x) + 2 clamped to the border.
    """
    m = np.zeros((n_out, n_in), dtype=np.float64)
    scale = n_in / n_out
    for i in range(n_out):
        x = (i + 0.5) * scale - 0.5
        x0 = math.floor(x)
        for k, w in enumerate(_cubic_weights(x - x0)):
            m[i, min(max(x0 - 1 + k, 0), n_in - 1)] += w
    return m


def resize_pos_table(table: np.ndarray, grid: int) -> np.ndarray:
    """[n*n, C] position table on an n x n grid -> [grid*grid, C] float32, token = row * grid + col."""
    n = math.isqrt(table.shape[0])
    if n * n != table.shape[0]:
        raise ValueError(f"position table has {table.shape[0]} rows, not a square grid")
    if n == grid:
        return table.astype(np.float32)
    m = bicubic_matrix(n, grid)
    out = np.einsum("ia,jb,abc->ijc", m, m, table.reshape(n, n, -1).astype(np.float64))
    return out.reshape(grid * grid, -1).astype(np.float32)


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = LN_EPS) -> np.ndarray:
    """Float64 LayerNorm over the last axis, for the parts folded at export time."""
    x = x.astype(np.float64)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * weight + bias


def estimate_weight_bytes(vis: VisualConfig, shapes: dict[str, tuple[int, ...]]) -> int:
    """Float32 bytes of the graph's weights: the tower's tensors plus the folded position tables."""
    numel = sum(math.prod(s) for n, s in shapes.items() if n.startswith(PREFIX))
    return 4 * (numel + vis.n_patches * (vis.width + vis.output_dim))


class VisionGraph:
    """Adds the tower's nodes to a ``GraphBuilder``, reading each weight once from the checkpoint."""

    def __init__(self, reader: CheckpointReader, builder: GraphBuilder):
        self.reader = reader
        self.b = builder
        self.vis = reader.config.visual
        self.used: set[str] = set()

    def weight(self, name: str) -> np.ndarray:
        """One checkpoint tensor as float32 (and note it as used, for the all-consumed check)."""
        self.used.add(PREFIX + name)
        return self.reader.tensor(PREFIX + name)

    def check_all_used(self) -> None:
        unused = sorted(set(self.reader.names(PREFIX)) - self.used)
        if unused:
            raise RuntimeError(f"vision export left {len(unused)} tensor(s) unused, e.g. {unused[0]}")

    # -- small pieces ---------------------------------------------------------------------------

    def make_layernorm(self, x: str, ckpt: str, path: str) -> str:
        scale = self.b.make_initializer(self.weight(ckpt + ".weight"), PREFIX + ckpt + ".weight")
        bias = self.b.make_initializer(self.weight(ckpt + ".bias"), PREFIX + ckpt + ".bias")
        return self.b.make_node("LayerNormalization", [x, scale, bias], f"{path}/LayerNormalization",
                                axis=-1, epsilon=LN_EPS)

    def make_linear(self, x: str, path: str, weight_t: np.ndarray, weight_name: str,
                    bias: np.ndarray | None = None, bias_name: str = "") -> str:
        """x @ weight_t (+ bias); ``weight_t`` is already [in, out]."""
        w = self.b.make_initializer(np.ascontiguousarray(weight_t, dtype=np.float32), weight_name)
        y = self.b.make_node("MatMul", [x, w], f"{path}/MatMul")
        if bias is None:
            return y
        bname = self.b.make_initializer(bias.astype(np.float32), bias_name)
        return self.b.make_node("Add", [y, bname], f"{path}/Add")

    def make_checkpoint_linear(self, x: str, ckpt: str, path: str) -> str:
        """A torch Linear stored as [out, in] plus ``.bias``."""
        w, b = self.weight(ckpt + ".weight"), self.weight(ckpt + ".bias")
        return self.make_linear(x, path, w.T, PREFIX + ckpt + ".weight", b, PREFIX + ckpt + ".bias")

    def make_gelu(self, x: str, path: str) -> str:
        """Exact GELU written as the pattern ORT fuses into one Gelu kernel.

        x -> Div(sqrt 2) -> Erf -> Add(1) -> Mul(x) -> Mul(0.5)
        """
        d = self.b.make_node("Div", [x, self.b.make_constant(math.sqrt(2.0), np.float32)], f"{path}/Div")
        e = self.b.make_node("Erf", [d], f"{path}/Erf")
        a = self.b.make_node("Add", [e, self.b.make_constant(1.0, np.float32)], f"{path}/Add")
        m = self.b.make_node("Mul", [x, a], f"{path}/Mul")
        return self.b.make_node("Mul", [m, self.b.make_constant(0.5, np.float32)], f"{path}/Mul_1")

    # -- the tower --------------------------------------------------------------------------------

    def make_patch_embed(self, pixels: str) -> str:
        """Patches -> tokens [N, grid*grid, W] plus the resized positional embedding, then ln_pre.

        pixels -> Conv(stride = patch) -> Reshape [N, W, L] -> Transpose [N, L, W] -> Add(pos) -> ln_pre
        """
        vis = self.vis
        p = vis.patch_size
        conv_w = self.b.make_initializer(self.weight("conv1.weight"), PREFIX + "conv1.weight")
        x = self.b.make_node("Conv", [pixels, conv_w], "/visual/conv1/Conv",
                             kernel_shape=[p, p], strides=[p, p])  # no bias
        x = self.b.make_node("Reshape", [x, self.b.make_constant([0, vis.width, vis.n_patches])],
                             "/visual/patches/Reshape")
        x = self.b.make_node("Transpose", [x], "/visual/patches/Transpose", perm=[0, 2, 1])
        pos = resize_pos_table(self.weight("positional_embedding"), vis.grid)  # [L, W]
        pos_name = self.b.make_initializer(pos, PREFIX + "positional_embedding/resized")
        x = self.b.make_node("Add", [x, pos_name], "/visual/pos/Add")
        return self.make_layernorm(x, "ln_pre", "/visual/ln_pre")

    def make_self_attention(self, x: str, i: int) -> str:
        """The ViT's attention. in_proj rows come per head as [q_h | k_h | v_h]; they are regrouped
        here to all-q | all-k | all-v so one MatMul + Split feeds MultiHeadAttention.

        x -> MatMul+Add (in_proj) -> Split(q, k, v) -> MultiHeadAttention -> MatMul+Add (out_proj)
        """
        vis, ckpt, path = self.vis, f"transformer.resblocks.{i}.attn", f"/visual/blocks.{i}/attn"
        w, hd = vis.width, vis.head_dim
        in_w = self.weight(ckpt + ".in_proj.weight").reshape(vis.heads, 3, hd, w).transpose(1, 0, 2, 3)
        in_b = self.weight(ckpt + ".in_proj.bias").reshape(vis.heads, 3, hd).transpose(1, 0, 2)
        name = PREFIX + ckpt + ".in_proj"
        qkv = self.make_linear(x, f"{path}/in_proj", in_w.reshape(3 * w, w).T, name + ".weight",
                               in_b.reshape(3 * w), name + ".bias")
        del in_w
        sizes, outs = self.b.make_constant([w, w, w]), [f"{path}/Split/output_{j}" for j in range(3)]
        q, k, v = self.b.make_multi_output_node("Split", [qkv, sizes], f"{path}/Split", outs, axis=-1)
        o = self.b.make_node("MultiHeadAttention", [q, k, v], f"{path}/MultiHeadAttention", domain=MS_DOMAIN,
                             num_heads=vis.heads)
        self.b.make_value_info(o, TensorProto.FLOAT, ["batch", vis.n_patches, w])  # ONNX cannot infer it
        return self.make_checkpoint_linear(o, ckpt + ".out_proj", f"{path}/out_proj")

    def make_block(self, x: str, i: int) -> str:
        """Pre-norm block: x += attn(ln_1(x)); x += c_proj(gelu(c_fc(ln_2(x))))."""
        ckpt, path = f"transformer.resblocks.{i}", f"/visual/blocks.{i}"
        h = self.make_layernorm(x, ckpt + ".ln_1", f"{path}/ln_1")
        x = self.b.make_node("Add", [x, self.make_self_attention(h, i)], f"{path}/attn_residual/Add")
        h = self.make_layernorm(x, ckpt + ".ln_2", f"{path}/ln_2")
        h = self.make_checkpoint_linear(h, ckpt + ".mlp.c_fc", f"{path}/mlp/c_fc")
        h = self.make_gelu(h, f"{path}/mlp/gelu")
        h = self.make_checkpoint_linear(h, ckpt + ".mlp.c_proj", f"{path}/mlp/c_proj")
        return self.b.make_node("Add", [x, h], f"{path}/mlp_residual/Add")

    def make_adapter(self, x: str) -> str:
        """The Resampler: 256 learned queries cross-attend to the tokens (torch MultiheadAttention).

        The query side (ln_q(query) + pos_embed, its projection, the 1/sqrt(128) scale) does not
        depend on the image and is folded into one constant Q [heads, 256, 128].

        x -> kv_proj -> ln_kv = kv;  key = kv + pos(resized) -> k_proj;  value = kv -> v_proj
        Q @ K^T -> Softmax -> @ V -> out_proj
        """
        vis, path, a = self.vis, "/visual/adapter", "attn_pool."
        d, heads, hd = vis.output_dim, vis.adapter_heads, ADAPTER_HEAD_DIM
        kv = self.make_linear(x, f"{path}/kv_proj", self.weight(a + "kv_proj.weight").T,
                              PREFIX + a + "kv_proj.weight")
        kv = self.make_layernorm(kv, a + "ln_kv", f"{path}/ln_kv")

        pos_embed = self.weight(a + "pos_embed")  # [256, D]
        pos_resized = self.b.make_initializer(resize_pos_table(pos_embed, vis.grid),
                                              PREFIX + a + "pos_embed/resized")
        key = self.b.make_node("Add", [kv, pos_resized], f"{path}/key_pos/Add")

        # torch MultiheadAttention: rows all-q, then all-k, then all-v
        in_w, in_b = self.weight(a + "attn.in_proj_weight"), self.weight(a + "attn.in_proj_bias")
        q = layer_norm(self.weight(a + "query"), self.weight(a + "ln_q.weight"), self.weight(a + "ln_q.bias"))
        q = ((q + pos_embed) @ in_w[:d].T.astype(np.float64) + in_b[:d]) / math.sqrt(hd)  # [256, D]
        q_name = self.b.make_initializer(q.reshape(-1, heads, hd).transpose(1, 0, 2).astype(np.float32),
                                         PREFIX + a + "query/projected")
        wn, bn = PREFIX + a + "attn.in_proj_weight", PREFIX + a + "attn.in_proj_bias"
        k = self.make_linear(key, f"{path}/attn/k_proj", in_w[d:2 * d].T, wn + "/k", in_b[d:2 * d], bn + "/k")
        v = self.make_linear(kv, f"{path}/attn/v_proj", in_w[2 * d:].T, wn + "/v", in_b[2 * d:], bn + "/v")
        del in_w

        heads_shape = self.b.make_constant([0, 0, heads, hd])
        k = self.b.make_node("Reshape", [k, heads_shape], f"{path}/attn/k_heads/Reshape")
        k = self.b.make_node("Transpose", [k], f"{path}/attn/k_heads/Transpose", perm=[0, 2, 3, 1])
        v = self.b.make_node("Reshape", [v, heads_shape], f"{path}/attn/v_heads/Reshape")
        v = self.b.make_node("Transpose", [v], f"{path}/attn/v_heads/Transpose", perm=[0, 2, 1, 3])
        scores = self.b.make_node("MatMul", [q_name, k], f"{path}/attn/scores/MatMul")  # [N, h, 256, L]
        probs = self.b.make_node("Softmax", [scores], f"{path}/attn/Softmax", axis=-1)
        o = self.b.make_node("MatMul", [probs, v], f"{path}/attn/context/MatMul")  # [N, h, 256, hd]
        o = self.b.make_node("Transpose", [o], f"{path}/attn/context/Transpose", perm=[0, 2, 1, 3])
        o = self.b.make_node("Reshape", [o, self.b.make_constant([0, 0, d])], f"{path}/attn/context/Reshape")
        return self.make_checkpoint_linear(o, a + "attn.out_proj", f"{path}/attn/out_proj")

    def make_output(self, x: str) -> str:
        """ln_post, then ``x @ proj`` (proj is stored [in, out]: a plain product, no transpose)."""
        x = self.make_layernorm(x, "ln_post", "/visual/ln_post")
        proj = self.b.make_initializer(self.weight("proj"), PREFIX + "proj")
        return self.b.make_node("MatMul", [x, proj], "/visual/proj/MatMul", output=OUTPUT_NAME)


def _make_vision_model(reader: CheckpointReader, builder: GraphBuilder,
                       progress: Callable[[str], None]) -> onnx.ModelProto:
    vis = reader.config.visual
    graph = VisionGraph(reader, builder)
    progress("vision: patch embedding")
    x = graph.make_patch_embed(INPUT_NAME)
    for i in range(vis.layers):
        progress(f"vision: block {i + 1}/{vis.layers}")
        x = graph.make_block(x, i)
    progress("vision: adapter")
    x = graph.make_output(graph.make_adapter(x))
    graph.check_all_used()
    s = vis.image_size
    inputs = [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 3, s, s])]
    outputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", vis.n_queries, vis.output_dim])]
    meta = {"qwenvl_edge.format_version": str(FORMAT_VERSION),
            "qwenvl_edge.visual_config": json.dumps(reader.config.to_dict()["visual"], sort_keys=True)}
    doc = "Qwen-VL vision tower + adapter: pixel_values -> image_embeds"
    return builder.make_model("qwen_vl_vision", inputs, outputs, {"": OPSET, MS_DOMAIN: 1}, doc, meta)


def build_vision_onnx(reader: CheckpointReader, out_path: Path, progress: Callable[[str], None] | None = None,
                      external_threshold: int = EXTERNAL_THRESHOLD_BYTES) -> Path:
    """Write the FP32 vision graph to ``out_path`` (+ ``<out_path>.data`` when over ``external_threshold``).

    Built in a hidden sibling folder and moved into place at the end: on failure nothing is left.
    """
    out_path = Path(out_path)
    report = progress or (lambda msg: log.info("%s", msg))
    external = estimate_weight_bytes(reader.config.visual, reader.config.tensor_shapes()) > external_threshold
    with staged_model_files(out_path) as staged:
        if external:
            data = external_data_path(staged)
            with open(data, "wb") as f:
                model = _make_vision_model(reader, GraphBuilder(ExternalDataWriter(f, data.name)), report)
        else:
            model = _make_vision_model(reader, GraphBuilder(), report)
        with open(staged, "wb") as f:
            f.write(model.SerializeToString())
        del model
        onnx.checker.check_model(str(staged))
    size = out_path.stat().st_size + (external_data_path(out_path).stat().st_size if external else 0)
    report(f"vision: wrote {out_path} ({size / 2**20:.1f} MiB{', external data' if external else ''})")
    return out_path
