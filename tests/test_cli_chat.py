"""``qwenvl-edge chat`` as its users drive it: through a pseudo-terminal (readline, Ctrl-C, Ctrl-D,
history) and with piped input (commands, bad images, bad bytes, /save)."""

from __future__ import annotations

import base64
import io
import json
import os
import sys
from pathlib import Path

import pexpect
import pytest

from qwenvl_edge.runtime.pipeline import QwenVL
from tests.cli_helpers import run_cli, run_process, temp_home  # noqa: F401

PROMPT = ">>> "


def spawn_chat(bundle: Path, *extra: str) -> pexpect.spawn:
    """The chat on a terminal of its own; the long answers (--max-tokens 100000) leave time for Ctrl-C."""
    args = ["-m", "qwenvl_edge", "chat", "--bundle", str(bundle), "--no-cache", "--greedy", "--threads", "1",
            "--max-tokens", "100000", *extra]
    env = dict(os.environ, TERM="xterm", LC_ALL="C.UTF-8")
    child = pexpect.spawn(sys.executable, args, env=env, encoding="utf-8", timeout=90, dimensions=(40, 200))
    child.expect_exact(PROMPT)
    return child


def end_with_ctrl_d(child: pexpect.spawn) -> str:
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    return child.before


def test_help_is_answered_locally_and_unknown_commands_refused(f32_bundle: Path) -> None:
    child = spawn_chat(f32_bundle)
    child.sendline("/help")
    child.expect_exact("/image PATH")
    child.expect_exact(PROMPT)
    assert "tok/s" not in child.before  # nothing reached the model
    child.sendline("/frobnicate now")
    child.expect_exact("unknown command /frobnicate; /help lists the commands")
    child.expect_exact(PROMPT)
    assert "tok/s" not in child.before
    tail = end_with_ctrl_d(child)
    assert tail.endswith("\r\n")  # the shell prompt starts on a line of its own


def test_history_recalls_lines_within_and_across_sessions(f32_bundle: Path) -> None:
    child = spawn_chat(f32_bundle)
    child.sendline("/help")
    child.expect_exact("Ctrl-C stops an answer")
    child.expect_exact(PROMPT)
    child.send("\x1b[A")  # up arrow: readline puts "/help" back on the line
    child.expect_exact("/help")
    child.send("\r")
    child.expect_exact("Ctrl-C stops an answer")
    child.expect_exact(PROMPT)
    end_with_ctrl_d(child)
    history = Path(os.environ["XDG_STATE_HOME"]) / "qwenvl-edge" / "chat_history"
    assert "/help" in history.read_text()

    child = spawn_chat(f32_bundle)  # a new session starts with the old lines
    child.send("\x1b[A")
    child.expect_exact("/help")
    child.send("\r")
    child.expect_exact("Ctrl-C stops an answer")
    child.expect_exact(PROMPT)
    end_with_ctrl_d(child)


def test_ctrl_c_stops_the_answer_and_keeps_the_session(f32_bundle: Path) -> None:
    child = spawn_chat(f32_bundle)
    child.sendline("Tell me everything.")
    child.expect_exact("Tell me everything.\r\n")  # readline's echo of the line
    child.expect(r"\S")  # the answer has started
    child.sendintr()
    child.expect_exact("[answer stopped; this turn is forgotten]")
    child.expect_exact(PROMPT)
    child.sendline("And now?")  # the model answers again after a stop
    child.expect_exact("And now?\r\n")
    child.expect(r"\S")
    child.sendintr()
    child.expect_exact("[answer stopped; this turn is forgotten]")
    child.expect_exact(PROMPT)
    child.sendline("/help")  # the session goes on
    child.expect_exact("/image PATH")
    child.expect_exact(PROMPT)
    end_with_ctrl_d(child)


def test_invalid_utf8_on_the_terminal_keeps_the_chat(f32_bundle: Path) -> None:
    """readline drops the byte that is not UTF-8 (piped input reaches the one-line refusal, tested below)."""
    child = spawn_chat(f32_bundle, "--max-tokens", "3")
    os.write(child.child_fd, b"caf\xe9 ?\r")
    child.expect_exact(PROMPT)
    assert "Traceback" not in child.before
    child.sendline("/help")
    child.expect_exact("/image PATH")
    end_with_ctrl_d(child)


