"""runtime.preprocess: golden pixels, EXIF orientation, and one-line ImageErrors for bad files."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qwenvl_edge import contract
from qwenvl_edge.errors import ImageError
from qwenvl_edge.runtime.preprocess import ImageSpec, load_image, preprocess_batch, preprocess_image

EXIF_ORIENTATION = 0x0112


def assert_one_line_image_error(source: object, match: str) -> ImageError:
    """Catches a decoder exception leaking out, or a multi-line message the CLI cannot print."""
    with pytest.raises(ImageError, match=match) as info:
        load_image(source)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    return info.value


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def tiny_png_declaring(width: int, height: int) -> bytes:
    """A few hundred bytes whose header claims ``width`` x ``height`` RGB pixels (black, if small)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * min(height * (1 + 3 * width), 64))  # filter byte + RGB per row
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


@pytest.mark.parametrize("name", ["sign", "noise"])
def test_pixels_match_golden(golden, name: str) -> None:
    pixels = preprocess_image(load_image(golden.images[name]))
    assert pixels.dtype == np.float32 and pixels.shape == (3, 448, 448)
    assert np.abs(pixels - golden.pixels(name)).max() <= 1e-6


def test_batch_stacks_images_in_order(golden) -> None:
    batch = preprocess_batch([golden.images["sign"], Image.open(golden.images["noise"])], 448)
    assert batch.shape == (2, 3, 448, 448) and batch.dtype == np.float32
    assert np.abs(batch[0] - golden.pixels("sign")).max() <= 1e-6
    assert np.abs(batch[1] - golden.pixels("noise")).max() <= 1e-6


def test_other_image_size_and_modes() -> None:
    gray = Image.new("L", (30, 20), 255)
    pixels = preprocess_image(load_image(gray), ImageSpec(224, contract.IMAGE_MEAN, contract.IMAGE_STD))
    assert pixels.shape == (3, 224, 224)
    assert np.array_equal(pixels, preprocess_image(load_image(gray), 224))  # a bare side: the exporter's spec
    white = (1.0 - np.array(contract.IMAGE_MEAN)) / np.array(contract.IMAGE_STD)
    np.testing.assert_allclose(pixels[:, 100, 100], white, rtol=1e-6)


def _red_left_blue_right(path: Path, orientation: int | None) -> None:
    image = Image.new("RGB", (60, 40), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 30, 40))
    exif = Image.Exif()
    if orientation is not None:
        exif[EXIF_ORIENTATION] = orientation
    image.save(path, "JPEG", quality=95, exif=exif.tobytes())


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    """Orientation 6: the camera was turned, the viewer rotates 90 degrees clockwise."""
    _red_left_blue_right(tmp_path / "rotated.jpg", orientation=6)
    image = load_image(tmp_path / "rotated.jpg")
    assert image.size == (40, 60) and image.mode == "RGB"
    top, bottom = np.asarray(image)[5, 20], np.asarray(image)[55, 20]
    assert top[0] > 200 and top[2] < 60, top  # the red left half is now on top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def test_upright_jpeg_is_left_alone(tmp_path: Path) -> None:
    _red_left_blue_right(tmp_path / "upright.jpg", orientation=1)
    image = load_image(tmp_path / "upright.jpg")
    assert image.size == (60, 40)
    assert np.asarray(image)[20, 5][0] > 200


def test_missing_file(tmp_path: Path) -> None:
    err = assert_one_line_image_error(tmp_path / "nope.png", "cannot read image")
    assert "nope.png" in str(err)


def test_folder_is_not_an_image(tmp_path: Path) -> None:
    assert_one_line_image_error(tmp_path, "cannot read image")


def test_non_image_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("these are\nnot pixels\n")
    err = assert_one_line_image_error(path, "cannot read image")
    assert "notes.png" in str(err)


def test_truncated_png(golden, tmp_path: Path) -> None:
    data = golden.images["noise"].read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    assert_one_line_image_error(path, "cannot read image")


@pytest.mark.parametrize("side", [12_000, 100_000])  # over 134 MP for a PNG (Pillow's own check past 268 MP)
def test_decompression_bomb(tmp_path: Path, side: int) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(tiny_png_declaring(side, side))
    assert path.stat().st_size < 1000
    err = assert_one_line_image_error(path, "decompression bomb")
    assert "bomb.png" in str(err)


def test_same_crafted_png_at_a_small_size_loads(tmp_path: Path) -> None:
    """The bomb tests fail for the declared size, not for the hand-made bytes."""
    path = tmp_path / "small.png"
    path.write_bytes(tiny_png_declaring(4, 4))
    image = load_image(path)
    assert image.size == (4, 4) and np.asarray(image).max() == 0
