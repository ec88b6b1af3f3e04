"""Fuzz the loaders of untrusted files: each input gives a result or one ``QwenVLError`` line, nothing else.

Hypothesis, derandomized (the same inputs on every run and machine), 2,000 inputs per loader: mutations
of a valid file (byte flips, inserts, deletes, truncation) mixed with structured inputs (headers and
JSON documents with fields replaced by arbitrary JSON). A loader that accepts an input must also be able
to use it: every accepted tensor record is read, every accepted image is preprocessed.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from qwenvl_edge.errors import QwenVLError
from qwenvl_edge.export import torch_zip_io
from qwenvl_edge.export.config import QwenConfig
from qwenvl_edge.export.safetensors_io import read_safetensors, write_safetensors
from qwenvl_edge.export.synthetic_checkpoint import make_config
from qwenvl_edge.runtime.bundle import Bundle
from qwenvl_edge.runtime.preprocess import preprocess_image, read_image

N_INPUTS = 2000
FUZZ = settings(max_examples=N_INPUTS, derandomize=True, database=None, deadline=None, print_blob=True,
                suppress_health_check=list(HealthCheck))
SHAPES = {"w": (3, 4), "b": (4,), "e": (0,)}

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)


def mutations(seed: bytes, max_edits: int = 6) -> st.SearchStrategy[bytes]:
    """``seed`` with a few byte-level edits: the inputs a damaged download or a hostile author produce."""
    edit = st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
                     st.integers(0, 2**20), st.integers(0, 255))

    def apply(edits: list) -> bytes:
        data = bytearray(seed)
        for kind, pos, value in edits:
            if not data:
                break
            i = pos % len(data)
            if kind == "flip":
                data[i] ^= 1 << (value % 8)
            elif kind == "set":
                data[i] = value
            elif kind == "insert":
                data[i:i] = bytes([value]) * (1 + value % 4)
            elif kind == "delete":
                del data[i:i + 1 + value % 4]
            else:
                del data[i:]
        return bytes(data)

    return st.lists(edit, min_size=1, max_size=max_edits).map(apply)


def replace_somewhere(doc: object) -> st.SearchStrategy[object]:
    """``doc`` (JSON) with one value, at a random path, replaced by arbitrary JSON (or the key deleted)."""
    paths: list[tuple] = []

    def walk(node: object, path: tuple) -> None:
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*path, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, (*path, i))
    walk(doc, ())

    def apply(args: tuple) -> object:
        path, value, delete = args
        copy = json.loads(json.dumps(doc))
        if not path:
            return value
        parent = copy
        for key in path[:-1]:
            parent = parent[key]
        if delete and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
        return copy

    return st.tuples(st.sampled_from(paths), JSON, st.booleans()).map(apply)


@pytest.fixture()
def scratch(tmp_path: Path):
    """A folder for the fuzzed files: in memory (/dev/shm) where there is one, so 2,000 writes stay cheap."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(dir=shm, prefix="qwenvl-fuzz-") as folder:
        yield Path(folder)


def outcome(fn, *args):
    """Run a loader: its result, or None after a one-line QwenVLError; any other exception fails the test."""
    try:
        return fn(*args)
    except QwenVLError as e:
        assert "\n" not in str(e)
        return None


def run_fuzz(strategy: st.SearchStrategy, check) -> None:
    seen: list[int] = []

    @FUZZ
    @given(strategy)
    def one(value) -> None:
        seen.append(1)
        check(value)

    one()
    assert len(seen) >= N_INPUTS


def read_all(records: dict | None) -> None:
    for rec in (records or {}).values():
        assert rec.f32().shape == rec.shape


# --- safetensors ----------------------------------------------------------------------------------

def test_fuzz_safetensors_header(scratch: Path) -> None:
    good = scratch / "good.safetensors"
    write_safetensors(good, SHAPES, lambda n: np.ones(SHAPES[n], dtype="<u2"))
    seed = good.read_bytes()
    n = struct.unpack("<Q", seed[:8])[0]
    header = json.loads(seed[8:8 + n])
    data = seed[8 + n:]

    def with_header(doc: object) -> bytes:
        raw = json.dumps(doc).encode()
        return struct.pack("<Q", len(raw)) + raw + data

    path = scratch / "fuzz.safetensors"

    def check(blob: bytes) -> None:
        path.write_bytes(blob)
        read_all(outcome(read_safetensors, path))

    run_fuzz(st.one_of(mutations(seed), replace_somewhere(header).map(with_header),
                       st.binary(max_size=64).map(lambda b: struct.pack("<Q", len(b)) + b)), check)


