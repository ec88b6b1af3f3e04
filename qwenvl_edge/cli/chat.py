"""``qwenvl-edge chat``: a REPL as llama.cpp's and ollama's users know it.

- On a terminal the line is read through ``readline`` (editing, up-arrow history kept in
  ``$XDG_STATE_HOME/qwenvl-edge/chat_history``); piped input is read plainly and no history is written.
- Lines starting with ``/`` are commands, answered here and never sent to the model (``/help``).
- Ctrl-C during an answer stops that answer at the next token and keeps the session (the stopped turn is
  not remembered); a second Ctrl-C stops at once and starts the conversation afresh. Ctrl-C at the prompt
  clears the line; Ctrl-D (or ``/quit``) ends the chat with a newline.
- ``/save FILE`` writes the conversation as OpenAI-style ``messages`` (images inline as ``data:`` URLs),
  which ``QwenVL.create_chat_completion`` and the server take as they are; atomically (a temporary file
  renamed over the target), so a failed save never leaves half a file nor loses the file that was there.
- Nothing typed at the prompt ends the chat but ``/quit`` (``/exit``, ``/bye``), Ctrl-D and a second
  Ctrl-C: a command or question that fails prints one line and the conversation goes on.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import mimetypes
import os
import signal
import stat
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from qwenvl_edge import validate
from qwenvl_edge.cli import resident
from qwenvl_edge.cli.common import check_model_options, open_model, sampling, say
from qwenvl_edge.cli.inputs import check_images, shown
from qwenvl_edge.errors import OptionError, QwenVLError
from qwenvl_edge.paths import state_root

PROMPT = ">>> "
HELP = """\
commands (a line starting with / is never sent to the model):
  /image PATH   add a picture to the next question (repeatable)
  /reset        forget the conversation and any pending pictures
  /save FILE    write the conversation as OpenAI-style messages (JSON)
  /help         this list
  /quit         end the chat (also /exit, /bye or Ctrl-D)
Ctrl-C stops an answer and keeps the chat; up/down arrows recall earlier lines."""
QUIT = {"/quit", "/exit", "/bye"}
HISTORY_LENGTH = 1000


def history_file() -> Path:
    return state_root() / "chat_history"


class LineReader:
    """``read()`` returns the next line or None at end of input; readline only on a terminal."""

    def __init__(self, quiet: bool = False):
        self.tty = sys.stdin.isatty()
        self.editing = self.tty and sys.stdout.isatty()  # input() uses readline only when both are terminals
        self.quiet = quiet
        self.readline = None
        if isinstance(sys.stdin, io.TextIOWrapper):
            sys.stdin.reconfigure(errors="surrogateescape")  # bad bytes reach validate.question, not a crash
        if self.editing:
            self._start_history()

    def _start_history(self) -> None:
        try:
            import readline
        except ImportError:  # Python built without it: plain input still works
            return
        self.readline = readline
        readline.set_history_length(HISTORY_LENGTH)
        with contextlib.suppress(OSError, UnicodeDecodeError):  # first chat, or an unreadable file: start empty
            readline.read_history_file(history_file())

    def read(self) -> str | None:
        try:
            if self.editing:
                return input(PROMPT)
            if self.tty and not self.quiet:
                print(PROMPT, end="", file=sys.stderr, flush=True)
            return input()
        except EOFError:
            if self.tty:
                print(file=sys.stderr)  # the shell's prompt starts on its own line
            return None

    def close(self) -> None:
        if self.readline is None:
            return
        try:
            history_file().parent.mkdir(parents=True, exist_ok=True)
            self.readline.write_history_file(history_file())
        except OSError as e:
            say(argparse.Namespace(quiet=self.quiet), f"[history not saved: {e.strerror or e}]")


class StopRequest:
    """SIGINT during an answer: the first asks the answer to stop, the second interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def image_message_part(path: str) -> dict:
    """An OpenAI ``image_url`` part with the file inline, so the saved chat works anywhere
    (a ``file://`` URL if the file cannot be read any more)."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return {"type": "image_url", "image_url": {"url": Path(path).resolve().as_uri()}}
    mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}}


def save_target(path: str) -> Path:
    """The file ``/save`` writes: a symlink's target (the link stays), never a folder or a device."""
    if "\x00" in path:
        raise OptionError(f"{shown(repr(path))}: not a file name (it holds a NUL byte)")
    if path.endswith(os.sep) or Path(path).name in ("", ".", ".."):
        raise OptionError(f"{shown(path)}: a folder; /save needs a file name: /save FILE")
    target = Path(os.path.realpath(path))
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        return target
    if stat.S_ISDIR(mode):
        raise OptionError(f"{shown(path)}: a folder; /save needs a file name: /save FILE")
    if not stat.S_ISREG(mode):
        raise OptionError(f"{shown(path)}: not a regular file (a device, pipe or socket); /save writes files only")
    return target


