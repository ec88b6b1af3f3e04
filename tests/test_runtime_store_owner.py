"""Store entries belong to the bundle part that wrote them: a prefix state or image rows written by another
bundle, copied under this bundle's key with a header that is valid in every other respect (key rewritten,
payload and sha256 untouched), is never used: it is a miss, dropped, and recomputed.

The other bundle is the same checkpoint exported with INT8 vision and a Q4_K_M decoder: its KV state and
rows have exactly the shapes this bundle expects (llama.cpp and the shape checks accept them), only the
numbers differ, which is what makes such an entry dangerous.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from qwenvl_edge.runtime.pipeline import QwenVL
from qwenvl_edge.runtime.store import MAGIC, SUFFIX, Expect, Store, encode_entry, entry_key

ROWS = Expect("float32", (2, 3))


def forge(source: Path, target: Path) -> None:
    """``source``'s entry written as ``target``'s: the header's key rewritten, payload and checksum kept."""
    blob = source.read_bytes()
    end = blob.index(b"\n", len(MAGIC))
    header = json.loads(blob[len(MAGIC):end])
    header["key"] = target.stem
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + blob[end + 1:])


def only_entry(store: Path, kind: str) -> Path:
    [path] = (store / kind).rglob(f"*{SUFFIX}")
    return path


@pytest.fixture(scope="module")
def other_store(default_bundle: Path, golden, tmp_path_factory) -> Path:
    """The other bundle's store after one question about the sign (one rows entry, one prefix state)."""
    folder = tmp_path_factory.mktemp("other-store")
    with QwenVL(default_bundle, n_threads=2, cache_dir=folder) as m:
        m.generate([golden.images["sign"]], golden.cases["one_image"]["text"], max_tokens=2, temperature=0)
    return folder


def test_a_prefix_state_of_another_bundle_is_never_restored(f32_bundle, other_store, golden, tmp_path) -> None:
    case, image = golden.cases["one_image"], golden.images["sign"]
    with QwenVL(f32_bundle, n_threads=2, cache_dir=tmp_path) as m:
        refs = m.session.read([image], {})
        key = m.session.prefix_key(None, [], refs)
        forge(only_entry(other_store, "prefix"), m.store.path("prefix", key))
        r = m.generate([image], case["text"], max_tokens=golden.max_new_tokens, temperature=0)
        assert r.timings.restored_positions == 0 and m.store.dropped == 1
        assert r.token_ids == case["generated_ids"]
    with QwenVL(f32_bundle, n_threads=2, cache_dir=tmp_path) as m:  # its own state, written instead, is used
        r = m.generate([image], case["text"], max_tokens=golden.max_new_tokens, temperature=0)
        assert r.timings.restored_positions > 0 and m.store.dropped == 0
        assert r.token_ids == case["generated_ids"]


def test_rows_of_another_bundles_vision_model_are_never_used(f32_bundle, other_store, golden, tmp_path) -> None:
    image = golden.images["sign"]
    with QwenVL(f32_bundle, n_threads=2, cache_dir=tmp_path) as m:
        key = m.session.encoder._key(m.session.read([image], {})[0].key)
        forge(only_entry(other_store, "rows"), m.store.path("rows", key))
        rows = m.encode_image(image)
        assert m.session.encoder.is_open and m.store.dropped == 1  # encoded, not read
    np.testing.assert_allclose(rows, golden.vision("sign"), atol=1e-4)


def test_a_state_moved_from_another_prompt_of_the_same_bundle_is_still_its_own(f32_bundle, golden,
                                                                              tmp_path) -> None:
    """The owner is the bundle, not the prompt: the same bundle's entries keep working after a copy of the
    store folder (the check is on the header's owner, not on where the file lies)."""
    case, image = golden.cases["one_image"], golden.images["sign"]
    with QwenVL(f32_bundle, n_threads=2, cache_dir=tmp_path / "a") as m:
        m.generate([image], case["text"], max_tokens=2, temperature=0)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    with QwenVL(f32_bundle, n_threads=2, cache_dir=tmp_path / "b") as m:
        r = m.generate([image], case["text"], max_tokens=golden.max_new_tokens, temperature=0)
        assert r.timings.restored_positions > 0 and r.timings.images_encoded == 0 and m.store.dropped == 0
        assert r.token_ids == case["generated_ids"]


@pytest.mark.parametrize("written_by", ["vision:other", "", None], ids=["other-owner", "empty-owner", "no-owner"])
def test_the_store_checks_the_owner_in_the_header(tmp_path, written_by) -> None:
    store, key = Store(tmp_path), entry_key("owner-test")
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    path = store.path("rows", key)
    path.parent.mkdir(parents=True)
    blob = encode_entry("rows", key, array, "" if written_by is None else written_by)
    if written_by is None:  # an entry from before owners were written: no owner field at all
        end = blob.index(b"\n", len(MAGIC))
        header = json.loads(blob[len(MAGIC):end])
        del header["owner"]
        blob = MAGIC + json.dumps(header).encode() + b"\n" + blob[end + 1:]
    path.write_bytes(blob)
    assert store.get("rows", key, ROWS, owner="vision:mine") is None
    assert store.dropped == 1 and not path.exists()
    store.put("rows", key, array, owner="vision:mine")
    np.testing.assert_array_equal(store.get("rows", key, ROWS, owner="vision:mine"), array)
    assert store.get("rows", key, ROWS, owner="vision:other") is None  # and it goes, as any bad entry


def test_rows_are_keyed_to_the_pixels_the_model_was_fed_not_only_to_the_vision_file(f32_bundle) -> None:
    """Two bundles sharing vision.onnx but not the image mean/std (or side) feed it other pixels, so their rows
    must not share cache entries: the identity holds the bundle's image spec as well as the model's sha256."""
    from dataclasses import replace

    from qwenvl_edge.runtime.image_encoder import ImageEncoder
    from qwenvl_edge.runtime.preprocess import ImageSpec

    with QwenVL(f32_bundle, n_threads=1, cache_dir=None) as m:
        mine = m.session.encoder
        spec: ImageSpec = mine.spec
        others = [replace(spec, mean=(0.5, 0.5, 0.5)), replace(spec, std=(0.25, 0.25, 0.25)),
                  replace(spec, size=spec.size + 28)]
        keys = {mine._key("photo")}
        for other in others:
            encoder = ImageEncoder(mine.path, m.bundle.vision_sha256, mine.hidden_size, mine.n_queries, other,
                                   mine.store)
            keys.add(encoder._key("photo"))
        assert len(keys) == 1 + len(others)
