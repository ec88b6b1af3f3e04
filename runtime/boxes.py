"""Grounding output: ``<ref>label</ref><box>(x1,y1),(x2,y2)</box>`` -> pixel boxes, and drawing them.

Corners are integers 0..1000 relative to the original image (before the squash to the model's side), so a
pixel coordinate is ``x / 1000 * width``. A ``<box>`` without a ``<ref>`` before it takes
the last label seen (the model writes several boxes for one phrase that way). The tag texts are the
bundle's (``ModelInfo.grounding``); Qwen-VL's are the default.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw

from qwenvl_edge.errors import QwenVLError

TAGS = ("<ref>", "</ref>", "<box>", "</box>")  # Qwen-VL's; a bundle may name its own


@lru_cache(maxsize=8)
def _pattern(ref: str, ref_end: str, box: str, box_end: str) -> re.Pattern[str]:
    ref, ref_end, box, box_end = (re.escape(t) for t in (ref, ref_end, box, box_end))
    return re.compile(rf"{ref}(?P<ref>.*?){ref_end}|{box}\s*\((?P<x1>-?\d+)\s*,\s*(?P<y1>-?\d+)\)\s*,\s*"
                      rf"\((?P<x2>-?\d+)\s*,\s*(?P<y2>-?\d+)\)\s*{box_end}", re.S)
COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324"]


@dataclass(frozen=True)
class Box:
    """One grounded phrase: its label, the model's 0..1000 corners and the pixel corners."""

    label: str
    norm: tuple[int, int, int, int]
    pixels: tuple[float, float, float, float]

    def to_dict(self) -> dict:
        return asdict(self)


def parse_boxes(text: str, width: int, height: int, tags: Sequence[str] = TAGS) -> list[Box]:
    """Every box in ``text``, scaled to an image of ``width`` x ``height`` pixels; ``tags``: the bundle's
    ``<ref> </ref> <box> </box>`` texts (``ModelInfo.grounding``, whose first four they are)."""
    boxes: list[Box] = []
    label = ""
    for m in _pattern(*tags[:4]).finditer(text):
        if m.group("ref") is not None:
            label = m.group("ref").strip()
            continue
        x1, y1, x2, y2 = (min(max(int(m.group(k)), 0), 1000) for k in ("x1", "y1", "x2", "y2"))
        pixels = (x1 / 1000 * width, y1 / 1000 * height, x2 / 1000 * width, y2 / 1000 * height)
        boxes.append(Box(label, (x1, y1, x2, y2), pixels))
    return boxes


def draw_boxes(image: Image.Image, boxes: list[Box], out: Path) -> Path:
    """Write ``image`` with each box outlined and labelled to ``out`` (PNG or any Pillow format)."""
    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    width = max(2, round(min(canvas.size) / 200))
    for i, box in enumerate(boxes):
        color = COLORS[i % len(COLORS)]
        x1, y1, x2, y2 = box.pixels
        draw.rectangle([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], outline=color, width=width)
        if box.label:
            left, top, right, bottom = draw.textbbox((x1, y1), box.label)
            ty = max(0, y1 - (bottom - top) - 2 * width)
            draw.rectangle([x1, ty, x1 + right - left + 2 * width, ty + bottom - top + 2 * width], fill=color)
            draw.text((x1 + width, ty + width - (top - y1)), box.label, fill="white")
    out = Path(out)
    try:
        canvas.save(out)
    except (OSError, ValueError) as e:
        raise QwenVLError(f"{out}: cannot write the drawing ({e})") from None
    return out
