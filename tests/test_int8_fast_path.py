"""The INT8 stage's tensor-by-tensor path: pieces that read the FP32 weights in place, and how many images
the quality check measures at each size."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from qwenvl_edge.export.checkpoint import CheckpointReader
from qwenvl_edge.export.vision_onnx import build_vision_onnx
from qwenvl_edge.quant import onnx_int8
from qwenvl_edge.quant.onnx_int8 import measured_counts, quantize_vision
from qwenvl_edge.quant.onnx_pieces import data_files, link_data_files
from qwenvl_edge.runtime.preprocess import preprocess_batch
from qwenvl_edge.runtime.vision import VisionEncoder

GIB = 2**30


@pytest.fixture(scope="module")
def fp32_onnx(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_vision_onnx(CheckpointReader(tiny_ckpt), tmp_path_factory.mktemp("fp32") / "vision_fp32.onnx")


@pytest.fixture(scope="module")
def golden_pixels(golden) -> np.ndarray:
    return preprocess_batch([golden.images["sign"], golden.images["noise"]])


@pytest.fixture(scope="module")
def fp32_external(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_vision_onnx(CheckpointReader(tiny_ckpt), tmp_path_factory.mktemp("fp32_ext") / "vision_fp32.onnx",
                             external_threshold=0)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(("weight_bytes", "want"), [
    (40 * 2**20, (4, 4)),  # the tiny towers: everything
    (int(3.5 * GIB), (2, 2)),
    (int(7.7 * GIB), (2, 0)),  # full size: a 17 s FP32 and a 16 s INT8 encode per image
    (40 * GIB, (2, 0)),  # never fewer than 2 calibration images: the floor is checked on them
])
def test_measured_images_shrink_with_the_tower(weight_bytes: int, want: tuple[int, int]) -> None:
    assert measured_counts(weight_bytes) == want


def test_linking_needs_external_data(fp32_external: Path, fp32_onnx: Path, tmp_path: Path) -> None:
    header = onnx.load(str(fp32_onnx), load_external_data=False)
    assert link_data_files(fp32_onnx, header, tmp_path) is False and list(tmp_path.iterdir()) == []
    (tmp_path / "linked").mkdir()
    header = onnx.load(str(fp32_external), load_external_data=False)
    assert link_data_files(fp32_external, header, tmp_path / "linked") is True
    name = data_files(header).pop()
    assert os.path.samefile(tmp_path / "linked" / name, fp32_external.parent / name)
    (tmp_path / "linked" / name).unlink()  # the module's other test counts the data file's links


def test_linked_and_inline_pieces_make_the_same_file(fp32_external: Path, tmp_path: Path, golden_pixels,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading the weights in place (a hard link) or copying them into each piece: the same INT8 graph, the
    same rows; the FP32 files are left as they were, with no second link."""
    data = fp32_external.parent / data_files(onnx.load(str(fp32_external), load_external_data=False)).pop()
    before = (_digest(fp32_external), _digest(data))
    few = {"n_threads": 2, "max_piece_bytes": 1}
    linked = quantize_vision(fp32_external, tmp_path / "linked" / "vision.onnx", **few)
    monkeypatch.setattr(onnx_int8, "link_data_files", lambda *_a: False)
    inline = quantize_vision(fp32_external, tmp_path / "inline" / "vision.onnx", **few)
    assert linked["quality"] == inline["quality"]
    for name in ("vision.onnx", "vision.onnx.data"):
        assert _digest(tmp_path / "linked" / name) == _digest(tmp_path / "inline" / name)
    assert (_digest(fp32_external), _digest(data)) == before and os.stat(data).st_nlink == 1
    assert sorted(p.name for p in (tmp_path / "linked").iterdir()) == ["vision.onnx", "vision.onnx.data"]
    with VisionEncoder(tmp_path / "linked" / "vision.onnx") as a, VisionEncoder(fp32_external) as b:
        got, want = a.encode(golden_pixels), b.encode(golden_pixels)
    cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert cos.min() > 0.99


def test_a_one_encode_session_skips_prepacking_with_the_same_rows(tmp_path: Path, fp32_onnx: Path,
                                                                    golden_pixels) -> None:
    """``run`` frees its vision session after one encode, so it opens without repacking the weights (3.7 s of
    a full-size open): the rows must not depend on it."""
    out = tmp_path / "vision.onnx"
    quantize_vision(fp32_onnx, out, n_threads=2)
    rows = {}
    for prepack in (True, False):
        with VisionEncoder(out, n_threads=2, prepack=prepack) as encoder:
            options = encoder._session.get_session_options()
            assert options.get_session_config_entry("session.disable_prepacking") == ("0" if prepack else "1")
            rows[prepack] = encoder.encode(golden_pixels)
    np.testing.assert_allclose(rows[False], rows[True], rtol=0, atol=1e-4)


def test_every_tensor_external_leaves_no_reference_to_the_fp32_data(fp32_onnx: Path, tmp_path: Path) -> None:
    """An FP32 file whose every tensor (scalars too) lives in its .data, as other exporters write it: the small
    ones that stay in float must come into the INT8 graph, not point at the FP32 file through the link."""
    model = onnx.load(str(fp32_onnx))
    src = tmp_path / "fp32" / "model.onnx"
    src.parent.mkdir()
    onnx.save_model(model, str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    out = tmp_path / "int8" / "vision.onnx"
    quantize_vision(src, out, n_threads=2)
    assert data_files(onnx.load(str(out), load_external_data=False)) <= {"vision.onnx.data"}
    assert sorted(p.name for p in out.parent.iterdir()) in (["vision.onnx"], ["vision.onnx", "vision.onnx.data"])
    with VisionEncoder(out) as encoder:
        assert encoder.hidden_size > 0
