"""Image frictions: transparency on white, empty PIL images refused, errors that name the image the user gave.

- a transparent PNG used to reach the model black (``convert("RGB")`` drops alpha) while the web page shows it
  on white: every mode with transparency is now composited onto white, ``round((c * a + 255 * (255 - a)) / 255)``;
- a 0 x 0 or N x 0 PIL image used to be answered as a black picture: it is refused with an ``ImageError``;
- an unreadable in-memory image used to print ``<_io.BytesIO object at 0x...>``: messages name the path, or the
  caller's name ("image 2"), never a Python object.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qwenvl_edge.errors import ImageError
from qwenvl_edge.runtime.preprocess import (
    ImageSpec,
    exporter_spec,
    load_image,
    preprocess_batch,
    preprocess_image,
    read_image,
)

RED = (230, 20, 40)


def on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The decision, computed independently in floats: alpha-weighted colour plus the white that shows through."""
    a = alpha.astype(np.float64)[..., None] / 255
    return np.rint(rgb.astype(np.float64) * a + 255 * (1 - a)).astype(np.uint8)


def alpha_ramp(width: int = 32, height: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Colours that vary and an alpha ramp 0..255 across the width (every level of transparency)."""
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    alpha = np.tile(np.linspace(0, 255, width).round().astype(np.uint8), (height, 1))
    return rgb, alpha


def transparent_images(folder: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """PNG files in each mode that carries transparency, with the RGB a browser shows for them."""
    rgb, alpha = alpha_ramp()
    out: dict[str, tuple[Path, np.ndarray]] = {}
    rgba = folder / "rgba.png"
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(rgba)
    out["RGBA"] = (rgba, on_white(rgb, alpha))
    gray = rgb[..., 0]
    la = folder / "la.png"
    Image.fromarray(np.dstack([gray, alpha]), "LA").save(la)
    out["LA"] = (la, on_white(np.dstack([gray] * 3), alpha))
    palette = Image.new("P", (6, 4), 1)
    palette.putpalette([0, 0, 0, *RED, 10, 200, 30] + [0] * 759)
    palette.putpixel((0, 0), 0)
    palette.putpixel((5, 3), 2)
    p_path = folder / "palette.png"
    palette.save(p_path, transparency=0)  # index 0 is transparent (a tRNS chunk)
    want = np.array(palette.convert("RGB"))
    want[0, 0] = 255
    out["P+tRNS"] = (p_path, want)
    key = np.full((4, 5), 90, np.uint8)
    key[1, 2] = 17
    l_path = folder / "gray_key.png"
    Image.fromarray(key, "L").save(l_path, transparency=17)  # gray 17 is transparent
    want = np.dstack([key] * 3)
    want[1, 2] = 255
    out["L+tRNS"] = (l_path, want)
    colour = np.zeros((3, 3, 3), np.uint8) + np.array(RED, np.uint8)
    colour[2, 2] = (1, 2, 3)
    c_path = folder / "rgb_key.png"
    Image.fromarray(colour, "RGB").save(c_path, transparency=(1, 2, 3))
    want = colour.copy()
    want[2, 2] = 255
    out["RGB+tRNS"] = (c_path, want)
    return out


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P+tRNS", "L+tRNS", "RGB+tRNS"])
def test_transparent_png_is_shown_on_white(tmp_path: Path, mode: str) -> None:
    """Before: transparent pixels came out black (alpha dropped) or in the palette's colour."""
    path, want = transparent_images(tmp_path)[mode]
    got = np.asarray(load_image(path))
    assert got.dtype == np.uint8 and got.shape == want.shape
    assert np.array_equal(got, want), f"{mode}: {np.count_nonzero(got != want)} values differ"


def test_fully_transparent_image_gives_white_pixels(tmp_path: Path) -> None:
    """The model's input of a fully transparent picture is that of a white one, not of a black one."""
    clear = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    white = Image.new("RGB", (40, 30), (255, 255, 255))
    assert np.array_equal(preprocess_image(load_image(clear)), preprocess_image(load_image(white)))
    assert np.array_equal(preprocess_image(clear), preprocess_image(white))  # a PIL image given directly too


@pytest.mark.parametrize("source", ["pil", "array", "bytes"])
def test_every_kind_of_input_is_flattened(source: str) -> None:
    rgb, alpha = alpha_ramp()
    rgba = np.dstack([rgb, alpha])
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    given = {"pil": Image.fromarray(rgba, "RGBA"), "array": rgba, "bytes": buf.getvalue()}[source]
    assert np.array_equal(np.asarray(load_image(given)), on_white(rgb, alpha))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_opaque_images_are_unchanged(mode: str) -> None:
    """Alpha 255 everywhere: exactly the pixels of the image without alpha (the golden stays exact)."""
    rgb, _ = alpha_ramp()
    opaque = Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]), "RGBA").convert(mode)
    plain = opaque.convert("RGB") if mode != "PA" else opaque.convert("RGBA").convert("RGB")
    assert np.array_equal(np.asarray(load_image(opaque)), np.asarray(plain))
    assert np.array_equal(preprocess_image(opaque), preprocess_image(plain))


