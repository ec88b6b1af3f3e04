"""What each ``qwenvl-edge`` subcommand does, given its parsed arguments (``chat`` is in ``chat.py``).

``qwenvl_edge.cli`` parses; these functions do the work and print (this is the ``__main__`` side, so
``print`` is allowed here and nowhere in the rooms). Each returns the exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
from pathlib import Path

from qwenvl_edge.cli import resident
from qwenvl_edge.cli.common import check_model_options, open_model, print_timings, sampling, say
from qwenvl_edge.cli.inputs import BadLine, Job, read_batch, split_items
from qwenvl_edge.contract import MANIFEST_FILE
from qwenvl_edge.errors import OptionError, QwenVLError
from qwenvl_edge.quant.registry import DEFAULT_SCHEME


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

    if a.out.exists() and (not a.out.is_dir() or any(a.out.iterdir())):
        raise OptionError(f"{a.out}: exists and is not an empty folder; synth writes a checkpoint only into a new "
                          "or empty folder (two checkpoints in one folder would mix)")
    shard = None if a.shard_mb == 0 else a.shard_mb * 2**20
    progress = None if a.quiet else ProgressPrinter()
    write_checkpoint(a.out, a.preset, a.seed, a.format, shard, a.tiktoken, a.override, progress=progress)
    print(a.out)
    return 0


def check_export_options(a: argparse.Namespace) -> None:
    """What argparse cannot see: calibration images only where a scheme reads them."""
    scheme = a.vision_scheme or DEFAULT_SCHEME
    if a.calibration_image and (a.vision != "int8" or scheme != "static"):
        used = f"--vision {a.vision}" if a.vision != "int8" else f"the {scheme} scheme"
        raise OptionError(f"--calibration-image is read only by --vision-scheme static; {used} would ignore it")


def cmd_export(a: argparse.Namespace) -> int:
    from qwenvl_edge.bundler.bundle_export import ExportOptions, export_bundle
    from qwenvl_edge.bundler.export_target import Terminated

    check_export_options(a)
    opts = ExportOptions(vision=a.vision, vision_scheme=a.vision_scheme, int8_floor=a.int8_floor,
                         calibration_images=tuple(a.calibration_image or ()), llm=a.llm,
                         keep_fp32_vision=a.keep_fp32_vision, n_threads=a.threads, force=a.force,
                         fresh=a.fresh)
    try:
        out = export_bundle(a.checkpoint, a.out, opts, progress=(lambda _m: None) if a.quiet else ProgressPrinter())
    except Terminated:  # SIGTERM: unwound like Ctrl-C, but exits as a SIGTERM'd process does (128 + 15)
        print("qwenvl-edge: interrupted (SIGTERM)", file=sys.stderr)
        return 143  # 128 + SIGTERM(15)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    for name, entry in manifest["files"].items():
        print(f"{entry['bytes'] / 2**20:10.1f} MiB  {out / name}")
    report = manifest["vision"].get("quality")
    if report and not a.quiet:
        from qwenvl_edge.quant.vision_quality import format_floor, format_quality

        print(f"vision INT8 ({report.get('scheme')}) vs FP32 rows:")
        print(format_quality(report["quality"]))
        if "floor" in report:
            print(format_floor(report["floor"]))
    llm_quality = manifest["llm"].get("quality")
    if llm_quality and not a.quiet:
        from qwenvl_edge.quant.gguf_quality import format_gguf_quality

        print(f"llm {manifest['llm']['type']}: {format_gguf_quality(llm_quality, 'BF16')}")
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    if a.batch is not None and a.json_schema is not None:
        raise OptionError("--json-schema cannot be used with --batch")
    if a.batch is not None:
        return _run_batch(a)
    job = split_items(a.items)
    structured = {}
    if a.json_schema is not None:  # checked, and made a grammar once, before the model loads
        from qwenvl_edge.runtime.structured import schema_file_format

        structured = {"response_format": schema_file_format(a.json_schema)}
    if a.draw is not None and not job.images:
        raise OptionError("--draw needs an image to draw on")
    if a.draw is not None and not a.draw.parent.is_dir():
        raise OptionError(f"--draw {a.draw}: no folder {a.draw.parent} to write it in")
    check_model_options(a)
    result = resident.answer(a, job.images, job.question, structured)  # a resident server's; None: load here
    if result is not None:
        if a.draw:
            _draw(a, job.images, result, a.draw)
        resident.show_timings(a, result)
        return 0
    with open_model(a) as model:
        if a.json:
            result = model.generate(job.images, job.question, **sampling(a), **structured)
        else:
            for piece in model.generate(job.images, job.question, stream=True, **sampling(a), **structured):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            sys.stdout.flush()
            result = model.last_result
        if a.draw:
            _draw(a, job.images, result, a.draw)
    if a.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False), flush=True)
    else:
        print_timings(a, result)
    return 0


def _run_batch(a: argparse.Namespace) -> int:
    """Every line of ``--batch`` with one model load; one JSON line out per line in, in order.

    Every line is checked before the model loads; a bad line, or one that fails while it is answered,
    gets ``{"error": ...}`` in its place and the others are answered all the same (exit code 2 then).
    """
    if a.items:
        raise OptionError("--batch reads the images and questions from its file: give no other arguments")
    if a.draw is not None:
        raise OptionError("--draw cannot be used with --batch")
    entries = read_batch(a.batch)
    check_model_options(a)
    failed = 0
    any_job = any(isinstance(entry, Job) for entry in entries)
    with open_model(a) if any_job else contextlib.nullcontext() as model:  # no load when every line is bad
        for entry in entries:
            if isinstance(entry, BadLine):
                out, failed = {"error": entry.error}, failed + 1
            else:
                try:
                    out = model.generate(entry.images, entry.question, **sampling(a)).to_dict()
                except QwenVLError as e:  # one bad image must not cost the other answers
                    out, failed = {"error": str(e)}, failed + 1
            print(json_line(out), flush=True)
    if failed:
        raise QwenVLError(f"{failed} of {len(entries)} questions failed (their output lines hold an \"error\")")
    say(a, f"[answered {len(entries)} questions]")
    return 0


def json_line(obj: dict) -> str:
    """One JSON line; a file name of undecodable bytes (lone surrogates) is escaped, not a crash at print."""
    text = json.dumps(obj, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj)
    return text


def _draw(a: argparse.Namespace, images: list[str], result, out: Path) -> None:
    from qwenvl_edge.runtime.boxes import draw_boxes
    from qwenvl_edge.runtime.preprocess import load_image

    draw_boxes(load_image(images[0]), result.boxes, out)
    say(a, f"[drew {len(result.boxes)} box(es) on {out}]")


# the demo's images: a seed the training never saw, whose three pictures the shipped weights answer right
# (seed 4's sign, a large CAFE at the top edge, is one of the 2 % they misread; accuracy: benchmarks/RESULTS.md)
DEMO_SEED = 5


def _demo_bundle(home: Path, llm: str, rebuild: bool) -> Path:
    """The tiny trained model's bundle under ``home``, rebuilt when missing or when the shipped weights changed."""
    import hashlib

    from qwenvl_edge.bundler.bundle_export import ExportOptions, export_bundle
    from qwenvl_edge.export.tiny_trained import DATA, write_tiny_trained

    ckpt, bundle, stamp = home / "tiny-checkpoint", home / "tiny-bundle", home / "weights.sha256"
    digest = (hashlib.sha256(DATA.read_bytes()).hexdigest() if DATA.is_file() else "missing") + f" {llm}"
    fresh = (bundle / MANIFEST_FILE).is_file() and stamp.is_file() and stamp.read_text().strip() == digest
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
    from qwenvl_edge.evaluation import task_images
    from qwenvl_edge.runtime.boxes import draw_boxes

    home = Path(a.dir)
    home.mkdir(parents=True, exist_ok=True)
    a.bundle = _demo_bundle(home, a.llm, a.rebuild)
    draw = a.draw or home / "demo-grounding-box.png"
    right = 0
    with open_model(a) as model:
        for task in ("sign", "colour", "grounding"):
            sample = task_images.make_set(task, 1, DEMO_SEED)[0]
            path = home / f"demo-{task}.png"
            sample.image.save(path)
            question = a.question or sample.question
            result = model.generate([str(path)], question, **sampling(a))
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
    """Every input is checked before any model work: options, both manifests (a --reference of another
    model is refused here, not after the answer pass), then questions.json or the synthetic images."""
    from qwenvl_edge.evaluation.evaluate import (
        check_counts,
        evaluate,
        folder_items,
        format_report,
        open_bundles,
        synthetic_items,
    )

    check_counts(a.n, a.seed)  # the option table checked them too; this keeps the order: cheap checks first
    open_bundles(a.bundle, a.reference)
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


def cmd_cache(a: argparse.Namespace) -> int:
    from qwenvl_edge.cli import cache

    kinds = cache.select_kinds(a.kind)
    store = cache.open_store()
    if a.action == "clear":
        cache.check_clear(store.folder, kinds)
        for kind in kinds:
            if kind == "export":
                from qwenvl_edge.bundler.export_stages import clear_export_cache

                size = cache.export_folders_size()[1]
                print(f"{kind}: removed {clear_export_cache()} folders ({cache.human(size)})")
                continue
            size = store.size(kind)[1]
            print(f"{kind}: removed {store.clear(kind)} entries ({cache.human(size)})")
        return 0
    print(f"cache folder: {store.folder} (at most {cache.human(store.max_bytes)}, least recently used go first)")
    for kind in kinds:
        entries, size = cache.export_folders_size() if kind == "export" else store.size(kind)
        print(f"{kind:<7} {entries:6d} entries {cache.human(size):>10}  {cache.KINDS[kind]}")
    return 0


def cmd_completion(a: argparse.Namespace) -> int:
    from qwenvl_edge.cli.completion import script

    sys.stdout.write(script(a.shell))
    return 0
