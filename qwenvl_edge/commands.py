"""What each ``qwenvl-edge`` subcommand does, given its parsed arguments.

``cli.py`` parses; these functions do the work and print (this is the ``__main__`` side, so
``print`` is allowed here and nowhere in the rooms). Each returns the exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from qwenvl_edge.errors import PromptError, QwenVLError


class ProgressPrinter:
    """Prints export progress: elapsed time, the stage's message, and time left while a k/n count runs.

    A stage is the text before its ``k/n`` counter ("vision: block 3/48" -> "vision: block "), so
    the estimate restarts whenever a new counted stage begins.
    """

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self.stage = ""
        self.stage_started = self.started
        self.tty = self.stream.isatty()

    def __call__(self, message: str) -> None:
        now = time.monotonic()
        m = re.search(r"(\d+)/(\d+)", message)
        stage = message[:m.start()] if m else message
        if stage != self.stage:
            self.stage, self.stage_started = stage, now
        left = ""
        if m and 0 < int(m.group(1)) < int(m.group(2)):
            done, total = int(m.group(1)), int(m.group(2))
            left = f" (~{(now - self.stage_started) / done * (total - done):.0f} s left)"
        line = f"[{now - self.started:7.1f} s] {message}{left}"
        if self.tty and m and m.group(1) != m.group(2):  # redraw one line while a count runs
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(("\r\033[K" if self.tty else "") + line + "\n")
        self.stream.flush()


def cmd_synth(a: argparse.Namespace) -> int:
    from qwenvl_edge.export.synthetic_checkpoint import write_checkpoint

    shard = None if a.shard_mb == 0 else a.shard_mb * 2**20
    write_checkpoint(a.out, a.preset, a.seed, a.format, shard, a.tiktoken, a.override, progress=ProgressPrinter())
    print(a.out)
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from qwenvl_edge.bundle_export import ExportOptions, export_bundle

    opts = ExportOptions(vision=a.vision, vision_scheme=a.vision_scheme,
                         calibration_images=tuple(a.calibration_image or ()), llm=a.llm,
                         keep_fp32_vision=a.keep_fp32_vision, n_threads=a.threads, force=a.force,
                         fresh=a.fresh)
    out = export_bundle(a.checkpoint, a.out, opts, progress=ProgressPrinter())
    manifest = json.loads((out / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        print(f"{entry['bytes'] / 2**20:10.1f} MiB  {out / name}")
    report = manifest["vision"].get("quality")
    if report:
        from qwenvl_edge.quant.vision_quality import format_quality

        print(f"vision INT8 ({report.get('scheme')}) vs FP32 rows:")
        print(format_quality(report["quality"]))
    llm_quality = manifest["llm"].get("quality")
    if llm_quality:
        from qwenvl_edge.quant.gguf_quality import format_gguf_quality

        print(f"llm {manifest['llm']['type']} vs BF16 next-token distributions: {format_gguf_quality(llm_quality)}")
    return 0


def _split_run_args(items: list[str]) -> tuple[list[str], str]:
    if not items:
        raise PromptError("give the question as the last argument")
    *images, question = items
    if not question.strip():
        raise PromptError("the question is empty")
    return images, question


def _open_model(a: argparse.Namespace):
    from qwenvl_edge.runtime.pipeline import QwenVL

    return QwenVL(a.bundle, n_threads=a.threads, n_ctx=a.n_ctx, keep_vision=a.keep_vision,
                  cache_dir=None if a.no_cache else _default_cache(), seed=a.seed, verbose=a.verbose,
                  use_mmap=a.mmap)


def _default_cache():
    from qwenvl_edge.runtime.embedding_cache import default_cache_dir

    return default_cache_dir()


def _sampling(a: argparse.Namespace) -> dict:
    return {"max_tokens": a.max_tokens, "temperature": 0.0 if a.greedy else a.temperature, "top_p": a.top_p}


def _print_timings(result) -> None:
    t = result.timings
    print(f"[image encode {t.image_encode_s:.2f} s ({t.images_encoded} encoded, {t.images_from_cache} cached), "
          f"prefill {t.prefill_positions} pos in {t.prefill_s:.2f} s, first token {t.ttft_s:.2f} s, "
          f"decode {t.decode_tokens} tok at {t.decode_tok_s:.1f} tok/s]", file=sys.stderr)


def cmd_run(a: argparse.Namespace) -> int:
    images, question = _split_run_args(a.items)
    for image in images:
        if not Path(image).is_file():
            raise QwenVLError(f"{image}: no such image file")
    with _open_model(a) as model:
        if a.json:
            result = model.generate(images, question, **_sampling(a))
        else:
            for piece in model.generate(images, question, stream=True, **_sampling(a)):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            result = model.last_result
        if a.draw:
            _draw(images, result, a.draw)
    if a.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
    else:
        _print_timings(result)
    return 0


def _draw(images: list[str], result, out: Path) -> None:
    from qwenvl_edge.runtime.boxes import draw_boxes
    from qwenvl_edge.runtime.preprocess import load_image

    if not images:
        raise QwenVLError("--draw needs an image")
    draw_boxes(load_image(images[0]), result.boxes, out)
    print(f"[drew {len(result.boxes)} box(es) on {out}]", file=sys.stderr)


def cmd_chat(a: argparse.Namespace) -> int:
    for image in a.images:
        if not Path(image).is_file():
            raise QwenVLError(f"{image}: no such image file")
    pending = list(a.images)
    with _open_model(a) as model:
        print("qwenvl-edge chat: type a question; /image PATH adds a picture, /reset forgets, /quit ends.",
              file=sys.stderr)
        while True:
            print("> ", end="", file=sys.stderr, flush=True)  # stdout carries only the answers
            try:
                line = input()
            except EOFError:
                break
            line = line.strip()
            if not line:
                continue
            if line in ("/quit", "/exit"):
                break
            if line == "/reset":
                model.reset()
                print("[conversation forgotten]", file=sys.stderr)
                continue
            if line.startswith("/image "):
                path = line[len("/image "):].strip()
                if Path(path).is_file():
                    pending.append(path)
                else:
                    print(f"qwenvl-edge: error: {path}: no such image file", file=sys.stderr)
                continue
            try:
                for piece in model.chat(line, pending, stream=True, **_sampling(a)):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            except QwenVLError as e:  # one bad turn must not end the conversation
                print(f"qwenvl-edge: error: {e}", file=sys.stderr)
                continue
            sys.stdout.write("\n")
            pending = []
            result = model.last_result
            _print_timings(result)
            print(f"[re-used {result.timings.reused_positions} cached positions]", file=sys.stderr)
    return 0


DEMO_SEED = 4  # the demo's images: a seed the training never saw


def default_demo_dir() -> Path:
    """``$XDG_CACHE_HOME/qwenvl-edge/demo`` (default ``~/.cache/qwenvl-edge/demo``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwenvl-edge" / "demo"


def _demo_bundle(home: Path, llm: str, rebuild: bool) -> Path:
    """The tiny trained model's bundle under ``home``, rebuilt when missing or when the shipped weights changed."""
    import hashlib

    from qwenvl_edge.bundle_export import ExportOptions, export_bundle
    from qwenvl_edge.export.tiny_trained import DATA, write_tiny_trained

    ckpt, bundle, stamp = home / "tiny-trained-checkpoint", home / f"tiny-trained-bundle-{llm}", home / "weights.sha256"
    digest = hashlib.sha256(DATA.read_bytes()).hexdigest() if DATA.is_file() else "missing"
    fresh = (bundle / "manifest.json").is_file() and stamp.is_file() and stamp.read_text().strip() == digest
    if rebuild or not fresh:
        progress = ProgressPrinter()
        print(f"demo: rebuilding the tiny trained Qwen-VL checkpoint in {ckpt}", file=sys.stderr)
        write_tiny_trained(ckpt, progress=progress)
        print(f"demo: exporting it (INT8 vision, {llm} LLM) to {bundle}", file=sys.stderr)
        export_bundle(ckpt, bundle, ExportOptions(llm=llm, force=True), progress=progress)
        stamp.write_text(digest + "\n")
    return bundle


def cmd_demo(a: argparse.Namespace) -> int:
    """Ask the tiny trained model its three tasks (sign, colour, grounding) about freshly drawn images."""
    from qwenvl_edge import task_images
    from qwenvl_edge.runtime.boxes import draw_boxes

    home = Path(a.dir) if a.dir else default_demo_dir()
    home.mkdir(parents=True, exist_ok=True)
    a.bundle = _demo_bundle(home, a.llm, a.rebuild)
    draw = a.draw or home / "demo-grounding-box.png"
    right = 0
    with _open_model(a) as model:
        for task in ("sign", "colour", "grounding"):
            sample = task_images.make_set(task, 1, DEMO_SEED)[0]
            path = home / f"demo-{task}.png"
            sample.image.save(path)
            question = a.question or sample.question
            result = model.generate([str(path)], question, **_sampling(a))
            model.reset()
            ok = a.question is None and task_images.answer_correct(sample, result.text)
            right += ok
            mark = f"  ({'right' if ok else 'expected ' + sample.answer})" if a.question is None else ""
            print(f"{path}\n  Q: {question}\n  A: {result.text}{mark}")
            if task == "grounding":
                draw_boxes(sample.image, result.boxes, draw)
                print(f"  [drew {len(result.boxes)} box(es) on {draw}]")
    if a.question is None:
        print(f"demo: {right}/3 right (bundle {a.bundle})", file=sys.stderr)
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from qwenvl_edge.evaluate import evaluate, folder_items, format_report, synthetic_items

    if a.n < 1:
        raise QwenVLError(f"--n must be at least 1, got {a.n}")
    items = folder_items(a.images) if a.images else synthetic_items(a.n, a.seed)
    report = evaluate(a.bundle, items, a.reference, a.threads)
    print(json.dumps(report, ensure_ascii=False) if a.json else format_report(report))
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from qwenvl_edge.runtime.bundle import Bundle

    bundle = Bundle.open(a.bundle)
    bundle.verify_checksums()
    print(f"{bundle.folder}: {len(bundle.manifest['files'])} files match the manifest")
    return 0
