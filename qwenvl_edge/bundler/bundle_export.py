"""Checkpoint folder -> bundle folder: vision ONNX (INT8 or FP32), LLM GGUF, manifest.

The orchestration above ``export/`` (checkpoint -> FP32 ONNX, float GGUF) and ``quant/`` (INT8,
k-quants, quality numbers), which never import each other. Stages, in order:

    vision_fp32 -> vision_int8 -> llm_gguf -> llm_quant -> llm_quality -> bundle

Each finished stage is kept, with sha256, in the resume folder (``export_stages``), so an export
that is interrupted or killed resumes at the stage it was in. Files no later stage needs are
deleted as soon as they are used (disk). The bundle is assembled in ``.OUT.partial-PID`` beside
OUT and renamed into place only when complete; a failed or interrupted export leaves no partial
folder, and ``--force`` replaces only an old bundle (``export_target``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qwenvl_edge import __version__, contract
from qwenvl_edge.bundler.export_progress import OverallProgress
from qwenvl_edge.bundler.export_stages import StageCache, export_cache_root, job_fingerprint
from qwenvl_edge.bundler.export_target import (
    OldBundle,
    check_target,
    disk_space_errors,
    partial_name,
    replace_folder,
    sweep_stale,
    terminate_as_interrupt,
)
from qwenvl_edge.errors import CheckpointError, QwenVLError
from qwenvl_edge.export.checkpoint import CheckpointReader
from qwenvl_edge.onnx_files import relocate_model
from qwenvl_edge.quant.registry import DEFAULT_INT8_FLOOR, DEFAULT_LLM_TYPE, FLOAT_LLM_TYPES, check_int8_floor
from qwenvl_edge.runtime.bundle import LLM_FILE, VISION_FILE, ModelInfo, make_manifest
from qwenvl_edge.validate import json_file

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
FLOAT_GGUF_TYPES = FLOAT_LLM_TYPES
VISION_PRECISIONS = ("int8", "fp32")
FP32_VISION = "vision_fp32.onnx"
LLM_SOURCE = "llm-bf16.gguf"
# Seconds per byte of stage input, from the full-size export (7.7 GB FP32 vision, 15.4 GB BF16 LLM):
# they weight the stages in the overall progress line.
STAGE_COST = {"vision_fp32": 41 / 7.7e9, "vision_int8": 366 / 7.7e9, "llm_gguf": 53 / 15.4e9,
              "llm_quant": 261 / 15.4e9, "llm_quality": 60 / 15.4e9, "bundle": 10 / 15.4e9}


@dataclass(frozen=True)
class ExportOptions:
    vision: str = "int8"  # int8 | fp32
    vision_scheme: str | None = None  # None: quant's default scheme
    int8_floor: float = DEFAULT_INT8_FLOOR  # worst INT8 row cosine accepted; below it sensitive MatMuls stay float
    calibration_images: tuple[Path, ...] = ()
    llm: str = DEFAULT_LLM_TYPE
    keep_fp32_vision: bool = False  # keep vision_fp32.onnx beside the INT8 one (benchmark baseline)
    n_threads: int | None = None
    force: bool = False
    fresh: bool = False  # ignore (and remove) finished stages of an earlier interrupted export
    measure_llm: bool = True  # KL / top-1 agreement of the quantized GGUF against its BF16 source


def model_info(reader: CheckpointReader) -> ModelInfo:
    """The manifest's model section, from config.json and generation_config.json (data: types checked)."""
    cfg = reader.config
    gen_path = reader.folder / "generation_config.json"
    gen = json_file(gen_path, CheckpointError, "generation_config.json") if gen_path.is_file() else {}
    if not isinstance(gen, dict):
        raise CheckpointError(f"{gen_path}: corrupt generation_config.json: not a JSON object")
    try:
        return ModelInfo(
            hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, seq_length=cfg.seq_length,
            image_size=cfg.visual.image_size, n_queries=cfg.visual.n_queries,
            image_start_id=cfg.visual.image_start_id,
            eos_token_id=int(gen.get("eos_token_id", contract.EOS_ID)),
            top_p=float(gen.get("top_p", contract.TOP_P)), top_k=int(gen.get("top_k", contract.TOP_K)),
            max_new_tokens=int(gen.get("max_new_tokens", contract.MAX_NEW_TOKENS)),
        )
    except (TypeError, ValueError, OverflowError) as e:
        raise CheckpointError(f"{gen_path}: corrupt generation_config.json: {e}") from None


