"""Images as users pass them: camera-size JPEGs, 16-bit PNGs, every API type; bombs and non-images refused."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qwenvl_edge.errors import ImageError
from qwenvl_edge.runtime.preprocess import load_image, preprocess_image, read_image

COLOR = (200, 120, 40)


def one_line(source, match: str) -> str:
    with pytest.raises(ImageError, match=match) as info:
        read_image(source)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400
    return message


def camera_jpeg(path: Path, size: tuple[int, int], orientation: int = 1) -> Path:
    image = Image.new("RGB", size, COLOR)
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, "JPEG", quality=90, exif=exif.tobytes())
    return path


@pytest.fixture(scope="module")
def photo_108mp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return camera_jpeg(tmp_path_factory.mktemp("photo") / "phone.jpg", (12000, 9000))


# --- large photos and bombs -----------------------------------------------------------------------

def test_108_megapixel_phone_jpeg_is_accepted_and_decoded_small(photo_108mp: Path) -> None:
    data = read_image(photo_108mp)  # before fix: refused as a decompression bomb
    assert data.size == (12000, 9000)
    assert data.image.size == (1500, 1125)  # DCT-scaled 1/8: bounded memory, still over 448 per side
    assert np.abs(np.asarray(data.image).astype(int) - COLOR).max() <= 3
    assert preprocess_image(data.image).shape == (3, 448, 448)
    assert data.key == hashlib.sha256(photo_108mp.read_bytes()).hexdigest()


def test_rotated_camera_jpeg_reports_upright_display_size(tmp_path: Path) -> None:
    data = read_image(camera_jpeg(tmp_path / "r.jpg", (6000, 4000), orientation=6))  # 24 MP, rotated
    assert data.size == (4000, 6000) and data.image.size == (500, 750)  # 1/8 scale, then rotated


def test_jpeg_under_16_megapixels_is_decoded_in_full(tmp_path: Path) -> None:
    """Parity with the original below the draft threshold: no DCT scaling."""
    data = read_image(camera_jpeg(tmp_path / "m.jpg", (4000, 3000)))
    assert data.image.size == (4000, 3000) == data.size


def png_declaring(width: int, height: int, bit_depth: int = 8) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def jpeg_declaring(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), COLOR).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize("data,match", [
    (png_declaring(100_000, 100_000), "decompression bomb"),
    (png_declaring(12_000, 12_000), "decompression bomb.*over 134217728 for PNG"),
    (png_declaring(65_535, 65_535, 16), "decompression bomb"),
    (jpeg_declaring(60_000, 60_000), "decompression bomb"),
    (jpeg_declaring(20_000, 15_000), "decompression bomb"),  # 300 MP: over even a 200 MP camera
])
def test_true_bombs_are_refused(data: bytes, match: str) -> None:
    assert len(data) < 1000
    one_line(data, match)


# --- 16-bit and other modes -----------------------------------------------------------------------

def test_16_bit_grayscale_png_is_scaled_to_8_bits(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 256 * 64).astype(np.uint16).reshape(64, 256)
    path = tmp_path / "gray16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(load_image(path)).astype(int)  # before fix: everything above 255 clipped to white
    expected = np.rint(ramp / 257.0).astype(int)
    assert np.abs(rgb[..., 0] - expected).max() <= 1 and (rgb[..., 0] == rgb[..., 2]).all()
    assert rgb.mean() == pytest.approx(127.5, abs=1)


@pytest.mark.parametrize("mode,values,expected", [
    ("I", [0, 32896, 65535], [0, 128, 255]),          # 32-bit integer gray holding 16-bit values
    ("F", [0.0, 0.5, 1.0], [0, 128, 255]),            # float gray in [0, 1]
    ("I;16", [0, 257, 65535], [0, 1, 255]),
])
def test_wide_gray_modes_as_pil_images(mode: str, values: list, expected: list) -> None:
    image = Image.new(mode, (3, 1))
    for x, v in enumerate(values):
        image.putpixel((x, 0), v)
    assert np.asarray(load_image(image))[0, :, 1].tolist() == expected


# --- the API's image types ------------------------------------------------------------------------

@pytest.fixture()
def png(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "p.png"
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(path)
    return path


def test_every_accepted_type_gives_the_same_picture(png: Path) -> None:
    expected = np.asarray(Image.open(png).convert("RGB"))
    data = png.read_bytes()
    file_key = hashlib.sha256(data).hexdigest()
    with open(png, "rb") as f:
        sources = [str(png), png, data, bytearray(data), memoryview(data), io.BytesIO(data), f]
        for source in sources:  # before fix: bytes, BytesIO, file objects raised raw exceptions
            got = read_image(source)
            np.testing.assert_array_equal(np.asarray(got.image), expected)
            assert got.key == file_key and got.size == (30, 20)
        assert not f.closed  # the caller's file stays open
    for source in [Image.open(png), expected, expected.copy(order="F")]:
        got = read_image(source)
        np.testing.assert_array_equal(np.asarray(got.image), expected)
        assert got.size == (30, 20)
    assert read_image(expected).key == read_image(Image.fromarray(expected)).key


def test_gray_and_rgba_arrays() -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    np.testing.assert_array_equal(np.asarray(load_image(gray))[..., 0], gray)
    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[0, 0, 3] = 255  # opaque: unchanged; transparent: white, as a browser shows it
    assert np.asarray(load_image(rgba))[0, 0].tolist() == [255, 0, 0]
    assert np.asarray(load_image(rgba))[1, 1].tolist() == [255, 255, 255]


@pytest.mark.parametrize("source,match", [
    (None, "not an image"), (0, "not an image"), (1, "not an image"), (True, "not an image"),
    (3.5, "not an image"), (np.int64(0), "not an image"), (object(), "not an image"), ({"a": 1}, "not an image"),
    ("", "empty image path"), (io.StringIO("abc"), "binary mode"),
    (np.zeros((4, 4, 3), np.float32), "expected uint8"), (np.zeros((4, 4, 2), np.uint8), "expected uint8"),
    (np.zeros((0, 4, 3), np.uint8), "expected uint8"), (np.zeros((2, 2, 2, 3), np.uint8), "expected uint8"),
    (b"", "cannot read image"), (b"GIF89a", "cannot read image"), (io.BytesIO(b"\x89PNG\r\n"), "cannot read image"),
])
def test_other_objects_are_refused_in_one_line(source, match: str) -> None:
    one_line(source, match)


def test_int_image_never_touches_file_descriptor_0() -> None:
    """images=[0] used to read stdin (here: block forever on an open pipe) and close the caller's fd 0."""
    code = ("import os, sys\n"
            "from qwenvl_edge.errors import ImageError\n"
            "from qwenvl_edge.runtime.preprocess import read_image\n"
            "for fd in (0, 1, 2):\n"
            "    try:\n"
            "        read_image(fd)\n"
            "    except ImageError as e:\n"
            "        print(e, file=sys.stderr)\n"
            "os.fstat(0)\n"
            "print('fd0 open')\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=120)  # stdin is never closed by us before this returns
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.strip() == "fd0 open" and err.count("not an image") == 3


def test_file_object_read_from_its_position(png: Path) -> None:
    data = png.read_bytes()
    stream = io.BytesIO(b"JUNK" + data)
    stream.seek(4)
    assert read_image(stream).key == hashlib.sha256(data).hexdigest()
    assert not stream.closed


def test_environment_untouched_by_reading(png: Path) -> None:
    before = os.listdir(png.parent)
    read_image(png)
    assert os.listdir(png.parent) == before


def test_fifo_and_devices_are_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    one_line(fifo, "not a regular file")
    one_line("/dev/zero", "not a regular file")  # would read forever
    one_line(tmp_path, "cannot read image")


def test_file_over_the_size_limit_is_refused_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qwenvl_edge.runtime import preprocess

    monkeypatch.setattr(preprocess, "MAX_FILE_BYTES", 1000)
    path = tmp_path / "big.png"
    path.write_bytes(png_declaring(4, 4) + bytes(2000))
    one_line(path, "larger than 1000 bytes")
    one_line(path.read_bytes(), "larger than 1000 bytes")
