"""``qwenvl-edge cache``: sizes per kind of what the runtime really wrote, and clearing only its entries."""

from __future__ import annotations

import os
from pathlib import Path

from tests.cli_helpers import run_cli, temp_home  # noqa: F401


def cache_root() -> Path:
    return Path(os.environ["XDG_CACHE_HOME"]) / "qwenvl-edge"


def test_cache_shows_what_run_wrote_and_clear_keeps_the_rest(f32_bundle: Path, golden, capsys) -> None:
    rc, out, err = run_cli(["cache"], capsys)
    assert rc == 0, err
    assert f"cache folder: {cache_root()}" in out and "rows" in out and "prefix" in out and " 0 entries" in out
    rc, _, err = run_cli(["run", "-q", "--bundle", str(f32_bundle), "--greedy", "--max-tokens", "1",
                          str(golden.images["sign"]), "What is it?"], capsys)
    assert rc == 0, err
    rc, out, _ = run_cli(["cache", "show"], capsys)
    [line] = [line for line in out.splitlines() if line.startswith("rows ")]
    assert " 1 entries" in line and "KiB" in line  # 256 rows x 256 floats = 256 KiB
    [line] = [line for line in out.splitlines() if line.startswith("prefix ")]
    assert " 0 entries" not in line  # the prompt's start up to the image was kept

    mine = cache_root() / "bundle" / "llm.gguf"  # the default bundle lives beside the cache
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"user's file")
    stray = cache_root() / "rows" / "notes.txt"
    stray.write_text("not an entry")
    rc, out, err = run_cli(["cache", "clear", "--kind", "rows"], capsys)
    assert rc == 0 and "rows: removed 1 entries" in out and "prefix" not in out, err
    assert mine.read_bytes() == b"user's file" and stray.is_file()
    assert not list((cache_root() / "rows").rglob("*.qvl")) and list((cache_root() / "prefix").rglob("*.qvl"))
    rc, out, _ = run_cli(["cache", "clear"], capsys)
    assert rc == 0 and "rows: removed 0 entries" in out and "prefix: removed" in out
    rc, out, _ = run_cli(["cache"], capsys)
    assert rc == 0 and out.count(" 0 entries") == 3


def test_cache_unknown_kind(capsys) -> None:
    rc, _, err = run_cli(["cache", "clear", "--kind", "everything"], capsys)
    assert rc == 2 and "--kind 'everything'" in err and "rows or prefix" in err


def test_cache_shows_and_clears_export_resume_folders(capsys) -> None:
    from qwenvl_edge.bundler.export_stages import export_cache_root

    stage = export_cache_root() / "0123abcd-int8-Q4_K_M" / "vision_fp32"
    stage.mkdir(parents=True)
    (stage / "vision_fp32.onnx").write_bytes(b"x" * 4096)
    rc, out, _ = run_cli(["cache", "--kind", "export"], capsys)
    [line] = [line for line in out.splitlines() if line.startswith("export ")]
    assert rc == 0 and " 1 entries" in line and "4.0 KiB" in line
    rc, out, _ = run_cli(["cache", "clear"], capsys)
    assert rc == 0 and "export: removed 1 folders (4.0 KiB)" in out
    assert not any(export_cache_root().iterdir())
