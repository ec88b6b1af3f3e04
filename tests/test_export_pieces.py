"""Piecewise INT8 equals onnxruntime's whole-graph quantization; the resume folder and the LLM quality number."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnxruntime.quantization import QuantType, quantize_dynamic

from qwenvl_edge.bundler.export_progress import OverallProgress
from qwenvl_edge.bundler.export_stages import StageCache, clear_export_cache, export_cache_root
from qwenvl_edge.errors import QwenVLError
from qwenvl_edge.export.checkpoint import CheckpointReader
from qwenvl_edge.export.vision_onnx import build_vision_onnx
from qwenvl_edge.quant.gguf_quality import compare_next_token
from qwenvl_edge.quant.onnx_int8 import DEFAULT_EXCLUDE, quantize_vision, weight_matmuls
from qwenvl_edge.quant.onnx_pieces import plan_pieces
from qwenvl_edge.runtime.preprocess import preprocess_batch
from qwenvl_edge.runtime.vision import VisionEncoder


@pytest.fixture(scope="module")
def odd_fp32(odd_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_vision_onnx(CheckpointReader(odd_ckpt), tmp_path_factory.mktemp("odd") / "fp32.onnx",
                             external_threshold=0)  # external data, as at full size


def test_pieces_are_bounded_and_wired(odd_fp32: Path) -> None:
    graph = onnx.load(str(odd_fp32), load_external_data=False).graph
    pieces = plan_pieces(graph, max_bytes=1)  # one group per piece
    labels = [p.label for p in pieces]
    assert labels[0] == "visual/conv1" and {"visual/blocks.0", "visual/blocks.2", "visual/adapter"} <= set(labels)
    assert sum(len(p.nodes) for p in pieces) == len(graph.node)
    available = {i.name for i in graph.input}
    for piece in pieces:
        assert set(piece.inputs) <= available  # every input was made before
        available |= set(piece.outputs)
    assert graph.output[0].name in pieces[-1].outputs
    assert len(plan_pieces(graph, max_bytes=2**40)) == 1


def test_piecewise_int8_equals_whole_graph_quantization(odd_fp32: Path, golden, tmp_path: Path) -> None:
    pixels = preprocess_batch([golden.images["sign"], golden.images["noise"]])
    report = quantize_vision(odd_fp32, tmp_path / "pieces" / "vision.onnx", max_piece_bytes=1)
    quantized, _ = weight_matmuls(onnx.load(str(odd_fp32), load_external_data=False), DEFAULT_EXCLUDE)
    quantize_dynamic(odd_fp32, tmp_path / "whole.onnx", op_types_to_quantize=["MatMul"], nodes_to_quantize=quantized,
                     per_channel=True, weight_type=QuantType.QUInt8, use_external_data_format=True)
    with VisionEncoder(tmp_path / "pieces" / "vision.onnx", 1) as a, VisionEncoder(tmp_path / "whole.onnx", 1) as b:
        np.testing.assert_allclose(a.encode(pixels), b.encode(pixels), rtol=0, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "pieces").iterdir()) == ["vision.onnx", "vision.onnx.data"]
    assert report["quality"]["heldout"]["cosine_min"] >= 0.999


def test_compare_next_token() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((5, 50)).astype(np.float32)
    same = compare_next_token(ref, ref)
    assert same["kl_max"] == pytest.approx(0.0, abs=1e-12) and same["top1_agreement"] == 1.0
    flat = compare_next_token(ref, np.zeros_like(ref))  # uniform candidate: KL = log V - H(p)
    p = np.exp(ref - ref.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected = np.log(50) + (p * np.log(p)).sum(1)
    assert flat["kl_mean"] == pytest.approx(expected.mean(), rel=1e-6) and flat["positions"] == 5
    with pytest.raises(ValueError, match="shapes differ"):
        compare_next_token(ref, ref[:2])


def test_stage_cache_reuses_verifies_and_clears(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder = export_cache_root() / "job"
    made = []

    def make(out: Path) -> dict:
        made.append(1)
        (out / "a.bin").write_bytes(b"stage output")
        return {"n": len(made)}

    cache = StageCache(folder)
    assert cache.run("one", make)["report"] == {"n": 1}
    with pytest.raises(QwenVLError, match=r"an export of this job is running \(pid \d+\)"):
        StageCache(folder)  # the same job, at the same time
    cache.close(remove=False)
    cache = StageCache(folder)
    assert cache.run("one", make)["report"] == {"n": 1} and cache.reused == ["one"] and len(made) == 1
    cache.close(remove=False)
    (folder / "a.bin").write_bytes(b"stage outpuT")  # same size, other bytes
    cache = StageCache(folder)
    assert cache.run("one", make)["report"] == {"n": 2} and cache.reused == []
    assert json.loads((folder / "stages.json").read_text())["one"]["files"]["a.bin"]["bytes"] == 12
    cache.close(remove=False)
    cache = StageCache(folder, fresh=True)
    assert cache.records == {} and not (folder / "a.bin").exists()
    cache.close(remove=False)
    assert clear_export_cache() == 1 and not folder.exists()


def test_overall_progress_weights_stages() -> None:
    lines: list[str] = []
    progress = OverallProgress({"a": 1.0, "b": 3.0}, lines.append, every=0.0)
    say = progress.start("a")
    say("step 1/2")
    progress.finish("a")
    progress.start("b")("piece 1/3")
    assert lines[0].startswith("overall: 0% done, stage 1 of 2 (a)")
    assert "overall: 12% done" in lines[2] and "overall: 50% done, stage 2 of 2 (b)" in lines[-1]
    assert set(progress.windows) == {"a", "b"} and len(progress.windows["a"]) == 2
