"""Many users on one CPU: ``serve --parallel 4`` against one client, and ``run`` through a resident server.

1. **Batched decoding.** One server (``--parallel 4``). One client alone, then four at once, each asking
   a different text question for ``--tokens`` greedy tokens (the random model never stops early), streamed.
   A client's decode rate is its tokens after the first over the time from its first to its last token;
   the aggregate rate of the four is all their tokens over the time from the first first-token to the last
   token. ``serve_parallel4_throughput_ratio`` = aggregate / alone, medians of ``--rounds`` rounds, every
   client's time to first token kept.
2. **A resident model.** ``qwenvl-edge run PHOTO QUESTION`` in a fresh process with an empty store and no
   server (as today), then twice through the running server (``run`` finds it by the bundle): the first
   pays the image encode and prefill in the server, the second reuses both. Each is timed from process
   start to the first answer byte. ``ttft_second_run_resident_ratio`` = second resident / fresh process.

Run alone on the machine (load average below 0.5 at the start, recorded)::

    python -m benchmarks.bench_serve_parallel BUNDLE [--threads 2] [--tokens 32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.bench_native_vs_python import machine, timed
from benchmarks.bench_server import _ask, _start
from benchmarks.process_stats import _rss_bytes

HERE = Path(__file__).resolve().parent
QUESTIONS = ["Tell me a story about the sea.", "Describe a walk in the mountains.", "Write about a city at night.",
             "Explain how a river reaches the sea."]
PHOTO_QUESTION = "What is written on the sign? Describe the picture."


def stream(url: str, question: str, tokens: int) -> dict:
    """One streamed greedy answer: its first and last token's arrival, completion tokens, time to first token."""
    r = _ask(url, [{"role": "user", "content": question}], tokens)
    n = r["usage"].get("completion_tokens", len(r["arrivals"]))
    return {"first": r["arrivals"][0], "last": r["arrivals"][-1], "tokens": n, "ttft_s": r["ttft_s"]}


def clients(url: str, n: int, tokens: int) -> list[dict]:
    """``n`` clients at once, each its own question; their answers' timestamps."""
    out: list[dict | None] = [None] * n
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            out[i] = stream(url, QUESTIONS[i % len(QUESTIONS)], tokens)
        except BaseException as e:  # noqa: BLE001 - raised below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out  # type: ignore[return-value]


def rate(rows: list[dict]) -> float:
    """Tokens per second over the span of decoding: all tokens after each first one, first first to last last."""
    span = max(r["last"] for r in rows) - min(r["first"] for r in rows)
    return sum(r["tokens"] - 1 for r in rows) / span if span > 0 else 0.0


def batched(url: str, tokens: int, rounds: int) -> dict:
    alone, four, ttfts = [], [], []
    for _ in range(rounds):
        alone.append(rate([stream(url, QUESTIONS[0], tokens)]))
        rows = clients(url, 4, tokens)
        four.append(rate(rows))
        ttfts.append([r["ttft_s"] for r in rows])
    one, agg = statistics.median(alone), statistics.median(four)
    return {"serve_alone_decode_tok_s": one, "serve_parallel4_aggregate_tok_s": agg,
            "serve_parallel4_throughput_ratio": agg / one, "serve_parallel4_client_ttft_s": ttfts,
            "serve_parallel4_rounds_tok_s": {"alone": alone, "four": four}}


def run_cmd(bundle: Path, photo: Path, tokens: int, threads: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qwenvl_edge.cli", "run", "--bundle", str(bundle), "--greedy", "--max-tokens",
            str(tokens), "--threads", str(threads), "-v", *extra, str(photo), PHOTO_QUESTION]


