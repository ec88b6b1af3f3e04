"""`qwenvl-edge export`: the bundle is complete and described, or not there at all."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qwenvl_edge.cli import main
from qwenvl_edge.runtime.bundle import Bundle, file_entry


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_line_error(rc: int, err: str, fragment: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("qwenvl-edge: error: ")]
    assert rc == 2 and len(lines) == 1 and fragment in lines[0], err


def test_default_bundle_manifest(default_bundle: Path) -> None:
    bundle = Bundle.open(default_bundle)
    manifest = bundle.manifest
    assert sorted(manifest["files"]) == ["llm.gguf", "vision.onnx"]
    for name, entry in manifest["files"].items():
        assert entry == file_entry(default_bundle / name)
    assert manifest["llm"]["type"] == "Q4_K_M" and manifest["vision"]["precision"] == "int8"
    quality = manifest["vision"]["quality"]["quality"]
    assert quality["heldout"]["cosine_min"] >= 0.99 and quality["calibration"]["cosine_min"] >= 0.99
    model = bundle.model
    assert (model.hidden_size, model.vocab_size, model.image_size, model.n_queries) == (256, 151936, 448, 256)
    assert model.top_p == 0.3 and model.max_new_tokens == 512
    assert set(manifest["export"]["stage_seconds"]) == {"vision_fp32", "vision_int8", "llm_gguf", "llm_quant",
                                                         "llm_quality", "bundle"}
    llm_quality = manifest["llm"]["quality"]  # Q4_K_M vs its BF16 source, on the fixed prompts
    assert llm_quality["positions"] > 100 and 0.0 < llm_quality["kl_mean"] <= llm_quality["kl_max"]
    assert 0.0 < llm_quality["top1_agreement"] <= 1.0
    assert manifest["source"]["config"]["visual"]["width"] == 64
    assert not list(default_bundle.parent.glob(".*partial*"))


def test_export_cli_other_sizes_from_bin_shards(odd_ckpt: Path, tiny_ckpt_bin: Path, tmp_path: Path, capsys) -> None:
    rc, out, err = run_cli(["export", str(odd_ckpt), str(tmp_path / "odd"), "--vision", "fp32", "--llm", "Q8_0"],
                           capsys)
    assert rc == 0, err
    assert "llm.gguf" in out and Bundle.open(tmp_path / "odd").manifest["llm"]["type"] == "Q8_0"
    rc, out, err = run_cli(["export", str(tiny_ckpt_bin), str(tmp_path / "bin"), "--llm", "F16"], capsys)
    assert rc == 0, err
    assert "row cosine" in out  # the INT8 quality report is printed


def test_unknown_llm_type_leaves_nothing(tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    rc, _, err = run_cli(["export", str(tiny_ckpt), str(tmp_path / "b"), "--llm", "Q3_XYZ"], capsys)
    assert_one_line_error(rc, err, "Q4_K_M")
    assert not (tmp_path / "b").exists()


def test_failure_midway_leaves_nothing(tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    """The LLM stage fails after the vision stage wrote files: no bundle, no partial folder."""
    ckpt = shutil.copytree(tiny_ckpt, tmp_path / "ckpt")
    (ckpt / "qwen.tiktoken").write_text("bm90IGJhc2U2NA== zero\n")  # unreadable ranks: fails in the LLM stage
    rc, _, err = run_cli(["export", str(ckpt), str(tmp_path / "out" / "b"), "--vision", "fp32"], capsys)
    assert rc == 2, err
    assert not (tmp_path / "out" / "b").exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_not_a_checkpoint(tmp_path: Path, capsys) -> None:
    (tmp_path / "ckpt").mkdir()
    rc, _, err = run_cli(["export", str(tmp_path / "ckpt"), str(tmp_path / "b")], capsys)
    assert_one_line_error(rc, err, "config.json")


def test_existing_bundle_needs_force(default_bundle: Path, tiny_ckpt: Path, capsys) -> None:
    rc, _, err = run_cli(["export", str(tiny_ckpt), str(default_bundle)], capsys)
    assert_one_line_error(rc, err, "--force")


def test_verify_catches_a_changed_byte(f32_bundle: Path, tmp_path: Path, capsys) -> None:
    copy = shutil.copytree(f32_bundle, tmp_path / "b")
    rc, out, _ = run_cli(["verify", "--bundle", str(copy)], capsys)
    assert rc == 0 and "match" in out
    with open(copy / "vision.onnx", "r+b") as f:
        f.seek(-10, 2)
        byte = f.read(1)
        f.seek(-10, 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    rc, _, err = run_cli(["verify", "--bundle", str(copy)], capsys)
    assert_one_line_error(rc, err, "checksum")


def test_manifest_format_is_checked(f32_bundle: Path, tmp_path: Path, capsys) -> None:
    copy = shutil.copytree(f32_bundle, tmp_path / "b")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    rc, _, err = run_cli(["run", "--bundle", str(copy), "hi"], capsys)
    assert_one_line_error(rc, err, "format_version")
    (copy / "manifest.json").write_text("{not json")
    rc, _, err = run_cli(["run", "--bundle", str(copy), "hi"], capsys)
    assert_one_line_error(rc, err, "corrupt manifest")


@pytest.mark.parametrize("scheme", ["nope"])
def test_unknown_vision_scheme(tiny_ckpt: Path, tmp_path: Path, capsys, scheme: str) -> None:
    rc, _, err = run_cli(["export", str(tiny_ckpt), str(tmp_path / "b"), "--vision-scheme", scheme], capsys)
    assert_one_line_error(rc, err, "dynamic")
