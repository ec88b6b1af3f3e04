"""``qwenvl-edge chat`` keeps the conversation whatever is typed at its prompt (issue 24): a command that
fails prints one line and the chat goes on; ``/save`` writes atomically and never loses the user's file.

Driven as users drive it: piped input through the real CLI, a process of its own where a resource limit
is needed, and a pseudo-terminal; on the real tiny bundle."""

from __future__ import annotations

import io
import json
import os
import resource
import stat
import sys
from pathlib import Path

import pexpect
import pytest
from PIL import Image

from tests.cli_helpers import run_cli, run_process, temp_home  # noqa: F401

LONG = "x" * 300  # one path component over the 255-byte limit of every common file system


def chat(bundle: Path, lines: str, capsys, monkeypatch, *extra: str) -> tuple[int, str, str]:
    """The chat with piped input, in this process (a traceback would fail the test, not only print)."""
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    return run_cli(["chat", "--bundle", str(bundle), "--greedy", "--max-tokens", "3", "--no-cache", "--threads", "2",
                    *extra], capsys)


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("qwenvl-edge: error: ")]


def assert_kept(rc: int, out: str, err: str, saved: Path, bad_commands: int) -> None:
    """The chat ended normally, each bad command cost one error line, and both answers were saved."""
    assert rc == 0, err
    assert "Traceback" not in err, err
    assert len(error_lines(err)) == bad_commands, err
    assert len(out.splitlines()) == 2, out  # the question before and the one after the bad command
    messages = json.loads(saved.read_text(encoding="utf-8"))
    assert [m["role"] for m in messages] == ["user", "assistant"] * 2
    assert messages[0]["content"] == "Hello" and messages[2]["content"] == "And now?"


def bad_command(kind: str, tmp: Path) -> str:
    """One command line of the given kind, its files made in ``tmp``."""
    (tmp / "folder").mkdir()
    (tmp / "notes.png").write_text("not an image")
    (tmp / "dangling.png").symlink_to(tmp / "nowhere" / "x.png")
    (tmp / "dangling.json").symlink_to(tmp / "nowhere" / "x.json")
    os.mkfifo(tmp / "fifo")  # stands for a device: a test must never risk /dev/null (root may replace it)
    return {
        "save-dot": "/save .",
        "save-root": "/save /",
        "save-folder-slash": f"/save {tmp}/folder/",
        "save-existing-folder": f"/save {tmp}/folder",
        "save-dotdot": f"/save {tmp}/folder/..",
        "save-nul": f"/save {tmp}/a\x00b.json",
        "save-too-long": f"/save {tmp}/{LONG}.json",
        "save-no-folder": f"/save {tmp}/no/such/folder/c.json",
        "save-unwritable-folder": "/save /proc/qwenvl-edge-chat.json",
        "save-device": f"/save {tmp}/fifo",
        "save-dangling-symlink": f"/save {tmp}/dangling.json",
        "image-too-long": f"/image {tmp}/{LONG}.png",
        "image-nul": f"/image {tmp}/a\x00b.png",
        "image-folder": f"/image {tmp}/folder",
        "image-not-an-image": f"/image {tmp}/notes.png",
        "image-dangling-symlink": f"/image {tmp}/dangling.png",
        "image-device": f"/image {tmp}/fifo",
        "image-unicode-missing": f"/image {tmp}/ünïcödé 猫.png",
        "image-empty": "/image",
        "save-empty": "/save",
        "unknown": "/frobnicate " + LONG,
    }[kind]


BAD_KINDS = ["save-dot", "save-root", "save-folder-slash", "save-existing-folder", "save-dotdot", "save-nul",
             "save-too-long", "save-no-folder", "save-unwritable-folder", "save-device", "save-dangling-symlink",
             "image-too-long", "image-nul", "image-folder", "image-not-an-image", "image-dangling-symlink",
             "image-device", "image-unicode-missing", "image-empty", "save-empty", "unknown"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_a_failing_command_is_one_line_and_the_conversation_goes_on(f32_bundle: Path, tmp_path: Path, capsys,
                                                                     monkeypatch, kind: str) -> None:
    line = bad_command(kind, tmp_path)
    saved = tmp_path / "kept.json"
    rc, out, err = chat(f32_bundle, f"Hello\n{line}\nAnd now?\n/save {saved}\n", capsys, monkeypatch)
    assert_kept(rc, out, err, saved, bad_commands=1)
    assert stat.S_ISFIFO(os.stat(tmp_path / "fifo").st_mode)  # a device or pipe is never replaced by a file
    assert not list(tmp_path.rglob("*.partial")) and not (tmp_path / "nowhere").exists()


def test_save_of_unicode_names_and_onto_a_file_keeps_its_mode(f32_bundle: Path, golden, tmp_path: Path, capsys,
                                                              monkeypatch) -> None:
    picture = tmp_path / "ünï çödé 猫.png"
    picture.write_bytes(golden.images["sign"].read_bytes())
    existing = tmp_path / "chat.json"
    existing.write_text("an older chat")
    existing.chmod(0o640)
    target = tmp_path / "ünï çhat.json"
    lines = f"Hello\n/image {picture}\nAnd now?\n/save {target}\n/save {existing}\n"
    rc, out, err = chat(f32_bundle, lines, capsys, monkeypatch)
    assert rc == 0 and not error_lines(err), err
    for saved in (target, existing):
        messages = json.loads(saved.read_text(encoding="utf-8"))
        assert len(messages) == 4 and messages[2]["content"][0]["image_url"]["url"].startswith("data:image/png")
    assert stat.S_IMODE(existing.stat().st_mode) == 0o640  # replaced in place, its permissions kept
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "home")  # no temporary file stays
    assert left == sorted([picture.name, existing.name, target.name])


