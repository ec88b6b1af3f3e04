"""What ``run`` is asked: the positional images and question, or a JSONL batch, checked before the
model loads so that a forgotten question or a bad line costs nothing.

Which argument is a file is decided by where it stands, never by looking at it: the last positional
argument is the question (a question may end in ``.jpg`` or be 100 kB long, and no file is looked up
for it), the ones before it are images.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from qwenvl_edge import validate
from qwenvl_edge.errors import ImageError, OptionError, PromptError, QwenVLError

STDIN = "-"
SHOWN_NAME = 200  # characters of a file name an error line shows
UTF8_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Job:
    """One question about some images."""

    images: list[str]
    question: str


@dataclass(frozen=True)
class BadLine:
    """A batch line refused by the checks: its error takes the line's place in the output."""

    error: str


def shown(name: str) -> str:
    """A file name for an error line: at most ``SHOWN_NAME`` characters (a 100 kB name is not one line)."""
    return name if len(name) <= SHOWN_NAME else f"{name[:SHOWN_NAME]}...({len(name)} characters)"


def image_file_problem(path: str) -> str | None:
    """Why ``path`` cannot be an image file, or None: the OS's own answer (too long, NUL byte, a folder,
    no permission) becomes a reason instead of an ``OSError`` or ``ValueError`` escaping."""
    try:
        info = os.stat(path)
    except ValueError:
        return f"{shown(repr(path))}: not a file name (it holds a NUL byte)"
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return f"{shown(path)}: no such image file"
        return f"{shown(path)}: cannot read ({e.strerror or e})"
    if stat.S_ISDIR(info.st_mode):
        return f"{shown(path)}: a folder, not an image file"
    if not stat.S_ISREG(info.st_mode):
        return f"{shown(path)}: not a regular file (a device, pipe or socket), not an image file"
    return None


def check_images(images: list[str]) -> None:
    """Each image names a regular file (decoding is checked when it is encoded); raises ``ImageError``."""
    for image in images:
        problem = image_file_problem(image)
        if problem:
            raise ImageError(problem)


def read_stdin_text() -> str:
    """All of stdin as text; undecodable bytes stay as lone surrogates, which ``validate.question`` refuses."""
    return sys.stdin.buffer.read().decode("utf-8", "surrogateescape").rstrip("\n")


def split_items(items: list[str]) -> Job:
    """``IMAGE ... QUESTION`` -> a job: the last argument is the question (``-`` reads it from stdin), the
    others are images. The question is never looked up as a file, whatever it looks like."""
    if not items:
        raise PromptError("no question: give it as the last argument (or - to read it from stdin)")
    *images, question = items
    if STDIN in images:
        raise OptionError("only the question (the last argument) can be - (stdin)")
    check_images(images)
    text = read_stdin_text() if question == STDIN else question
    return Job(images, validate.question(text, "the question"))


def read_batch(source: Path) -> list[Job | BadLine]:
    """Every non-blank line of a JSONL file (``-`` = stdin): ``{"images": [...], "question": "..."}``.

    Each line is checked on its own: a bad one becomes a ``BadLine`` in its place, so it costs only its
    own answer. Lines end at ``\\n`` only (a trailing ``\\r`` is dropped): ``str.splitlines`` would also
    split at U+2028, U+0085 or ``\\x1c`` inside a question. Relative image paths are taken from the batch
    file's folder (from the working folder for stdin). Raises only when the file cannot be read or holds
    no line at all.
    """
    if str(source) == STDIN:
        data, base = sys.stdin.buffer.read(), Path.cwd()
    else:
        try:
            data = source.read_bytes()
        except OSError as e:
            raise QwenVLError(f"{source}: cannot read the batch file ({e.strerror or e})") from None
        except ValueError:
            raise QwenVLError(f"{source!r}: not a file name (it holds a NUL byte)") from None
        base = source.parent
    if data.startswith(UTF8_BOM):  # Windows editors start a UTF-8 file with one
        data = data[len(UTF8_BOM):]
    entries = [_entry(raw, f"{shown(str(source))}:{n}", base)
               for n, raw in enumerate(data.split(b"\n"), 1) if raw.strip()]
    if not entries:
        raise PromptError(f"{source}: no questions in the batch file")
    return entries


def _entry(raw: bytes, where: str, base: Path) -> Job | BadLine:
    try:
        return _job(raw.removesuffix(b"\r"), where, base)
    except QwenVLError as e:
        return BadLine(str(e))


def _job(raw: bytes, where: str, base: Path) -> Job:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PromptError(f"{where}: not valid UTF-8 (byte {e.start + 1} of the line)") from None
    try:
        item = json.loads(line)
    except ValueError as e:
        raise PromptError(f"{where}: not a JSON object ({e})") from None
    except RecursionError:
        raise PromptError(f"{where}: JSON nested too deeply") from None
    if not isinstance(item, dict):
        raise PromptError(f'{where}: expected {{"images": [...], "question": "..."}}, got a JSON '
                          f"{type(item).__name__}")
    extra = sorted(set(item) - {"images", "question"})
    if extra:
        raise PromptError(f'{where}: expected {{"images": [...], "question": "..."}}, got the unknown key '
                          f"{shown(repr(extra[0]))}")
    try:
        images = validate.image_list(item.get("images"))
        if not all(isinstance(image, str) for image in images):
            raise ImageError("images must be file paths (strings)")
        images = [str(base / image) for image in images]
        check_images(images)
        question = validate.question(item.get("question"), "question")
    except QwenVLError as e:
        raise type(e)(f"{where}: {e}") from None
    return Job(images, question)
