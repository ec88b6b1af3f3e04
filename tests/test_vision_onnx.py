"""export.vision_onnx + runtime.vision: the FP32 graph against the golden rows and a float64 numpy reference.

The reference below is written from SPEC "Vision forward" alone (its own bicubic kernel, the
per-head q|k|v split the original does at run time, torch MultiheadAttention for the adapter), so
a shared misreading of the spec between it and the exporter is the only thing it cannot catch;
the golden rows of the original implementation cover that for the tiny sizes.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from qwenvl_edge.errors import BundleError, CheckpointError
from qwenvl_edge.export.checkpoint import CheckpointReader
from qwenvl_edge.export.config import QwenConfig
from qwenvl_edge.export.safetensors_io import write_safetensors
from qwenvl_edge.export.synthetic_checkpoint import write_checkpoint
from qwenvl_edge.export.vision_onnx import build_vision_onnx
from qwenvl_edge.runtime.preprocess import preprocess_batch
from qwenvl_edge.runtime.vision import VisionEncoder

GOLDEN_TOL = 1e-4  # golden/README.md: FP32 ONNX rows within 1e-4 max abs (rows have std ~1)
REFERENCE_TOL = 2e-5  # float32 graph vs float64 numpy: measured 3.5e-6 (tiny, odd), so 5x headroom
SMALL_LLM = {"vocab_size": 512, "num_hidden_layers": 1}  # the vision tests never read the LLM part


# -- an independent float64 reference of SPEC "Vision forward" ------------------------------------

def keys_cubic(d: float, a: float = -0.75) -> float:
    """Keys' cubic convolution kernel, torch's A = -0.75."""
    d = abs(d)
    if d <= 1:
        return (a + 2) * d**3 - (a + 3) * d**2 + 1
    if d < 2:
        return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
    return 0.0


def ref_interpolation(n_in: int, n_out: int) -> np.ndarray:
    """Each output sample as weights over the input: torch's half-pixel source position, no clamp of
    the position itself, the four taps around it clamped to the border."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        for tap in range(math.floor(src) - 1, math.floor(src) + 3):
            m[i, min(max(tap, 0), n_in - 1)] += keys_cubic(src - tap)
    return m


def ref_resize(table: np.ndarray, grid: int) -> np.ndarray:
    """[n*n, C] -> [grid*grid, C]: resize the columns of the n x n grid, then its rows (separable)."""
    n = math.isqrt(len(table))
    m = ref_interpolation(n, grid)
    image = table.reshape(n, n, -1)  # [row, col, C]
    taller = np.einsum("ia,abc->ibc", m, image)  # [grid, n, C]
    return np.einsum("jb,ibc->ijc", m, taller).reshape(grid * grid, -1)


def ref_layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-6) * w + b


def ref_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


ERF = np.frompyfunc(math.erf, 1, 1)


