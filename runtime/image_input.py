"""What users pass as an image -> one ``ImageData``: its content key, its bytes, its size, read once.

Accepted: a path (``str``/``Path``, ``~`` expanded), a PIL image, encoded ``bytes``, a binary file
object (read, never closed: the caller owns it), an H x W x 3 ``uint8`` array, or an ``ImageRef``
of an image already seen (history). A file is read exactly once: the same bytes give the content
hash, the display size (from the header) and, only when the rows are not cached, the pixels.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from qwenvl_edge.errors import ImageError

ImageInput = Any  # str | Path | PIL.Image.Image | bytes | BinaryIO | np.ndarray | ImageRef

MAX_IMAGE_BYTES = 1 << 30  # a photo is tens of MB; refuse to read a larger "image" into memory


@dataclass(frozen=True)
class ImageRef:
    """One image in a prompt: ``key`` is its content hash, ``size`` its upright (width, height)."""

    key: str
    n_rows: int = 256
    size: tuple[int, int] = (0, 0)


@dataclass
class ImageData:
    """One image as read: its key, where it came from (for messages), encoded bytes or a PIL image."""

    key: str
    name: str
    data: bytes | None = None
    image: Image.Image | None = None
    _size: tuple[int, int] | None = None

    def decode(self) -> Image.Image:
        """The upright RGB picture (``load_image``: EXIF, bomb guard, one-line errors)."""
        from qwenvl_edge.runtime.preprocess import load_image

        if self.image is not None:
            return load_image(self.image)
        buffer = io.BytesIO(self.data or b"")
        try:
            return load_image(buffer)
        except ImageError as e:
            raise ImageError(str(e).replace(str(buffer), self.name)) from None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) after EXIF rotation, from the header only; (0, 0) when unreadable."""
        if self._size is None:
            self._size = _display_size(self.image if self.image is not None else io.BytesIO(self.data or b""))
        return self._size


def _display_size(source: Image.Image | io.BytesIO) -> tuple[int, int]:
    if isinstance(source, Image.Image):
        return source.size
    try:
        with Image.open(source) as im:
            width, height = im.size
            orientation = im.getexif().get(0x0112, 1)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return (0, 0)  # decode() reports the real problem when the image is encoded
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _hash(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def _from_bytes(data: bytes, name: str) -> ImageData:
    if not data:
        raise ImageError(f"{name}: empty image data")
    return ImageData(_hash(data), name, data=data)


def _from_path(path: Path) -> ImageData:
    path = path.expanduser()
    try:
        if path.is_dir():
            raise ImageError(f"{path}: is a folder, not an image")
        size = path.stat().st_size
        if size > MAX_IMAGE_BYTES:
            raise ImageError(f"{path}: {size / 2**30:.1f} GiB is too large for an image")
        data = path.read_bytes()
    except OSError as e:
        raise ImageError(f"{path}: cannot read ({e.strerror or e})") from None
    return _from_bytes(data, str(path))


def _from_array(array: np.ndarray, name: str) -> ImageData:
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3 or 0 in array.shape:
        raise ImageError(f"{name}: an image array must be H x W x 3 uint8, got {array.dtype} {list(array.shape)}")
    array = np.ascontiguousarray(array)
    key = _hash(f"array:{array.shape}".encode(), array.tobytes())
    return ImageData(key, name, image=Image.fromarray(array, "RGB"))


def _from_pil(image: Image.Image, name: str) -> ImageData:
    try:
        pixels = image.tobytes()
    except Exception as e:  # a lazily opened image whose file is broken
        raise ImageError(f"{name}: cannot read image ({type(e).__name__}: {e})") from None
    return ImageData(_hash(f"{image.mode}:{image.size}".encode(), pixels), name, image=image)


def read_image(source: ImageInput, name: str = "image") -> ImageData:
    """Any accepted image input -> ``ImageData``; anything else is a one-line ``ImageError``."""
    if isinstance(source, (str, Path)):
        if isinstance(source, str) and not source.strip():
            raise ImageError(f"{name}: empty image path")
        return _from_path(Path(source))
    if isinstance(source, Image.Image):
        return _from_pil(source, name)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _from_bytes(bytes(source), name)
    if isinstance(source, np.ndarray):
        return _from_array(source, name)
    if hasattr(source, "read") and not isinstance(source, (int, bool)):
        try:
            data = source.read(MAX_IMAGE_BYTES + 1)
        except (OSError, ValueError) as e:
            raise ImageError(f"{name}: cannot read the file object ({e})") from None
        if isinstance(data, str):
            raise ImageError(f"{name}: the file object is open in text mode; open it with 'rb'")
        if not isinstance(data, (bytes, bytearray)) or len(data) > MAX_IMAGE_BYTES:
            raise ImageError(f"{name}: the file object gave no image bytes")
        return _from_bytes(bytes(data), getattr(source, "name", name) if isinstance(getattr(source, "name", None),
                                                                                   str) else name)
    raise ImageError(f"{name}: not an image: expected a path, PIL image, bytes, binary file object or "
                     f"H x W x 3 uint8 array, got {type(source).__name__}")
