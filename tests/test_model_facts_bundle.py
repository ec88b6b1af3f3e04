"""Every model fact the Python runtime uses comes from the bundle (manifest.json, else the GGUF's ``qwenvl.*``).

Before, preprocessing, the vision signature and the prompt read ``qwenvl_edge/contract.py``: a bundle with other
mean/std, rows per image or grounding tags was run with Qwen-VL's numbers anyway. Bundles here are copies of the
session's real F32 export with one manifest fact changed.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from qwenvl_edge import contract
from qwenvl_edge.errors import BundleError
from qwenvl_edge.runtime.bundle import Bundle, file_entry
from qwenvl_edge.runtime.pipeline import QwenVL
from qwenvl_edge.runtime.preprocess import ImageSpec, preprocess_image, read_image
from qwenvl_edge.runtime.vision import VisionEncoder
from tests.test_reliability_bundles import make_bundle

OTHER_MEAN = (0.5, 0.25, 0.125)
OTHER_STD = (0.5, 0.5, 0.25)


def patch_gguf(path: Path, key: str, value: int | str) -> None:
    """Set a ``qwenvl.*`` value in place (an int32/uint32, or a string padded to the old length with zeros:
    the file keeps its size and layout, as if the exporter had written another model's fact)."""
    data = bytearray(path.read_bytes())
    name = key.encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    kind = struct.unpack_from("<I", data, at)[0]
    if kind in (4, 5):  # uint32, int32
        struct.pack_into("<I" if kind == 4 else "<i", data, at + 4, value)
    else:
        assert kind == 8 and isinstance(value, str), (key, kind)
        size = struct.unpack_from("<Q", data, at + 4)[0]
        text = value.encode().ljust(size, b"0")
        assert len(text) == size, (key, value)
        data[at + 12:at + 12 + size] = text
    path.write_bytes(bytes(data))


def changed_bundle(source: Path, folder: Path, drop: tuple[str, ...] = (), gguf: bool = False, **model) -> Path:
    """A copy of ``source`` whose manifest has ``model`` facts changed and ``drop`` facts removed; with ``gguf``
    the GGUF states the changed facts too (a consistent bundle of another model)."""
    shutil.copytree(source, folder)
    path = folder / contract.MANIFEST_FILE
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest["model"].update(model)
    for name in drop:
        manifest["model"].pop(name)
    if gguf:
        keys = {"image_mean": contract.KEY_IMAGE_MEAN, "image_std": contract.KEY_IMAGE_STD,
                "n_queries": contract.KEY_N_QUERIES}
        for name, value in model.items():
            patch_gguf(folder / contract.LLM_FILE, keys[name], ", ".join(map(repr, value))
                       if isinstance(value, list) else value)
        manifest["files"][contract.LLM_FILE] = file_entry(folder / contract.LLM_FILE)
    path.write_text(json.dumps(manifest), encoding="utf-8")
    return folder


def other_normalisation(source: Path, folder: Path) -> Path:
    """The bundle of a model trained with another mean and std (manifest and GGUF say so)."""
    return changed_bundle(source, folder, gguf=True, image_mean=list(OTHER_MEAN), image_std=list(OTHER_STD))


def rows(bundle: Path, image: Path) -> np.ndarray:
    with QwenVL(bundle, n_threads=2, cache_dir=None) as m:
        return m.encode_image(image)


def test_the_manifests_mean_and_std_give_other_pixels(f32_bundle: Path, golden, tmp_path: Path) -> None:
    """Before: the runtime normalised with the contract's CLIP numbers whatever the manifest said."""
    other = other_normalisation(f32_bundle, tmp_path / "other")
    image = golden.images["sign"]
    assert Bundle.open(other).model.image_spec == ImageSpec(448, OTHER_MEAN, OTHER_STD)
    got, usual = rows(other, image), rows(f32_bundle, image)
    with VisionEncoder(other / contract.VISION_FILE, n_threads=2) as vision:
        want = vision.encode(preprocess_image(read_image(image).image, ImageSpec(448, OTHER_MEAN, OTHER_STD))[None])[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(got - usual).max() > 1e-3
    np.testing.assert_allclose(usual, golden.vision("sign"), atol=1e-4)  # the golden bundle is unchanged


def test_the_manifests_rows_per_image_decide_the_vision_check(f32_bundle: Path, golden, tmp_path: Path) -> None:
    """Before: a graph of 256 rows was taken for a manifest saying 128 (the contract's N_QUERIES was checked)."""
    other = changed_bundle(f32_bundle, tmp_path / "rows", gguf=True, n_queries=128)
    with pytest.raises(BundleError, match=r"wrong vision signature.*\[N, 128, hidden\]"):
        rows(other, golden.images["sign"])


def test_the_manifests_grounding_tags_are_special(f32_bundle: Path, tmp_path: Path) -> None:
    """Before: the six tag texts were written into bundle.py; now they are the bundle's."""
    tags = ["<REF>", "</REF>", "<BOX>", "</BOX>", "<QUAD>", "</QUAD>"]
    other = changed_bundle(f32_bundle, tmp_path / "tags", grounding=tags)
    question = "Where is <REF>the sign</REF>?"
    with QwenVL(other, n_threads=2, cache_dir=None) as m:
        ids = m.prompt_ids([], question)
    with QwenVL(f32_bundle, n_threads=2, cache_dir=None) as m:
        usual = m.prompt_ids([], question)
    assert contract.REF_START_ID in ids and contract.REF_START_ID + 1 in ids
    assert contract.REF_START_ID not in usual


def test_facts_an_older_manifest_lacks_come_from_the_gguf(f32_bundle: Path, tmp_path: Path) -> None:
    """An older manifest without mean/std, ids, rows or tags: the GGUF states them (no contract fallback)."""
    full = Bundle.open(f32_bundle).model
    dropped = ("image_mean", "image_std", "eos_token_id", "im_start_id", "im_end_id", "ref_start_id", "n_queries",
               "system_prompt", "top_k", "max_new_tokens", "grounding")
    older = Bundle.open(changed_bundle(f32_bundle, tmp_path / "older", drop=dropped)).model
    assert older.image_spec == full.image_spec
    assert older.grounding_tags == full.grounding_tags == {t: contract.REF_START_ID + i
                                                           for i, t in enumerate(contract.GROUNDING_TAGS)}
    assert older == full


@pytest.mark.parametrize("fact", ["image_mean", "eos_token_id", "n_queries", "grounding"])
def test_a_fact_neither_file_states_is_refused(tmp_path: Path, fact: str) -> None:
    """A GGUF without qwenvl.* keys (nor the tag tokens) and a manifest without the fact: refused, never assumed."""
    folder = make_bundle(tmp_path / "bare")
    path = folder / contract.MANIFEST_FILE
    manifest = json.loads(path.read_text(encoding="utf-8"))
    del manifest["model"][fact]
    path.write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(BundleError, match=rf"no model\.{fact}.*export the bundle again") as info:
        Bundle.open(folder)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("model, key", [
    ({"image_mean": list(OTHER_MEAN)}, contract.KEY_IMAGE_MEAN),
    ({"im_end_id": contract.IM_END_ID + 3}, contract.KEY_IM_END_ID),
    ({"ref_start_id": contract.REF_START_ID - 6}, contract.KEY_REF_START_ID),
])
def test_a_manifest_and_gguf_of_different_models_are_refused(f32_bundle: Path, tmp_path: Path, model: dict,
                                                               key: str) -> None:
    """Before: the GGUF's ids and mean/std were compared with the contract's, not with the manifest's."""
    other = changed_bundle(f32_bundle, tmp_path / "mixed", **model)
    # refused when the vocabulary loads (the prompt needs it)
    with pytest.raises(BundleError, match=key) as info, QwenVL(other, n_threads=2, cache_dir=None) as m:
        m.prompt_ids([], "hello")
    assert "parts of different models" in str(info.value)


def test_bad_grounding_in_the_manifest_is_refused(f32_bundle: Path, tmp_path: Path) -> None:
    for bad in (["<ref>"] * 6, ["a", "b"], "<ref>", ["", "b", "c", "d", "e", "f"]):
        folder = changed_bundle(f32_bundle, tmp_path / f"bad{len(list(tmp_path.iterdir()))}", grounding=bad)
        with pytest.raises(BundleError, match="grounding"):
            Bundle.open(folder)


def test_the_exporter_writes_every_fact(f32_bundle: Path) -> None:
    """A fresh export carries every fact in its manifest: nothing is left to a fallback."""
    model = json.loads((f32_bundle / contract.MANIFEST_FILE).read_text(encoding="utf-8"))["model"]
    assert model["grounding"] == list(contract.GROUNDING_TAGS)
    assert model["image_mean"] == list(contract.IMAGE_MEAN) and model["n_queries"] == contract.N_QUERIES
    assert file_entry(f32_bundle / contract.LLM_FILE)["bytes"] > 0


def test_the_api_refuses_empty_images_and_names_the_bad_one(f32_bundle: Path, golden) -> None:
    """Before: a 0 x 5 PIL image was answered as a black picture, and bad bytes printed a BytesIO repr."""
    from PIL import Image

    from qwenvl_edge.errors import ImageError

    with QwenVL(f32_bundle, n_threads=2, cache_dir=None) as m:
        for empty in (Image.new("RGB", (0, 5)), Image.new("RGB", (0, 0))):
            with pytest.raises(ImageError, match=r"^image 1: empty image"):
                m.generate([empty], "What is it?", max_tokens=2, temperature=0)
        with pytest.raises(ImageError, match=r"^image 2: cannot read image \(not an image format") as info:
            m.build_prompt([golden.images["sign"], io.BytesIO(b"junk")], "hi")
        assert "object at" not in str(info.value)
        with pytest.raises(ImageError, match=rf"^{golden.images['noise'].parent}/missing.png: cannot read image"):
            m.build_prompt([golden.images["noise"].parent / "missing.png"], "hi")
        with pytest.raises(ImageError, match=r"^the image: empty image"):
            m.encode_image(Image.new("L", (7, 0)))
