"""``qwenvl-native run`` against ``qwenvl-edge run`` on the same bundle and photo (issue 26): is native as fast?

Each run is a fresh process with an empty store (``XDG_CACHE_HOME`` in a new temp folder, ``--no-resident``):
``qwenvl-native run BUNDLE IMAGE QUESTION --greedy --max-tokens N --threads T --stats`` and
``qwenvl-edge run --bundle BUNDLE --greedy --max-tokens N --threads T --no-resident IMAGE QUESTION``, in
interleaved rounds (the order swaps each round: a shared machine's load drifts). Both are timed the same way,
from outside: time to first token = process start to the first answer byte on stdout; decode tok/s = (tokens - 1)
/ (last answer byte - first answer byte), tokens as each process reports them; peak RSS from ``wait4``. Each
process's own figures (load, encode, prefill) are kept beside them. With ``--busy`` every pair is measured again
beside one process spinning one core (a third process that wants the CPU: the threads must not collapse).

Writes ``native_vs_python`` and the flat keys ``native_vs_python_decode_ratio`` (native / Python tok/s, target
>= 0.95) and ``native_vs_python_ttft_ratio`` (native / Python first token, target <= 1.05), ``..._busy`` with
``--busy``, into benchmarks/results.json (merged), and its RESULTS.md section into benchmarks/native_vs_python.md::

    python -m benchmarks.bench_native_vs_python BUNDLE IMAGE --threads 2 --rounds 3 --busy
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BINARY = REPO / "native-build" / "host" / "qwenvl-native"
QUESTION = "Describe this picture."
TOKENS = 32
DECODE_TARGET = 0.95  # native decode tok/s >= 0.95 x Python's
TTFT_TARGET = 1.05  # native time to first token <= 1.05 x Python's
PY_TIMINGS = re.compile(r"\[load ([\d.]+) s, image encode ([\d.]+) s .*?prefill (\d+) pos in ([\d.]+) s, "
                        r"first token ([\d.]+) s, decode (\d+) tok at ([\d.]+) tok/s\]")
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                "avx512_bf16", "amx_tile", "asimd", "asimddp", "i8mm", "sve")


def commands(binary: Path, bundle: Path, image: Path, question: str, threads: int, tokens: int) -> dict:
    """The two command lines, same bundle, photo, question, threads and greedy tokens."""
    common = ["--greedy", "--max-tokens", str(tokens), "--threads", str(threads)]
    return {"native": [str(binary), "run", str(bundle), str(image), question, *common, "--stats"],
            "python": [sys.executable, "-m", "qwenvl_edge.cli", "run", "--bundle", str(bundle), *common,
                       "--no-resident", str(image), question]}


def timed(cmd: list[str], env: dict) -> dict:
    """Start to first stdout byte, first to last stdout byte, the whole wall time, peak RSS and stderr."""
    with tempfile.TemporaryFile() as err:
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
        chunks: list[bytes] = []
        first = last = None
        while True:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            now = time.monotonic()
            first = now if first is None else first
            last = now
            chunks.append(chunk)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - started
        proc.stdout.close()
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or first is None:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited {code}: {stderr.strip()[-500:]}")
    return {"ttft_s": first - started, "stream_s": last - first, "wall_s": wall,
            "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9, "stdout": b"".join(chunks).decode(errors="replace"),
            "stderr": stderr}


def native_figures(stderr: str) -> dict:
    """The ``--stats`` JSON line ``qwenvl-native`` prints last."""
    stats = json.loads(stderr.strip().splitlines()[-1])
    return {"tokens": stats["n_tokens"], "own_ttft_s": stats["ttft_ms"] / 1e3,
            "own_decode_tok_s": stats["decode_tokens_per_s"], "vision_s": stats["vision_ms"] / 1e3,
            "decoder_load_s": stats["decoder_load_ms"] / 1e3, "decoder_wait_s": stats.get("decoder_wait_ms", 0) / 1e3,
            "prefill_s": stats["prefill_ms"] / 1e3, "prompt_positions": stats["n_prompt_positions"],
            "overlap": stats.get("overlap"), "load": stats.get("load"), "omp_spin": stats.get("omp_spin")}


def python_figures(stderr: str) -> dict:
    """The timings line ``qwenvl-edge run`` prints on stderr (its own clock starts at the call)."""
    m = PY_TIMINGS.search(stderr)
    if not m:
        raise RuntimeError(f"qwenvl-edge run printed no timings: {stderr.strip()[-300:]}")
    load, encode, positions, prefill, ttft, tokens, tok_s = m.groups()
    return {"tokens": int(tokens), "own_ttft_s": float(ttft), "own_decode_tok_s": float(tok_s),
            "decoder_load_s": float(load), "vision_s": float(encode), "prefill_s": float(prefill),
            "prompt_positions": int(positions)}


def measure_one(which: str, cmd: list[str], env: dict, work: Path) -> dict:
    """One fresh process with an empty store; decode tok/s from the answer's stream, timed from outside."""
    store = Path(tempfile.mkdtemp(prefix=f"store-{which}-", dir=work))
    try:
        out = timed(cmd, {**env, "XDG_CACHE_HOME": str(store)})
    finally:
        shutil.rmtree(store, ignore_errors=True)
    own = native_figures(out["stderr"]) if which == "native" else python_figures(out["stderr"])
    steps = own["tokens"] - 1  # the first token comes from the prefill's logits
    decode = steps / out["stream_s"] if steps > 0 and out["stream_s"] > 0 else 0.0
    return {"ttft_s": out["ttft_s"], "decode_tok_s": decode, "wall_s": out["wall_s"],
            "peak_rss_gb": out["peak_rss_gb"], **own, "answer": out["stdout"].rstrip("\n")}


