"""What ``run`` is asked: the positional images and question, or a JSONL batch, checked before the
model loads so that a forgotten question or a bad line costs nothing.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from qwenvl_edge import validate
from qwenvl_edge.cli.common import IMAGE_SUFFIXES, check_image_files
from qwenvl_edge.errors import OptionError, PromptError, QwenVLError

STDIN = "-"


@dataclass(frozen=True)
class Job:
    """One question about some images."""

    images: list[str]
    question: str


def read_stdin_text() -> str:
    """All of stdin as text; undecodable bytes stay as lone surrogates, which ``validate.question`` refuses."""
    return sys.stdin.buffer.read().decode("utf-8", "surrogateescape").rstrip("\n")


def split_items(items: list[str]) -> Job:
    """``IMAGE ... QUESTION`` -> a job; the question is required, ``-`` reads it from stdin."""
    if not items:
        raise PromptError("no question: give it as the last argument (or - to read it from stdin)")
    *images, question = items
    if question != STDIN and (Path(question).is_file() or Path(question).suffix.lower() in IMAGE_SUFFIXES):
        raise PromptError(f"no question: the last argument {question!r} is an image; "
                          "give the question after the images")
    if STDIN in images:
        raise OptionError("only the question (the last argument) can be - (stdin)")
    check_image_files(images)
    text = read_stdin_text() if question == STDIN else question
    return Job(images, validate.question(text, "the question"))


def read_batch(source: Path) -> list[Job]:
    """Every non-blank line of a JSONL file (``-`` = stdin): ``{"images": [...], "question": "..."}``.

    Relative image paths are taken from the batch file's folder (from the working folder for stdin).
    """
    if str(source) == STDIN:
        text, base = read_stdin_text(), Path.cwd()
    else:
        try:
            text = source.read_bytes().decode("utf-8", "surrogateescape")
        except OSError as e:
            raise QwenVLError(f"{source}: cannot read the batch file ({e.strerror or e})") from None
        base = source.parent
    jobs = [_job(line, f"{source}:{n}", base) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not jobs:
        raise PromptError(f"{source}: no questions in the batch file")
    return jobs


def _job(line: str, where: str, base: Path) -> Job:
    try:
        item = json.loads(line)
    except ValueError as e:
        raise PromptError(f"{where}: not a JSON object ({e})") from None
    if not isinstance(item, dict) or set(item) - {"images", "question"}:
        raise PromptError(f'{where}: expected {{"images": [...], "question": "..."}}')
    try:
        images = validate.image_list(item.get("images"))
        if not all(isinstance(image, str) for image in images):
            raise PromptError("images must be file paths (strings)")
        images = [str(base / image) for image in images]
        check_image_files(images)
        question = validate.question(item.get("question"), "question")
    except QwenVLError as e:
        raise type(e)(f"{where}: {e}") from None
    return Job(images, question)
