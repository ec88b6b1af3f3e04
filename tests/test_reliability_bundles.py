"""Malformed bundles: manifest.json of the wrong shape, unsafe file names, a GGUF of another model.

The small bundles here are real files (a GGUF written by the ``gguf`` package, a manifest written by
``make_manifest``); ``Bundle.open`` checks them without loading any engine.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from qwenvl_edge import contract
from qwenvl_edge.errors import BundleError
from qwenvl_edge.runtime.bundle import Bundle, ModelInfo, file_entry, make_manifest
from qwenvl_edge.runtime.gguf_header import read_gguf_metadata

SIZES = {"embedding_length": 256, "context_length": 2048, "block_count": 2, "feed_forward_length": 1024,
         "vocab_size": 151936}
CONFIG = {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 1024,
          "vocab_size": 151936, "seq_length": 2048}


def write_gguf(path: Path, arch: str = "qwen", **changes: int) -> Path:
    sizes = {**SIZES, "attention.head_count": 2, **changes}
    w = gguf.GGUFWriter(path, arch)
    for key, value in sizes.items():
        w.add_uint32(f"{arch}.{key}", value)
    w.add_token_list([f"t{i}" for i in range(8)])
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def make_bundle(folder: Path, arch: str = "qwen", **changes: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vision.onnx").write_bytes(b"onnx bytes are not read by Bundle.open")
    write_gguf(folder / "llm.gguf", arch, **changes)
    info = ModelInfo(hidden_size=256, vocab_size=151936, seq_length=2048, image_size=448, n_queries=256,
                     image_start_id=contract.IMAGE_START_ID)
    manifest = make_manifest(folder, info, {"precision": "fp32"}, {"type": "F32"}, {"config": CONFIG}, "test")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def refused(folder: Path, match: str) -> str:
    with pytest.raises(BundleError, match=match) as info:
        Bundle.open(folder)
    message = str(info.value)
    assert "\n" not in message
    return message


def edit_manifest(folder: Path, edit) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_good_small_bundle_opens(tmp_path: Path) -> None:
    bundle = Bundle.open(make_bundle(tmp_path / "b"))
    assert bundle.model.hidden_size == 256 and bundle.llm_path.name == "llm.gguf"


def test_real_export_passes_the_gguf_checks(f32_bundle: Path) -> None:
    """The facts the check compares are the ones the exporter writes."""
    meta = read_gguf_metadata(f32_bundle / "llm.gguf")
    assert meta["general.architecture"] == "qwen" and meta["qwen.embedding_length"] == 256
    Bundle.open(f32_bundle).check_llm_facts()


@pytest.mark.parametrize("text,match", [
    ("[]", "not a qwenvl-edge manifest"), ("null", "not a qwenvl-edge manifest"),   # before fix: AttributeError
    ('"qwenvl-edge-bundle"', "not a qwenvl-edge manifest"), ("{", "not valid JSON"),
    ("[" * 100000 + "]" * 100000, "nested too deeply|not valid JSON"), ("\udcff", "not UTF-8|not valid JSON"),
])
def test_manifest_that_is_not_an_object(tmp_path: Path, text: str, match: str) -> None:
    folder = make_bundle(tmp_path / "b")
    (folder / "manifest.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    refused(folder, match)


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.update(model=[]), "model must be a JSON object"),
    (lambda m: m.update(model=None), "model must be a JSON object"),
    (lambda m: m.update(files=[]), "files must be a JSON object"),
    (lambda m: m.update(llm="llm.gguf"), "llm must be a JSON object"),
    (lambda m: m.update(format_version="1"), "format_version"),
    (lambda m: m.update(format_version=True), "format_version"),
    (lambda m: m["model"].update(hidden_size="256"), "hidden_size"),              # fields of the wrong type
    (lambda m: m["model"].update(n_queries=0), "n_queries"),
    (lambda m: m["model"].update(seq_length=2048.0), "seq_length"),
    (lambda m: m["model"].update(system_prompt=None), "system_prompt"),
    (lambda m: m["model"].update(image_mean=[0.5, 0.5]), "image_mean"),
    (lambda m: m["model"].update(image_std=[0.5, 0.0, 0.5]), "image_std"),
    (lambda m: m["model"].update(top_p=float("nan")), "top_p"),
    (lambda m: m["model"].update(top_p=2), "top_p"),
    (lambda m: m["model"].update(eos_token_id=-1), "eos_token_id"),
    (lambda m: m["model"].update(im_end_id=10**6), "outside the vocabulary"),
    (lambda m: m["model"].pop("hidden_size"), "missing hidden_size"),
    (lambda m: m["files"]["llm.gguf"].update(bytes="12"), "bytes"),
    (lambda m: m["files"]["llm.gguf"].update(sha256=None), "sha256"),
    (lambda m: m["files"].update({"vision.onnx": "abc"}), "must be a JSON object"),
])
def test_manifest_fields_of_wrong_type(tmp_path: Path, edit, match: str) -> None:
    folder = make_bundle(tmp_path / "b")
    edit_manifest(folder, edit)
    refused(folder, match)


@pytest.mark.parametrize("name", ["../secret.txt", "/etc/passwd", "sub/../../x", "..", "", "a\\..\\b", "C:x"])
def test_file_names_outside_the_bundle_are_refused(tmp_path: Path, name: str) -> None:
    folder = make_bundle(tmp_path / "b")
    (tmp_path / "secret.txt").write_text("the user's file")
    entry = file_entry(tmp_path / "secret.txt")
    edit_manifest(folder, lambda m: m["files"].update({name: entry}))
    refused(folder, "not a plain file name|not a non-empty string")
    edit_manifest(folder, lambda m: (m["files"].pop(name), m["llm"].update(file=name)))
    refused(folder, "not a plain file name|not a non-empty string")


def test_gguf_of_another_architecture_with_the_same_sizes_is_refused(tmp_path: Path) -> None:
    folder = make_bundle(tmp_path / "b", arch="llama")  # before fix: opened, and llama.cpp answered wrongly
    assert "architecture 'llama'" in refused(folder, "expected 'qwen'")
    refused(make_bundle(tmp_path / "c", arch="qwen2"), "architecture 'qwen2'")
    refused(make_bundle(tmp_path / "d", arch="gpt2"), "architecture 'gpt2'")


@pytest.mark.parametrize("change,match", [
    ({"block_count": 3}, "block_count is 3, manifest says num_hidden_layers 2"),
    ({"feed_forward_length": 2048}, "feed_forward_length"),
    ({"embedding_length": 128}, "embedding_length"),
    ({"context_length": 8192}, "context_length"),
    ({"attention.head_count": 4}, "head_count"),
])
def test_gguf_facts_must_match_the_manifest(tmp_path: Path, change: dict, match: str) -> None:
    refused(make_bundle(tmp_path / "b", **change), match)


@pytest.mark.parametrize("damage", ["magic", "version", "truncate", "kv_count"])
def test_damaged_gguf_header(tmp_path: Path, damage: str) -> None:
    folder = make_bundle(tmp_path / "b")
    gguf_path = folder / "llm.gguf"
    data = bytearray(gguf_path.read_bytes())
    if damage == "magic":
        data[:4] = b"GGML"
    elif damage == "version":
        data[4:8] = (99).to_bytes(4, "little")
    elif damage == "kv_count":
        data[16:24] = (2**62).to_bytes(8, "little")
    else:
        data = data[:60]
    gguf_path.write_bytes(bytes(data))
    edit_manifest(folder, lambda m: m["files"].update({"llm.gguf": file_entry(gguf_path)}))
    refused(folder, "GGUF")


def test_bundle_user_folder_is_untouched_after_refusal(tmp_path: Path) -> None:
    folder = make_bundle(tmp_path / "b", arch="llama")
    before = sorted(p.name for p in folder.iterdir())
    refused(folder, "architecture")
    assert sorted(p.name for p in folder.iterdir()) == before
    shutil.rmtree(folder)
