"""The native preprocessing (native/src/image_preprocess.cpp) against Pillow, the runtime and the golden.

The C++ file is compiled on its own with the system g++ into a temp folder and loaded with ctypes, so
this test needs neither CMake nor llama.cpp. What it pins down:
- the uint8 resize equals Pillow's ``resize(size, BICUBIC)`` of the runtime's RGB (RGBA composited onto white by
  ``flatten_on_white``) bit for bit, over up and down scaling, odd and extreme aspect ratios, RGB and RGBA,
  smooth, noisy and hard-edged images;
- the float output equals ``runtime.preprocess.preprocess_image`` and the original's golden pixels, with the
  mean/std given (another model's give other pixels, Python's for that model);
- bad input returns the documented error codes and leaves the output untouched.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import PIL
import pytest
from PIL import Image

from qwenvl_edge import contract
from qwenvl_edge.runtime.preprocess import ImageSpec, flatten_on_white, preprocess_image

NATIVE = Path(__file__).resolve().parents[1] / "native"
SOURCE = NATIVE / "src" / "image_preprocess.cpp"
PIXEL_TOL = 1e-6  # golden/README.md: pixels within 1e-6 (the code is exact: 0 expected)
PILLOW_MAJOR = int(PIL.__version__.split(".")[0])

# Return codes of qwenvl_preprocess.h.
OK, ERR_NULL, ERR_SIZE, ERR_CHANNELS, ERR_TOO_LARGE = 0, -1, -2, -3, -4
MAX_SIDE, MAX_PIXELS, MAX_OUTPUT_SIDE = 65535, 178956970, 8192

_u8p = ctypes.POINTER(ctypes.c_ubyte)
_f32p = ctypes.POINTER(ctypes.c_float)


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """image_preprocess.cpp alone as a shared library, built once per test module."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("no g++ on this machine to build native/src/image_preprocess.cpp")
    return _build(gxx, tmp_path_factory.mktemp("native_preprocess"))

# the model's normalisation, as the core passes it on from the GGUF's qwenvl.image_mean / image_std
MEAN = (ctypes.c_float * 3)(*contract.IMAGE_MEAN)
STD = (ctypes.c_float * 3)(*contract.IMAGE_STD)