@pytest.mark.parametrize("size", [(0, 0), (5, 0), (0, 7)])
def test_empty_pil_image_is_refused(size: tuple[int, int]) -> None:
    """Before: a 0 x N image was taken and answered as a black picture."""
    empty = Image.new("RGB", size)
    with pytest.raises(ImageError, match=rf"empty image \({size[0]}x{size[1]} pixels\)"):
        read_image(empty)
    with pytest.raises(ImageError, match="empty image"):
        preprocess_image(empty)
    with pytest.raises(ImageError, match=r"^image 1: empty image"):
        preprocess_batch([empty], 16)


@pytest.mark.parametrize("source", [io.BytesIO(b"not an image at all"), b"GIF89a-no", bytearray(b"\x89PNG\r\n\x1a\n"),
                                    memoryview(b"\xff\xd8\xff\xe0 broken jpeg")])
def test_unreadable_in_memory_image_names_no_python_object(source) -> None:
    """Before: "cannot identify image file <_io.BytesIO object at 0x7f...>"."""
    with pytest.raises(ImageError) as info:
        read_image(source)
    message = str(info.value)
    assert "object at 0x" not in message and "<_io" not in message and "BytesIO" not in message, message
    with pytest.raises(ImageError, match=r"^image 2: cannot read image") as named:
        read_image(source.getvalue() if isinstance(source, io.BytesIO) else source, "image 2")
    assert "object at" not in str(named.value)


def test_path_names_itself_whatever_the_name(tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageError, match=rf"^{path}: cannot read image"):
        read_image(path, "image 3")


def test_batch_names_the_failing_image() -> None:
    good = Image.new("RGB", (8, 8), RED)
    with pytest.raises(ImageError, match=r"^image 2: cannot read image \(not an image format"):
        preprocess_batch([good, io.BytesIO(b"junk")], 16)


def test_spec_decides_the_pixels() -> None:
    """The normalisation comes from the spec given (the bundle's), not from constants."""
    image = Image.fromarray(alpha_ramp()[0], "RGB")
    spec = exporter_spec(32)
    other = ImageSpec(32, (0.5, 0.25, 0.125), (0.5, 0.5, 0.25))
    a, b = preprocess_image(image, spec), preprocess_image(image, other)
    x = np.asarray(image.resize((32, 32), Image.BICUBIC), np.float32).transpose(2, 0, 1) / np.float32(255)
    want = (x - np.float32([0.5, 0.25, 0.125])[:, None, None]) / np.float32([0.5, 0.5, 0.25])[:, None, None]
    assert np.array_equal(b, want)
    assert not np.allclose(a, b)
    with pytest.raises(ValueError, match="not an ImageSpec"):
        preprocess_image(image, 0)


@pytest.mark.parametrize("tags", [("<REF>", "</REF>", "<BOX>", "</BOX>", "<Q>", "</Q>"),
                                  ("[r]", "[/r]", "(b)", "(/b)", "q", "/q"),
                                  ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>")])
def test_boxes_are_read_with_the_bundles_tags(tags: tuple[str, ...]) -> None:
    """Before: the tag texts were written into boxes.py; a bundle with its own tags gave no boxes."""
    from qwenvl_edge.runtime.boxes import parse_boxes

    text = f"{tags[0]}the sign{tags[1]}{tags[2]}(100,200),(300,400){tags[3]} and <ref>x</ref>"
    [box] = parse_boxes(text, 640, 427, tags)
    assert box.label == "the sign" and box.norm == (100, 200, 300, 400)
    assert box.pixels == pytest.approx((64.0, 85.4, 192.0, 170.8))