def file_mode(target: Path) -> int:
    """The mode the saved file gets: the replaced file's, else what the umask gives a new file."""
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_atomically(path: str, data: bytes) -> Path:
    """Write ``data`` to a temporary file in the target's folder, then rename it over the target: a failure
    (disk full, no permission, ...) leaves the old file as it was and no partial file behind."""
    target = save_target(path)
    mode = file_mode(target)
    fd, tmp = tempfile.mkstemp(prefix=".qwenvl-edge-chat-", suffix=".partial", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target


def user_message(question: str, images: list[str]) -> dict:
    if not images:
        return {"role": "user", "content": question}
    return {"role": "user", "content": [*map(image_message_part, images), {"type": "text", "text": question}]}


class ChatSession:
    """One conversation: the model, the pictures waiting for the next question, the messages so far."""

    def __init__(self, model, a: argparse.Namespace, images: list[str]):
        self.model = model
        self.a = a
        self.pending = list(images)
        self.messages: list[dict] = []
        self._mid_line = False  # part of an answer is on stdout without its newline
        self.commands: dict[str, Callable[[str], bool]] = {
            "/help": self._help, "/image": self._image, "/reset": self._reset, "/save": self._save}

    def handle(self, line: str) -> bool:
        """Act on one input line; False ends the chat, which only the quit commands do."""
        line = line.strip()
        if not line:
            return True
        if line.startswith("/"):
            name, rest = (line.split(maxsplit=1) + [""])[:2]  # "/image\tcat.png" is /image too
            if name in QUIT:
                return False
            if name not in self.commands:
                self._error(f"unknown command {shown(name)}; /help lists the commands")
                return True
            return self._command(name, rest.strip())
        self._ask(line)
        return True

    def _command(self, name: str, argument: str) -> bool:
        """Run one command; whatever it fails with is one line, never the end of the conversation."""
        try:
            return self.commands[name](argument)
        except QwenVLError as e:
            self._error(str(e))
        except (OSError, ValueError) as e:  # a path the OS refuses (NUL byte, too long, ...)
            self._error(f"{name} {shown(argument)}: {getattr(e, 'strerror', None) or e}")
        except KeyboardInterrupt:  # Ctrl-C during a slow /save or /image stops that command only
            print(file=sys.stderr)
            self._error(f"{name} interrupted; the conversation is kept")
        except Exception as e:  # a bug must not cost the user the conversation either
            self._error(f"{name} failed ({type(e).__name__}: {e}); the conversation is kept")
        return True

    def _help(self, _rest: str) -> bool:
        print(HELP, file=sys.stderr)
        return True

    def _image(self, path: str) -> bool:
        from qwenvl_edge.runtime.preprocess import load_image

        if not path:
            self._error("/image needs a file: /image PATH")
            return True
        path = os.path.expanduser(path)
        check_images([path])  # raises one line for any name (too long, NUL, a folder), as load_image does
        load_image(path)  # a file that is no image is refused now, not on every later turn
        self.pending.append(path)
        say(self.a, f"[{path} goes with the next question]")
        return True

    def _reset(self, _rest: str) -> bool:
        self.model.reset()
        self.pending, self.messages = [], []
        say(self.a, "[conversation forgotten]")
        return True

    def _save(self, path: str) -> bool:
        if not path:
            self._error("/save needs a file: /save FILE")
            return True
        target = os.path.expanduser(path)
        data = (json.dumps(self.messages, ensure_ascii=False, indent=1) + "\n").encode("utf-8", "surrogateescape")
        try:
            write_atomically(target, data)
        except OSError as e:
            raise OptionError(f"{shown(target)}: cannot write ({e.strerror or e})") from None
        say(self.a, f"[saved {len(self.messages)} messages to {target}]")
        return True

    def _ask(self, question: str) -> None:
        try:
            question = validate.question(question, "the question")
            images, self.pending = self.pending, []
            with StopRequest() as stop:
                stopped = self._stream(self.model.chat(question, images, stream=True, **sampling(self.a)), stop)
        except KeyboardInterrupt:  # the second Ctrl-C: the KV cache may be mid-write, start afresh
            sys.stdout.write("\n")
            self._mid_line = False
            self.model.reset()
            self.messages = []
            say(self.a, "[answer stopped; the conversation starts afresh]")
            return
        except QwenVLError as e:  # one bad turn must not end the conversation
            self._end_line()
            self._error(f"{e} (the question and its pictures were not sent)")
            return
        except Exception as e:  # an engine failure or a bug: this turn only, the conversation goes on
            self._end_line()
            self._error(f"the answer failed ({type(e).__name__}: {e}); the conversation so far is kept")
            return
        sys.stdout.write("\n")
        sys.stdout.flush()
        self._mid_line = False
        if stopped:
            say(self.a, "[answer stopped; this turn is forgotten]")
            return
        result = self.model.last_result
        self.messages += [user_message(question, images), {"role": "assistant", "content": result.text}]
        resident.show_timings(self.a, result)
        say(self.a, f"[re-used {result.timings.reused_positions} cached positions]")

    def _end_line(self) -> None:
        """A newline on stdout if an answer was cut off mid-line, so the error starts a line of its own."""
        sys.stdout.write("\n" if self._mid_line else "")
        sys.stdout.flush()
        self._mid_line = False

    def _stream(self, pieces, stop: StopRequest) -> bool:
        """Print the answer as it comes; True if Ctrl-C stopped it."""
        try:
            for piece in pieces:
                sys.stdout.write(piece)
                sys.stdout.flush()
                self._mid_line = self._mid_line or bool(piece)
                if stop.requested:
                    return True
            return False  # complete, even if Ctrl-C came after the last piece
        finally:
            pieces.close()

    def _error(self, message: str) -> None:
        one_line = message.replace("\r", "\\r").replace("\n", "\\n")
        print(f"qwenvl-edge: error: {one_line}", file=sys.stderr, flush=True)


def cmd_chat(a: argparse.Namespace) -> int:
    from qwenvl_edge.runtime.preprocess import load_image

    check_images(a.images)
    for image in a.images:
        load_image(image)  # refused now, in one line, rather than after the model loads
    check_model_options(a)
    reader = LineReader(quiet=a.quiet)
    with resident.chat_client(a) or open_model(a) as model:  # a resident server on this bundle, else load here
        session = ChatSession(model, a, a.images)
        say(a, "qwenvl-edge chat: type a question; /help lists the commands, Ctrl-D ends.")
        try:
            while True:
                try:
                    line = reader.read()
                except KeyboardInterrupt:  # at the prompt: drop the line, as a shell does
                    print(file=sys.stderr)
                    continue
                if line is None or not session.handle(line):
                    break
        finally:
            reader.close()
    return 0

