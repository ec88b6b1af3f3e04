"""Malformed checkpoints: every shape of bad safetensors header, torch zip, config.json or index is one line.

Each case is built directly (small files), so the loaders are tested without a full checkpoint.
"""

from __future__ import annotations

import json
import pickle
import struct
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from qwenvl_edge.errors import CheckpointError
from qwenvl_edge.export import torch_zip_io
from qwenvl_edge.export.checkpoint import CheckpointReader
from qwenvl_edge.export.config import QwenConfig
from qwenvl_edge.export.safetensors_io import read_safetensors, write_safetensors
from qwenvl_edge.export.synthetic_checkpoint import make_config
from qwenvl_edge.export.torch_zip_io import read_torch_zip, write_torch_zip

SHAPES = {"a": (4, 2), "b": (3,)}


def refused(fn, path: Path, match: str) -> str:
    with pytest.raises(CheckpointError, match=match) as info:
        fn(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


# --- safetensors ----------------------------------------------------------------------------------

def write_raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def good_header() -> dict:
    return {"a": {"dtype": "F32", "shape": [4, 2], "data_offsets": [0, 32]},
            "b": {"dtype": "F32", "shape": [3], "data_offsets": [32, 44]}}


def test_good_safetensors_reads(tmp_path: Path) -> None:
    path = write_raw_safetensors(tmp_path / "m.safetensors", good_header(), np.arange(11, dtype="<f4").tobytes())
    recs = read_safetensors(path)
    np.testing.assert_array_equal(recs["b"].f32(), [8, 9, 10])


@pytest.mark.parametrize("tensor,offsets,match", [
    ("a", [-8, 24], "outside"),             # negative: before fix, read the header's bytes as weights
    ("b", [32, 4096], "outside"),           # past the end of the data area
    ("b", [24, 36], "overlap"),             # inside a's bytes: two tensors share storage
    ("a", [8, 40], "overlap"),
    ("b", [40, 28], "outside"),             # end before begin
])
def test_safetensors_offsets_outside_or_overlapping_are_refused(tmp_path: Path, tensor, offsets, match) -> None:
    header = good_header()
    header[tensor]["data_offsets"] = offsets
    if tensor == "a":
        header[tensor]["shape"] = [(offsets[1] - offsets[0]) // 4] if offsets[1] > offsets[0] else [0]
    else:
        header[tensor]["shape"] = [max(offsets[1] - offsets[0], 0) // 4]
    path = write_raw_safetensors(tmp_path / "m.safetensors", header, bytes(44 + 2048 * (match == "x")))
    refused(read_safetensors, path, match)


@pytest.mark.parametrize("field,value", [
    ("data_offsets", ["0", "32"]), ("data_offsets", [0]), ("data_offsets", [0.0, 32.0]), ("data_offsets", None),
    ("shape", [4, "2"]), ("shape", [True, 8]), ("shape", [-4, -2]), ("shape", "4x2"),
    ("dtype", ["F32"]), ("dtype", "I64"), ("dtype", None),
])
def test_safetensors_wrong_field_types_are_refused(tmp_path: Path, field, value) -> None:
    header = good_header()
    header["a"][field] = value
    path = write_raw_safetensors(tmp_path / "m.safetensors", header, bytes(44))
    refused(read_safetensors, path, "tensor a|entry for a")


@pytest.mark.parametrize("header", [[], None, {"a": []}, {"a": "F32"}, {"a": 3}])
def test_safetensors_header_of_wrong_shape(tmp_path: Path, header) -> None:
    refused(read_safetensors, write_raw_safetensors(tmp_path / "m.safetensors", header, bytes(8)), "corrupt")


def test_safetensors_deeply_nested_header(tmp_path: Path) -> None:
    path = tmp_path / "deep.safetensors"
    raw = b"[" * 200_000 + b"]" * 200_000
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    refused(read_safetensors, path, "corrupt")


# --- torch zip ------------------------------------------------------------------------------------

def small_bin(path: Path) -> Path:
    write_torch_zip(path, SHAPES, lambda n: np.zeros(SHAPES[n], dtype="<u2"))
    return path


def patch_uncompressed_size(path: Path, member: str, size: int) -> None:
    """Make the zip's local and central headers declare ``size`` bytes for ``member``."""
    data = bytearray(path.read_bytes())
    name = member.encode()
    for sig, size_at, name_at in ((b"PK\x03\x04", 22, 30), (b"PK\x01\x02", 24, 46)):
        pos = data.find(sig + b"")
        while pos >= 0:
            if data[pos + name_at:pos + name_at + len(name)] == name:
                data[pos + size_at:pos + size_at + 4] = struct.pack("<I", size)
            pos = data.find(sig, pos + 4)
    path.write_bytes(bytes(data))


def deflated_pickle_bin(path: Path, pickle_bytes: bytes) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", pickle_bytes)
    return path


def test_deflated_pickle_declaring_2gb_is_refused_before_inflating(tmp_path: Path) -> None:
    path = deflated_pickle_bin(tmp_path / "bomb.bin", bytes(1 << 20))  # 1 MiB of zeros: ~1 KB deflated
    patch_uncompressed_size(path, "archive/data.pkl", 2**31)
    tracemalloc.start()
    try:
        message = refused(read_torch_zip, path, "declares 2147483648 bytes")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "before reading" in message and peak < 8 * 2**20


def test_deflated_pickle_that_inflates_past_its_declared_size_stops_there(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_zip_io, "MAX_PICKLE_BYTES", 2**20)
    path = deflated_pickle_bin(tmp_path / "bomb.bin", bytes(32 << 20))  # 32 MiB of zeros in ~32 KB
    patch_uncompressed_size(path, "archive/data.pkl", 1000)  # lies: says 1000 bytes
    tracemalloc.start()
    try:
        refused(read_torch_zip, path, "corrupt pickle|not a zip")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"inflated {peak} bytes"


def test_deflated_pickle_of_honest_size_over_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_zip_io, "MAX_PICKLE_BYTES", 2**20)
    path = deflated_pickle_bin(tmp_path / "big.bin", bytes(4 << 20))
    refused(read_torch_zip, path, "declares 4194304 bytes")


def test_small_deflated_pickle_is_still_read(tmp_path: Path) -> None:
    """Compression alone is not refused: a deflated data.pkl of sane size reads like a stored one."""
    src = small_bin(tmp_path / "src.bin")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp_path / "re.bin", "w") as zout:
        for info in zin.infolist():
            method = zipfile.ZIP_DEFLATED if info.filename.endswith("data.pkl") else zipfile.ZIP_STORED
            zout.writestr(info.filename, zin.read(info), compress_type=method)
    assert set(read_torch_zip(tmp_path / "re.bin")) == set(SHAPES)


def pickle_with(tensor_args: bytes) -> bytes:
    """A one-tensor state dict whose _rebuild_tensor_v2 gets ``tensor_args`` (pickle opcodes) after the storage."""
    p = torch_zip_io
    pid = p._pickle_tuple([p._pickle_str("storage"), p._pickle_global("torch", "BFloat16Storage"),
                           p._pickle_str("0"), p._pickle_str("cpu"), p._pickle_int(8)])
    return b"".join([pickle.PROTO + b"\x02", pickle.EMPTY_DICT, p._pickle_str("a"),
                     p._pickle_global("torch._utils", "_rebuild_tensor_v2"), pickle.MARK, pid, pickle.BINPERSID,
                     tensor_args, pickle.TUPLE, pickle.REDUCE, pickle.SETITEM, pickle.STOP])


def bin_with_pickle(path: Path, pkl: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/data/0", bytes(16))
    return path


@pytest.mark.parametrize("args,match", [
    ("0 (4,2) (2,1)", None),                      # the good case
    ("0 (8,2) (2,1)", "overruns"),                # view needs 16 elements, storage holds 8
    ("0 (4,2) (4,1)", "overruns"),                # strided view reads past the storage (before fix: unchecked)
    ("0 (4,2) (1,4)", None),                      # a transposed view inside the storage is fine
    ("6 (2,2) (2,1)", "overruns"),                # offset pushes it past the end
    ("-1 (2,) (1,)", "corrupt pickle"),           # negative storage offset
    ("0 (4,-2) (2,1)", "corrupt pickle"),         # negative size
    ("0 (4,2) (2,)", "corrupt pickle"),           # stride of another rank
    ("0 'ab' (1,)", "corrupt pickle"),            # size is not a tuple
])
def test_torch_tensor_views_are_checked(tmp_path: Path, args: str, match: str | None) -> None:
    p = torch_zip_io
    offset, size, stride = args.split(" ")

    def enc(token: str) -> bytes:
        if token.startswith("("):
            items = [t for t in token.strip("(),").split(",") if t]
            return p._pickle_tuple([p._pickle_int(int(t)) for t in items])
        if token.startswith("'"):
            return p._pickle_str(token.strip("'"))
        return p._pickle_int(int(token))

    path = bin_with_pickle(tmp_path / "v.bin", pickle_with(enc(offset) + enc(size) + enc(stride)))
    if match is None:
        assert read_torch_zip(path)["a"].raw().shape == (4, 2)
    else:
        refused(read_torch_zip, path, match)


@pytest.mark.parametrize("payload", [b"", b"PK\x03\x04" + bytes(100), b"PK\x05\x06" + bytes(18), b"not a zip"])
def test_not_a_zip(tmp_path: Path, payload: bytes) -> None:
    (tmp_path / "x.bin").write_bytes(payload)
    refused(read_torch_zip, tmp_path / "x.bin", "not a zip|truncated|no data.pkl")


# --- config.json ----------------------------------------------------------------------------------

def config_file(tmp_path: Path, edit) -> Path:
    cfg = make_config("tiny")
    edit(cfg)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def test_good_config_reads(tmp_path: Path) -> None:
    assert QwenConfig.from_file(config_file(tmp_path, lambda c: None)).hidden_size == 256


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(num_attention_heads=0), "num_attention_heads must be an integer"),  # was ZeroDivisionError
    (lambda c: c["visual"].update(heads=0), "heads must be an integer"),
    (lambda c: c.update(hidden_size="256"), "hidden_size must be an integer"),             # sizes as strings
    (lambda c: c["visual"].update(width="64"), "width must be an integer"),
    (lambda c: c.update(num_hidden_layers=2.0), "num_hidden_layers must be an integer"),
    (lambda c: c.update(num_hidden_layers=True), "num_hidden_layers must be an integer"),
    (lambda c: c.update(num_hidden_layers=-1), "num_hidden_layers must be an integer"),
    (lambda c: c.update(vocab_size=10**30), "vocab_size must be an integer"),
    (lambda c: c.update(num_hidden_layers=2**24), "num_hidden_layers must be an integer in \\[1, 1024\\]"),
    (lambda c: c.update(visual=None), "visual.*JSON object"),                               # visual: null
    (lambda c: c.update(visual=[64, 2, 4]), "visual.*JSON object"),
    (lambda c: c.update(visual="clip"), "visual.*JSON object"),
    (lambda c: c.update(layer_norm_epsilon=float("nan")), "layer_norm_epsilon must be a positive finite"),
    (lambda c: c.update(rotary_emb_base="1e4"), "rotary_emb_base must be a positive finite"),
    (lambda c: c["visual"].update(mlp_ratio=0.001), "leaves no MLP"),
    (lambda c: c.update(use_logn_attn="yes"), "use_logn_attn must be true or false"),
])
def test_malformed_config_is_one_line(tmp_path: Path, edit, match: str) -> None:
    refused(QwenConfig.from_file, config_file(tmp_path, edit), match)