def resident(bundle: Path, photo: Path, tokens: int, threads: int, env: dict, url: str) -> dict:
    cold = timed(run_cmd(bundle, photo, tokens, threads, "--no-resident"),
                 {**env, "XDG_CACHE_HOME": tempfile.mkdtemp(prefix="cold-store-")})
    first = timed(run_cmd(bundle, photo, tokens, threads), env)
    second = timed(run_cmd(bundle, photo, tokens, threads), env)
    for row in (first, second):
        if f"resident server on {url}" not in row["stderr"]:
            raise RuntimeError(f"run did not use the resident server: {row['stderr'][-400:]}")
    same = cold["stdout"] == first["stdout"] == second["stdout"]
    return {"run_fresh_process_ttft_s": cold["ttft_s"], "run_resident_first_ttft_s": first["ttft_s"],
            "run_resident_second_ttft_s": second["ttft_s"],
            "ttft_second_run_resident_ratio": second["ttft_s"] / cold["ttft_s"],
            "ttft_second_over_first_resident": second["ttft_s"] / first["ttft_s"], "resident_same_answer": same}


def measure(bundle: Path, threads: int, tokens: int, rounds: int) -> dict:
    out: dict = {"machine": machine(), "threads": threads, "tokens": tokens, "rounds": rounds}
    from qwenvl_edge.quant.calibration import generate_images

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        photo = folder / "photo.png"
        generate_images(1, seed=4321)[0].save(photo)
        env = {**os.environ, "HOME": str(folder), "XDG_CACHE_HOME": str(folder / "cache"),
               "XDG_STATE_HOME": str(folder / "state")}
        env.pop("QWENVL_EDGE_NO_RESIDENT", None)
        started = time.monotonic()
        proc, url = _start(bundle, threads, folder, "--parallel", "4", "--keep-alive", "never")
        out["server_ready_s"] = time.monotonic() - started
        try:
            out.update(batched(url, tokens, rounds))
            out["server_rss_gb"] = _rss_bytes(proc.pid) / 1e9
            out.update(resident(bundle, photo, tokens, threads, env, url))
        finally:
            proc.terminate()
            proc.wait(timeout=120)
    return out


def section(out: dict) -> str:
    ttfts = ", ".join(f"{t:.1f}" for t in sorted(out["serve_parallel4_client_ttft_s"][-1]))
    return "\n".join([
        "## Many users: `serve --parallel 4` and a resident model", "",
        f"Measured alone: load average {out['machine']['loadavg_start'][0]:.2f} at the start, "
        f"{out['threads']} threads, {out['tokens']} greedy tokens per answer, medians of {out['rounds']} rounds.", "",
        "| figure | value |", "| --- | --- |",
        f"| one client, decode | {out['serve_alone_decode_tok_s']:.2f} tok/s |",
        f"| four clients at once, aggregate decode | {out['serve_parallel4_aggregate_tok_s']:.2f} tok/s |",
        f"| `serve_parallel4_throughput_ratio` (target >= 2.5) | **{out['serve_parallel4_throughput_ratio']:.2f}** |",
        f"| four clients' first tokens (last round) | {ttfts} s |",
        f"| `run` in a fresh process, first token | {out['run_fresh_process_ttft_s']:.2f} s |",
        f"| `run` through the resident server, first time | {out['run_resident_first_ttft_s']:.2f} s |",
        f"| `run` through the resident server, same photo again | {out['run_resident_second_ttft_s']:.2f} s |",
        f"| `ttft_second_run_resident_ratio` (target <= 0.05) | **{out['ttft_second_run_resident_ratio']:.3f}** |",
        f"| same answer all three ways | {out['resident_same_answer']} |", ""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--results", type=Path, default=HERE / "results.json", help="merged into this results.json")
    ap.add_argument("--markdown", type=Path, default=HERE / "serve_parallel.md")
    a = ap.parse_args(argv)
    out = measure(a.bundle, a.threads, a.tokens, a.rounds)
    results = json.loads(a.results.read_text()) if a.results.is_file() else {}
    results["serve_parallel"] = out
    for key in ("serve_parallel4_throughput_ratio", "ttft_second_run_resident_ratio"):
        results[key] = out[key]
    a.results.write_text(json.dumps(results, indent=2) + "\n")
    a.markdown.write_text(section(out))
    if "export" in results:  # a full run's results.json: RESULTS.md gets this section and the targets
        from benchmarks.report import write_report

        write_report(results, a.results.parent)
    print(json.dumps({k: v for k, v in out.items() if k != "machine"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
