"""Shared fixtures: real-format tiny checkpoints built by the project's own ``synth``, and golden data.

Nothing is downloaded: checkpoints are written into pytest's temp folders once per session.
HOME and XDG_CACHE_HOME point at a temporary folder for the whole session (set when this file is
imported, before any test module reads them), so no test writes into the user's home or cache.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from qwenvl_edge.export.synthetic_checkpoint import write_checkpoint

TEST_HOME = Path(tempfile.mkdtemp(prefix="qwenvl-edge-test-home-"))
os.environ["HOME"] = str(TEST_HOME / "home")
os.environ["XDG_CACHE_HOME"] = str(TEST_HOME / "cache")
os.environ.pop("QWENVL_EDGE_BUNDLE", None)  # the default bundle folder is the temp home's, never the user's
os.environ.pop("XDG_STATE_HOME", None)  # chat history and server state files under each test's HOME, never the user's
(TEST_HOME / "home").mkdir()


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(TEST_HOME, ignore_errors=True)


GOLDEN_DIR = Path(__file__).parent / "golden" / "tiny"
GOLDEN_IMAGES = GOLDEN_DIR / "images"


class Golden:
    """The original implementation's outputs on the tiny seed-0 checkpoint (see golden/README.md)."""

    def __init__(self, folder: Path = GOLDEN_DIR):
        data = json.loads((folder / "golden.json").read_text(encoding="utf-8"))
        self.system: str = data["system"]
        self.max_new_tokens: int = data["max_new_tokens"]
        self.cases: dict[str, dict] = {c["name"]: c for c in data["cases"]}
        with np.load(folder / "golden.npz") as npz:
            self.arrays: dict[str, np.ndarray] = {k: npz[k] for k in npz.files}
        self.images: dict[str, Path] = {p.stem: p for p in sorted((folder / "images").glob("*.png"))}

    def pixels(self, image: str) -> np.ndarray:
        return self.arrays[f"pixels/{image}"]  # (3, 448, 448) float32

    def vision(self, image: str) -> np.ndarray:
        return self.arrays[f"vision/{image}"]  # (256, 256) float32

    def logits_last(self, case: str) -> np.ndarray:
        return self.arrays[f"logits_last/{case}"]  # (151936,) float32

    def logits_after_img(self, case: str) -> np.ndarray:
        return self.arrays[f"logits_after_img/{case}"]


@pytest.fixture(scope="session")
def golden() -> Golden:
    return Golden()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The golden tiny checkpoint (preset tiny, seed 0), safetensors, one shard."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_ckpt_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same checkpoint as torch-zip ``.bin`` shards with an index (the official layout)."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_bin", "tiny", seed=0, fmt="bin",
                            shard_bytes=40 * 2**20)


@pytest.fixture(scope="session")
def odd_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Other sizes than the golden: 3 layers, 4 heads of 64 (LLM), 2 vision heads of 48, 3 blocks."""
    overrides = {"hidden_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4,
                 "intermediate_size": 768, "visual": {"width": 96, "layers": 3, "heads": 2}}
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "odd", "tiny", seed=7, overrides=overrides)


def export_for_tests(ckpt: Path, out: Path, vision: str, llm: str) -> Path:
    from qwenvl_edge.bundler.bundle_export import ExportOptions, export_bundle

    return export_bundle(ckpt, out, ExportOptions(vision=vision, llm=llm, n_threads=2), progress=lambda _m: None)


@pytest.fixture(scope="session")
def f32_bundle(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The golden checkpoint exported exactly: FP32 vision, F32 LLM (the parity bundle)."""
    return export_for_tests(tiny_ckpt, tmp_path_factory.mktemp("bundle") / "f32", "fp32", "F32")


@pytest.fixture(scope="session")
def default_bundle(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The golden checkpoint exported with the defaults: INT8 vision, Q4_K_M LLM."""
    return export_for_tests(tiny_ckpt, tmp_path_factory.mktemp("bundle") / "default", "int8", "Q4_K_M")


@pytest.fixture(scope="session")
def narrow_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another checkpoint (hidden 128, one block of vision width 32), seed 1."""
    overrides = {"hidden_size": 128, "num_attention_heads": 1, "intermediate_size": 512, "num_hidden_layers": 1,
                 "visual": {"width": 32, "layers": 1, "heads": 2}}
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "narrow", "tiny", seed=1, overrides=overrides)


@pytest.fixture(scope="session")
def narrow_bundle(narrow_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle of another checkpoint (hidden 128): its parts must not mix with the tiny bundle's."""
    return export_for_tests(narrow_ckpt, tmp_path_factory.mktemp("bundle") / "narrow", "fp32", "F32")


@pytest.fixture(scope="session")
def trained_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny trained Qwen-VL, rebuilt from its shipped weights (export/data/tiny_trained.npz)."""
    from qwenvl_edge.export.tiny_trained import write_tiny_trained

    return write_tiny_trained(tmp_path_factory.mktemp("ckpt") / "trained")


@pytest.fixture(scope="session")
def trained_f32_bundle(trained_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained model's float reference bundle: FP32 vision, F32 LLM."""
    return export_for_tests(trained_ckpt, tmp_path_factory.mktemp("bundle") / "trained_f32", "fp32", "F32")


@pytest.fixture(scope="session")
def trained_default_bundle(trained_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained model exported with the defaults: INT8 vision, Q4_K_M LLM."""
    return export_for_tests(trained_ckpt, tmp_path_factory.mktemp("bundle") / "trained_default", "int8", "Q4_K_M")
