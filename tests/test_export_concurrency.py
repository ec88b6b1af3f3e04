"""A lock held by a live export is respected by every path that removes its files: ``export --fresh`` and
``cache clear`` refuse in one line (exit 2) and touch nothing; the running export then finishes. Real
processes throughout: the export under test is a separate ``qwenvl-edge export`` process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qwenvl_edge.runtime.bundle import Bundle
from tests.cli_helpers import assert_one_line_error
from tests.test_export_safety import export_process, read_until, snapshot


def cli(args: list[str], xdg: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CACHE_HOME": str(xdg), "HOME": str(xdg.parent)}
    return subprocess.run([sys.executable, "-m", "qwenvl_edge.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def export_root(xdg: Path) -> Path:
    return xdg / "qwenvl-edge" / "export"


def test_fresh_and_cache_clear_respect_a_running_export(tiny_ckpt: Path, tmp_path: Path) -> None:
    """Export A holds its job's lock (stopped with SIGSTOP inside the GGUF stage, so it stays there):
    ``cache clear --kind export``, ``cache clear`` and ``export --fresh`` of the same job each refuse naming
    A's pid, and A's resume folder is untouched; resumed, A finishes with a valid bundle (it used to die
    with "No such file or directory")."""
    xdg, out = tmp_path / "xdg", tmp_path / "out" / "b"
    args = [str(tiny_ckpt), str(out), "--vision", "fp32", "--llm", "F16", "--threads", "2"]
    proc = export_process(args, xdg)
    try:
        read_until(proc, "vocabulary:")  # vision_fp32 finished and recorded; inside llm_gguf
        proc.send_signal(signal.SIGSTOP)
        [folder] = list(export_root(xdg).iterdir())
        before = snapshot(folder)
        assert "vision_fp32.onnx" in before
        for command in (["cache", "clear", "--kind", "export"], ["cache", "clear"],
                        ["export", *args, "--fresh"], ["export", *args]):
            result = cli(command, xdg)
            running = f"an export of this job is running (pid {proc.pid})"
            assert_one_line_error(result.returncode, result.stderr, running)
            assert snapshot(folder) == before, command
    finally:
        proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert Bundle.open(out).manifest["llm"]["type"] == "F16"
    assert list(export_root(xdg).iterdir()) == []


HOLDER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from qwenvl_edge.bundler.export_stages import StageCache
    cache = StageCache(Path(sys.argv[1]))
    (cache.folder / "vision_fp32.onnx").write_bytes(b"half done")
    print("locked", flush=True)
    sys.stdin.read()
    cache.close(remove=False)
""")


@pytest.fixture()
def holder(tmp_path: Path):
    """Another process holding one job's lock (as a running export does), until its stdin closes."""
    xdg = tmp_path / "xdg"
    folder = export_root(xdg) / "0123456789abcdef-01234567"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield xdg, folder, proc
    proc.stdin.close()
    proc.wait(timeout=30)


def test_cache_clear_refuses_before_removing_any_kind(holder, capsys) -> None:
    """``cache clear`` (every kind) with one export running: refused before the other resume folders and
    the other kinds are touched."""
    xdg, folder, proc = holder
    other = export_root(xdg) / "fedcba9876543210-76543210"
    other.mkdir()
    (other / "llm-bf16.gguf").write_bytes(b"x" * 10)
    result = cli(["cache", "clear"], xdg)
    assert_one_line_error(result.returncode, result.stderr, f"(pid {proc.pid})")
    assert (folder / "vision_fp32.onnx").read_bytes() == b"half done" and (other / "llm-bf16.gguf").is_file()
    proc.stdin.close()
    proc.wait(timeout=30)
    result = cli(["cache", "clear", "--kind", "export"], xdg)
    assert result.returncode == 0 and "export: removed 2 folders" in result.stdout, result.stderr
    assert list(export_root(xdg).iterdir()) == []


def test_stage_cache_fresh_refuses_while_locked(holder, monkeypatch) -> None:
    """In-process ``StageCache(fresh=True)`` against another process's lock: refused, nothing removed."""
    from qwenvl_edge.bundler.export_stages import StageCache, clear_export_cache
    from qwenvl_edge.errors import QwenVLError

    xdg, folder, proc = holder
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    with pytest.raises(QwenVLError, match=rf"an export of this job is running \(pid {proc.pid}\)"):
        StageCache(folder, fresh=True)
    with pytest.raises(QwenVLError, match=rf"\(pid {proc.pid}\)"):
        clear_export_cache()
    assert (folder / "vision_fp32.onnx").read_bytes() == b"half done" and (folder / "lock").is_file()


def test_fresh_without_a_running_export_starts_over(tmp_path: Path) -> None:
    """The lock taken first changes nothing when no export runs: --fresh drops the finished stages."""
    from qwenvl_edge.bundler.export_stages import StageCache

    folder = tmp_path / "job"
    cache = StageCache(folder)
    cache.run("s1", lambda work: (work / "a.bin").write_bytes(b"a") and {})
    cache.close(remove=False)
    cache = StageCache(folder, fresh=True)
    try:
        assert not cache.done("s1") and sorted(p.name for p in folder.iterdir()) == ["lock"]
    finally:
        cache.close(remove=True)
    assert not folder.exists()