def check_options(opts: ExportOptions) -> None:
    """Refuse bad choices before any long work starts."""
    from qwenvl_edge.quant.gguf_quant import LLM_TYPES
    from qwenvl_edge.quant.onnx_int8 import SCHEMES

    if opts.vision_scheme is not None and opts.vision_scheme not in SCHEMES:
        raise QwenVLError(f"--vision-scheme {opts.vision_scheme!r}: choose one of {', '.join(SCHEMES)}")
    if opts.vision not in VISION_PRECISIONS:
        raise QwenVLError(f"--vision {opts.vision!r}: choose {' or '.join(VISION_PRECISIONS)}")
    try:
        check_int8_floor(opts.int8_floor)
    except ValueError as e:
        raise QwenVLError(str(e)) from None
    if opts.llm not in LLM_TYPES:
        raise QwenVLError(f"--llm {opts.llm!r}: choose one of {', '.join(LLM_TYPES)}")
    for image in opts.calibration_images:
        if not Path(image).is_file():
            raise QwenVLError(f"{image}: calibration image not found")


def _job_options(opts: ExportOptions) -> dict[str, Any]:
    """What decides the stages' outputs (not --force/--fresh/--threads), for the resume folder's name."""
    images = [(str(Path(p).resolve()), Path(p).stat().st_size, Path(p).stat().st_mtime_ns)
              for p in opts.calibration_images]
    return {"vision": opts.vision, "scheme": opts.vision_scheme, "calibration": images, "llm": opts.llm,
            "measure_llm": opts.measure_llm, "version": __version__,
            **({"int8_floor": float(opts.int8_floor)} if opts.vision == "int8" else {})}