@pytest.mark.parametrize("text,match", [("[]", "not a JSON object"), ("null", "not a JSON object"),
                                        ("3", "not a JSON object"), ("{", "not valid JSON"),
                                        ("[" * 100000, "not valid JSON|nested too deeply"),
                                        ("\xff\xfe", "not UTF-8")])
def test_config_that_is_not_an_object(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(text.encode("latin-1"))
    refused(QwenConfig.from_file, path, match)


# --- shard index ----------------------------------------------------------------------------------

@pytest.mark.parametrize("weight_map,match", [
    (["model-1.safetensors"], "not a mapping"),                     # before fix: AttributeError
    (None, "not a mapping"),
    ("model-1.safetensors", "not a mapping"),
    ({"a": ["model-1.safetensors"]}, "not a non-empty string"),     # before fix: unhashable TypeError
    ({"a": 3}, "not a non-empty string"),
    ({"a": "../outside.safetensors"}, "not a plain file name"),     # would read outside the folder
    ({"a": "/etc/passwd"}, "not a plain file name"),
    ({"a": "sub/model.safetensors"}, "not a plain file name"),
])
def test_index_whose_weight_map_is_not_a_mapping_of_names(tmp_path: Path, weight_map, match: str) -> None:
    config_file(tmp_path, lambda c: None)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    refused(CheckpointReader, tmp_path, match)
    index.write_text("[]")
    refused(CheckpointReader, tmp_path, "not a mapping")


def test_good_small_bin_round_trips(tmp_path: Path) -> None:
    recs = read_torch_zip(small_bin(tmp_path / "s.bin"))
    assert {n: r.shape for n, r in recs.items()} == SHAPES


def test_safetensors_writer_output_still_reads(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "w.safetensors", SHAPES, lambda n: np.ones(SHAPES[n], dtype="<u2"))
    assert {n: r.shape for n, r in read_safetensors(tmp_path / "w.safetensors").items()} == SHAPES


@pytest.mark.parametrize("put", [pickle.LONG_BINPUT + struct.pack("<I", 4_000_000_000),
                                 pickle.LONG_BINPUT + struct.pack("<I", 174_417_761),
                                 pickle.PUT + b"99999999999\n"])
def test_pickle_memo_slot_far_past_its_size_is_refused(tmp_path: Path, put: bytes) -> None:
    """Found by the fuzz test: CPython's unpickler sizes its memo array by the slot number (GBs from 6 bytes)."""
    pkl = pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + put + pickle.STOP
    tracemalloc.start()
    try:
        refused(read_torch_zip, bin_with_pickle(tmp_path / "m.bin", pkl), "memo slot")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20