class Busy:
    """One process spinning one core for as long as the block runs (``--busy``)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Busy:
        if self.enabled:
            self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(0.5)  # on the CPU before the measured process starts
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def median_row(samples: list[dict]) -> dict:
    """Median of each number over the rounds; the last round's answer and settings."""
    keys = [k for k, v in samples[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {**samples[-1], **{k: statistics.median(s[k] for s in samples) for k in keys}, "runs": len(samples)}


def compare(rows: dict) -> dict:
    native, python = rows["native"], rows["python"]
    return {"decode_ratio": native["decode_tok_s"] / python["decode_tok_s"] if python["decode_tok_s"] else None,
            "ttft_ratio": native["ttft_s"] / python["ttft_s"] if python["ttft_s"] else None,
            "same_answer": native["answer"] == python["answer"]}


def machine() -> dict:
    """Load average at the start, the CPU and its vector extensions (report.machine adds llama.cpp's build)."""
    flags: set[str] = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(("flags", "Features")):
            flags = set(line.split(":", 1)[1].split())
            break
    out = {"loadavg_start": list(os.getloadavg()), "cpu_vector_flags": [f for f in VECTOR_FLAGS if f in flags],
           "arch": os.uname().machine}
    try:
        from benchmarks.report import machine as report_machine

        out.update(report_machine())
    except Exception as e:  # noqa: BLE001 - the figures stay useful without the library versions
        out["machine_error"] = str(e)
    return out


def measure(binary: Path, bundle: Path, image: Path, question: str, threads: int, tokens: int, rounds: int,
            busy: bool, work: Path, env_extra: dict | None = None) -> dict:
    """Interleaved rounds of both commands, idle (and beside a busy process): medians and ratios."""
    cmds = commands(binary, bundle, image, question, threads, tokens)
    env = {**{k: v for k, v in os.environ.items() if k not in ("QWENVL_EDGE_OVERLAP",)}, **(env_extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    conditions = ["idle", "busy"] if busy else ["idle"]
    samples: dict = {c: {"native": [], "python": []} for c in conditions}
    for round_ in range(rounds):
        for condition in conditions:
            order = ("native", "python") if round_ % 2 == 0 else ("python", "native")
            for which in order:
                with Busy(condition == "busy"):
                    row = measure_one(which, cmds[which], env, work)
                print(json.dumps({"round": round_, "condition": condition, which: {
                    k: v for k, v in row.items() if k != "answer"}}), file=sys.stderr, flush=True)
                samples[condition][which].append(row)
    out: dict = {"threads": threads, "tokens": tokens, "rounds": rounds, "question": question,
                 "image": str(image), "commands": {k: " ".join(v) for k, v in cmds.items()}, "env": env_extra or {}}
    for condition in conditions:
        rows = {which: median_row(samples[condition][which]) for which in ("native", "python")}
        out[condition] = {**rows, **compare(rows)}
    return out


def flat_keys(out: dict) -> dict:
    """The ratios as results.json's top-level keys (``..._busy`` when measured beside a busy process)."""
    keys = {}
    for condition in ("idle", "busy"):
        if condition in out:
            tail = "" if condition == "idle" else "_busy"
            keys[f"native_vs_python_decode_ratio{tail}"] = out[condition]["decode_ratio"]
            keys[f"native_vs_python_ttft_ratio{tail}"] = out[condition]["ttft_ratio"]
    return keys


def section(out: dict) -> str:
    """benchmarks/native_vs_python.md, which report.py copies into RESULTS.md."""
    m = out["machine"]
    load = ", ".join(f"{x:.2f}" for x in m["loadavg_start"])
    lines = ["## `qwenvl-native run` vs `qwenvl-edge run` (issue 26)", "",
             f"Same bundle and photo, {out['tokens']} greedy tokens, {out['threads']} threads, a fresh process with an "
             f"empty store each, {out['rounds']} interleaved round(s) (medians), timed from outside: first token = "
             "process start to the first answer byte; decode = tokens after the first / the answer's stream time. "
             f"CPU: {m.get('cpu', m['arch'])} ({' '.join(m['cpu_vector_flags'])}); load average at the start {load}."
             + (" `busy`: beside one process spinning one core." if "busy" in out else "")
             + ("".join(f" {k}={v}" for k, v in out.get("env", {}).items()).join((" Environment of both:", "."))
                if out.get("env") else ""), "",
             "| condition | runtime | time to first token | of which load / encode / prefill | decode | peak RSS "
             "| ratio native / Python |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for condition in ("idle", "busy"):
        if condition not in out:
            continue
        c = out[condition]
        for which in ("native", "python"):
            r = c[which]
            ratio = (f"decode x{c['decode_ratio']:.3f} (target >= {DECODE_TARGET}), first token "
                     f"x{c['ttft_ratio']:.3f} (target <= {TTFT_TARGET})" if which == "native" else "")
            lines.append(f"| {condition} | {which} | {r['ttft_s']:.2f} s | {r['decoder_load_s']:.2f} / "
                         f"{r['vision_s']:.2f} / {r['prefill_s']:.2f} s | {r['decode_tok_s']:.2f} tok/s | "
                         f"{r['peak_rss_gb']:.2f} GB | {ratio} |")
        if not c["same_answer"]:
            lines.append(f"| {condition} | | the two answers differ | | | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("image", type=Path)
    ap.add_argument("--binary", type=Path, default=DEFAULT_BINARY, help="qwenvl-native (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=TOKENS, help="greedy tokens per answer")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--question", default=QUESTION)
    ap.add_argument("--busy", action="store_true", help="also measure beside one process spinning one core")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment of both runtimes' processes, e.g. GOMP_SPINCOUNT=10000 (libgomp's "
                         "barrier spin: qwenvl-native sets 10000 unless told, Python keeps libgomp's 300000)")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results.json")
    ap.add_argument("--section", type=Path, default=None,
                    help="the RESULTS.md section (default: native_vs_python.md beside --results)")
    a = ap.parse_args(argv)
    if not a.binary.is_file() or not os.access(a.binary, os.X_OK):
        print(f"bench_native_vs_python: {a.binary} missing: build it with cmake -S . -B native-build/host",
              file=sys.stderr)
        return 1
    for path in (a.bundle / "manifest.json", a.image):
        if not path.is_file():
            print(f"bench_native_vs_python: {path} missing", file=sys.stderr)
            return 1
    if a.threads < 1 or a.tokens < 2 or a.rounds < 1:
        print("bench_native_vs_python: --threads >= 1, --tokens >= 2 and --rounds >= 1", file=sys.stderr)
        return 1
    if any("=" not in item or item.startswith("=") for item in a.env):
        print("bench_native_vs_python: --env takes KEY=VALUE", file=sys.stderr)
        return 1
    env_extra = dict(item.split("=", 1) for item in a.env)
    start_machine = machine()
    with tempfile.TemporaryDirectory(prefix="qwenvl-native-vs-python-") as work:
        out = measure(a.binary, a.bundle.resolve(), a.image.resolve(), a.question, a.threads, a.tokens, a.rounds,
                      a.busy, Path(work), env_extra)
    out["machine"] = start_machine
    print(json.dumps(out, indent=2))
    results = json.loads(a.results.read_text()) if a.results.is_file() else {}
    results["native_vs_python"] = out
    results.update(flat_keys(out))
    a.results.parent.mkdir(parents=True, exist_ok=True)
    a.results.write_text(json.dumps(results, indent=2) + "\n")
    (a.section or a.results.parent / "native_vs_python.md").write_text(section(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