class Exporter:
    """Runs the stages of one export through the resume folder."""

    def __init__(self, reader: CheckpointReader, opts: ExportOptions, cache: StageCache, progress: Progress):
        self.reader, self.opts, self.cache = reader, opts, cache
        cfg = reader.config
        vision_bytes = 4 * sum(n for k, n in _numel(cfg).items() if k.startswith("transformer.visual."))
        llm_bytes = 2 * sum(n for k, n in _numel(cfg).items() if not k.startswith("transformer.visual."))
        stages = ["vision_fp32"] + (["vision_int8"] if opts.vision == "int8" else []) + ["llm_gguf"]
        if opts.llm not in FLOAT_GGUF_TYPES:
            stages += ["llm_quant"] + (["llm_quality"] if opts.measure_llm else [])
        stages.append("bundle")
        sizes = {"vision_fp32": vision_bytes, "vision_int8": vision_bytes}
        self.overall = OverallProgress({s: STAGE_COST[s] * sizes.get(s, llm_bytes) for s in stages}, progress)
        self.records: dict[str, dict[str, Any]] = {}

    def stage(self, name: str, make: Callable[[Path, Progress], dict[str, Any]]) -> dict[str, Any]:
        say = self.overall.start(name)
        with disk_space_errors(self.cache.folder, f"stage {name}"):
            record = self.cache.run(name, lambda folder: make(folder, say))
        self.overall.finish(name, ran=name not in self.cache.reused)
        self.records[name] = record
        return record

    def vision(self) -> None:
        from qwenvl_edge.export.vision_onnx import build_vision_onnx

        int8 = self.opts.vision == "int8"
        if int8 and self.cache.done("vision_int8") and not _same_floor(self.cache.records["vision_int8"], self.opts):
            self.cache.say("resume: stage vision_int8 was made for another --int8-floor; redoing it")
            self.cache.forget("vision_int8")
        if int8 and self.cache.dropped("vision_fp32") and not self.cache.done("vision_int8"):
            self.cache.forget("vision_fp32")  # its files were deleted after use, but their user must be redone
        if not (int8 and self.cache.done("vision_int8") and self.cache.dropped("vision_fp32")):
            self.stage("vision_fp32", lambda folder, say: _built(build_vision_onnx(self.reader, folder / FP32_VISION,
                                                                                 say)))
        if int8:
            self.stage("vision_int8", self._quantize_vision)
            if not self.opts.keep_fp32_vision:
                self.cache.drop_files("vision_fp32")

    def _quantize_vision(self, folder: Path, say: Progress) -> dict[str, Any]:
        from qwenvl_edge.quant.onnx_int8 import DEFAULT_SCHEME, SCHEMES, quantize_vision

        scheme = self.opts.vision_scheme or DEFAULT_SCHEME
        if SCHEMES[scheme].caveat:
            say(f"vision: warning: scheme {scheme!r}: {SCHEMES[scheme].caveat}")
        return quantize_vision(self.cache.path(FP32_VISION), folder / VISION_FILE, scheme=scheme,
                               calibration_images=list(self.opts.calibration_images) or None,
                               n_threads=self.opts.n_threads, progress=say, floor=self.opts.int8_floor)

    def llm(self) -> None:
        from qwenvl_edge.export.llm_gguf import write_llm_gguf

        opts = self.opts
        if opts.llm in FLOAT_GGUF_TYPES:
            self.stage("llm_gguf", lambda folder, say: _built(write_llm_gguf(self.reader, folder / LLM_FILE,
                                                                             opts.llm, say)))
            return
        later = ["llm_quant"] + (["llm_quality"] if opts.measure_llm else [])
        if self.cache.dropped("llm_gguf") and not all(self.cache.done(s) for s in later):
            self.cache.forget("llm_gguf")
        if not self.cache.dropped("llm_gguf"):
            self.stage("llm_gguf", lambda folder, say: _built(write_llm_gguf(self.reader, folder / LLM_SOURCE,
                                                                             "BF16", say)))
        self.stage("llm_quant", self._quantize_llm)
        if opts.measure_llm:
            self.stage("llm_quality", self._measure_llm)
        self.cache.drop_files("llm_gguf")

    def _quantize_llm(self, folder: Path, say: Progress) -> dict[str, Any]:
        from qwenvl_edge.quant.gguf_quant import quantize_gguf

        say(f"llm: quantizing to {self.opts.llm}")
        quantize_gguf(self.cache.path(LLM_SOURCE), folder / LLM_FILE, self.opts.llm, n_threads=self.opts.n_threads,
                      progress=say)
        return {}

    def _measure_llm(self, _folder: Path, say: Progress) -> dict[str, Any]:
        from qwenvl_edge.quant.gguf_quality import format_gguf_quality, measure_gguf_quality_in_worker

        report = measure_gguf_quality_in_worker(self.cache.path(LLM_SOURCE), self.cache.path(LLM_FILE),
                                                n_threads=self.opts.n_threads, progress=say)
        report["reference"] = "BF16 (the checkpoint's own bits)"
        say(f"llm {self.opts.llm}: {format_gguf_quality(report, 'BF16')}")
        return report

    def assemble(self, work: Path, checkpoint: Path) -> dict[str, Any]:
        """Move the finished files into ``work`` and write the manifest (checksums from the stage records)."""
        say = self.overall.start("bundle")
        opts, files = self.opts, {}
        vision_record = self.records["vision_int8" if opts.vision == "int8" else "vision_fp32"]
        moves = {}
        if opts.vision == "int8":
            moves.update({n: n for n in vision_record["files"]})
        if opts.vision == "fp32" or opts.keep_fp32_vision:
            moves.update({n: n for n in self.records["vision_fp32"]["files"]})
        moves.update({n: n for n in (self.records.get("llm_quant") or self.records["llm_gguf"])["files"]})
        for name in moves:
            entry = self.records[_owner(self.records, name)]["files"][name]
            _move(self.cache.path(name), work / name)
            files[name] = entry
        if opts.vision == "fp32":  # the bundle's graph is vision.onnx: rename it with its .data reference
            files = relocate_model(work / FP32_VISION, work / VISION_FILE, files)
        vision = {"file": VISION_FILE, "precision": opts.vision, "input": contract.VISION_INPUT,
                  "output": contract.VISION_OUTPUT}
        if opts.vision == "int8":
            vision["quality"] = vision_record["report"]
            if opts.keep_fp32_vision:
                vision["fp32_file"] = FP32_VISION
        llm = {"file": LLM_FILE, "type": opts.llm, "bytes": files[LLM_FILE]["bytes"]}
        if "llm_quality" in self.records:
            llm["quality"] = self.records["llm_quality"]["report"]
        source = {"checkpoint": str(Path(checkpoint).resolve()), "config": self.reader.config.to_dict(),
                  "weight_files": [p.name for p in self.reader.files]}
        manifest = make_manifest(work, model_info(self.reader), vision, llm, source, f"qwenvl-edge {__version__}",
                                 files=files)
        manifest["export"] = {
            "stages": {name: {"seconds": r["seconds"], "reused": name in self.cache.reused}
                       for name, r in self.records.items()},
            "stage_seconds": self.overall.windows,  # start/end since the export began (the benchmark reads them)
            "options": {k: (list(map(str, v)) if isinstance(v, tuple) else v) for k, v in asdict(opts).items()
                        if k not in ("force", "fresh")},
        }
        say("bundle: manifest written")
        self.overall.finish("bundle")
        return manifest


