"""Image -> pixel_values exactly as Qwen-VL's transform: bicubic squash to S x S, /255, CLIP mean/std.

Pillow and numpy only. ``load_image`` is where untrusted files are met: it applies the EXIF
orientation (the original ignored it, so phone photos arrived sideways), refuses decompression
bombs, and turns every decoding failure into a one-line ``ImageError``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from qwenvl_edge.errors import ImageError

IMAGE_SIZE = 448
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

ImageSource = str | Path | Image.Image

log = logging.getLogger(__name__)


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}".rstrip(": ")


def _upright_rgb(image: Image.Image, where: str) -> Image.Image:
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as e:  # a corrupt EXIF block should not cost the picture
        log.warning("%s: ignoring unreadable EXIF orientation (%s)", where, _one_line(e))
    return image.convert("RGB")


def load_image(source: ImageSource) -> Image.Image:
    """Decode a file (or take a PIL image), upright per its EXIF orientation, as RGB."""
    where = "image" if isinstance(source, Image.Image) else str(source)
    limit = Image.MAX_IMAGE_PIXELS
    try:
        if isinstance(source, Image.Image):
            if limit and source.width * source.height > limit:
                raise Image.DecompressionBombError(f"{source.width}x{source.height} pixels exceeds {limit}")
            return _upright_rgb(source, where)
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that: refuse both the same way
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                image.load()  # decode now: truncated data fails here, not in the resize
                return _upright_rgb(image, where)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageError(f"{where}: refused as a possible decompression bomb ({_one_line(e)})") from None
    except Exception as e:  # OSError (missing, unreadable, not an image, truncated) and decoder errors
        raise ImageError(f"{where}: cannot read image ({_one_line(e)})") from None


def preprocess_image(image: Image.Image, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """RGB image -> float32 [3, S, S]: bicubic resize to S x S (no crop), /255, normalize."""
    resized = image.convert("RGB").resize((image_size, image_size), Image.BICUBIC)
    x = np.asarray(resized, dtype=np.float32) / np.float32(255)  # (S, S, 3) in [0, 1]
    x = (x - np.asarray(IMAGE_MEAN, dtype=np.float32)) / np.asarray(IMAGE_STD, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # (3, S, S) float32


def preprocess_batch(images: Sequence[ImageSource], image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Paths or PIL images -> float32 [N, 3, S, S], each through ``load_image`` then ``preprocess_image``."""
    out = np.empty((len(images), 3, image_size, image_size), dtype=np.float32)
    for i, source in enumerate(images):
        out[i] = preprocess_image(load_image(source), image_size)
    return out
