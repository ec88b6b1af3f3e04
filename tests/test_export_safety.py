"""Export never deletes what the user owns, and leaves nothing half-written after a signal or a full disk."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from qwenvl_edge.runtime.bundle import Bundle
from tests.test_bundle_export import assert_one_line_error as assert_refused
from tests.test_bundle_export import run_cli


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg"


@pytest.fixture()
def own_ckpt(tiny_ckpt: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_ckpt, tmp_path / "parent" / "ck"))


def test_force_never_replaces_the_checkpoint(own_ckpt: Path, cache_home: Path, capsys) -> None:
    before = snapshot(own_ckpt.parent)
    rc, _, err = run_cli(["export", str(own_ckpt), str(own_ckpt), "--force"], capsys)  # export ck ck --force
    assert_refused(rc, err, "is the checkpoint")
    rc, _, err = run_cli(["export", str(own_ckpt), str(own_ckpt.parent), "--force"], capsys)  # parent/ck parent
    assert_refused(rc, err, "holds the checkpoint")
    rc, _, err = run_cli(["export", str(own_ckpt), str(own_ckpt / "bundle"), "--force"], capsys)
    assert_refused(rc, err, "is inside the checkpoint")
    link = own_ckpt.parent.parent / "link-to-ck"
    link.symlink_to(own_ckpt, target_is_directory=True)
    rc, _, err = run_cli(["export", str(own_ckpt), str(link), "--force"], capsys)
    assert_refused(rc, err, "is the checkpoint")
    assert snapshot(own_ckpt.parent) == before and link.is_symlink()


def test_force_never_replaces_user_files(tiny_ckpt: Path, f32_bundle: Path, tmp_path: Path, cache_home: Path,
                                         capsys) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"my photo")
    rc, _, err = run_cli(["export", str(tiny_ckpt), str(photos), "--force"], capsys)
    assert_refused(rc, err, "not a qwenvl-edge bundle")
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "manifest.json").write_text('{"format": "something-else", "files": {}}')
    rc, _, err = run_cli(["export", str(tiny_ckpt), str(fake), "--force"], capsys)
    assert_refused(rc, err, "not a qwenvl-edge bundle")
    crowded = Path(shutil.copytree(f32_bundle, tmp_path / "crowded"))
    (crowded / "notes.txt").write_text("mine")
    rc, _, err = run_cli(["export", str(tiny_ckpt), str(crowded), "--force"], capsys)
    assert_refused(rc, err, "notes.txt")
    link = tmp_path / "link-to-bundle"
    link.symlink_to(crowded, target_is_directory=True)
    rc, _, err = run_cli(["export", str(tiny_ckpt), str(link), "--force"], capsys)
    assert_refused(rc, err, "symbolic link")
    assert (photos / "holiday.jpg").read_bytes() == b"my photo" and (crowded / "notes.txt").read_text() == "mine"
    assert (fake / "manifest.json").is_file()


def export_process(args: list[str], xdg: Path) -> subprocess.Popen:
    env = {**os.environ, "XDG_CACHE_HOME": str(xdg), "HOME": str(xdg.parent)}
    return subprocess.Popen([sys.executable, "-m", "qwenvl_edge.cli", "export", *args], stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)


def read_until(proc: subprocess.Popen, fragment: str) -> list[str]:
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if fragment in line:
            return lines
    raise AssertionError(f"export ended before {fragment!r}: {''.join(lines[-5:])}")


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def partials(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".partial" in p.name] if folder.exists() else []


def test_sigterm_removes_the_partial_folder(tiny_ckpt: Path, tmp_path: Path) -> None:
    xdg, out = tmp_path / "xdg", tmp_path / "out" / "b"
    proc = export_process([str(tiny_ckpt), str(out), "--vision", "fp32", "--llm", "F16"], xdg)
    read_until(proc, "vocabulary:")  # inside the GGUF stage
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "interrupted" in err, err
    assert not out.exists() and partials(tmp_path) == []


def test_killed_export_resumes_without_redoing_finished_stages(tiny_ckpt: Path, tmp_path: Path) -> None:
    """SIGKILL in the INT8 stage: the next run sweeps what the dead one left, reuses the verified FP32
    vision stage, redoes only the rest, and clears the resume folder on success."""
    xdg, out = tmp_path / "xdg", tmp_path / "out" / "b"
    stale_out = out.parent / f".b.partial-{dead_pid()}"
    args = [str(tiny_ckpt), str(out), "--llm", "F16"]
    proc = export_process(args, xdg)
    read_until(proc, "vision int8: piece")
    proc.kill()
    proc.wait()
    stale_out.mkdir(parents=True)
    (stale_out / "vision.onnx").write_bytes(b"half")
    assert [p.name for p in partials(xdg)] and not out.exists()  # the INT8 stage's partial folder was left
    proc = export_process(args, xdg)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "stage vision_fp32 finished earlier, files verified: reused" in err
    assert "vision: block" not in err and "vision int8: piece 1/1" in err  # FP32 graph not rebuilt
    assert ".vision_int8.partial-" in err and f"removed {stale_out.name}" in err
    stages = Bundle.open(out).manifest["export"]["stages"]
    assert {k: v["reused"] for k, v in stages.items()} == {"vision_fp32": True, "vision_int8": False,
                                                            "llm_gguf": False}
    assert partials(tmp_path) == [] and list((xdg / "qwenvl-edge" / "export").iterdir()) == []


@pytest.fixture()
def small_disk(tmp_path: Path):
    """A 5 MiB tmpfs: room for the tiny FP32 vision graph (3.2 MiB), not for the INT8 stage after it."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_in_the_int8_stage_is_one_line(tiny_ckpt: Path, small_disk: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(small_disk / "xdg"))
    rc, _, err = run_cli(["export", str(tiny_ckpt), str(small_disk / "b"), "--llm", "F16"], capsys)
    assert_refused(rc, err, "no space left while writing stage vision_int8")
    assert not (small_disk / "b").exists() and partials(small_disk) == []