def _number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _llm_quality_report(report: dict[str, Any]) -> bool:
    """A resumed ``llm_quality`` report (a stage with no files to hash) has the numbers the manifest needs."""
    positions = report.get("positions")
    return (type(positions) is int and positions > 0
            and all(_number(report.get(k)) for k in ("kl_mean", "kl_max", "kl_p99", "top1_agreement")))


def _vision_int8_report(report: dict[str, Any]) -> bool:
    """A resumed ``vision_int8`` report has the row-quality numbers the manifest and the CLI print."""
    quality = report.get("quality")
    keys = ("images", "cosine_min", "cosine_mean", "rel_error_max", "rel_error_mean")
    return (isinstance(report.get("scheme"), str) and isinstance(quality, dict) and bool(quality)
            and all(isinstance(m, dict) and all(_number(m.get(k)) for k in keys) for m in quality.values()))


def _same_floor(record: dict[str, Any], opts: ExportOptions) -> bool:
    """A finished ``vision_int8`` stage is reused only when it was made for this ``--int8-floor`` (the folder's
    name holds the floor too: this catches a record written by hand or by an older version)."""
    floor = record["report"].get("floor")
    if not isinstance(floor, dict) or not all(_number(floor.get(k)) for k in ("floor", "cosine_min_before",
                                                                               "cosine_min_after", "candidates")):
        return False
    kept = floor.get("kept_in_float")
    return (floor["floor"] == float(opts.int8_floor) and isinstance(floor.get("met"), bool)
            and isinstance(kept, list) and all(isinstance(k, str) for k in kept))


STAGE_REPORTS = {"llm_quality": _llm_quality_report, "vision_int8": _vision_int8_report}


def _owner(records: dict[str, dict[str, Any]], name: str) -> str:
    return next(stage for stage, r in records.items() if name in r["files"])


def _built(_path: Path) -> dict[str, Any]:
    return {}


def _numel(cfg) -> dict[str, int]:
    import math

    return {name: math.prod(shape) for name, shape in cfg.tensor_shapes().items()}


def _move(src: Path, dst: Path) -> None:
    """Rename when on the same file system, else copy (the resume folder may live on another disk)."""
    try:
        os.replace(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
        src.unlink()


def _replace_folder(work: Path, out: Path, old: OldBundle | None, progress: Progress) -> None:
    """``work`` takes ``out``'s name; of an old bundle there only its verified files are deleted."""
    kept = replace_folder(work, out, old)
    if kept is not None:
        progress(f"kept {kept}: files were added to the old bundle folder while it was being replaced")


def _prepare_work(out: Path) -> Path:
    """Create OUT's parent and the partial folder now, so an output place that cannot be written
    (read-only, a file, a parent that cannot be made) fails in one line before any stage runs."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QwenVLError(f"{out}: cannot create its folder {out.parent} ({e.strerror or e}); "
                          "choose another output folder") from None
    work = out.parent / partial_name(out.name)
    try:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
    except OSError as e:
        raise QwenVLError(f"{out}: cannot write in {out.parent} ({e.strerror or e}); "
                          "choose another output folder") from None
    return work


def export_bundle(checkpoint: Path, out: Path, opts: ExportOptions = ExportOptions(),
                  progress: Progress = log.info) -> Path:
    """Export ``checkpoint`` into the bundle folder ``out``; all or nothing."""
    out = Path(out)
    check_options(opts)
    old = check_target(checkpoint, out, opts.force)
    reader = CheckpointReader(checkpoint)
    model_info(reader)  # a bad generation_config.json fails now, not after the stages
    if out.parent.is_dir():
        for stale in sweep_stale(out.parent, f".{out.name}."):
            progress(f"removed {stale.name}, left by an export that was killed")
    started = time.monotonic()
    job = job_fingerprint([*reader.files, reader.folder / "config.json"], _job_options(opts))
    with terminate_as_interrupt():
        work = _prepare_work(out)
        success, cache = False, None
        try:
            cache = StageCache(export_cache_root() / job, fresh=opts.fresh, progress=progress,
                               reports=STAGE_REPORTS)
            exporter = Exporter(reader, opts, cache, progress)
            exporter.vision()
            exporter.llm()
            with disk_space_errors(out.parent, "the bundle"):
                manifest = exporter.assemble(work, checkpoint)
                (work / contract.MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            _replace_folder(work, out, old, progress)
            success = True
        finally:
            shutil.rmtree(work, ignore_errors=True)
            if cache is not None:
                cache.close(remove=success)
    progress(f"bundle: done in {time.monotonic() - started:.1f} s -> {out}")
    return out