# --- torch zip --------------------------------------------------------------------------------------

def test_fuzz_torch_zip_pickle(scratch: Path) -> None:
    pkl = torch_zip_io.state_dict_pickle(SHAPES, "BF16")
    sizes = {str(i): 2 * int(np.prod(s)) for i, s in enumerate(SHAPES.values())}

    def archive(pickle_bytes: bytes, compress: bool) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("archive/data.pkl", pickle_bytes,
                        compress_type=zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED)
            for key, size in sizes.items():
                zf.writestr(f"archive/data/{key}", bytes(size))
        return buf.getvalue()

    seed = archive(pkl, False)
    path = scratch / "fuzz.bin"

    def check(blob: bytes) -> None:
        path.write_bytes(blob)
        read_all(outcome(torch_zip_io.read_torch_zip, path))

    hostile = st.sampled_from([pickle.dumps(x, protocol=p) for p in (2, 4, 5)
                               for x in ({"a": 1}, [1, 2], "s", None, {"a": (1, 2)}, {1: b"x"})])
    run_fuzz(st.one_of(st.tuples(mutations(pkl, 4), st.booleans()).map(lambda a: archive(*a)),
                       mutations(seed, 3), hostile.map(lambda p: archive(p, False))), check)


# --- config.json ------------------------------------------------------------------------------------

def test_fuzz_config(scratch: Path) -> None:
    config = make_config("tiny")
    path = scratch / "config.json"

    def check(blob: bytes) -> None:
        path.write_bytes(blob)
        cfg = outcome(QwenConfig.from_file, path)
        if cfg is not None:
            assert all(min(shape, default=1) >= 0 for shape in cfg.tensor_shapes().values())

    text = json.dumps(config).encode()
    run_fuzz(st.one_of(replace_somewhere(config).map(lambda d: json.dumps(d).encode()),
                       mutations(text, 3), JSON.map(lambda d: json.dumps(d).encode())), check)


# --- manifest.json ----------------------------------------------------------------------------------

def test_fuzz_manifest(scratch: Path) -> None:
    from tests.test_reliability_bundles import make_bundle

    folder = make_bundle(scratch / "b")
    manifest = json.loads((folder / "manifest.json").read_text())
    gguf_seed = (folder / "llm.gguf").read_bytes()

    def check(blob: bytes) -> None:
        (folder / "manifest.json").write_bytes(blob)
        bundle = outcome(Bundle.open, folder)
        if bundle is not None:
            assert bundle.llm_path.parent == folder and bundle.vision_path.parent == folder

    def with_gguf(blob: bytes) -> bytes:  # the GGUF header reader meets damaged files too
        (folder / "llm.gguf").write_bytes(blob)
        doc = json.loads(json.dumps(manifest))
        doc["files"]["llm.gguf"]["bytes"] = len(blob)
        return json.dumps(doc).encode()

    text = json.dumps(manifest).encode()
    try:
        run_fuzz(st.one_of(replace_somewhere(manifest).map(lambda d: json.dumps(d).encode()),
                           mutations(text, 3), mutations(gguf_seed[:400], 4).map(
                               lambda b: with_gguf(b + gguf_seed[400:]))), check)
    finally:
        (folder / "llm.gguf").write_bytes(gguf_seed)


# --- image bytes ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image_seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    seeds = []
    for fmt, mode in [("PNG", "RGB"), ("JPEG", "RGB"), ("GIF", "P"), ("BMP", "RGB"), ("WEBP", "RGB"),
                      ("TIFF", "RGB"), ("PNG", "I;16"), ("PNG", "LA")]:
        buf = io.BytesIO()
        picture.convert(mode).save(buf, fmt)
        seeds.append(buf.getvalue())
    return seeds


def test_fuzz_image_bytes(image_seeds: list[bytes]) -> None:
    def check(blob: bytes) -> None:
        data = outcome(read_image, blob)
        if data is not None:
            assert data.image.mode == "RGB" and len(data.key) == 64
            assert preprocess_image(data.image, 28).shape == (3, 28, 28)

    run_fuzz(st.one_of(*[mutations(seed, 4) for seed in image_seeds], st.binary(max_size=64)), check)
