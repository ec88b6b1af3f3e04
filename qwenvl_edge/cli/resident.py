"""A resident model, as ollama keeps one: ``serve --background``, ``ps``, ``stop``, and ``run`` / ``chat``
answered by a running server on the same bundle instead of loading the model again.

A server registers itself in a state file (``qwenvl_edge.server.registry``: pid, URL, bundle folder and
manifest sha256, locked by the server for its life). ``run`` and ``chat`` look there; when a live server
runs on the same bundle (same resolved folder, same manifest) and can honour the options, they send the
question over HTTP (``/v1/chat/completions``, streamed, images inline as ``data:`` URLs so ``--media-dir``
does not matter) and print the answer exactly as an in-process answer prints. Anything else (no server,
``--no-resident``, an option only a model in this process can honour, a server that refuses before its
first token) loads the model in this process as before; ``-v`` says which.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import os
import select
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from qwenvl_edge.cli.common import print_timings, sampling, say
from qwenvl_edge.errors import OptionError, QwenVLError
from qwenvl_edge.options import ENV_NO_RESIDENT
from qwenvl_edge.paths import default_bundle_dir
from qwenvl_edge.server import registry

START_TIMEOUT_S = 600.0  # serve --background: the full model loads in about 10 s; a slow disk takes longer
STOP_TIMEOUT_S = 30.0  # stop: the server's graceful shutdown takes at most 3 s, then it frees the model
READ_TIMEOUT_S = 900.0  # one request: the server ends a generation at its --request-timeout (600 s)
HEALTH_TIMEOUT_S = 2.0


class Refused(QwenVLError):
    """The resident server did not take the request (unreachable, or an HTTP error before the first token):
    ``run`` loads the model in this process instead."""


def note(a: argparse.Namespace, message: str) -> None:
    """A ``-v`` line: which way the answer came."""
    if getattr(a, "verbose", False):
        print(f"qwenvl-edge: {message}", file=sys.stderr, flush=True)


# --- serve --background --------------------------------------------------------------------------

def cmd_serve(a: argparse.Namespace) -> int:
    if getattr(a, "background", False):
        return start_background(a)
    from qwenvl_edge.server.main import cmd_serve as serve

    return serve(a)


def bundle_folder(a: argparse.Namespace) -> Path:
    return Path(a.bundle).expanduser() if a.bundle is not None else default_bundle_dir()


def start_background(a: argparse.Namespace) -> int:
    """Start the server detached (a double fork: its own session, stdio to the log) and return once its
    ``/health`` answers 200; if it exits first, its log's last error line is this command's error."""
    from qwenvl_edge.server.main import _check

    _check(a)  # the option errors here, on the terminal, not in the log
    folder = bundle_folder(a)
    running = registry.server_for(folder)
    if running is not None:
        raise QwenVLError(f"a server for the bundle {folder.resolve()} is already running (pid {running.pid}, "
                          f"{running.url}): use it, or stop it first with `qwenvl-edge stop`")
    log = registry.log_path(folder)
    log.parent.mkdir(parents=True, exist_ok=True)
    log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    offset = os.fstat(log_fd).st_size
    a.log_file = str(log)
    pid, pipe = _spawn(a, log_fd)
    try:
        server = _wait_started(folder, pid, pipe, log, offset)
    finally:
        os.close(pipe)
    print(server.url, flush=True)
    say(a, f"qwenvl-edge: serving {server.bundle} on {server.url} in the background (pid {server.pid}, log {log}); "
           "`qwenvl-edge stop` stops it")
    return 0


def _spawn(a: argparse.Namespace, log_fd: int) -> tuple[int, int]:
    """(the server's pid, a pipe whose end of file means the server has exited)."""
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    first = os.fork()
    if first == 0:  # the intermediate child: a new session, then the server, then gone (no zombie, no tty)
        try:
            os.close(r)
            os.setsid()
            second = os.fork()
            if second == 0:
                _run_detached(a, log_fd, w)
            os.write(w, f"{second}\n".encode())
        finally:
            os._exit(0)
    os.close(w)
    os.close(log_fd)
    os.waitpid(first, 0)
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(r, 32)
        if not chunk:
            os.close(r)
            raise QwenVLError("the background server could not be started (fork failed)")
        line += chunk
    return int(line), r


def _run_detached(a: argparse.Namespace, log_fd: int, alive: int) -> None:
    """The server process: stdin from /dev/null, stdout and stderr to the log; ``alive`` stays open until it
    exits. Never returns (its exit code is the command's, as ``main`` would give it)."""
    rc = 1
    try:
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(devnull)
        os.close(log_fd)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print(f"qwenvl-edge: --- serve --background, pid {os.getpid()}, {time.strftime('%Y-%m-%d %H:%M:%S')}",
              file=sys.stderr, flush=True)
        from qwenvl_edge.server.main import cmd_serve as serve

        rc = serve(a)
    except QwenVLError as e:
        print(f"qwenvl-edge: error: {e}", file=sys.stderr)
        rc = 2
    except KeyboardInterrupt:
        rc = 130
    except OSError as e:
        print(f"qwenvl-edge: error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}",
              file=sys.stderr)
        rc = 2
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(rc)


def _wait_started(folder: Path, pid: int, pipe: int, log: Path, offset: int) -> registry.Server:
    deadline = time.monotonic() + START_TIMEOUT_S
    exited = False
    while True:
        server = registry.server_for(folder)
        if server is not None and server.pid == pid and health(server.url) == 200:
            return server
        if exited:
            raise QwenVLError(f"the server did not start: {last_error(log, offset)} (log: {log})")
        if time.monotonic() > deadline:
            raise QwenVLError(f"the server (pid {pid}) did not answer /health within {START_TIMEOUT_S:g} s; "
                              f"it may still be loading: `qwenvl-edge ps` shows it, its log is {log}")
        ready, _, _ = select.select([pipe], [], [], 0.1)
        if ready and not os.read(pipe, 64):
            exited = True  # one more look: it may have answered just before it stopped


def last_error(log: Path, offset: int) -> str:
    """The log's last ``qwenvl-edge: error:`` line since ``offset`` (else its last line), for the terminal."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            lines = [line.strip() for line in f.read().decode("utf-8", "replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    prefix = "qwenvl-edge: error: "
    errors = [line[len(prefix):] for line in lines if line.startswith(prefix)]
    return errors[-1] if errors else (lines[-1] if lines else "it exited without a word")


def health(url: str, timeout: float = HEALTH_TIMEOUT_S) -> int | None:
    """The status of ``GET url/health``, or None when nothing answers."""
    try:
        status, _ = _get(url, "/health", timeout)
    except (OSError, http.client.HTTPException):
        return None
    return status


def _get(url: str, path: str, timeout: float) -> tuple[int, Any]:
    conn = _connection(url, timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(body)
    except ValueError:
        return resp.status, None


def _connection(url: str, timeout: float) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)


# --- ps, stop ------------------------------------------------------------------------------------

def cmd_ps(a: argparse.Namespace) -> int:
    """The resident servers: pid, URL, model state, idle time, bundle (stale state files are skipped)."""
    for path in registry.stale_files():
        note(a, f"skipped {path}: its server is gone (killed?); the next serve on that bundle replaces it")
    servers = registry.live_servers()
    if not servers:
        say(a, "no resident server is running (start one: qwenvl-edge serve --background)")
        return 0
    rows = [("PID", "URL", "MODEL", "IDLE", "KEEP-ALIVE", "BUNDLE")]
    rows += [(str(s.pid), s.url, *_model_state(s), s.bundle) for s in servers]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1], flush=True)
    return 0


def _model_state(s: registry.Server) -> tuple[str, str, str]:
    """(loaded / unloaded / loading / not answering, idle time, keep-alive) from the server's ``/api/ps``."""
    keep = _duration(s.info.get("keep_alive_s"), never="never")
    try:
        status, body = _get(s.url, "/api/ps", HEALTH_TIMEOUT_S)
    except (OSError, http.client.HTTPException):
        return "not answering", "-", keep
    if status != 200 or not isinstance(body, dict):
        return f"HTTP {status}", "-", keep
    idle = "busy" if body.get("busy") else _duration(body.get("idle_s"), never="-")
    return str(body.get("state", "?")), idle, keep


def _duration(seconds: float | None, never: str) -> str:
    if seconds is None:
        return never
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"


def cmd_stop(a: argparse.Namespace) -> int:
    """SIGTERM to one server (``--bundle``, or the only one running) or all (``--all``), then wait for each to go."""
    servers = registry.live_servers()
    if a.bundle is not None:
        folder = Path(a.bundle).expanduser()
        match = registry.server_for(folder)
        if match is None:
            raise OptionError(f"no resident server runs on the bundle {folder} (`qwenvl-edge ps` lists them)")
        servers = [match]
    elif not servers:
        say(a, "no resident server is running")
        return 0
    elif len(servers) > 1 and not a.all:
        raise OptionError(f"{len(servers)} resident servers are running: name one with --bundle, or stop them "
                          "all with --all (`qwenvl-edge ps` lists them)")
    failed = [s for s in servers if not _stop(a, s)]
    if failed:
        raise QwenVLError(f"{', '.join(f'pid {s.pid}' for s in failed)} did not stop within {STOP_TIMEOUT_S:g} s "
                          "(kill -9 ends it)")
    return 0


def _stop(a: argparse.Namespace, s: registry.Server) -> bool:
    """SIGTERM, then wait until the server lets go of its state file (it does as it exits)."""
    try:
        os.kill(s.pid, signal.SIGTERM)
    except ProcessLookupError:
        return True  # gone between the listing and now
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while registry.held(s.path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    say(a, f"stopped the server on {s.url} (pid {s.pid}, bundle {s.bundle})")
    return True


# --- run and chat through a resident server -------------------------------------------------------

def resident_for(a: argparse.Namespace, command: str) -> ResidentClient | None:
    """A client of the live server on this bundle when it can answer as this process would; else None
    (with ``-v``: why the model loads here)."""
    server, reason = _usable(a, command)
    if server is None:
        note(a, f"loading the model in this process ({reason})")
        return None
    note(a, f"using the resident server on {server.url} (pid {server.pid})")
    return ResidentClient(server, a.seed)


def _usable(a: argparse.Namespace, command: str) -> tuple[registry.Server | None, str]:
    if getattr(a, "no_resident", False) or os.environ.get(ENV_NO_RESIDENT, "").strip() not in ("", "0"):
        return None, "--no-resident" if getattr(a, "no_resident", False) else f"${ENV_NO_RESIDENT} is set"
    folder = bundle_folder(a)
    server = registry.server_for(folder)
    if server is None:
        return None, "no resident server runs on this bundle"
    if server.manifest_sha256 is None or server.manifest_sha256 != registry.manifest_sha256(folder):
        return None, f"the resident server on {server.url} has another export of this bundle loaded"
    for problem in _options_it_cannot_honour(a, command, server):
        return None, f"the resident server on {server.url} cannot honour {problem}"
    if health(server.url) != 200:
        return None, f"the resident server on {server.url} does not answer /health"
    return server, ""


def _options_it_cannot_honour(a: argparse.Namespace, command: str, server: registry.Server) -> Iterator[str]:
    if server.info.get("api_key"):
        yield "this request: it needs an API key"
    if command == "run" and getattr(a, "json", False):
        yield "--json (token ids and engine timings stay in the server)"
    if command == "run" and getattr(a, "batch", None) is not None:
        yield "--batch"
    if getattr(a, "no_cache", False):
        yield "--no-cache (it keeps image rows in its disk cache)"
    if a.n_ctx != server.info.get("n_ctx"):
        yield f"--n-ctx {a.n_ctx} (it runs with {server.info.get('n_ctx')})"


def answer(a: argparse.Namespace, images: list[str], question: str, extra: dict) -> RemoteResult | None:
    """``run``'s answer streamed to stdout by the resident server, or None: nothing printed, load here."""
    client = resident_for(a, "run")
    if client is None:
        return None
    try:
        pieces = client.generate(images, question, **sampling(a), **extra)
    except Refused as e:
        note(a, f"loading the model in this process (the resident server on {client.url} refused: {e})")
        return None
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return client.last_result


def show_timings(a: argparse.Namespace, result: Any) -> None:
    """The timings line on stderr: the engine's, or what a client of the resident server can measure."""
    if not isinstance(result, RemoteResult):
        print_timings(a, result)
        return
    t = result.timings
    say(a, f"[resident server {result.url}: prompt {t.prompt_positions} pos ({t.reused_positions} re-used), "
           f"first token {t.ttft_s:.2f} s, decode {t.decode_tokens} tok at {t.decode_tok_s:.1f} tok/s]")


@dataclass
class RemoteTimings:
    """What the client sees of a generation: the usage counts and its own clock."""

    ttft_s: float = 0.0
    decode_s: float = 0.0
    decode_tokens: int = 0
    prompt_positions: int = 0
    reused_positions: int = 0

    @property
    def decode_tok_s(self) -> float:
        return (self.decode_tokens - 1) / self.decode_s if self.decode_tokens > 1 and self.decode_s > 0 else 0.0


@dataclass
class RemoteResult:
    """An answer from the resident server, with what ``run`` and ``chat`` read of a ``GenerationResult``."""

    url: str
    text: str
    finish_reason: str | None
    boxes: list = field(default_factory=list)
    timings: RemoteTimings = field(default_factory=RemoteTimings)


def data_url(path: str) -> str:
    """The file inline (the server sniffs and checks its type: no MIME guessed from the name)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise Refused(f"{path}: {e.strerror or e}") from None
    return "data:;base64," + base64.b64encode(data).decode("ascii")


def user_message(question: str, images: list[str]) -> dict:
    if not images:
        return {"role": "user", "content": question}
    parts = [{"type": "image_url", "image_url": {"url": data_url(str(p))}} for p in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": question}]}


class ResidentClient:
    """What ``run`` and ``chat`` use of ``QwenVL`` (``generate``, ``chat``, ``reset``, ``last_result``), answered
    by the resident server; a chat resends its earlier turns, whose KV prefix the server keeps."""

    def __init__(self, server: registry.Server, seed: int | None):
        self.server = server
        self.url = server.url
        self.seed = seed
        self.messages: list[dict] = []
        self.last_result: RemoteResult | None = None

    def __enter__(self) -> ResidentClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to free here: the model stays in the server."""

    def reset(self) -> None:
        self.messages = []

    def generate(self, images: list[str], question: str, stream: bool = True, **kwargs: Any) -> Iterator[str]:
        return self._complete([user_message(question, images)], **kwargs)

    def chat(self, question: str, images: list[str] = (), stream: bool = True, **kwargs: Any) -> Iterator[str]:
        user = user_message(question, list(images))
        pieces = self._complete([*self.messages, user], **kwargs)

        def remembered() -> Iterator[str]:
            yield from pieces
            self.messages += [user, {"role": "assistant", "content": self.last_result.text}]
        return remembered()

    def _complete(self, messages: list[dict], max_tokens: int | None = None, temperature: float | None = None,
                  top_p: float | None = None, response_format: dict | None = None) -> Iterator[str]:
        """Send the request now (a refusal raises ``Refused`` here, before any text); the pieces follow."""
        body: dict[str, Any] = {"messages": messages, "stream": True, "stream_options": {"include_usage": True}}
        for key, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p),
                           ("seed", self.seed), ("response_format", response_format)):
            if value is not None:
                body[key] = value
        started = time.monotonic()
        conn = _connection(self.url, READ_TIMEOUT_S)
        try:
            conn.request("POST", "/v1/chat/completions", json.dumps(body, ensure_ascii=False).encode(),
                         {"Content-Type": "application/json", "Accept": "text/event-stream"})
            resp = conn.getresponse()  # the server answers once the first token is out
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise Refused(f"cannot reach it ({getattr(e, 'strerror', None) or e})") from None
        if resp.status != 200:
            message = _error_message(resp)
            conn.close()
            raise Refused(f"HTTP {resp.status}: {message}")
        return self._pieces(conn, resp, started)

    def _pieces(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse,
                started: float) -> Iterator[str]:
        text: list[str] = []
        result = RemoteResult(self.url, "", None)
        first_at = None
        try:
            for event in _events(resp):
                if "error" in event:
                    raise QwenVLError(f"the resident server failed: {(event['error'] or {}).get('message')}")
                usage = event.get("usage")
                if usage:
                    result.timings.prompt_positions = usage.get("prompt_tokens", 0)
                    result.timings.decode_tokens = usage.get("completion_tokens", 0)
                    result.timings.reused_positions = (usage.get("prompt_tokens_details") or {}).get(
                        "cached_tokens", 0)
                for choice in event.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        first_at = first_at or time.monotonic()
                        text.append(piece)
                        yield piece
                    if choice.get("finish_reason"):
                        result.finish_reason = choice["finish_reason"]
                        result.boxes = [_box(b) for b in choice.get("boxes") or ()]
        finally:
            conn.close()  # also what tells the server to stop, when the reader stops early (Ctrl-C in chat)
        ended = time.monotonic()
        result.text = "".join(text)
        result.timings.ttft_s = (first_at or ended) - started
        result.timings.decode_s = ended - (first_at or ended)
        self.last_result = result


def _events(resp: http.client.HTTPResponse) -> Iterator[dict]:
    """The JSON of each ``data:`` line until ``[DONE]``."""
    for raw in resp:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        yield json.loads(data)


def _error_message(resp: http.client.HTTPResponse) -> str:
    try:
        return str(json.loads(resp.read())["error"]["message"])
    except (ValueError, KeyError, TypeError, OSError, http.client.HTTPException):
        return resp.reason or "error"


def _box(entry: dict) -> Any:
    from qwenvl_edge.runtime.boxes import Box

    return Box(entry["label"], tuple(entry["norm"]), tuple(entry["pixels"]))


def chat_client(a: argparse.Namespace) -> ResidentClient | None:
    """``chat``'s model when a resident server can take the conversation (else None: load here)."""
    return resident_for(a, "chat")
