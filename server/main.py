"""``qwenvl-edge serve``: bind the port, start uvicorn at once, load the bundle behind it.

The port is bound and the bundle's manifest checked before anything slow, so a wrong folder or a
port in use is one line on stderr, not a server that never answers. The model then loads on a
thread while ``/health`` says 503; if loading fails, the server stops and the command exits 2.
Each server claims its bundle's state file first (``registry``: one server per bundle, found by ``run``,
``chat``, ``ps`` and ``stop``) and serves a ``keepalive.ResidentModel``, which unloads the engine after
``--keep-alive`` idle seconds and loads it again for the next request.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import os
import re
import signal
import socket
import sys
import time

from qwenvl_edge import validate
from qwenvl_edge.errors import QwenVLError
from qwenvl_edge.server import registry
from qwenvl_edge.server.keepalive import DEFAULT_KEEP_ALIVE, ResidentModel, add_status_route, parse_keep_alive
from qwenvl_edge.server.options import config_from_args

log = logging.getLogger("qwenvl_edge.server")
ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s?#]+")  # what a browser sends in Origin: no path, no slash


def cmd_serve(a: argparse.Namespace) -> int:
    try:
        import uvicorn  # noqa: F401 -- the extra's presence, checked before anything else

        from qwenvl_edge.server.app import create_app  # noqa: F401
    except ImportError as e:
        raise QwenVLError(f"serve needs the server extra ({e.name} is not installed): "
                          "pip install 'qwenvl-edge[server]'") from None
    from qwenvl_edge.runtime.bundle import Bundle

    _check(a)
    config = config_from_args(a)
    bundle = Bundle.open(a.bundle)  # a wrong folder is reported now, before the port opens
    config = dataclasses.replace(config, parallel=a.parallel or default_parallel(bundle, a.n_ctx))
    claim = registry.claim(bundle.folder)  # one server per bundle: a second one is refused here (exit 2)
    try:
        return _serve(a, config, bundle, claim)
    finally:
        claim.release()


def _serve(a: argparse.Namespace, config, bundle, claim: registry.Claim) -> int:
    """Bind, publish this server in its state file, serve until SIGINT / SIGTERM."""
    import uvicorn

    from qwenvl_edge.server.app import create_app

    sock = _bind(a.host, a.port)
    failures: list[BaseException] = []
    keep_alive = getattr(a, "keep_alive", parse_keep_alive(DEFAULT_KEEP_ALIVE))

    def load_model():
        return ResidentModel(lambda: open_engine(bundle.folder, n_threads=a.threads, n_ctx=a.n_ctx,
                                                 verbose=a.verbose, parallel=config.parallel), keep_alive)

    def load_failed(e: BaseException) -> None:
        failures.append(e)
        server.should_exit = True

    # a server reports what it does (load time, clients that left) unless asked to be quiet
    log.setLevel(logging.DEBUG if a.verbose else logging.ERROR if a.quiet else logging.INFO)
    app = create_app(config, load_model, load_failed)
    add_status_route(app, config.model_id)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            """SIGINT / SIGTERM: stop every request at once (open streams end with an error event, waiting
            and running requests get 503), so uvicorn's graceful shutdown has nothing long to wait for."""
            app.state.server.scheduler.begin_shutdown()
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, log_level="warning" if a.quiet else "info", lifespan="on",
                                   timeout_graceful_shutdown=3))
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    claim.publish(_state(a, bundle.folder, host, port, keep_alive))
    together = f"{config.parallel} requests decoded together" if config.parallel > 1 else "one request at a time"
    print(f"qwenvl-edge: serving {config.model_id} on http://{shown}:{port} ({together}; page at /, API at /v1, "
          f"loading the model: /health answers 503 until it is ready)", file=sys.stderr, flush=True)
    # uvicorn stops gracefully on SIGINT / SIGTERM, then raises the signal again: both end here with 0
    signal.signal(signal.SIGTERM, _interrupt)
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock])
    print("qwenvl-edge: server stopped", file=sys.stderr)
    if failures:
        e = failures[0]
        raise e if isinstance(e, QwenVLError) else QwenVLError(f"loading the model failed: {e}")
    return 0


def _state(a: argparse.Namespace, folder, host: str, port: int, keep_alive: float | None) -> dict:
    """What ``run``, ``chat``, ``ps`` and ``stop`` read from the state file (never the API key itself)."""
    near = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # where this machine's clients connect
    url_host = f"[{near}]" if ":" in near else near
    return {"pid": os.getpid(), "url": f"http://{url_host}:{port}", "host": host, "port": port,
            "bundle": str(folder.expanduser().resolve()), "manifest_sha256": registry.manifest_sha256(folder),
            "model": a.model_name, "n_ctx": a.n_ctx, "keep_alive_s": keep_alive, "api_key": a.api_key is not None,
            "started": time.time(), "log": getattr(a, "log_file", None)}


def default_parallel(bundle, n_ctx: int) -> int:
    """``--parallel``'s default: as many sequences as fit in the memory available now, at most 4."""
    from qwenvl_edge.runtime.memory import sequences_that_fit
    from qwenvl_edge.runtime.parallel import MOST

    return sequences_that_fit(bundle, n_ctx, MOST)


def open_engine(bundle_dir, parallel: int = 1, **kwargs):
    """The engine, ready: one token through the public API loads the decoder now rather than on the
    first request, and leaves the system prompt's KV prefix in place for it. With ``parallel`` > 1, the
    batched engine: that many requests decoded together."""
    from qwenvl_edge.runtime.parallel import ParallelQwenVL
    from qwenvl_edge.runtime.pipeline import QwenVL

    model = ParallelQwenVL(bundle_dir, parallel, **kwargs) if parallel > 1 else QwenVL(bundle_dir, **kwargs)
    try:
        model.create_chat_completion([{"role": "user", "content": "Hello"}], max_tokens=1, temperature=0)
    except BaseException:
        model.close()
        raise
    return model


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def _check(a: argparse.Namespace) -> None:
    """The options' values, before anything starts (one line each, as the CLI prints errors)."""
    validate.n_ctx(a.n_ctx)
    validate.n_threads(a.threads)
    for name in ("max_images", "max_image_pixels", "max_body_mb", "request_timeout", "remote_max_mb", "remote_timeout"):
        value = getattr(a, name)
        if not (math.isfinite(value) and value > 0):
            raise QwenVLError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    if a.max_queue < 0:
        raise QwenVLError(f"--max-queue must be 0 or more, got {a.max_queue}")
    if a.parallel is not None:
        import llama_cpp

        most = llama_cpp.llama_max_parallel_sequences()  # llama.cpp's own ceiling on a context's sequences
        if a.parallel > most:
            raise QwenVLError(f"--parallel {a.parallel}: llama.cpp decodes at most {most} sequences together")
    if a.media_dir is not None and not a.media_dir.expanduser().is_dir():
        raise QwenVLError(f"--media-dir {a.media_dir}: not a folder")
    if a.api_key is not None and not a.api_key.strip():
        raise QwenVLError("--api-key is empty")
    for origin in a.cors_origin or ():
        if origin != "*" and not ORIGIN.fullmatch(origin):
            raise QwenVLError(f"--cors-origin {origin!r}: an origin is * or scheme://host[:port], with no path")


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (0 picks a free port), or a one-line error."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except (OSError, UnicodeError, OverflowError) as e:
        raise QwenVLError(f"cannot listen on {host}:{port} ({getattr(e, 'strerror', None) or e})") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock
