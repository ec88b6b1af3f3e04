"""Real servers for the server tests: ``qwenvl-edge serve`` in a child process on a free port, and a
plain HTTP server on 127.0.0.1 that serves images to the remote-image checks.

Nothing here is a stand-in: the child is the installed command line with the real engine, and its
memory and log are read from the outside, as an operator would.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

SERVING = re.compile(r"serving \S+ on (http://\S+?:\d+)")
API_KEY = "sk-test-key"


def require_tool(path: str, what: str) -> str:
    """The tool's path; a missing tool skips the test, or fails it under CI=true."""
    found = shutil.which(path)
    if found is None:
        message = f"{what} ({path}) is not installed: apt-get install chromium chromium-driver"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


class ServerProcess:
    """``qwenvl-edge serve --port 0 ...`` in a child process, with its home and cache in ``folder``."""

    def __init__(self, bundle: Path, folder: Path, *args: str, ready_timeout_s: float = 180):
        folder.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HOME": str(folder / "home"), "XDG_CACHE_HOME": str(folder / "cache"),
               "NO_PROXY": "*", "PYTHONUNBUFFERED": "1"}
        self.log_path = folder / "server.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 -- open for the child's whole life
        cmd = [sys.executable, "-m", "qwenvl_edge.cli", "serve", "--bundle", str(bundle), "--port", "0",
               "--threads", "1", *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.url = self._wait_for_url(ready_timeout_s)
        self._wait_healthy(ready_timeout_s)

    def _wait_for_url(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            m = SERVING.search(self.log())
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the server did not start:\n{self.log()}")

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the server never became healthy:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def rss_bytes(self) -> int:
        """The child's resident memory, from /proc (what ``ps`` shows as RSS)."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def module_server(bundle: Path, tmp_path_factory: pytest.TempPathFactory, name: str):
    """A module fixture's body: a server on ``bundle``, yielded, then stopped cleanly with no traceback in its
    log (``yield from module_server(...)``)."""
    s = ServerProcess(bundle, tmp_path_factory.mktemp(name))
    yield s
    assert s.stop() == 0
    assert "Traceback" not in s.log(), s.log()


class ImageHost:
    """A plain HTTP server on 127.0.0.1 serving files from a folder; ``/slow/NAME`` answers after
    ``delay_s`` (for the fetch timeout). Only the loopback address is ever used."""

    def __init__(self, folder: Path, delay_s: float = 3.0):
        delay = delay_s

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def do_GET(self):  # noqa: N802 -- the stdlib's name
                if self.path.startswith("/slow/"):
                    time.sleep(delay)
                    self.path = self.path[len("/slow"):]
                super().do_GET()

            def copyfile(self, source, outputfile):
                # the server stops reading at its size cap: what the test wants
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    super().copyfile(source, outputfile)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class InProcessServer:
    """``create_app`` under a real uvicorn on a free port of 127.0.0.1, in this process (for a
    configuration the command line does not offer, e.g. a model load the test holds back)."""

    def __init__(self, config, load_model):
        import socket

        import uvicorn

        from qwenvl_edge.server.app import create_app

        self.load_errors: list[BaseException] = []
        app = create_app(config, load_model, self.load_errors.append)
        self.state = app.state.server  # .model: the engine, once loaded
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
        self.sock.close()
