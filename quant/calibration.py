"""Images for INT8 calibration and checking, and the reader that feeds them to onnxruntime.

No photos ship with the package: the default set is drawn from a seed, with the statistics a
vision tower meets in use: smooth gradients, flat shapes with hard edges, dark text-like
strokes on paper, and photo-like textures (low-frequency colour fields plus sensor grain).
The same seed always gives the same images. Users can pass their own files instead.
Every image goes through ``runtime.preprocess``, so calibration sees exactly what inference sees.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from onnxruntime.quantization import CalibrationDataReader
from PIL import Image, ImageDraw, ImageFilter

from qwenvl_edge.contract import IMAGE_SIZE, VISION_INPUT  # the exporter's: no bundle exists yet
from qwenvl_edge.runtime.preprocess import ImageSource, load_image, preprocess_image

CALIBRATION_SEED = 0
HELDOUT_SEED = 1
SIZES = ((448, 448), (640, 480), (360, 540), (800, 600), (512, 288))  # varied aspect ratios: the squash


def _gradient(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A linear or radial blend between two random colours."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if rng.random() < 0.5:
        angle = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(angle) + yy * np.sin(angle)
    else:
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        t = np.hypot(xx - cx, yy - cy)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    rgb = a + (b - a) * t[..., None]
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB")


def _random_color(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _shapes(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Flat rectangles, ellipses and polygons with hard edges on a plain background."""
    image = Image.new("RGB", (w, h), _random_color(rng))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(6, 16))):
        x0, y0 = rng.uniform(-0.1 * w, w), rng.uniform(-0.1 * h, h)
        x1, y1 = x0 + rng.uniform(0.05, 0.5) * w, y0 + rng.uniform(0.05, 0.5) * h
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.rectangle((x0, y0, x1, y1), fill=_random_color(rng))
        elif kind == 1:
            draw.ellipse((x0, y0, x1, y1), fill=_random_color(rng), outline=_random_color(rng), width=3)
        else:
            n_points = int(rng.integers(3, 7))
            pts = [(float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1))) for _ in range(n_points)]
            draw.polygon(pts, fill=_random_color(rng))
    return image


def _text_strokes(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Lines of short dark glyph-like strokes on a light page, like a document or a sign."""
    paper = int(rng.integers(200, 256))
    image = Image.new("RGB", (w, h), (paper, paper, int(rng.integers(180, paper + 1))))
    draw = ImageDraw.Draw(image)
    ink = tuple(int(c) for c in rng.integers(0, 90, 3))
    glyph = int(rng.integers(10, 28))  # glyph height in pixels
    y = int(rng.integers(4, glyph + 4))
    while y + glyph < h:
        x = int(rng.integers(4, 3 * glyph))
        line_end = int(w - rng.integers(4, max(5, w // 3)))
        while x + glyph < line_end:
            for _ in range(int(rng.integers(3, 9))):  # one word
                gw = int(glyph * rng.uniform(0.4, 0.8))
                for _ in range(int(rng.integers(1, 4))):  # strokes of one glyph
                    p0 = (x + float(rng.uniform(0, gw)), y + float(rng.uniform(0, glyph)))
                    p1 = (x + float(rng.uniform(0, gw)), y + float(rng.uniform(0, glyph)))
                    draw.line((p0, p1), fill=ink, width=max(1, glyph // 8))
                x += gw + 2
            x += glyph // 2  # word space
        y += int(glyph * rng.uniform(1.4, 2.0))
    return image


def _photo_noise(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Low-frequency colour fields (upsampled bicubically) with blur and per-pixel grain."""
    coarse = rng.uniform(0, 255, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3)).astype(np.uint8)
    field = Image.fromarray(coarse, "RGB").resize((w, h), Image.BICUBIC)
    field = field.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0, 3))))
    detail = rng.normal(0, rng.uniform(4, 24), (h, w, 3)).astype(np.float32)
    rgb = np.asarray(field, dtype=np.float32) + detail
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB")


KINDS: dict[str, Callable[[np.random.Generator, int, int], Image.Image]] = {
    "gradient": _gradient,
    "shapes": _shapes,
    "text": _text_strokes,
    "photo": _photo_noise,
}


def generate_images(n: int = 8, seed: int = CALIBRATION_SEED) -> list[Image.Image]:
    """``n`` RGB images cycling through the kinds; a pure function of (n, seed)."""
    kinds = list(KINDS.values())
    images = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        w, h = SIZES[int(rng.integers(0, len(SIZES)))]
        images.append(kinds[i % len(kinds)](rng, w, h))
    return images


def preprocess_all(images: Sequence[ImageSource], image_size: int = IMAGE_SIZE) -> list[np.ndarray]:
    """Each image as the runtime sees it: float32 [3, S, S]."""
    return [preprocess_image(load_image(image), image_size) for image in images]


class ImageCalibrationReader(CalibrationDataReader):
    """Feeds ``{input_name: [1, 3, S, S]}`` one image at a time, then ``None``."""

    def __init__(self, images: Sequence[ImageSource], image_size: int = IMAGE_SIZE,
                 input_name: str = VISION_INPUT):
        self.input_name = input_name
        self.pixels = preprocess_all(images, image_size)
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.pixels):
            return None
        x = self.pixels[self._next][None]  # (1, 3, S, S) float32
        self._next += 1
        return {self.input_name: x}

    def rewind(self) -> None:
        self._next = 0

    def __len__(self) -> int:
        return len(self.pixels)


class ActivationCalibrationReader(CalibrationDataReader):
    """Feeds prepared input dicts (a graph piece's inputs, one image each) to onnxruntime's calibrator."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]):
        self.feeds = list(feeds)
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.feeds):
            return None
        self._next += 1
        return self.feeds[self._next - 1]

    def rewind(self) -> None:
        self._next = 0

    def __len__(self) -> int:
        return len(self.feeds)