# --- piped input --------------------------------------------------------------------------------

def chat_piped(bundle: Path, lines: str, capsys, monkeypatch, *extra: str) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    return run_cli(["chat", "--bundle", str(bundle), "--greedy", "--max-tokens", "4", "--no-cache", *extra], capsys)


def test_bad_images_leave_the_chat_working(f32_bundle: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    lines = f"/image {notes}\n/image {tmp_path / 'missing.jpg'}\n/image\nWhat is it?\n"
    rc, out, err = chat_piped(f32_bundle, lines, capsys, monkeypatch)
    assert rc == 0, err
    assert "notes.png" in err and "missing.jpg: no such image file" in err and "/image needs a file" in err
    assert out.count("\n") == 1 and out.strip()  # the question was answered, with no image
    assert "0 encoded, 0 cached" in err


def test_invalid_utf8_piped_does_not_end_the_chat(f32_bundle: Path) -> None:
    done = run_process(["chat", "--bundle", str(f32_bundle), "--greedy", "--max-tokens", "3", "--no-cache"],
                       stdin=b"caf\xe9\xff?\nHello\n")
    err = done.stderr.decode()
    assert done.returncode == 0, err
    assert "not valid UTF-8" in err and "Traceback" not in err
    assert done.stdout.decode().count("\n") == 1  # "Hello" was answered


def test_save_writes_openai_messages(f32_bundle: Path, golden, tmp_path: Path, capsys, monkeypatch) -> None:
    sign = golden.images["sign"]
    saved = tmp_path / "conversation.json"
    lines = (f"What is written on the sign?\n/image {sign}\nAnd here?\n/save {saved}\n/reset\n"
             f"/save {tmp_path}/empty.json\n")
    rc, out, err = chat_piped(f32_bundle, lines, capsys, monkeypatch, str(sign))
    assert rc == 0, err
    answers = out.splitlines()
    messages = json.loads(saved.read_text())
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in messages[1::2]] == answers
    for message in messages[0::2]:
        image, text = message["content"]
        assert image["type"] == "image_url" and text == {"type": "text", "text": text["text"]}
        head, data = image["image_url"]["url"].split(",", 1)
        assert head == "data:image/png;base64" and base64.b64decode(data) == sign.read_bytes()
    assert messages[2]["content"][1]["text"] == "And here?"
    assert json.loads((tmp_path / "empty.json").read_text()) == []  # /reset forgot it all
    assert "[saved 4 messages" in err and "[conversation forgotten]" in err
    with QwenVL(f32_bundle, n_threads=2, cache_dir=None) as m:  # the API takes the saved chat as it is
        reply = m.create_chat_completion([*messages, {"role": "user", "content": "And now?"}], max_tokens=2,
                                         temperature=0)
    assert reply["choices"][0]["message"]["role"] == "assistant"
    assert reply["usage"]["prompt_tokens"] > 2 * 258  # both pictures of the saved turns are in the prompt


def test_save_to_a_bad_place_is_one_line(f32_bundle: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    lines = f"/save {tmp_path}/no/such/folder/c.json\n/save\n/help\n"
    rc, _, err = chat_piped(f32_bundle, lines, capsys, monkeypatch)
    assert rc == 0 and "cannot write" in err and "/save needs a file" in err and "/image PATH" in err
    assert not list(tmp_path.glob("**/*.partial"))


@pytest.mark.parametrize("quit_line", ["/quit", "/exit", "/bye"])
def test_quit_commands(f32_bundle: Path, capsys, monkeypatch, quit_line: str) -> None:
    rc, out, _ = chat_piped(f32_bundle, f"{quit_line}\nnever asked\n", capsys, monkeypatch)
    assert rc == 0 and out == ""
    assert not (Path(os.environ["XDG_STATE_HOME"]) / "qwenvl-edge").exists()  # no history without a terminal
