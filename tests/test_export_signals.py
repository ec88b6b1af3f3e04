"""Ctrl-C and SIGTERM stop the LLM stages promptly, even inside one long llama.cpp call, leave nothing
half-written, and exit 130 / 143; the next run resumes at the stage it was in.

Real exports in separate processes. To stand for a C call that runs for minutes (full size), the test
stops llama.cpp's worker process with SIGSTOP: then only the export's own handling can end the stage.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import llama_cpp
import pytest

from qwenvl_edge.runtime.bundle import Bundle
from tests.test_export_safety import export_process, partials, read_until

PROMPT_EXIT_S = 8.0  # "within a few seconds" (the machine running the suite may be busy)


def worker_pid(lines: list[str], task: str) -> int:
    found = [int(m[1]) for line in lines for m in [re.search(rf"llama.cpp {task}: worker process (\d+)", line)] if m]
    assert found, "".join(lines[-5:])
    return found[-1]


def interrupt(proc: subprocess.Popen, sig: int, want_rc: int) -> str:
    started = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode == want_rc, err[-2000:]
    assert elapsed < PROMPT_EXIT_S, f"{elapsed:.1f} s to stop"
    assert "Traceback" not in err and "qwenvl-edge: interrupted" in err
    return err


def assert_nothing_half_written(tmp_path: Path, out: Path, worker: int | None = None) -> None:
    assert not out.exists() and partials(tmp_path) == [], partials(tmp_path)
    if worker is not None:
        assert not Path(f"/proc/{worker}").exists(), "the llama.cpp worker outlived the export"


def args_for(ckpt: Path, out: Path) -> list[str]:
    return [str(ckpt), str(out), "--vision", "fp32", "--llm", "Q4_K_M", "--threads", "2"]


def test_sigint_in_a_quantization_that_does_not_return(tiny_ckpt: Path, tmp_path: Path) -> None:
    """SIGINT while llama_model_quantize runs and cannot return (its worker stopped): exit 130 at once,
    the worker killed, no partial file (the signal used to vanish in llama.cpp's log callback)."""
    xdg, out = tmp_path / "xdg", tmp_path / "out" / "b"
    proc = export_process(args_for(tiny_ckpt, out), xdg)
    lines = read_until(proc, "quantized Q4_K_M [1/")
    worker = worker_pid(lines, "quantize")
    os.kill(worker, signal.SIGSTOP)
    interrupt(proc, signal.SIGINT, 130)
    assert_nothing_half_written(tmp_path, out, worker)


@pytest.mark.long  # three exports; the default suite keeps the SIGINT case
def test_sigterm_then_sigint_in_the_llm_stages_and_resume(tiny_ckpt: Path, tmp_path: Path) -> None:
    """1. SIGTERM while llama.cpp quantizes: exit 143, nothing half-written. 2. The rerun reuses the GGUF
    stage; SIGINT in the quality check whose worker is stuck: exit 130 at once. 3. The rerun reuses both
    finished LLM stages, measures, and prints what the number measures."""
    xdg, out = tmp_path / "xdg", tmp_path / "out" / "b"
    args = args_for(tiny_ckpt, out)
    proc = export_process(args, xdg)
    read_until(proc, "quantized Q4_K_M [1/")  # inside the one C call
    interrupt(proc, signal.SIGTERM, 143)
    assert_nothing_half_written(tmp_path, out)

    proc = export_process(args, xdg)
    lines = read_until(proc, "llm quality: reference 1/2")
    assert any("stage llm_gguf finished earlier, files verified: reused" in line for line in lines)
    worker = worker_pid(lines, "quality")
    os.kill(worker, signal.SIGSTOP)
    interrupt(proc, signal.SIGINT, 130)
    assert_nothing_half_written(tmp_path, out, worker)

    proc = export_process(args, xdg)
    stdout, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    for stage in ("vision_fp32", "llm_gguf", "llm_quant"):
        assert f"stage {stage} finished earlier, files verified: reused" in err
    stages = Bundle.open(out).manifest["export"]["stages"]
    assert {k: v["reused"] for k, v in stages.items()} == {"vision_fp32": True, "llm_gguf": True, "llm_quant": True,
                                                            "llm_quality": False}
    line = re.search(r"llm Q4_K_M: greedy top-1 agreement with BF16 on (\d+) calibration positions ([\d.]+) %", stdout)
    assert line and int(line[1]) == Bundle.open(out).manifest["llm"]["quality"]["positions"], stdout
    assert partials(tmp_path) == [] and list((xdg / "qwenvl-edge" / "export").iterdir()) == []


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
def test_log_callback_never_swallows_an_exception(tmp_path: Path, exc: type[BaseException]) -> None:
    """In-process: what llama.cpp's log callback raises (a Ctrl-C landing there) is raised after the C call
    returns, not printed and dropped by ctypes."""
    from qwenvl_edge.quant.gguf_quant import routed_llama_logs

    src = tmp_path / "broken.gguf"
    src.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\xff" * 64)
    params = llama_cpp.llama_model_quantize_default_params()

    def on_line(_level: int, _line: str) -> None:
        raise exc()

    with pytest.raises(exc), routed_llama_logs(on_line):
        llama_cpp.llama_model_quantize(str(src).encode(), str(tmp_path / "out.gguf").encode(), ctypes.byref(params))
    assert not (tmp_path / "out.gguf").exists()
