"""``GET /metrics``: what the server has done, in Prometheus' text format (version 0.0.4), written by hand.

Counters only grow while the process lives; gauges are read when scraped. The engine's work is
taken from each finished generation's ``Timings`` (a request stopped half-way adds nothing);
requests are counted by endpoint and status code as they are answered, refusals included.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from typing import Any

ENDPOINTS = ("/v1/chat/completions", "/v1/models", "/health", "/metrics", "/")

# name -> (type, help); Timings field (or None: kept by the server) in ENGINE below
HELP = {
    "qwenvl_requests_total": ("counter", "HTTP requests answered, by endpoint and status code"),
    "qwenvl_queue_depth": ("gauge", "requests waiting for the decoder"),
    "qwenvl_sequences_running": ("gauge", "generations running now, each on its own sequence"),
    "qwenvl_sequences_max": ("gauge", "generations that can run together (serve --parallel)"),
    "qwenvl_generations_total": ("counter", "generations that ran to their end"),
    "qwenvl_image_encode_seconds_total": ("counter", "seconds spent encoding images"),
    "qwenvl_images_encoded_total": ("counter", "images encoded by the vision model"),
    "qwenvl_prefill_tokens_total": ("counter", "prompt positions evaluated (image rows included)"),
    "qwenvl_prefill_seconds_total": ("counter", "seconds spent evaluating prompts"),
    "qwenvl_decode_tokens_total": ("counter", "tokens generated"),
    "qwenvl_decode_seconds_total": ("counter", "seconds spent generating tokens"),
    "qwenvl_reused_positions_total": ("counter", "prompt positions kept in the KV cache or restored"),
    "qwenvl_cache_hits_total": ("counter", "cache hits: kind=rows (an image's rows from the cache), "
                                "kind=prefix (a prompt's KV state restored from the store)"),
    "qwenvl_resident_memory_bytes": ("gauge", "resident memory of the server process"),
}
ENGINE = {"qwenvl_image_encode_seconds_total": "image_encode_s", "qwenvl_images_encoded_total": "images_encoded",
          "qwenvl_prefill_tokens_total": "prefill_positions", "qwenvl_prefill_seconds_total": "prefill_s",
          "qwenvl_decode_tokens_total": "decode_tokens", "qwenvl_decode_seconds_total": "decode_s",
          "qwenvl_reused_positions_total": "reused_positions"}


class Metrics:
    """The counters; ``observe`` runs on the decoder thread, ``count`` on the event loop, ``render`` on either."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.engine: dict[str, float] = dict.fromkeys(ENGINE, 0.0)
        self.generations = 0
        self.hits: Counter[str] = Counter({"rows": 0, "prefix": 0})

    def count(self, path: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint(path), status)] += 1

    def observe(self, timings: Any) -> None:
        """Add one finished generation's ``Timings``."""
        with self._lock:
            self.generations += 1
            for name, field in ENGINE.items():
                self.engine[name] += getattr(timings, field)
            self.hits["rows"] += timings.images_from_cache
            self.hits["prefix"] += 1 if timings.restored_positions else 0

    def render(self, waiting: int, running: int, most: int = 1) -> str:
        with self._lock:
            samples: dict[str, list[tuple[str, float]]] = {
                "qwenvl_requests_total": [(f'{{endpoint="{e}",code="{c}"}}', n)
                                          for (e, c), n in sorted(self.requests.items())],
                "qwenvl_queue_depth": [("", waiting)],
                "qwenvl_sequences_running": [("", running)],
                "qwenvl_sequences_max": [("", most)],
                "qwenvl_generations_total": [("", self.generations)],
                **{name: [("", value)] for name, value in self.engine.items()},
                "qwenvl_cache_hits_total": [(f'{{kind="{k}"}}', n) for k, n in sorted(self.hits.items())],
            }
        rss = resident_bytes()
        if rss is not None:
            samples["qwenvl_resident_memory_bytes"] = [("", rss)]
        lines = []
        for name, values in samples.items():
            kind, text = HELP[name]
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            lines += [f"{name}{labels} {_number(v)}" for labels, v in values]
        return "\n".join(lines) + "\n"


def endpoint(path: str) -> str:
    """A request path as a label with few values (an id in the path would make one series per id)."""
    if path.startswith("/v1/models"):
        return "/v1/models"
    if path.startswith("/static/"):
        return "/static"
    return path if path in ENDPOINTS else "other"


def resident_bytes() -> int | None:
    """This process's resident memory (``/proc/self/statm``); None where there is no /proc."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


class CountRequests:
    """Pure ASGI middleware (outermost): counts every answered request by endpoint and status; a request
    that raised before answering is counted as the 500 the server then sends."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: list[int] = []

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except BaseException:
            if not status:
                status.append(500)
            raise
        finally:
            self.metrics.count(scope.get("path", ""), status[0] if status else 499)
