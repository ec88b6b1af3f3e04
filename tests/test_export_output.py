"""Smaller export/cache defects: an output place that cannot be written fails before any stage runs;
``cache clear`` never follows a symlinked cache folder; the LLM quality line says what it measures."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from qwenvl_edge.quant.gguf_quality import format_gguf_quality
from tests.cli_helpers import assert_one_line_error, run_cli, temp_home  # noqa: F401


@pytest.fixture()
def read_only(tmp_path: Path):
    """A folder nobody may write in: a read-only tmpfs as root (root ignores mode bits), else mode 0555."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() == 0:
        if shutil.which("mount") is None:
            pytest.skip("a read-only folder for root needs mount")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], check=False)
        if done.returncode != 0:
            pytest.skip("cannot mount a read-only tmpfs here")
        try:
            yield folder
        finally:
            subprocess.run(["umount", "-l", str(folder)], check=False)
    else:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)


def assert_refused_before_work(rc: int, err: str, fragment: str) -> None:
    assert_one_line_error(rc, err, fragment)  # the one line is all: no stage printed progress
    export_cache = Path(os.environ["XDG_CACHE_HOME"]) / "qwenvl-edge" / "export"
    assert not export_cache.exists() or not any(export_cache.iterdir())


@pytest.mark.parametrize("where", ["read-only parent", "missing under read-only", "deep under read-only"])
def test_unwritable_output_fails_before_any_stage(tiny_ckpt: Path, read_only: Path, capsys, where: str) -> None:
    """The bundle's folder cannot be written: one line, exit 2, before the stages (it used to fail only
    after every stage had run)."""
    out = {"read-only parent": read_only / "b", "missing under read-only": read_only / "new" / "b",
           "deep under read-only": read_only / "a" / "b" / "c"}[where]
    rc, _, err = run_cli(["export", str(tiny_ckpt), str(out)], capsys)
    assert_refused_before_work(rc, err, str(out))
    assert not any(read_only.iterdir())


@pytest.mark.parametrize("depth", [1, 2])
def test_output_under_a_file_fails_before_any_stage(tiny_ckpt: Path, tmp_path: Path, capsys, depth: int) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    out = blocker / "b" if depth == 1 else blocker / "x" / "b"
    rc, _, err = run_cli(["export", str(tiny_ckpt), str(out)], capsys)
    assert_refused_before_work(rc, err, "cannot create its folder")
    assert blocker.read_text() == "mine"


def cache_root() -> Path:
    return Path(os.environ["XDG_CACHE_HOME"]) / "qwenvl-edge"


def users_folder(tmp_path: Path) -> Path:
    """A user's folder laid out like a cache, so following a link into it would delete things."""
    mine = tmp_path / "mine"
    for rel in ("export/0123456789abcdef-01234567/llm-bf16.gguf", "rows/ab/abcd.qvl", "prefix/cd/cdef.qvl",
                "0123456789abcdef-01234567/vision_fp32.onnx", "ab/abcd.qvl", "thesis.txt"):
        (mine / rel).parent.mkdir(parents=True, exist_ok=True)
        (mine / rel).write_text("mine")
    return mine


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


LINKS = {  # (the link inside the cache, the kind cleared): each must be refused, nothing followed
    "cache root": ("", None),
    "export folder": ("export", "export"),
    "rows folder": ("rows", "rows"),
    "prefix folder": ("prefix", "prefix"),
    "a rows subfolder": ("rows/ab", "rows"),
}


@pytest.mark.parametrize("case", sorted(LINKS))
def test_cache_clear_never_follows_a_symlinked_folder(tmp_path: Path, capsys, case: str) -> None:
    link_at, kind = LINKS[case]
    mine = users_folder(tmp_path)
    before = files(mine)
    link = cache_root() / link_at if link_at else cache_root()
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_dir() and not link.is_symlink():
        shutil.rmtree(link)
    link.symlink_to(mine, target_is_directory=True)
    rc, _, err = run_cli(["cache", "clear", *(["--kind", kind] if kind else [])], capsys)
    assert_one_line_error(rc, err, "symbolic link")
    assert files(mine) == before and link.is_symlink()


def test_cache_clear_skips_a_symlinked_resume_folder(tmp_path: Path, capsys) -> None:
    """A link inside the export folder is not a resume folder: left alone, and what it points to too."""
    mine = users_folder(tmp_path)
    before = files(mine)
    root = cache_root() / "export"
    root.mkdir(parents=True)
    (root / "0123456789abcdef-76543210").symlink_to(mine, target_is_directory=True)
    (root / "fedcba9876543210-01234567").mkdir()
    rc, out, err = run_cli(["cache", "clear", "--kind", "export"], capsys)
    assert rc == 0 and "export: removed 1 folders" in out, err
    assert files(mine) == before


REPORT = {"positions": 200, "top1_agreement": 0.56, "kl_mean": 0.2956, "kl_max": 0.9346, "kl_p99": 0.9}


@pytest.mark.parametrize("reference", ["BF16", "F32", "the reference"])
def test_quality_line_says_what_it_measures(reference: str) -> None:
    """Not a bare "top-1 agreement 0.560" beside the README's 95.7 % (another measure): greedy top-1
    agreement with the named reference, on how many calibration positions, as a percentage."""
    line = format_gguf_quality(REPORT, reference)
    assert line.startswith(f"greedy top-1 agreement with {reference} on 200 calibration positions 56.0 %")
    assert f"KL({reference} || quantized) mean 0.2956 max 0.9346 nats" in line
