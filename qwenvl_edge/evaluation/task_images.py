"""The synthetic tasks the tiny trained Qwen-VL knows: colour, sign and grounding (issue 15).

One generator serves training, tests, the demo and ``eval``, so a test image is made exactly
as the training images were, only from another seed. Pillow and numpy only (no torch): the
demo and ``eval`` run it on the device side.

- colour: one filled circle, square or triangle (80-220 px) in one of eight colours (each
  channel +-12); ``What color is the shape?`` -> ``red``.
- sign: one word in black capitals (``ImageFont.load_default(size)``, size 40-90) on a light
  rectangle with a dark border; ``What is written on the sign?`` -> ``STOP``.
- grounding: two or three shapes of different colours; ``Where is the red circle?`` ->
  ``<ref>the red circle</ref><box>(x1,y1),(x2,y2)</box>`` in the model's 0..1000 frame.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIZE = 448
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 70, 220), "yellow": (240, 210, 30),
    "orange": (245, 130, 20), "purple": (140, 50, 170), "black": (20, 20, 20), "grey": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
WORDS = ("STOP", "EXIT", "OPEN", "CLOSED", "SALE", "PUSH", "PULL", "CAFE", "HOTEL", "TAXI", "BUS", "PARK", "BANK",
         "POLICE", "SCHOOL", "HOSPITAL")
TASKS = ("colour", "sign", "grounding")
QUESTIONS = {"colour": "What color is the shape?", "sign": "What is written on the sign?"}
_TASK_STREAM = {task: i for i, task in enumerate(TASKS)}  # keeps the three tasks' random streams apart


@dataclass(frozen=True)
class Sample:
    """One task image with its question and the answer a correct model gives."""

    task: str
    image: Image.Image
    question: str
    answer: str
    box: tuple[int, int, int, int] | None = None  # the asked-for shape, pixels (x1, y1, x2, y2), grounding only
    objects: tuple[tuple[str, tuple[int, int, int, int]], ...] = ()  # grounding: every shape as (phrase, box)


def to_frame(box: tuple[float, float, float, float], width: int = SIZE, height: int = SIZE) -> tuple[int, ...]:
    """Pixel corners -> the model's 0..1000 frame, as Qwen-VL writes boxes."""
    x1, y1, x2, y2 = box
    return tuple(min(1000, max(0, round(v / s * 1000))) for v, s in ((x1, width), (y1, height), (x2, width),
                                                                      (y2, height)))


def box_answer(phrase: str, box: tuple[float, float, float, float]) -> str:
    x1, y1, x2, y2 = to_frame(box)
    return f"<ref>{phrase}</ref><box>({x1},{y1}),({x2},{y2})</box>"


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes (corners in any order)."""
    ax1, ax2, ay1, ay2 = min(a[0], a[2]), max(a[0], a[2]), min(a[1], a[3]), max(a[1], a[3])
    bx1, bx2, by1, by2 = min(b[0], b[2]), max(b[0], b[2]), min(b[1], b[3]), max(b[1], b[3])
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in rgb)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x1, y1, x2, y2 = box
    if shape == "circle":
        draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=fill)
    elif shape == "square":
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=fill)
    else:
        draw.polygon([((x1 + x2 - 1) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=fill)


def _place(rng: np.random.Generator, size: int, taken: list[tuple[int, ...]]) -> tuple[int, int, int, int] | None:
    """A size x size box inside the image that keeps 8 px clear of the boxes already taken."""
    for _ in range(100):
        x, y = (int(v) for v in rng.integers(0, SIZE - size + 1, 2))
        box = (x, y, x + size, y + size)
        if all(box[2] + 8 <= t[0] or t[2] + 8 <= box[0] or box[3] + 8 <= t[1] or t[3] + 8 <= box[1]
               for t in taken):
            return box
    return None


def colour_sample(rng: np.random.Generator) -> Sample:
    name = str(rng.choice(list(COLOURS)))
    shape = str(rng.choice(SHAPES))
    size = int(rng.integers(80, 221))
    image = Image.new("RGB", (SIZE, SIZE), "white")
    box = _place(rng, size, [])
    _draw_shape(ImageDraw.Draw(image), shape, box, _jitter(COLOURS[name], rng))
    return Sample("colour", image, QUESTIONS["colour"], name)


def sign_sample(rng: np.random.Generator) -> Sample:
    word = str(rng.choice(WORDS))
    font = ImageFont.load_default(int(rng.integers(40, 91)))
    image = Image.new("RGB", (SIZE, SIZE), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
    pad, border = int(rng.integers(8, 25)), int(rng.integers(3, 8))
    w = min(SIZE, right - left + 2 * (pad + border))
    h = bottom - top + 2 * (pad + border)
    x, y = int(rng.integers(0, SIZE - w + 1)), int(rng.integers(0, SIZE - h + 1))
    light = tuple(int(v) for v in rng.integers(215, 256, 3))
    dark = tuple(int(v) for v in rng.integers(0, 90, 3))
    draw.rectangle([x, y, x + w - 1, y + h - 1], fill=light, outline=dark, width=border)
    draw.text((x + (w - (right - left)) / 2 - left, y + pad + border - top), word, fill=(0, 0, 0), font=font)
    return Sample("sign", image, QUESTIONS["sign"], word)


def grounding_sample(rng: np.random.Generator) -> Sample:
    while True:
        n = int(rng.integers(2, 4))
        names = [str(c) for c in rng.choice(list(COLOURS), n, replace=False)]
        boxes: list[tuple[int, int, int, int]] = []
        for _ in names:
            box = _place(rng, int(rng.integers(80, 221)), boxes)
            if box is None:
                break
            boxes.append(box)
        if len(boxes) == n:
            break
    shapes = [str(rng.choice(SHAPES)) for _ in names]
    image = Image.new("RGB", (SIZE, SIZE), "white")
    draw = ImageDraw.Draw(image)
    for name, shape, box in zip(names, shapes, boxes, strict=True):
        _draw_shape(draw, shape, box, _jitter(COLOURS[name], rng))
    k = int(rng.integers(n))
    phrases = [f"the {name} {shape}" for name, shape in zip(names, shapes, strict=True)]
    return Sample("grounding", image, f"Where is {phrases[k]}?", box_answer(phrases[k], boxes[k]), boxes[k],
                  tuple(zip(phrases, boxes, strict=True)))


MAKERS = {"colour": colour_sample, "sign": sign_sample, "grounding": grounding_sample}


def samples(task: str, seed: int) -> Iterator[Sample]:
    """An endless stream of one task's samples, a pure function of (task, seed)."""
    if task not in MAKERS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    rng = np.random.default_rng([seed, _TASK_STREAM[task]])
    while True:
        yield MAKERS[task](rng)


def make_set(task: str, n: int, seed: int) -> list[Sample]:
    """The first ``n`` samples of a task's stream."""
    stream = samples(task, seed)
    return [next(stream) for _ in range(n)]


def is_right(expected: str, box: tuple[float, ...] | None, answer: str, size: tuple[int, int] = (SIZE, SIZE)) -> bool:
    """Exact answer; or, when a pixel box is expected, the first answered box has IoU >= 0.5 with it."""
    if box is None:
        return answer.strip() == expected
    from qwenvl_edge.runtime.boxes import parse_boxes

    boxes = parse_boxes(answer, *size)
    return bool(boxes) and iou(boxes[0].pixels, box) >= 0.5


def answer_correct(sample: Sample, answer: str) -> bool:
    """The issue's scoring of one sample's answer (see ``is_right``)."""
    return is_right(sample.answer, sample.box, answer)
