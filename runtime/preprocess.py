"""Image -> pixel_values exactly as Qwen-VL's transform: bicubic squash to S x S, /255, the model's mean/std.

Pillow and numpy only. ``read_image`` is where untrusted images are met, whatever the caller passes
(a path, ``Path``, PIL image, encoded ``bytes``, a binary file object, a uint8 numpy array): each
input's bytes are read once, hashed (the image-row cache key) and decoded from memory. It applies the
EXIF orientation (the original ignored it, so phone photos arrived sideways), decodes large JPEGs at a
reduced DCT scale (memory stays bounded for 108 MP and 200 MP camera photos), scales 16-bit images to
8 bits (the original clipped them, so they came out almost white), refuses only true decompression
bombs, and turns every decoding failure into a one-line ``ImageError``. Integers are never taken for
file descriptors: ``images=[0]`` is refused, it does not read stdin.

Transparency is flattened onto white (the original's ``convert("RGB")`` dropped alpha, so a transparent
PNG reached the model as black while a browser shows it on white): any image with an alpha channel or a
transparent colour (RGBA, LA, PA, P or L/RGB with a ``transparency`` key) becomes
``(c * a + 255 * (255 - a) + 127) // 255`` per channel, in integers, so the native core
(native/src/image_preprocess.cpp, native/tools/image_file.cpp) gives the same bytes. Opaque images are
untouched. Every message names the image as the caller gave it (its path, or ``name`` such as "image 2"),
never a Python object.

The model's facts (side, mean, std) come from the bundle as one ``ImageSpec`` (``ModelInfo.image_spec``);
nothing here knows Qwen-VL's numbers.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import stat
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageOps

from qwenvl_edge.errors import ImageError

# Pixel limits (width x height as the file declares it). Formats decoded in full: 2**27 (134 MP: every
# camera photo up to 12000 x 11000, 400 MB as RGB). JPEG is decoded at 1/2 .. 1/8 scale toward 448 above
# DRAFT_ABOVE, so it may declare up to 2**28 (268 MP: 200 MP phone cameras) and still decodes small.
MAX_PIXELS = 2**27
MAX_PIXELS_JPEG = 2**28
DRAFT_ABOVE = 2**24  # below 16 MP a JPEG is decoded in full, exactly as the original does
DRAFT_SIDE = 448  # a large JPEG is decoded at least this big when the caller names no model side
MAX_FILE_BYTES = 2**30
# Pillow refuses at twice its limit inside Image.open, before we can look: raise its default (89 MP) so our
# limits above decide. A limit the user set themselves is left alone.
if Image.MAX_IMAGE_PIXELS == 89478485:
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS

ImageSource = str | os.PathLike | Image.Image | bytes | bytearray | memoryview | np.ndarray | io.IOBase

log = logging.getLogger(__name__)
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")
ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


@dataclass(frozen=True)
class ImageSpec:
    """What the vision model takes: side S of its square input and the per-channel mean/std (the bundle's)."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def exporter_spec(size: int | None = None) -> ImageSpec:
    """The exporter's spec (qwenvl_edge/contract.py), for tools that work before a bundle exists
    (calibration, training, tests) and name at most a side; the runtime passes the bundle's spec instead."""
    from qwenvl_edge import contract  # exporter facts: only this helper reads them

    return ImageSpec(contract.IMAGE_SIZE if size is None else size, contract.IMAGE_MEAN, contract.IMAGE_STD)


def _as_spec(spec: ImageSpec | int | None) -> ImageSpec:
    if isinstance(spec, ImageSpec):
        return spec
    if spec is not None and (isinstance(spec, bool) or not isinstance(spec, int) or spec < 1):
        raise ValueError(f"image spec {spec!r:.40} is not an ImageSpec or a side >= 1")
    return exporter_spec(spec)


class ImageData(NamedTuple):
    """One image read once: its content key, the decoded upright RGB picture, and its display size."""

    key: str  # sha256 hex of the encoded bytes (files, bytes, file objects) or of mode + size + pixels
    image: Image.Image  # upright RGB; a large JPEG arrives at a reduced DCT scale (at least 448 per side)
    size: tuple[int, int]  # (width, height) of the full picture after EXIF rotation: box pixel coordinates


def _one_line(e: BaseException) -> str:
    """The exception in one line, without object reprs (Pillow's "cannot identify image file <_io.BytesIO ...>")."""
    if isinstance(e, Image.UnidentifiedImageError):
        return "not an image format Pillow reads"
    text = _OBJECT_REPR.sub("the data", " ".join(str(e).split()))
    return f"{type(e).__name__}: {text}".rstrip(": ")


def _name(source: Any, name: str | None = None) -> str:
    """How messages name an image: its path, else the caller's ``name`` ("image 2"), else its kind."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        return path if isinstance(path, str) else os.fsdecode(path)
    if name:
        return name
    if isinstance(source, Image.Image):
        return "PIL image"
    if isinstance(source, np.ndarray):
        return "numpy array"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "image bytes"
    return "image file object" if callable(getattr(source, "read", None)) else f"a {type(source).__name__!r} value"


def has_alpha(image: Image.Image) -> bool:
    """An alpha channel, or a palette / colour key that marks some pixels transparent."""
    return image.mode in ALPHA_MODES or "transparency" in image.info


def flatten_on_white(image: Image.Image) -> Image.Image:
    """RGB with transparency composited onto white: ``(c * a + 255 * (255 - a) + 127) // 255``, exact integers
    (the native loaders do the same arithmetic); an opaque image is only converted to RGB."""
    if not has_alpha(image):
        return image if image.mode == "RGB" else image.convert("RGB")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Palette images with Transparency expressed in bytes ..."
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint16)
    alpha = rgba[..., 3:]
    flat = (rgba[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255  # <= 65152: fits uint16
    return Image.fromarray(flat.astype(np.uint8), "RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit grayscale to 8 bits by scaling (Pillow's ``convert`` would clip at 255)."""
    if image.mode.startswith("I;16") or image.mode == "I":
        x = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(x / 257.0), 0, 255).astype(np.uint8), "L")
    if image.mode == "F":
        x = np.nan_to_num(np.asarray(image, dtype=np.float64))
        scale = 255.0 if x.size and x.max() <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.rint(x * scale), 0, 255).astype(np.uint8), "L")
    return image