def _build(gxx: str, folder: Path) -> ctypes.CDLL:
    out = folder / "libqwenvl_preprocess.so"
    cmd = [gxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared",
           "-I", str(NATIVE / "include"), str(SOURCE), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"g++ failed on {SOURCE}:\n{proc.stderr}"
    lib = ctypes.CDLL(str(out))
    lib.qwenvl_preprocess_image.argtypes = [_u8p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, _f32p, _f32p,
                                            _f32p]
    lib.qwenvl_preprocess_image.restype = ctypes.c_int
    lib.qwenvl_resize_bicubic_u8.argtypes = [_u8p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                             ctypes.c_int, ctypes.c_int, _u8p]
    lib.qwenvl_resize_bicubic_u8.restype = ctypes.c_int
    lib.qwenvl_preprocess_error_string.argtypes = [ctypes.c_int]
    lib.qwenvl_preprocess_error_string.restype = ctypes.c_char_p
    return lib


def _u8(a: np.ndarray | None):
    return None if a is None else a.ctypes.data_as(_u8p)


def native_resize(lib: ctypes.CDLL, pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """(H, W, C) uint8 -> (height, width, 3) uint8 via qwenvl_resize_bicubic_u8, guard bytes checked."""
    h, w, c = pixels.shape
    src = np.ascontiguousarray(pixels)
    n = height * width * 3
    buf = np.full(n + 64, 0xA5, dtype=np.uint8)  # 64 guard bytes catch writes past the end
    rc = lib.qwenvl_resize_bicubic_u8(_u8(src), w, h, c, width, height, _u8(buf))
    assert rc == OK, lib.qwenvl_preprocess_error_string(rc).decode()
    assert (buf[n:] == 0xA5).all(), "wrote past the output buffer"
    return buf[:n].reshape(height, width, 3)


def native_preprocess(lib: ctypes.CDLL, pixels: np.ndarray, image_size: int, mean=MEAN, std=STD) -> np.ndarray:
    """(H, W, C) uint8 -> (3, S, S) float32 via qwenvl_preprocess_image."""
    h, w, c = pixels.shape
    src = np.ascontiguousarray(pixels)
    out = np.empty((3, image_size, image_size), dtype=np.float32)
    rc = lib.qwenvl_preprocess_image(_u8(src), w, h, c, image_size, mean, std, out.ctypes.data_as(_f32p))
    assert rc == OK, lib.qwenvl_preprocess_error_string(rc).decode()
    return out


def pillow_resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """The reference: what the Python runtime does to the same bytes."""
    mode = {3: "RGB", 4: "RGBA"}[pixels.shape[2]]
    image = flatten_on_white(Image.fromarray(pixels, mode))
    return np.asarray(image.resize((width, height), Image.BICUBIC))


def make_image(kind: str, width: int, height: int, channels: int, seed: int) -> np.ndarray:
    """(H, W, C) uint8 test picture: uniform noise, a smooth gradient, or hard edges (clipping)."""
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    phase = rng.uniform(0, 2 * np.pi, channels)
    smooth = 127.5 + 120 * np.sin(xx[..., None] / max(width, 2) * 5 + yy[..., None] / max(height, 2) * 3 + phase)
    if kind == "smooth":
        return smooth.round().astype(np.uint8)
    if kind == "edges":  # black/white blocks: bicubic overshoot must clip to 0..255 like Pillow's
        return np.where(smooth > 127.5, 255, 0).astype(np.uint8)
    raise ValueError(kind)


def runs_vertical_first(w: int, h: int, out_w: int, out_h: int) -> bool:
    """Both passes run and Pillow >= 13 does the vertical one first (the height loses over twice the
    pixels the width does); Pillow <= 12 always went horizontal first, which rounds differently."""
    return w != out_w and h - out_h > 0 and h - out_h > (w - out_w) * 2


def require_pillow_order(w: int, h: int, out_w: int, out_h: int) -> None:
    if runs_vertical_first(w, h, out_w, out_h) and PILLOW_MAJOR < 13:
        pytest.skip(f"Pillow {PIL.__version__} resamples horizontally first here; the native code follows 13")


# (width, height, out_width, out_height, channels, kind)
RESIZE_CASES = [
    (1, 1, 448, 448, 3, "noise"),
    (1, 1000, 448, 448, 3, "smooth"),
    (1000, 1, 448, 448, 4, "noise"),
    (3000, 17, 448, 448, 3, "noise"),
    (448, 448, 448, 448, 3, "noise"),  # identity: a copy, no filter
    (448, 448, 448, 448, 4, "smooth"),  # identity, alpha composited onto white
    (449, 447, 448, 448, 3, "noise"),
    (2000, 1500, 448, 448, 3, "noise"),
    (100, 100, 448, 448, 3, "smooth"),  # upscale
    (100, 100, 448, 448, 4, "edges"),
    (640, 427, 448, 448, 4, "smooth"),
    (17, 3000, 448, 448, 4, "edges"),
    (300, 200, 300, 77, 3, "noise"),  # vertical pass only
    (301, 200, 97, 200, 4, "smooth"),  # horizontal pass only
    (100, 100, 160, 60, 3, "noise"),  # wider and shorter: vertical pass first in Pillow 13
    (50, 5000, 40, 100, 3, "edges"),  # very tall: vertical first with a width reduction too
    (255, 191, 256, 135, 4, "smooth"),
    (97, 13, 31, 400, 3, "edges"),
]


@pytest.mark.parametrize(("w", "h", "out_w", "out_h", "channels", "kind"), RESIZE_CASES)
def test_resize_matches_pillow_bit_for_bit(native, w, h, out_w, out_h, channels, kind):
    require_pillow_order(w, h, out_w, out_h)
    pixels = make_image(kind, w, h, channels, seed=w * 7919 + h)
    got = native_resize(native, pixels, out_w, out_h)
    want = pillow_resize(pixels, out_w, out_h)
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.max() == 0, f"{w}x{h}->{out_w}x{out_h}: {np.count_nonzero(diff)} values differ, max {diff.max()}"


def test_resize_matches_pillow_on_random_sizes(native):
    """150 random sizes (1..300 in, 1..500 out, both passes, both orders), fixed seed."""
    rng = np.random.default_rng(20240501)
    failures = []
    for i in range(150):
        w, h = (int(v) for v in rng.integers(1, 300, 2))
        out_w, out_h = (int(v) for v in rng.integers(1, 500, 2))
        if runs_vertical_first(w, h, out_w, out_h) and PILLOW_MAJOR < 13:
            continue
        pixels = make_image(("noise", "smooth", "edges")[i % 3], w, h, int(rng.choice([3, 4])), seed=i)
        if not np.array_equal(native_resize(native, pixels, out_w, out_h), pillow_resize(pixels, out_w, out_h)):
            failures.append((w, h, out_w, out_h, pixels.shape[2]))
    assert not failures, f"differs from Pillow for (w, h, out_w, out_h, channels): {failures[:10]}"


@pytest.mark.parametrize(("w", "h", "channels", "kind", "image_size"), [
    (640, 427, 3, "noise", 448), (1, 1000, 4, "smooth", 448), (449, 447, 3, "edges", 448),
    (300, 300, 4, "noise", 224), (123, 456, 3, "smooth", 37),
])
def test_preprocess_matches_runtime(native, w, h, channels, kind, image_size):
    """float32 output equals runtime.preprocess.preprocess_image, for other model input sizes too."""
    require_pillow_order(w, h, image_size, image_size)
    pixels = make_image(kind, w, h, channels, seed=11)
    got = native_preprocess(native, pixels, image_size)
    want = preprocess_image(Image.fromarray(pixels, {3: "RGB", 4: "RGBA"}[channels]), image_size)
    assert got.shape == want.shape == (3, image_size, image_size)
    assert float(np.abs(got - want).max()) <= PIXEL_TOL


@pytest.mark.parametrize("name", ["sign", "noise"])
def test_preprocess_matches_golden_pixels(native, golden, name):
    """From the golden PNG bytes to the original implementation's pixel_values, within 1e-6."""
    with Image.open(golden.images[name]) as image:
        pixels = np.asarray(image.convert("RGBA" if "A" in image.mode else "RGB"))
    want = golden.pixels(name)  # (3, 448, 448) float32
    got = native_preprocess(native, pixels, want.shape[-1])
    assert float(np.abs(got - want).max()) <= PIXEL_TOL
    # An opaque alpha channel changes nothing; a transparent one is composited onto white, as in Python.
    opaque = np.concatenate([pixels[..., :3], np.full(pixels.shape[:2] + (1,), 255, np.uint8)], axis=2)
    assert float(np.abs(native_preprocess(native, opaque, want.shape[-1]) - want).max()) <= PIXEL_TOL
    alpha = np.random.default_rng(3).integers(0, 256, pixels.shape[:2] + (1,), dtype=np.uint8)
    rgba = np.concatenate([pixels[..., :3], alpha], axis=2)
    python = preprocess_image(Image.fromarray(rgba, "RGBA"), want.shape[-1])
    assert float(np.abs(native_preprocess(native, rgba, want.shape[-1]) - python).max()) <= PIXEL_TOL


@pytest.mark.parametrize("alpha", [0, 1, 77, 128, 254])
def test_rgba_is_composited_onto_white_exactly(native, alpha: int):
    """Before: alpha was ignored, so a transparent picture reached the model in its hidden colours (often black)."""
    pixels = make_image("noise", 37, 23, 4, seed=alpha)
    pixels[..., 3] = alpha
    got = native_resize(native, pixels, 37, 23)  # same size: the flattening alone
    want = np.rint((pixels[..., :3] * (alpha / 255.0)) + 255 * (1 - alpha / 255.0)).astype(np.uint8)
    assert np.array_equal(got, want)


def test_other_mean_and_std_give_python_pixels_for_that_model(native, golden):
    """The normalisation is the caller's (the bundle's), never a built-in CLIP one."""
    with Image.open(golden.images["sign"]) as image:
        pixels = np.asarray(image.convert("RGB"))
    mean, std = (0.5, 0.25, 0.125), (0.5, 0.5, 0.25)
    got = native_preprocess(native, pixels, 448, (ctypes.c_float * 3)(*mean), (ctypes.c_float * 3)(*std))
    want = preprocess_image(Image.fromarray(pixels), ImageSpec(448, mean, std))
    assert float(np.abs(got - want).max()) <= PIXEL_TOL
    assert float(np.abs(got - golden.pixels("sign")).max()) > 1e-3


def test_widest_valid_image_is_accepted(native):
    """The limits reject absurd sizes only: a 65535 x 2 strip still resizes, like Pillow."""
    pixels = make_image("smooth", MAX_SIDE, 2, 3, seed=5)
    assert np.array_equal(native_resize(native, pixels, 448, 448), pillow_resize(pixels, 448, 448))


BAD_INPUTS = [
    # (description, width, height, channels, image_size, null_pixels, null_out, expected code)
    ("NULL pixels", 4, 4, 3, 8, True, False, ERR_NULL),
    ("NULL out", 4, 4, 3, 8, False, True, ERR_NULL),
    ("zero width", 0, 4, 3, 8, False, False, ERR_SIZE),
    ("negative height", 4, -1, 3, 8, False, False, ERR_SIZE),
    ("zero image_size", 4, 4, 3, 0, False, False, ERR_SIZE),
    ("negative image_size", 4, 4, 3, -448, False, False, ERR_SIZE),
    ("1 channel", 4, 4, 1, 8, False, False, ERR_CHANNELS),
    ("2 channels", 4, 4, 2, 8, False, False, ERR_CHANNELS),
    ("5 channels", 4, 4, 5, 8, False, False, ERR_CHANNELS),
    ("side over the limit", MAX_SIDE + 1, 1, 3, 8, False, False, ERR_TOO_LARGE),
    ("pixels over the limit", 20000, 20000, 3, 8, False, False, ERR_TOO_LARGE),
    ("image_size over the limit", 4, 4, 3, MAX_OUTPUT_SIDE + 1, False, False, ERR_TOO_LARGE),
]


@pytest.mark.parametrize(("what", "w", "h", "channels", "image_size", "null_pixels", "null_out", "code"),
                         BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_returns_error_code(native, what, w, h, channels, image_size, null_pixels, null_out, code):
    # Validation comes before any read: a 4x4x4 buffer stands in for the claimed (absurd) sizes.
    pixels = None if null_pixels else np.zeros(64, dtype=np.uint8)
    side = max(1, min(image_size, 8))
    out = np.full((3, side, side), 7.0, dtype=np.float32)
    out_ptr = None if null_out else out.ctypes.data_as(_f32p)
    assert native.qwenvl_preprocess_image(_u8(pixels), w, h, channels, image_size, MEAN, STD, out_ptr) == code, what
    assert (out == 7.0).all(), "output written although the input was refused"
    resized = np.full(side * side * 3, 9, dtype=np.uint8)
    out_u8 = None if null_out else _u8(resized)
    assert native.qwenvl_resize_bicubic_u8(_u8(pixels), w, h, channels, image_size, image_size, out_u8) == code
    assert (resized == 9).all()


def test_error_strings(native):
    codes = [OK, ERR_NULL, ERR_SIZE, ERR_CHANNELS, ERR_TOO_LARGE, -5]
    messages = [native.qwenvl_preprocess_error_string(c).decode() for c in codes]
    assert len(set(messages)) == len(codes) and all(messages)
    assert "channels" in native.qwenvl_preprocess_error_string(ERR_CHANNELS).decode()
    assert native.qwenvl_preprocess_error_string(-99).decode() == "unknown error code"
