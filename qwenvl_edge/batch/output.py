"""``batch OUT``: one row per input row, written as each batch finishes, so that a killed job loses at most the
batches in flight and a rerun skips the ids already there.

- ``*.jsonl`` (any other suffix too): one JSON object a line, appended batch by batch in one ``write`` each,
  then fsynced. A line cut short by a kill (the file does not end in a newline) is dropped on the next run
  and its row answered again; a file whose whole lines are not this command's rows is refused, never changed.
- ``*.parquet``: a folder of part files (``part-000001.parquet``, ...), one per batch, each written to a
  temporary name, fsynced and renamed, so a part is whole or absent; ``pyarrow.parquet.read_table(OUT)``
  and pandas read the folder as one table.

Rows: ``id``, ``text``, ``boxes``, ``finish_reason``, ``timings``; or ``id`` and ``error``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import fields
from pathlib import Path
from typing import Any, Protocol

from qwenvl_edge.batch.rows import is_parquet
from qwenvl_edge.cli.commands import json_line
from qwenvl_edge.errors import QwenVLError

log = logging.getLogger(__name__)

PART = re.compile(r"part-(\d{6,})\.parquet")
TMP_PREFIX = ".tmp-part-"


def need_pyarrow(what: str) -> Any:
    """pyarrow, or one line saying how to get it (it comes with the ``ray`` extra)."""
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise QwenVLError(f"{what} needs pyarrow: pip install 'qwenvl-edge[ray]' (or pip install pyarrow)") from None
    return pyarrow


class Output(Protocol):
    def done(self) -> dict[str, bool]:
        """The ids already in OUT, each with whether its row is an error."""

    def append(self, rows: list[dict]) -> None:
        """Add the rows of one finished batch, durably (on disk when this returns)."""


def open_output(path: Path, source: Path) -> Output:
    """OUT checked before any work: its folder exists, it is not IN, it is a file (JSONL) or a folder (Parquet)."""
    if not path.absolute().parent.is_dir():
        raise QwenVLError(f"{path}: no folder {path.absolute().parent} to write it in")
    if str(source) != "-" and path.exists() and source.exists() and path.samefile(source):
        raise QwenVLError(f"{path}: OUT is IN; give another file for the answers")
    return ParquetOutput(path) if is_parquet(path) else JsonlOutput(path)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class JsonlOutput:
    def __init__(self, path: Path):
        if path.is_dir():
            raise QwenVLError(f"{path}: a folder; a JSONL OUT is a file (a Parquet OUT, *.parquet, is a folder)")
        self.path = path

    def done(self) -> dict[str, bool]:
        """The rows already written; a last line cut short by a kill is dropped (it is answered again)."""
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        whole, _, tail = data.rpartition(b"\n")
        seen = {}
        for n, line in enumerate(whole.split(b"\n") if whole else [], 1):
            ident, failed = _known_row(line, f"{self.path}:{n}")
            seen[ident] = failed
        if tail:
            self._drop_tail(len(data) - len(tail))
        return seen

    def _drop_tail(self, keep: int) -> None:
        log.warning("%s: its last line was cut short (the job was stopped while writing it): that row is "
                    "answered again", self.path)
        with open(self.path, "r+b") as f:
            f.truncate(keep)
            os.fsync(f.fileno())

    def append(self, rows: list[dict]) -> None:
        data = "".join(json_line(row) + "\n" for row in rows).encode("utf-8", "surrogateescape")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)


def _known_row(line: bytes, where: str) -> tuple[str, bool]:
    """(id, is an error) of one line of OUT; a line that is no row of ours means OUT is another file."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        row = None
    if not isinstance(row, dict) or not isinstance(row.get("id"), str) or not ("text" in row or "error" in row):
        raise QwenVLError(f"{where}: not a row of qwenvl-edge batch's output; OUT holds something else: give "
                          "another OUT (nothing was changed)")
    return row["id"], "error" in row


def parquet_schema() -> Any:
    """The columns of a Parquet OUT, fixed (not inferred from the first part: a part of only error rows would
    otherwise get other types). ``timings`` follows ``runtime.results.Timings``."""
    from qwenvl_edge.runtime.results import Timings

    pa = need_pyarrow("a Parquet OUT")
    kinds = {"int": pa.int64(), "float": pa.float64()}
    timing = [pa.field(f.name, kinds[str(f.type)]) for f in fields(Timings)]
    timing += [pa.field("decode_tok_s", pa.float64()), pa.field("prefill_tok_s", pa.float64())]
    box = pa.struct([pa.field("label", pa.string()), pa.field("norm", pa.list_(pa.int64())),
                     pa.field("pixels", pa.list_(pa.float64()))])
    return pa.schema([pa.field("id", pa.string()), pa.field("text", pa.string()), pa.field("boxes", pa.list_(box)),
                      pa.field("finish_reason", pa.string()), pa.field("timings", pa.struct(timing)),
                      pa.field("error", pa.string())])


class ParquetOutput:
    def __init__(self, path: Path):
        self.pa = need_pyarrow("a Parquet OUT")
        if path.exists() and not path.is_dir():
            raise QwenVLError(f"{path}: a file; a Parquet OUT is a folder of part files (give a new name)")
        self.path = path
        self.schema = parquet_schema()
        self.next_part = 1

    def _parts(self) -> list[Path]:
        if not self.path.exists():
            return []
        parts = []
        for entry in sorted(self.path.iterdir()):
            if entry.name.startswith(TMP_PREFIX):  # a part a kill cut short: never renamed, so never counted
                continue
            if not PART.fullmatch(entry.name):
                raise QwenVLError(f"{entry}: not a part file of qwenvl-edge batch's output; OUT holds something "
                                  "else: give another OUT (nothing was changed)")
            parts.append(entry)
        return parts

    def done(self) -> dict[str, bool]:
        seen = {}
        for part in self._parts():
            try:
                table = self.pa.parquet.read_table(part, columns=["id", "error"])
            except (OSError, ValueError, KeyError) as e:
                raise QwenVLError(f"{part}: cannot read this part of OUT ({str(e).splitlines()[0]})") from None
            for ident, error in zip(*(table.column(c).to_pylist() for c in ("id", "error")), strict=True):
                seen[ident] = error is not None
            self.next_part = max(self.next_part, int(PART.fullmatch(part.name).group(1)) + 1)
        return seen

    def append(self, rows: list[dict]) -> None:
        self.path.mkdir(exist_ok=True)
        if self.next_part == 1:
            self.done()  # the numbering continues after the parts already there
        table = self.pa.Table.from_pylist(rows, schema=self.schema)
        final = self.path / f"part-{self.next_part:06d}.parquet"
        tmp = self.path / f"{TMP_PREFIX}{self.next_part:06d}-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                self.pa.parquet.write_table(table, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_folder(self.path)
        self.next_part += 1
