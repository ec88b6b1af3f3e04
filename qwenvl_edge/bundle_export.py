"""Checkpoint folder -> bundle folder: vision ONNX (INT8 or FP32), LLM GGUF, manifest.

The whole bundle is built in a hidden temporary folder beside the target and renamed into
place only when every file and the manifest are written, so a failed or interrupted export
leaves nothing half-written under the name the user asked for.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qwenvl_edge import __version__
from qwenvl_edge.errors import QwenVLError
from qwenvl_edge.export.checkpoint import CheckpointReader
from qwenvl_edge.runtime.bundle import LLM_FILE, VISION_FILE, ModelInfo, make_manifest

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
FLOAT_GGUF_TYPES = ("F32", "F16", "BF16")
VISION_PRECISIONS = ("int8", "fp32")


@dataclass(frozen=True)
class ExportOptions:
    vision: str = "int8"  # int8 | fp32
    vision_scheme: str | None = None  # None: quant's default scheme
    calibration_images: tuple[Path, ...] = ()
    llm: str = "Q4_K_M"
    keep_fp32_vision: bool = False  # keep vision_fp32.onnx beside the INT8 one (benchmark baseline)
    n_threads: int | None = None
    force: bool = False


def model_info(reader: CheckpointReader) -> ModelInfo:
    """The manifest's model section, from config.json and generation_config.json."""
    cfg = reader.config
    gen_path = reader.folder / "generation_config.json"
    gen = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.is_file() else {}
    return ModelInfo(
        hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, seq_length=cfg.seq_length,
        image_size=cfg.visual.image_size, n_queries=cfg.visual.n_queries,
        image_start_id=cfg.visual.image_start_id,
        eos_token_id=int(gen.get("eos_token_id", 151643)),
        top_p=float(gen.get("top_p", 0.3)), top_k=int(gen.get("top_k", 0)),
        max_new_tokens=int(gen.get("max_new_tokens", 512)),
    )


class StageClock:
    """Start/end seconds of each export stage, kept in the manifest (the benchmark reads them)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.stages: dict[str, list[float]] = {}

    def start(self, name: str) -> None:
        self.stages[name] = [round(time.monotonic() - self.started, 3)]

    def end(self, name: str) -> None:
        self.stages[name].append(round(time.monotonic() - self.started, 3))


def export_vision(reader: CheckpointReader, work: Path, opts: ExportOptions, progress: Progress,
                  clock: StageClock) -> dict:
    """Write ``vision.onnx`` (and maybe ``vision_fp32.onnx``) into ``work``; return the manifest section."""
    from qwenvl_edge.export.vision_onnx import build_vision_onnx

    clock.start("vision_fp32")
    if opts.vision == "fp32":
        build_vision_onnx(reader, work / VISION_FILE, progress)
        clock.end("vision_fp32")
        return {"file": VISION_FILE, "precision": "fp32", "input": "pixel_values", "output": "image_embeds"}
    from qwenvl_edge.quant.onnx_int8 import quantize_vision

    fp32 = work / "vision_fp32.onnx"
    build_vision_onnx(reader, fp32, progress)
    clock.end("vision_fp32")
    clock.start("vision_int8")
    progress("vision: quantizing to INT8")
    kwargs = {"scheme": opts.vision_scheme} if opts.vision_scheme else {}
    report = quantize_vision(fp32, work / VISION_FILE, calibration_images=list(opts.calibration_images) or None,
                             **kwargs)
    if not opts.keep_fp32_vision:
        for part in work.glob("vision_fp32.onnx*"):
            part.unlink()
    clock.end("vision_int8")
    return {"file": VISION_FILE, "precision": "int8", "input": "pixel_values", "output": "image_embeds",
            "quality": report, **({"fp32_file": fp32.name} if opts.keep_fp32_vision else {})}


def export_llm(reader: CheckpointReader, work: Path, opts: ExportOptions, progress: Progress,
               clock: StageClock) -> dict:
    """Write ``llm.gguf`` into ``work``: float types directly, quantized types through a BF16 pass.

    BF16 holds the checkpoint's exact bits (it is stored as bf16), cannot overflow as F16 can,
    and the k-quants made from it equal those made from F32.
    """
    from qwenvl_edge.export.llm_gguf import write_llm_gguf
    from qwenvl_edge.quant.gguf_quant import quantize_gguf

    clock.start("llm_gguf")
    if opts.llm in FLOAT_GGUF_TYPES:
        write_llm_gguf(reader, work / LLM_FILE, opts.llm, progress)
        clock.end("llm_gguf")
    else:
        source = work / "llm-bf16.gguf.tmp"
        write_llm_gguf(reader, source, "BF16", progress)
        clock.end("llm_gguf")
        clock.start("llm_quant")
        progress(f"llm: quantizing to {opts.llm}")
        quantize_gguf(source, work / LLM_FILE, opts.llm, n_threads=opts.n_threads, progress=progress)
        source.unlink()
        clock.end("llm_quant")
    return {"file": LLM_FILE, "type": opts.llm, "bytes": (work / LLM_FILE).stat().st_size}


def check_options(opts: ExportOptions) -> None:
    """Refuse bad choices before any long work starts."""
    from qwenvl_edge.quant.gguf_quant import LLM_TYPES
    from qwenvl_edge.quant.onnx_int8 import SCHEMES

    if opts.vision_scheme is not None and opts.vision_scheme not in SCHEMES:
        raise QwenVLError(f"--vision-scheme {opts.vision_scheme!r}: choose one of {', '.join(SCHEMES)}")
    if opts.vision not in VISION_PRECISIONS:
        raise QwenVLError(f"--vision {opts.vision!r}: choose {' or '.join(VISION_PRECISIONS)}")
    if opts.llm not in LLM_TYPES:
        raise QwenVLError(f"--llm {opts.llm!r}: choose one of {', '.join(LLM_TYPES)}")
    for image in opts.calibration_images:
        if not Path(image).is_file():
            raise QwenVLError(f"{image}: calibration image not found")


def export_bundle(checkpoint: Path, out: Path, opts: ExportOptions = ExportOptions(),
                  progress: Progress = log.info) -> Path:
    """Export ``checkpoint`` into the bundle folder ``out``; all or nothing."""
    out = Path(out)
    check_options(opts)
    if out.exists() and any(out.iterdir()) and not opts.force:
        raise QwenVLError(f"{out}: exists and is not empty (pass --force to replace it)")
    reader = CheckpointReader(checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    clock = StageClock()
    try:
        vision = export_vision(reader, work, opts, progress, clock)
        llm = export_llm(reader, work, opts, progress, clock)
        clock.start("checksums")
        progress("bundle: checksums")
        source = {"checkpoint": str(Path(checkpoint).resolve()), "config": reader.config.to_dict(),
                  "weight_files": [p.name for p in reader.files]}
        manifest = make_manifest(work, model_info(reader), vision, llm, source, f"qwenvl-edge {__version__}")
        clock.end("checksums")
        manifest["export"] = {"stage_seconds": clock.stages}
        (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    progress(f"bundle: done in {time.monotonic() - clock.started:.1f} s -> {out}")
    return out