def ref_vision(reader: CheckpointReader, pixels: np.ndarray) -> np.ndarray:
    """[N, 3, S, S] -> [N, 256, D], float64 throughout."""
    vis = reader.config.visual

    def t(name: str) -> np.ndarray:
        return reader.tensor("transformer.visual." + name).astype(np.float64)

    def ln(x: np.ndarray, name: str) -> np.ndarray:
        return ref_layer_norm(x, t(name + ".weight"), t(name + ".bias"))

    n, p, g, w = len(pixels), vis.patch_size, vis.grid, vis.width
    patches = pixels.astype(np.float64).reshape(n, 3, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(n, g * g, -1)
    x = patches @ t("conv1.weight").reshape(w, -1).T  # conv1 as a matmul over patches, token = row * g + col
    x = ln(x + ref_resize(t("positional_embedding"), g), "ln_pre")
    hd = vis.head_dim
    for i in range(vis.layers):
        b = f"transformer.resblocks.{i}."
        h = ln(x, b + "ln_1")
        qkv = (h @ t(b + "attn.in_proj.weight").T + t(b + "attn.in_proj.bias")).reshape(n, g * g, vis.heads, 3 * hd)
        q, k, v = qkv[..., :hd], qkv[..., hd:2 * hd], qkv[..., 2 * hd:]  # per head: q_h | k_h | v_h
        probs = ref_softmax(np.einsum("nqhd,nkhd->nhqk", q / math.sqrt(hd), k))
        o = np.einsum("nhqk,nkhd->nqhd", probs, v).reshape(n, g * g, w)
        x = x + o @ t(b + "attn.out_proj.weight").T + t(b + "attn.out_proj.bias")
        h = ln(x, b + "ln_2") @ t(b + "mlp.c_fc.weight").T + t(b + "mlp.c_fc.bias")
        h = 0.5 * h * (1 + ERF(h / math.sqrt(2)).astype(np.float64))
        x = x + h @ t(b + "mlp.c_proj.weight").T + t(b + "mlp.c_proj.bias")

    a, d = "attn_pool.", vis.output_dim
    kv = ln(x @ t(a + "kv_proj.weight").T, a + "ln_kv")
    query = ln(t(a + "query"), a + "ln_q")
    pos = t(a + "pos_embed")
    in_w, in_b = t(a + "attn.in_proj_weight"), t(a + "attn.in_proj_bias")
    q = (query + pos) @ in_w[:d].T + in_b[:d]  # [256, D]
    k = (kv + ref_resize(pos, g)) @ in_w[d:2 * d].T + in_b[d:2 * d]  # [N, L, D]
    v = kv @ in_w[2 * d:].T + in_b[2 * d:]
    heads, ahd = d // 128, 128
    qh = q.reshape(-1, heads, ahd)
    kh, vh = k.reshape(n, -1, heads, ahd), v.reshape(n, -1, heads, ahd)
    probs = ref_softmax(np.einsum("qhd,nkhd->nhqk", qh, kh) / math.sqrt(ahd))
    o = np.einsum("nhqk,nkhd->nqhd", probs, vh).reshape(n, -1, d)
    o = o @ t(a + "attn.out_proj.weight").T + t(a + "attn.out_proj.bias")
    return ln(o, "ln_post") @ t("proj")


# -- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_onnx(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_vision_onnx(CheckpointReader(tiny_ckpt), tmp_path_factory.mktemp("vision") / "vision.onnx")


@pytest.fixture(scope="session")
def tiny_bin_onnx(tiny_ckpt_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_vision_onnx(CheckpointReader(tiny_ckpt_bin), tmp_path_factory.mktemp("vision") / "vision.onnx")


@pytest.fixture(scope="session")
def tiny_external_onnx(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The > 2 GB code path (weights streamed into vision.onnx.data), forced by a zero threshold."""
    return build_vision_onnx(CheckpointReader(tiny_ckpt), tmp_path_factory.mktemp("vision_ext") / "vision.onnx",
                             external_threshold=0)


@pytest.fixture(scope="session")
def golden_batch(golden) -> np.ndarray:
    return preprocess_batch([golden.images["sign"], golden.images["noise"]])  # (2, 3, 448, 448)


def encode(path: Path, pixels: np.ndarray) -> np.ndarray:
    with VisionEncoder(path) as encoder:
        return encoder.encode(pixels)


# -- golden ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["tiny_onnx", "tiny_bin_onnx", "tiny_external_onnx"])
def test_rows_match_golden_through_the_encoder(request, golden, golden_batch, model: str) -> None:
    rows = encode(request.getfixturevalue(model), golden_batch)
    assert rows.shape == (2, 256, 256) and rows.dtype == np.float32
    assert np.abs(rows[0] - golden.vision("sign")).max() < GOLDEN_TOL
    assert np.abs(rows[1] - golden.vision("noise")).max() < GOLDEN_TOL


@pytest.mark.parametrize("model", ["tiny_onnx", "tiny_bin_onnx"])
def test_rows_match_golden_as_a_batch_in_one_run(request, golden, golden_batch, model: str) -> None:
    """The graph's batch axis (VisionEncoder itself runs one image at a time)."""
    session = ort.InferenceSession(str(request.getfixturevalue(model)), providers=["CPUExecutionProvider"])
    (rows,) = session.run(["image_embeds"], {"pixel_values": golden_batch})
    assert rows.shape == (2, 256, 256)
    assert np.abs(rows[0] - golden.vision("sign")).max() < GOLDEN_TOL
    assert np.abs(rows[1] - golden.vision("noise")).max() < GOLDEN_TOL


def test_encoder_reports_sizes(tiny_onnx: Path) -> None:
    with VisionEncoder(tiny_onnx, n_threads=1) as encoder:
        assert (encoder.image_size, encoder.hidden_size) == (448, 256)
        assert encoder.encode(np.zeros((0, 3, 448, 448), np.float32)).shape == (0, 256, 256)
        with pytest.raises(ValueError, match=r"\[N, 3, 448, 448\]"):
            encoder.encode(np.zeros((1, 3, 224, 224), np.float32))
    encoder.close()  # twice is fine
    with pytest.raises(ValueError, match="closed"):
        encoder.encode(np.zeros((1, 3, 448, 448), np.float32))


# -- other sizes vs the numpy reference -----------------------------------------------------------

def test_reference_matches_golden(tiny_ckpt: Path, golden, golden_batch) -> None:
    """The reference is itself checked against the original implementation (measured 2.9e-6)."""
    rows = ref_vision(CheckpointReader(tiny_ckpt), golden_batch)
    assert np.abs(rows[0] - golden.vision("sign")).max() < REFERENCE_TOL
    assert np.abs(rows[1] - golden.vision("noise")).max() < REFERENCE_TOL


def test_odd_sizes_match_numpy_reference(odd_ckpt: Path, golden_batch, tmp_path: Path) -> None:
    reader = CheckpointReader(odd_ckpt)
    vis = reader.config.visual
    assert (vis.width, vis.heads, vis.layers) == (96, 2, 3)
    rows = encode(build_vision_onnx(reader, tmp_path / "vision.onnx"), golden_batch)
    assert np.abs(rows - ref_vision(reader, golden_batch)).max() < REFERENCE_TOL


@pytest.fixture(scope="session")
def grid20_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """280 px input (20 x 20 patches: a non-integer 16 -> 20 resize), 3 heads of 16, 1 block, 2 adapter heads."""
    folder = write_checkpoint(tmp_path_factory.mktemp("ckpt") / "grid20", "tiny", seed=11, shard_bytes=None,
                              overrides={**SMALL_LLM, "visual": {"width": 48, "heads": 3, "layers": 1}})
    config = json.loads((folder / "config.json").read_text())
    config["visual"]["image_size"] = 280
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_other_image_size_matches_numpy_reference(grid20_ckpt: Path, golden, tmp_path: Path) -> None:
    reader = CheckpointReader(grid20_ckpt)
    pixels = preprocess_batch([golden.images["sign"], golden.images["noise"]], 280)
    with VisionEncoder(build_vision_onnx(reader, tmp_path / "vision.onnx")) as encoder:
        assert encoder.image_size == 280
        rows = encoder.encode(pixels)
    assert np.abs(rows - ref_vision(reader, pixels)).max() < REFERENCE_TOL


def test_reference_resize_on_hand_computed_values() -> None:
    """2 -> 4 samples: phases 0.75 and 0.25 of the A = -0.75 kernel, i.e. the weights
    (-0.03515625, 0.26171875, 0.87890625, -0.10546875) and their mirror, summed where taps clamp."""
    expected = np.array([[1.10546875, -0.10546875], [0.7734375, 0.2265625],
                         [0.2265625, 0.7734375], [-0.10546875, 1.10546875]])
    np.testing.assert_allclose(ref_interpolation(2, 4), expected, atol=1e-12)
    np.testing.assert_allclose(ref_interpolation(16, 16), np.eye(16), atol=1e-12)  # same size: identity


# -- the graph itself -----------------------------------------------------------------------------

def test_signature_and_metadata(tiny_onnx: Path, tiny_ckpt: Path) -> None:
    model = onnx.load(str(tiny_onnx))
    (x,), (y,) = model.graph.input, model.graph.output
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (x, y)]
    assert (x.name, y.name) == ("pixel_values", "image_embeds")
    assert dims == [["batch", 3, 448, 448], ["batch", 256, 256]]
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["qwenvl_edge.visual_config"]) == QwenConfig.from_file(tiny_ckpt / "config.json") \
        .to_dict()["visual"]
    names = {n.name for n in model.graph.node}
    assert "/visual/blocks.1/attn/MultiHeadAttention" in names and "/visual/proj/MatMul" in names
    assert len(names) == len(model.graph.node)  # node names are unique paths
    consts = [t.name for t in model.graph.initializer if t.name.startswith("/constants/")]
    assert len(consts) == len(set(consts))


def test_onnxruntime_fuses_gelu_and_keeps_fused_kernels(tiny_onnx: Path, tmp_path: Path) -> None:
    """The graph is written for ORT's CPU fusions; if an opset or pattern change breaks them, this says so."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(tiny_onnx), options, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    assert ops["BiasGelu"] == 2 and ops["Erf"] == 0  # erf-GELU + c_fc bias -> one kernel per block
    assert ops["MultiHeadAttention"] == 2 and ops["LayerNormalization"] == 2 * 2 + 3


def test_small_model_is_one_file_and_external_data_is_used_above_threshold(tiny_onnx: Path,
                                                                           tiny_external_onnx: Path) -> None:
    assert sorted(p.name for p in tiny_onnx.parent.iterdir()) == ["vision.onnx"]
    assert sorted(p.name for p in tiny_external_onnx.parent.iterdir()) == ["vision.onnx", "vision.onnx.data"]
    assert tiny_external_onnx.stat().st_size < 100_000  # the graph only
    model = onnx.load(str(tiny_external_onnx), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert len(external) > 20
    offsets = {e.key: e.value for e in external[0].external_data}
    assert offsets["location"] == "vision.onnx.data" and int(offsets["offset"]) % 4096 == 0


def test_build_replaces_an_old_file_and_progress_is_reported(tiny_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "vision.onnx"
    out.write_bytes(b"old")
    (tmp_path / "vision.onnx.data").write_bytes(b"stale")
    messages: list[str] = []
    build_vision_onnx(CheckpointReader(tiny_ckpt), out, progress=messages.append)
    assert "vision: block 2/2" in messages and messages[-1].startswith("vision: wrote")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vision.onnx"]
    onnx.checker.check_model(str(out))


# -- failures -------------------------------------------------------------------------------------

@pytest.fixture
def small_ckpt(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "small", "tiny", seed=3, shard_bytes=None, overrides=SMALL_LLM)


def test_wrong_shaped_tensor_is_a_one_line_checkpoint_error(small_ckpt: Path) -> None:
    shapes = QwenConfig.from_file(small_ckpt / "config.json").tensor_shapes()
    bad = "transformer.visual.transformer.resblocks.0.mlp.c_fc.weight"
    shapes[bad] = (shapes[bad][0] + 1, shapes[bad][1])
    write_safetensors(small_ckpt / "model.safetensors", shapes, lambda name: np.zeros(shapes[name], np.uint16))
    with pytest.raises(CheckpointError, match=r"resblocks\.0\.mlp\.c_fc\.weight has shape \[316, 64\]") as info:
        CheckpointReader(small_ckpt)
    assert "\n" not in str(info.value)


def test_failed_build_leaves_nothing_behind(small_ckpt: Path, tmp_path: Path) -> None:
    reader = CheckpointReader(small_ckpt)
    (small_ckpt / "model.safetensors").unlink()  # the weights vanish after the folder was opened
    out_dir = tmp_path / "bundle"
    with pytest.raises(OSError):
        build_vision_onnx(reader, out_dir / "vision.onnx", external_threshold=0)
    assert list(out_dir.iterdir()) == []


def test_encoder_refuses_a_file_that_is_not_onnx(tmp_path: Path) -> None:
    path = tmp_path / "vision.onnx"
    path.write_bytes(b"\x00\x01 definitely not protobuf \xff" * 10)
    with pytest.raises(BundleError, match="not a loadable ONNX model") as info:
        VisionEncoder(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    with pytest.raises(BundleError, match="missing"):
        VisionEncoder(tmp_path / "absent.onnx")


def _identity_model(path: Path, in_name: str, in_shape: list, out_name: str, out_shape: list) -> Path:
    """An I/O-only graph: the signature is all the encoder checks at load."""
    nodes = [helper.make_node("Identity", [in_name], ["flat"]),
             helper.make_node("Reshape", ["flat", "shape"], [out_name])]
    shape = helper.make_tensor("shape", TensorProto.INT64, [3], [1, 256, -1])
    graph = helper.make_graph(nodes, "io", [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape)], [shape])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("in_name, in_shape, out_name, out_shape", [
    ("x", ["n", 3, 448, 448], "image_embeds", ["n", 256, 64]),  # wrong input name
    ("pixel_values", ["n", 3, 448, 448], "image_embeds", ["n", 255, 64]),  # not 256 rows
    ("pixel_values", ["n", 3, "s", "s"], "image_embeds", ["n", 256, 64]),  # image size not fixed
    ("pixel_values", ["n", 1, 448, 448], "image_embeds", ["n", 256, 64]),  # not RGB
])
def test_encoder_refuses_a_wrong_signature(tmp_path: Path, in_name, in_shape, out_name, out_shape) -> None:
    path = _identity_model(tmp_path / "vision.onnx", in_name, in_shape, out_name, out_shape)
    with pytest.raises(BundleError, match="wrong vision signature") as info:
        VisionEncoder(path)
    assert "\n" not in str(info.value)


def test_encoder_accepts_the_right_signature_on_an_io_only_graph(tmp_path: Path) -> None:
    path = _identity_model(tmp_path / "vision.onnx", "pixel_values", ["n", 3, 16, 16], "image_embeds",
                           ["n", 256, 3])
    with VisionEncoder(path) as encoder:
        assert (encoder.image_size, encoder.hidden_size) == (16, 3)
        pixels = np.arange(3 * 16 * 16, dtype=np.float32).reshape(1, 3, 16, 16)
        assert encoder.encode(pixels).reshape(-1).tolist() == pixels.reshape(-1).tolist()
