"""``qwenvl-edge serve`` as a chat app uses it: time to the first streamed token for a question about a
new photo, then for a follow-up about the same photo with the whole conversation resent.

The server runs in its own process (started once, like a user would); each run uses a photo it
has never seen, so the first question pays encode + prefill and the follow-up only its new tokens.
Times are measured at the client, from sending the request to the first content byte. The ratio
follow-up / first is measured in the same run, on the same server.

    python -m benchmarks.bench_server BUNDLE --runs 3 --json out.json
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.measure_cli import measure_main
from benchmarks.process_stats import _rss_bytes

MAX_TOKENS = 16
FIRST = "What is written on the sign? Describe the picture."
FOLLOW_UP = "What colour is the sign?"


def _photos(n: int) -> list[str]:
    from qwenvl_edge.quant.calibration import generate_images

    uris = []
    for image in generate_images(n, seed=1234):
        buf = io.BytesIO()
        image.save(buf, "PNG")
        uris.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return uris


def _ask(url: str, messages: list[dict], max_tokens: int = MAX_TOKENS) -> dict:
    """One streamed greedy answer: time to first content byte, the text, usage, and when each content chunk
    arrived (``time.perf_counter``)."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    arrivals, text, usage = [], [], None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                piece = choice["delta"].get("content")
                if piece:
                    arrivals.append(time.perf_counter())
                    text.append(piece)
    return {"ttft_s": arrivals[0] - started if arrivals else None, "wall_s": time.perf_counter() - started,
            "text": "".join(text), "usage": usage or {}, "started": started, "arrivals": arrivals}


def _start(bundle: Path, threads: int | None, folder: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """``qwenvl-edge serve`` with its home, cache and state in ``folder``; returns once /health answers."""
    env = {**os.environ, "XDG_CACHE_HOME": str(folder / "cache"), "HOME": str(folder),
           "XDG_STATE_HOME": str(folder / "state")}
    cmd = [sys.executable, "-m", "qwenvl_edge.cli", "serve", "--bundle", str(bundle), "--port", "0", *extra]
    cmd += ["--threads", str(threads)] if threads else []
    log = open(folder / "server.log", "wb")  # noqa: SIM115 -- the child writes it for its whole life
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 1800
    url = None
    while time.monotonic() < deadline and proc.poll() is None:
        if url is None:
            m = re.search(r"on (http://\S+?:\d+)", (folder / "server.log").read_text(errors="replace"))
            url = m.group(1) if m else None
        elif httpx.get(url + "/health", timeout=10).status_code == 200:
            return proc, url
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server did not start: {(folder / 'server.log').read_text(errors='replace')[-2000:]}")


def measure(bundle: Path, runs: int, threads: int | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        proc, url = _start(bundle, threads, Path(tmp))
        ready_s = time.perf_counter() - started
        try:
            rows = []
            for photo in _photos(runs):
                question = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": photo}},
                                                         {"type": "text", "text": FIRST}]}]
                first = _ask(url, question)
                follow = _ask(url, [*question, {"role": "assistant", "content": first["text"]},
                                    {"role": "user", "content": FOLLOW_UP}])
                rows.append((first, follow))
            rss = _rss_bytes(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    first_s = statistics.median(f["ttft_s"] for f, _ in rows)
    follow_s = statistics.median(g["ttft_s"] for _, g in rows)
    usage = rows[-1][1]["usage"]
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    return {"server_ready_s": ready_s, "server_first_ttft_s": first_s, "server_followup_ttft_s": follow_s,
            "server_followup_ttft_ratio": follow_s / first_s,
            "server_followup_prompt_tokens": usage.get("prompt_tokens"), "server_followup_cached_tokens": cached,
            "server_rss_gb": rss / 1e9}


if __name__ == "__main__":
    raise SystemExit(measure_main(measure))
