"""``qwenvl-edge eval``: how much a bundle loses against its float reference, stage by stage.

Three numbers, each isolating one stage:

- vision: the bundle's image rows against the reference's (per-row cosine, relative error);
- decoder: both decoders get the *reference* rows and the reference's own greedy answer, and
  their next-token distributions are compared at every answer position (top-1 agreement, KL),
  so a difference here is the GGUF quantization alone;
- task: each bundle answers end to end, greedily, as ``qwenvl-edge run`` does, and answers
  are scored where they are known (exact answer; box IoU >= 0.5).

Images come from the tiny trained model's task generator (``--task synthetic``) or a folder
(``--images DIR``, questions and answers from ``DIR/questions.json`` when it has one).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from qwenvl_edge import validate
from qwenvl_edge.errors import QwenVLError
from qwenvl_edge.evaluation import task_images
from qwenvl_edge.runtime.bundle import Bundle
from qwenvl_edge.runtime.preprocess import read_image
from qwenvl_edge.runtime.prompt import ImageRef, PromptBuilder, Turn
from qwenvl_edge.validate import DEFAULT_N_CTX, json_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
QUESTIONS_FILE = "questions.json"
ENTRY_KEYS = ("image", "question", "answer", "box", "task")
ENTRY = "{image, question, answer?, box?, task?}"
SPEC_SHAPE = f"a list of {ENTRY} objects"
OPEN_QUESTION = "What is in the picture?"
MAX_TOKENS = 48


@dataclass(frozen=True)
class Item:
    """One question about one image, with its answer when known."""

    task: str
    image: Image.Image | Path
    question: str
    answer: str | None = None
    box: tuple[float, float, float, float] | None = None  # pixels, grounding only

    def correct(self, text: str) -> bool | None:
        if self.answer is None:
            return None
        size = self.image.size if isinstance(self.image, Image.Image) else read_image(self.image).size
        return task_images.is_right(self.answer, self.box, text, size)


def check_counts(n: int, seed: int) -> None:
    """``--n`` and ``--seed`` of the synthetic images (numpy's generator takes no negative seed), for API
    callers too: the CLI's option table checks the same before this runs."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise QwenVLError(f"--n must be at least 1, got {n!r:.40}")
    if seed is None:
        raise QwenVLError("seed must be an integer, got None")
    validate.seed(seed)


def synthetic_items(n: int, seed: int) -> list[Item]:
    """``n`` images per task of the tiny model's colour / sign / grounding tasks."""
    check_counts(n, seed)
    return [Item(s.task, s.image, s.question, s.answer, s.box)
            for task in task_images.TASKS for s in task_images.make_set(task, n, seed)]


def folder_items(folder: Path) -> list[Item]:
    """The images of ``folder``; ``questions.json`` ([{image, question, answer?, box?}]) says what to ask."""
    folder = Path(folder)
    if not folder.is_dir():
        raise QwenVLError(f"{folder}: not a folder of images")
    spec = folder / QUESTIONS_FILE
    if spec.is_file():
        return spec_items(folder, spec, json_file(spec, QwenVLError, QUESTIONS_FILE))
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise QwenVLError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return [Item("folder", p, OPEN_QUESTION) for p in images]


def spec_items(folder: Path, spec: Path, entries: Any) -> list[Item]:
    """``questions.json``'s entries, each checked now (before any model work), errors naming the entry."""
    if not isinstance(entries, list):
        raise QwenVLError(f"{spec}: not {SPEC_SHAPE} (a JSON {type(entries).__name__})")
    if not entries:
        raise QwenVLError(f"{spec}: no questions; expected {SPEC_SHAPE}")
    return [_spec_item(folder, f"{spec}: entry {i}", entry) for i, entry in enumerate(entries, 1)]


def _spec_item(folder: Path, where: str, entry: Any) -> Item:
    if not isinstance(entry, dict):
        raise QwenVLError(f"{where}: a JSON {type(entry).__name__}, expected an object {ENTRY}")
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        raise QwenVLError(f"{where}: unknown key {unknown[0]!r:.40}; an entry is {ENTRY}")
    image, task, answer, box = entry.get("image"), entry.get("task", "folder"), entry.get("answer"), entry.get("box")
    if not isinstance(image, str) or not image or "\x00" in image:
        raise QwenVLError(f"{where}: image must be a file name, got {image!r:.60}")
    if not os.path.isfile(folder / image):  # isfile: False, not an exception, for a name too long to look up
        raise QwenVLError(f"{where}: {str(folder / image):.200}: no such image file")
    question = validate.question(entry.get("question"), f"{where}: question")
    if not isinstance(task, str) or not task:
        raise QwenVLError(f"{where}: task must be a non-empty string, got {task!r:.60}")
    if answer is not None and not isinstance(answer, str):
        raise QwenVLError(f"{where}: answer must be a string, got {answer!r:.60}")
    if box is not None and not (isinstance(box, list) and len(box) == 4 and all(
            isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
        raise QwenVLError(f"{where}: box must be [x1, y1, x2, y2] in pixels, got {box!r:.60}")
    return Item(task, folder / image, question, answer, tuple(map(float, box)) if box else None)


# what a reference must share with the bundle for its rows and logits to be compared: (section, key)
SAME_MODEL = [("model", "hidden_size"), ("model", "vocab_size"), ("model", "n_queries"), ("model", "image_size"),
              ("config", "num_hidden_layers"), ("config", "num_attention_heads"), ("config", "intermediate_size")]


def _model_fact(bundle: Bundle, section: str, key: str) -> Any:
    if section == "model":
        return getattr(bundle.model, key)
    source = bundle.manifest.get("source")
    config = source.get("config") if isinstance(source, dict) else None
    return config.get(key) if isinstance(config, dict) else None


def check_reference(bundle: Bundle, reference: Bundle) -> None:
    """The reference must be a float export of the same model: its manifest is read before any engine loads,
    so another width is refused at once, not after the whole answer pass."""
    for section, key in SAME_MODEL:
        mine, theirs = _model_fact(bundle, section, key), _model_fact(reference, section, key)
        if mine is not None and theirs is not None and mine != theirs:
            raise QwenVLError(f"--reference {reference.folder}: another model ({key} {theirs}, the bundle's is "
                              f"{mine}); the reference must be the float export of the bundle's checkpoint")


def open_bundles(bundle_dir: Path, reference_dir: Path | None) -> tuple[Bundle, Bundle | None]:
    """Both bundles opened (manifests, file sizes, GGUF headers) and matched, before any model work."""
    bundle = Bundle.open(bundle_dir)
    if reference_dir is None:
        return bundle, None
    reference = Bundle.open(reference_dir)
    check_reference(bundle, reference)
    return bundle, reference


def encode_rows(bundle: Bundle, items: Sequence[Item], n_threads: int | None) -> np.ndarray:
    """[n, 256, hidden] rows of every item's image through the bundle's vision model."""
    from qwenvl_edge.runtime.preprocess import load_image, preprocess_image
    from qwenvl_edge.runtime.vision import VisionEncoder

    with VisionEncoder(bundle.vision_path, n_threads) as encoder:
        return np.concatenate([encoder.encode(preprocess_image(load_image(it.image), encoder.image_size)[None])
                               for it in items])


def task_answers(folder: Path, items: Sequence[Item], n_threads: int | None) -> list[tuple[str, list[int]]]:
    """Each item answered end to end, greedily, as ``qwenvl-edge run --greedy`` does: (text, ids)."""
    from qwenvl_edge.runtime.pipeline import QwenVL

    out = []
    with QwenVL(folder, n_threads=n_threads, cache_dir=None) as model:
        for it in items:
            result = model.generate([it.image], it.question, max_tokens=MAX_TOKENS, temperature=0.0)
            out.append((result.text, list(result.token_ids)))
            model.reset()
    return out


class TeacherForced:
    """A bundle's decoder fed given image rows and a given answer: its logits at every answer position."""

    def __init__(self, bundle: Bundle, n_threads: int | None):
        from qwenvl_edge.runtime.decoder import Decoder

        self.decoder = Decoder(bundle.llm_path, n_ctx=DEFAULT_N_CTX, n_threads=n_threads)
        self.prompts = PromptBuilder(bundle.model, self.decoder.tokenizer)

    def logits(self, question: str, rows: np.ndarray, answer: Sequence[int]) -> np.ndarray:
        """[len(answer) + 1, vocab]: after the prompt, then after each answer token."""
        self.decoder.keep(0)
        self.decoder.prefill(self.prompts.build(Turn(question, (ImageRef("rows"),))), lambda _ref: rows)
        out = [self.decoder.last_logits()]
        for token in answer:
            self.decoder.eval_tokens([token])
            out.append(self.decoder.last_logits())
        return np.stack(out)

    def close(self) -> None:
        self.decoder.close()


def _accuracy(items: Sequence[Item], answers: Sequence[tuple[str, list[int]]]) -> dict[str, dict]:
    per_task: dict[str, dict] = {}
    for it, (text, _) in zip(items, answers, strict=True):
        ok = it.correct(text)
        if ok is None:
            continue
        t = per_task.setdefault(it.task, {"n": 0, "right": 0})
        t["n"] += 1
        t["right"] += int(ok)
    for t in per_task.values():
        t["accuracy"] = t["right"] / t["n"]
    return per_task


def evaluate(bundle_dir: Path, items: Sequence[Item], reference_dir: Path | None = None,
             n_threads: int | None = None, compare_per_task: int | None = None) -> dict:
    """The report as a dict (see the module docstring); ``reference_dir`` None gives task accuracy only.

    ``compare_per_task`` limits the vision and decoder comparison to the first items of each task
    (accuracy always uses every item).
    """
    from qwenvl_edge.quant.vision_quality import compare_rows

    bundle, reference = open_bundles(bundle_dir, reference_dir)  # fail before the long part
    answers = task_answers(bundle.folder, items, n_threads)
    report: dict = {"bundle": str(bundle.folder), "reference": None, "items": len(items),
                    "tasks": {t: {"bundle": v} for t, v in _accuracy(items, answers).items()},
                    "examples": [{"task": it.task, "question": it.question, "expected": it.answer, "answer": a[0]}
                                 for it, a in zip(items, answers, strict=True) if it.correct(a[0]) is False][:5]}
    if reference is None:
        return report
    report["reference"] = str(reference.folder)
    ref_answers = task_answers(reference.folder, items, n_threads)
    for t, v in _accuracy(items, ref_answers).items():
        report["tasks"].setdefault(t, {})["reference"] = v
    limit, seen, keep = compare_per_task or len(items), Counter(), []
    for i, it in enumerate(items):
        seen[it.task] += 1
        if seen[it.task] <= limit:
            keep.append(i)
    compared = [items[i] for i in keep]
    ref_rows = encode_rows(reference, compared, n_threads)
    report["vision"] = {"images": len(compared), **compare_rows(ref_rows, encode_rows(bundle, compared, n_threads))}
    report["decoder"] = compare_decoders(reference, bundle, compared, ref_rows, [ref_answers[i] for i in keep],
                                         n_threads)
    return report


def compare_decoders(reference: Bundle, bundle: Bundle, items: Sequence[Item], rows: np.ndarray,
                     answers: Sequence[tuple[str, list[int]]], n_threads: int | None) -> dict:
    """Next-token agreement and KL of the two decoders on the same rows, along the reference's answers."""
    from qwenvl_edge.quant.gguf_quality import compare_next_token

    ref, cand = TeacherForced(reference, n_threads), TeacherForced(bundle, n_threads)
    try:
        pairs = [(ref.logits(it.question, r, ids), cand.logits(it.question, r, ids))
                 for it, r, (_, ids) in zip(items, rows, answers, strict=True)]
    finally:
        ref.close()
        cand.close()
    return compare_next_token(np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs]))


def format_report(report: dict) -> str:
    """The text form of ``evaluate``'s report."""
    lines = [f"bundle    {report['bundle']}", f"reference {report['reference'] or '(none)'}",
             f"items     {report['items']}"]
    if "vision" in report:
        v = report["vision"]
        lines.append(f"vision rows: cosine min {v['cosine_min']:.4f} mean {v['cosine_mean']:.4f}, "
                     f"relative error max {v['rel_error_max']:.4f} mean {v['rel_error_mean']:.4f}")
        d = report["decoder"]
        lines.append("decoder (reference rows, reference answers): " +
                     ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items()))
    for task, scores in report["tasks"].items():
        parts = [f"{who} {s['right']}/{s['n']} ({100 * s['accuracy']:.1f} %)" for who, s in scores.items()]
        lines.append(f"task {task}: " + ", ".join(parts))
    for ex in report["examples"]:
        lines.append(f"  wrong ({ex['task']}): {ex['question']!r} -> {ex['answer']!r}, expected {ex['expected']!r}")
    return "\n".join(lines)
