"""The rows of ``batch IN``: JSONL (the lines of ``run --batch`` plus an optional ``id``) or Parquet (columns
``id``, ``images``, ``question``), each checked by ``run --batch``'s own per-line checks before any model loads.

A row without an ``id`` takes its line (JSONL) or row (Parquet) number. Ids are compared and written as
strings (``7`` and ``"7"`` are the same row), and one id twice is refused before any work: OUT could not
tell the two answers apart, and a rerun could not tell which one is done.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenvl_edge.cli import inputs
from qwenvl_edge.cli.inputs import BadLine, Job
from qwenvl_edge.errors import PromptError, QwenVLError

MAX_ID_CHARS = 1000


@dataclass(frozen=True)
class Row:
    """One input row: its id and its checked job, or the error that takes its answer's place."""

    id: str
    job: Job | None
    error: str | None = None


def check_line(raw: bytes, where: str, base: Path) -> Job | BadLine:
    """``run --batch``'s check of one line (JSON object, images that are files, a question): one set of rules
    for both commands. The single place this package reaches into ``cli.inputs``."""
    return inputs._entry(raw, where, base)


def is_parquet(path: Path) -> bool:
    return path.suffix.lower() == ".parquet"


def read_rows(source: Path) -> list[Row]:
    """Every row of IN, checked; raises ``QwenVLError`` (one line) for an unreadable file, no rows, or an id
    given twice. Relative image paths are taken from IN's folder, made absolute so that a worker on another
    machine reads the same shared path."""
    base = Path.cwd() if str(source) == inputs.STDIN else source.absolute().parent
    rows = _parquet_rows(source, base) if is_parquet(source) else _jsonl_rows(source, base)
    if not rows:
        raise PromptError(f"{source}: no questions in the batch file")
    check_unique(rows, source)
    return rows


def check_unique(rows: list[Row], source: Path) -> None:
    first: dict[str, int] = {}
    for n, row in enumerate(rows, 1):
        if row.id in first:
            raise QwenVLError(f"{source}: id {inputs.shown(repr(row.id))} is given twice (rows {first[row.id]} and "
                              f"{n}); ids must be unique, or OUT could not tell the answers apart")
        first[row.id] = n


def normal_id(value: Any) -> str:
    """An id as OUT writes it: a non-empty string or a whole number, as a string (``QwenVLError`` otherwise)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise PromptError(f"id must be a string or a whole number, got a JSON {type(value).__name__}")
    text = str(value)
    if not text.strip() or len(text) > MAX_ID_CHARS:
        raise PromptError(f"id must be 1 to {MAX_ID_CHARS} characters, got {len(text.strip())}")
    return text


def _read_bytes(source: Path) -> bytes:
    if str(source) == inputs.STDIN:
        return sys.stdin.buffer.read()
    try:
        return source.read_bytes()
    except OSError as e:
        raise QwenVLError(f"{source}: cannot read the batch file ({e.strerror or e})") from None
    except ValueError:
        raise QwenVLError(f"{source!r}: not a file name (it holds a NUL byte)") from None


def _jsonl_rows(source: Path, base: Path) -> list[Row]:
    data = _read_bytes(source).removeprefix(inputs.UTF8_BOM)
    return [_jsonl_row(raw.removesuffix(b"\r"), n, f"{inputs.shown(str(source))}:{n}", base)
            for n, raw in enumerate(data.split(b"\n"), 1) if raw.strip()]


def _jsonl_row(raw: bytes, n: int, where: str, base: Path) -> Row:
    """The ``id`` is taken out of the line, the rest checked as a ``run --batch`` line (which knows no id)."""
    ident, rest = str(n), raw
    try:
        item = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        item = None  # the line check below names what is wrong with it
    if isinstance(item, dict) and "id" in item:
        try:
            ident = normal_id(item.pop("id"))
        except QwenVLError as e:
            return Row(ident, None, f"{where}: {e}")
        rest = json.dumps(item).encode()
    return _row(ident, check_line(rest, where, base))


def _row(ident: str, entry: Job | BadLine) -> Row:
    return Row(ident, None, entry.error) if isinstance(entry, BadLine) else Row(ident, entry)


def _parquet_rows(source: Path, base: Path) -> list[Row]:
    from qwenvl_edge.batch.output import need_pyarrow

    pq = need_pyarrow("a Parquet IN").parquet
    try:
        table = pq.read_table(source)
    except OSError as e:  # pyarrow's ArrowInvalid (not Parquet) is a ValueError
        raise QwenVLError(f"{source}: cannot read the Parquet file ({e})") from None
    except ValueError as e:
        raise QwenVLError(f"{source}: not a Parquet file ({str(e).splitlines()[0]})") from None
    missing = [name for name in ("images", "question") if name not in table.column_names]
    if missing:
        raise QwenVLError(f"{source}: no column {missing[0]!r}; a Parquet IN has the columns id (optional), "
                          "images and question")
    ids = table.column("id").to_pylist() if "id" in table.column_names else [None] * table.num_rows
    items = zip(ids, table.column("images").to_pylist(), table.column("question").to_pylist(), strict=True)
    return [_parquet_row(n, ident, images, question, f"{inputs.shown(str(source))}:row {n}", base)
            for n, (ident, images, question) in enumerate(items, 1)]


def _parquet_row(n: int, ident: Any, images: Any, question: Any, where: str, base: Path) -> Row:
    try:
        key = str(n) if ident is None else normal_id(ident)
    except QwenVLError as e:
        return Row(str(n), None, f"{where}: {e}")
    try:
        raw = json.dumps({"images": [] if images is None else images, "question": question}).encode()
    except (TypeError, ValueError):
        return Row(key, None, f"{where}: images must be a list of file paths and question a text")
    return _row(key, check_line(raw, where, base))