def _upright_rgb(image: Image.Image, where: str) -> Image.Image:
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as e:  # a corrupt EXIF block should not cost the picture
        log.warning("%s: ignoring unreadable EXIF orientation (%s)", where, _one_line(e))
    return flatten_on_white(_to_8bit(image))


def _display_size(image: Image.Image, size: tuple[int, int]) -> tuple[int, int]:
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:
        orientation = 1
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


def _array_image(array: np.ndarray) -> Image.Image:
    """HxW (gray), HxWx3 (RGB) or HxWx4 (RGBA) uint8 arrays; anything else is refused."""
    mode = {2: "L", 3: {3: "RGB", 4: "RGBA"}.get(array.shape[-1])}.get(array.ndim)
    if array.dtype != np.uint8 or mode is None or 0 in array.shape:
        raise ImageError(f"numpy array of shape {array.shape} and dtype {array.dtype}: expected uint8 "
                         "HxW, HxWx3 or HxWx4")
    if array.shape[0] * array.shape[1] > MAX_PIXELS:
        raise ImageError(f"numpy array of shape {array.shape}: over {MAX_PIXELS} pixels")
    return Image.fromarray(np.ascontiguousarray(array))  # uint8 HxW, HxWx3, HxWx4: L, RGB, RGBA


def _pil_key(image: Image.Image) -> str:
    digest = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def _read_bytes(source: Any, where: str) -> bytes:
    """The encoded bytes of a path, bytes-like or binary file object (read once; a file object is not closed)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        info = os.stat(source)
        if not stat.S_ISREG(info.st_mode):  # a FIFO or device would block or never end
            raise ImageError(f"{where}: cannot read image (not a regular file)")
        if info.st_size > MAX_FILE_BYTES:
            raise ImageError(f"{where}: file larger than {MAX_FILE_BYTES} bytes: not an image we decode")
        with open(source, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    else:
        data = source.read(MAX_FILE_BYTES + 1)
        if not isinstance(data, bytes):
            raise ImageError(f"{where}: a file object must be opened in binary mode ('rb')")
    if len(data) > MAX_FILE_BYTES:
        raise ImageError(f"{where}: file larger than {MAX_FILE_BYTES} bytes: not an image we decode")
    return data


def _decode(data: bytes, where: str, draft_side: int) -> tuple[Image.Image, tuple[int, int]]:
    """Decode encoded image bytes with the pixel limits; returns the loaded picture and its declared size."""
    with warnings.catch_warnings():
        # our own limits decide below; decoder notes on damaged files ("Skipping tag ...") are not the user's to act on
        warnings.simplefilter("ignore")
        image = Image.open(io.BytesIO(data))
        size = image.size
        pixels = size[0] * size[1]
        limit = MAX_PIXELS_JPEG if image.format == "JPEG" else MAX_PIXELS
        if pixels > limit:
            raise Image.DecompressionBombError(f"{size[0]}x{size[1]} = {pixels} pixels, over {limit} "
                                               f"for {image.format}")
        if image.format == "JPEG" and pixels > DRAFT_ABOVE:
            image.draft("RGB", (draft_side, draft_side))  # DCT scaling, the smallest of 1/2..1/8 that keeps S
        image.load()  # decode now: truncated data fails here, not in the resize
        return image, size


def _check_not_empty(image: Image.Image, where: str) -> None:
    """A 0 x N picture has no pixels to show the model (the original answered it as black)."""
    if image.width < 1 or image.height < 1:
        raise ImageError(f"{where}: empty image ({image.width}x{image.height} pixels)")


def read_image(source: ImageSource, name: str | None = None, draft_side: int = DRAFT_SIDE) -> ImageData:
    """Read ``source`` once: (sha256 key, upright RGB image, display size), or one ``ImageError`` line.

    Accepted: a path (``str`` or ``os.PathLike``), encoded ``bytes``/``bytearray``/``memoryview``, a binary
    file object (read from its position to the end, never closed), a PIL image, a uint8 numpy array
    HxW / HxWx3 / HxWx4. Anything else (``None``, ints, text) is refused. ``name`` is how messages call an
    in-memory image ("image 2"); a path always names itself. ``draft_side``: the model's side (the bundle's
    ``image_size``), the least a large JPEG is decoded at. Transparency is flattened onto white.
    """
    where = _name(source, name)
    if source is None or isinstance(source, (bool, int, float, complex, np.generic)):
        shown = f"{where}: {type(source).__name__}" if name else repr(source)
        raise ImageError(f"{shown} is not an image: pass a path, PIL image, bytes, a binary file or a uint8 "
                         "array (integers are not file descriptors here)")
    try:
        if isinstance(source, np.ndarray):
            source = _array_image(source)
        if isinstance(source, Image.Image):
            _check_not_empty(source, where)
            if source.width * source.height > MAX_PIXELS:
                raise Image.DecompressionBombError(f"{source.width}x{source.height} pixels exceeds {MAX_PIXELS}")
            return ImageData(_pil_key(source), _upright_rgb(source, where), _display_size(source, source.size))
        if not isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)) and not callable(
                getattr(source, "read", None)):
            raise ImageError(f"{where}: not an image: pass a path, PIL image, bytes, a binary file or a uint8 array")
        if isinstance(source, str) and not source:
            raise ImageError("empty image path")
        data = _read_bytes(source, where)
        image, size = _decode(data, where, draft_side)
        with image:
            return ImageData(hashlib.sha256(data).hexdigest(), _upright_rgb(image, where), _display_size(image, size))
    except ImageError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageError(f"{where}: refused as a possible decompression bomb ({_one_line(e)})") from None
    except OSError as e:
        detail = e.strerror if e.strerror else _one_line(e)
        raise ImageError(f"{where}: cannot read image ({detail})") from None
    except Exception as e:  # decoder errors of hostile bytes (ValueError, struct.error, SyntaxError, ...)
        raise ImageError(f"{where}: cannot read image ({_one_line(e)})") from None


def load_image(source: ImageSource, name: str | None = None) -> Image.Image:
    """The decoded upright RGB picture of ``source`` (see ``read_image`` for what is accepted)."""
    return read_image(source, name).image


def preprocess_image(image: Image.Image, spec: ImageSpec | int | None = None) -> np.ndarray:
    """Image -> float32 [3, S, S]: transparency onto white, bicubic resize to S x S (no crop), /255, (x - mean) / std.

    ``spec``: the bundle's ``ImageSpec`` (``ModelInfo.image_spec``); a bare side or None is the exporter's
    (``exporter_spec``), for tools without a bundle.
    """
    spec = _as_spec(spec)
    _check_not_empty(image, "PIL image")
    resized = flatten_on_white(image).resize((spec.size, spec.size), Image.BICUBIC)
    x = np.asarray(resized, dtype=np.float32) / np.float32(255)  # (S, S, 3) in [0, 1]
    x = (x - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # (3, S, S) float32


def preprocess_batch(images: Sequence[ImageSource], spec: ImageSpec | int | None = None) -> np.ndarray:
    """Images (anything ``read_image`` accepts) -> float32 [N, 3, S, S], each through ``preprocess_image``."""
    spec = _as_spec(spec)
    out = np.empty((len(images), 3, spec.size, spec.size), dtype=np.float32)
    for i, source in enumerate(images, 1):
        out[i - 1] = preprocess_image(read_image(source, f"image {i}", spec.size).image, spec)
    return out