def test_save_through_a_symlink_writes_its_target_and_keeps_the_link(f32_bundle: Path, tmp_path: Path, capsys,
                                                                     monkeypatch) -> None:
    (tmp_path / "real").mkdir()
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "real" / "chat.json")  # dangling now: /save creates the file it names
    rc, _, err = chat(f32_bundle, f"Hello\n/save {link}\nAnd now?\n/save {link}\n", capsys, monkeypatch)
    assert rc == 0 and not error_lines(err), err
    assert link.is_symlink() and len(json.loads((tmp_path / "real" / "chat.json").read_text())) == 4


def limit_file_size(limit: int):
    """For a child process: files it writes stop at ``limit`` bytes (EFBIG, as a full disk gives ENOSPC;
    Python ignores SIGXFSZ, so the write fails with an OSError instead of killing the process)."""
    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return set_limit


def test_a_save_that_runs_out_of_space_keeps_the_old_file_and_the_chat(f32_bundle: Path, golden,
                                                                       tmp_path: Path) -> None:
    keep = tmp_path / "keep.json"
    keep.write_text("the user's earlier chat\n")
    lines = (f"/image {golden.images['sign']}\nWhat is written?\n/save {keep}\n/save {tmp_path}/new.json\n"
             f"And now?\n/reset\n/save {tmp_path}/small.json\nHello\n")
    done = run_process(["chat", "--bundle", str(f32_bundle), "--greedy", "--max-tokens", "3", "--no-cache",
                        "--threads", "2"], stdin=lines.encode(), preexec_fn=limit_file_size(2048))
    err = done.stderr.decode()
    assert done.returncode == 0 and "Traceback" not in err, err
    assert len(error_lines(err)) == 2 and all("cannot write (File too large)" in e for e in error_lines(err)), err
    assert keep.read_text() == "the user's earlier chat\n"  # not truncated, not deleted
    assert not (tmp_path / "new.json").exists() and not list(tmp_path.glob(".*"))  # no half-written file
    assert json.loads((tmp_path / "small.json").read_text()) == []  # the chat went on after the failures
    assert len(done.stdout.decode().splitlines()) == 3  # all three questions answered


@pytest.mark.parametrize("question", ["word " * 3000, "caf\udce9 ?", "\u2028\u2029"])
def test_a_question_that_is_refused_keeps_the_conversation(f32_bundle: Path, tmp_path: Path, capsys, monkeypatch,
                                                          question: str) -> None:
    """Too long for the context, undecodable bytes, only white space: one line, the chat goes on."""
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(
        f"Hello\n{question}\nAnd now?\n/save {tmp_path}/kept.json\n".encode("utf-8", "surrogateescape")),
        errors="surrogateescape"))
    rc, out, err = run_cli(["chat", "--bundle", str(f32_bundle), "--greedy", "--max-tokens", "3", "--no-cache",
                            "--threads", "2"], capsys)
    blank = not question.strip()
    assert_kept(rc, out, err, tmp_path / "kept.json", bad_commands=0 if blank else 1)


def test_on_a_terminal_bad_commands_keep_the_chat(f32_bundle: Path, tmp_path: Path) -> None:
    """The chat on a pseudo-terminal (readline): /save . and a 300-byte /image name, then a normal ending."""
    env = dict(os.environ, TERM="xterm", LC_ALL="C.UTF-8")
    child = pexpect.spawn(sys.executable, ["-m", "qwenvl_edge", "chat", "--bundle", str(f32_bundle), "--no-cache",
                                           "--greedy", "--max-tokens", "3", "--threads", "2"],
                          env=env, encoding="utf-8", timeout=90, dimensions=(40, 400))
    child.expect_exact(">>> ")
    child.sendline("Hello")
    child.expect_exact(">>> ")
    for line, message in [("/save .", "a folder; /save needs a file name"),
                          (f"/image {tmp_path}/{LONG}.png", "File name too long"),
                          ("/save /", "a folder; /save needs a file name")]:
        child.sendline(line)
        child.expect_exact(message)
        child.expect_exact(">>> ")
    child.sendline(f"/save {tmp_path}/c.json")
    child.expect_exact("[saved 2 messages")
    child.expect_exact(">>> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and "Traceback" not in child.before


def test_a_picture_with_a_unicode_name_goes_with_the_question(f32_bundle: Path, golden, tmp_path: Path, capsys,
                                                              monkeypatch) -> None:
    picture = tmp_path / "照片 ü.png"
    Image.open(golden.images["sign"]).save(picture)
    rc, _, err = chat(f32_bundle, f"/image {picture}\nWhat is it?\n", capsys, monkeypatch)
    assert rc == 0 and not error_lines(err) and "(1 encoded, 0 cached)" in err, err
