"""``qwenvl-native run``: the whole pipeline in the native core (image file -> vision.onnx through ONNX Runtime's
C API -> llm.gguf through llama.cpp), run as a real process on real bundles.

What it pins down:
- on the golden tiny F32 bundle (FP32 vision, F32 LLM) the command answers exactly the golden text, greedy, for
  one image, two images and text only (the same text the Python runtime gives, tests/test_runtime_golden.py);
- its image rows equal the Python runtime's (read_image -> preprocess_image -> onnxruntime): FP32 within 1e-4,
  the INT8 bundle's with min cosine >= 0.999, for a PNG, an RGBA PNG and a JPEG with an EXIF rotation (the
  native decoders, the orientation and the Pillow-exact resize, not only the graph);
- transparent PNGs (RGBA, LA, palette and gray with a tRNS colour) are composited onto white, as in Python;
- a bundle whose manifest has another mean and std gives other rows, the same as Python's for that bundle;
- bad input (a missing bundle, an unreadable image, an unknown option) is one line on stderr, nothing on stdout
  and a non-zero exit;
- speed settings as the Python runtime's (issue 26): the decoder loads while the images encode (--overlap,
  QWENVL_EDGE_OVERLAP), mapped by default (--load), with as many threads as usable cores, and OpenMP's barriers
  spin briefly (GOMP_SPINCOUNT) unless the user set otherwise; the answers stay golden.
The binary comes from the shared host build (tests/native_build.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qwenvl_edge import contract
from qwenvl_edge.runtime.bundle import Bundle
from qwenvl_edge.runtime.preprocess import preprocess_image, read_image
from qwenvl_edge.runtime.vision import VisionEncoder
from tests.native_build import BUILD_ROOT, build_native, needs_cmake
from tests.test_model_facts_bundle import other_normalisation
from tests.test_model_facts_images import transparent_images

pytestmark = needs_cmake
GOLDEN_CASES = ["one_image", "two_images", "text_only"]


@pytest.fixture(scope="module")
def native_cmd() -> Path:
    build = build_native(BUILD_ROOT / "host")
    cache = (build / "CMakeCache.txt").read_text(encoding="utf-8")
    assert "QWENVL_ORT_LIBRARY" in cache and (build / "onnxruntime").is_dir(), "built without ONNX Runtime"
    return build / "qwenvl-native"


def run_native(cmd: Path, *args: str | Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(cmd), "run", *map(str, args)], capture_output=True, timeout=timeout)


@pytest.fixture(scope="module")
def test_images(tmp_path_factory: pytest.TempPathFactory, golden) -> list[Path]:
    """A golden PNG, an RGBA PNG (composited onto white) and a JPEG stored sideways (EXIF 6)."""
    folder = tmp_path_factory.mktemp("native_images")
    rng = np.random.default_rng(3)
    smooth = np.cumsum(rng.integers(-6, 7, (200, 320, 4)), axis=1).clip(0, 255).astype(np.uint8)
    rgba = folder / "alpha.png"
    Image.fromarray(smooth, "RGBA").save(rgba)
    jpeg = folder / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(smooth[..., :3], "RGB").save(jpeg, quality=90, exif=exif.tobytes())
    return [golden.images["sign"], rgba, jpeg]


def native_rows(cmd: Path, bundle: Path, images: list[Path], out: Path) -> np.ndarray:
    proc = run_native(cmd, bundle, *images, "rows", "--vision-only", "--rows-out", out)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b""
    return np.fromfile(out, dtype="<f4").reshape(len(images), contract.N_QUERIES, -1)


def python_rows(bundle: Path, images: list[Path]) -> np.ndarray:
    spec = Bundle.open(bundle).model.image_spec  # the bundle's side, mean and std
    with VisionEncoder(bundle / contract.VISION_FILE, n_threads=2) as vision:
        pixels = np.stack([preprocess_image(read_image(p).image, spec) for p in images])
        return vision.encode(pixels)


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_answers_golden_exact(native_cmd: Path, f32_bundle: Path, golden, case: str):
    """Catches any step of the native pipeline that differs from the original: decoding, resize, vision, prompt."""
    c = golden.cases[case]
    images = [golden.images[name] for name in c["images"]]
    proc = run_native(native_cmd, f32_bundle, *images, c["text"], "--greedy", "--max-tokens", golden.max_new_tokens,
                      "--threads", "2")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode("utf-8") == c["generated_text"] + "\n"
    assert proc.stderr == b""


def test_fp32_rows_match_the_python_runtime(native_cmd: Path, f32_bundle: Path, test_images, tmp_path: Path):
    """Catches a decoder, orientation or resize that differs from Pillow's, and a wrong ONNX Runtime call."""
    got = native_rows(native_cmd, f32_bundle, test_images, tmp_path / "rows.f32")
    want = python_rows(f32_bundle, test_images)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 1e-4


def test_int8_rows_match_the_python_runtime(native_cmd: Path, default_bundle: Path, test_images, tmp_path: Path):
    """The default (INT8) bundle: the same dynamic-INT8 graph through the C API."""
    got = native_rows(native_cmd, default_bundle, test_images, tmp_path / "rows.f32")
    got = got.reshape(len(test_images) * contract.N_QUERIES, -1)
    want = python_rows(default_bundle, test_images).reshape(got.shape)
    cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cosine.min() >= 0.999


def test_transparent_pngs_are_composited_on_white_as_in_python(native_cmd: Path, f32_bundle: Path, tmp_path: Path):
    """Before: libpng's strip_alpha gave black where Python (and a browser) show white."""
    pngs = transparent_images(tmp_path)
    images = [pngs[mode][0] for mode in ("RGBA", "LA", "P+tRNS", "L+tRNS", "RGB+tRNS")]
    got = native_rows(native_cmd, f32_bundle, images, tmp_path / "rows.f32")
    want = python_rows(f32_bundle, images)
    assert np.abs(got - want).max() < 1e-4
    dropped = tmp_path / "dropped.png"  # what the native loader used to see: the colours without alpha
    Image.open(images[0]).convert("RGB").save(dropped)
    assert np.abs(got[0] - python_rows(f32_bundle, [dropped])[0]).max() > 1e-3


def test_rows_follow_the_manifests_mean_and_std(native_cmd: Path, f32_bundle: Path, golden, tmp_path: Path):
    """The command normalises with the bundle's mean/std: other numbers, other rows, the same as Python's."""
    other = other_normalisation(f32_bundle, tmp_path / "other")
    images = [golden.images["sign"]]
    got = native_rows(native_cmd, other, images, tmp_path / "other.f32")
    usual = native_rows(native_cmd, f32_bundle, images, tmp_path / "usual.f32")
    assert np.abs(got - python_rows(other, images)).max() < 1e-4
    assert np.abs(got - usual).max() > 1e-3


@pytest.mark.parametrize("args, message", [
    (["{missing}", "hi"], "manifest.json: missing"),
    (["{bundle}", "{bad_image}", "hi"], "cannot read image"),
    (["{bundle}", "hi", "--kv", "q4"], "--kv q4"),
    (["{bundle}", "hi", "--max-tokens", "0"], "--max-tokens 0"),
])
def test_bad_input_is_one_line(native_cmd: Path, f32_bundle: Path, tmp_path: Path, args: list[str], message: str):
    """Catches tracebacks, crashes, partial answers on stdout and zero exits on bad input."""
    bad_image = tmp_path / "not-an-image.png"
    bad_image.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    names = {"missing": tmp_path / "nowhere", "bundle": f32_bundle, "bad_image": bad_image}
    proc = run_native(native_cmd, *[a.format(**names) for a in args])
    err = proc.stderr.decode()
    assert proc.returncode != 0 and proc.stdout == b""
    assert err.count("\n") == 1 and err.startswith("qwenvl-native: error: ") and message in err, err


# --- speed: the decoder loads beside the encoder, threads, OpenMP spinning (issue 26) ----------------------------


def run_native_env(cmd: Path, *args: str | Path, env: dict | None = None, preexec_fn=None
                   ) -> subprocess.CompletedProcess:
    """``run_native`` with the OpenMP settings of the caller's environment left out unless ``env`` names them."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_DISPLAY_ENV", "QWENVL_EDGE_OVERLAP")}
    return subprocess.run([str(cmd), "run", *map(str, args)], capture_output=True, timeout=300,
                          env={**base, **(env or {})}, preexec_fn=preexec_fn)


def stats_of(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stderr.decode().strip().splitlines()[-1])


@pytest.mark.parametrize("flags, env, overlap, load", [
    ([], {"QWENVL_EDGE_OVERLAP": "1"}, True, "map"),  # the default load: mapped, as `qwenvl-edge run`
    ([], {"QWENVL_EDGE_OVERLAP": "0"}, False, "map"),
    (["--overlap", "on", "--load", "read"], {"QWENVL_EDGE_OVERLAP": "0"}, True, "read"),  # the flag wins
    (["--overlap", "off", "--load", "read"], {}, False, "read"),  # the phone order
    (["--mmap", "--overlap", "on"], {}, True, "map"),
])
def test_decoder_loads_beside_the_encoder_with_the_same_answer(native_cmd: Path, f32_bundle: Path, golden,
                                                               flags: list[str], env: dict, overlap: bool, load: str):
    """Catches a decoder that loads only after the vision step (time to first token), a load on the other thread
    that changes the answer, and --load / --overlap / QWENVL_EDGE_OVERLAP that do not do what they say."""
    c = golden.cases["one_image"]
    images = [golden.images[name] for name in c["images"]]
    proc = run_native_env(native_cmd, f32_bundle, *images, c["text"], "--greedy", "--max-tokens",
                          golden.max_new_tokens, "--threads", "2", "--stats", *flags, env=env)
    assert proc.stdout.decode("utf-8") == c["generated_text"] + "\n"
    stats = stats_of(proc)
    assert (stats["overlap"], stats["load"], stats["mmap"]) == (overlap, load, load == "map")
    assert stats["decoder_load_ms"] > 0 and stats["decoder_wait_ms"] >= 0


@pytest.mark.parametrize("flag, message", [(["--load", "mmap"], "--load mmap: expected map or read"),
                                           (["--overlap", "yes"], "--overlap yes: expected auto, on or off"),
                                           (["--load"], "--load needs a value")])
def test_bad_load_options_are_one_line(native_cmd: Path, f32_bundle: Path, flag: list[str], message: str):
    proc = run_native(native_cmd, f32_bundle, "hi", *flag)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and proc.stdout == b"" and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("cpus, flags, threads", [(1, [], 1), (2, [], 2), (1, ["--threads", "3"], 3)])
def test_decoder_threads_default_to_the_usable_cores(native_cmd: Path, f32_bundle: Path, cpus: int,
                                                     flags: list[str], threads: int):
    """Catches a default that counts every online core (hardware_concurrency) instead of the affinity mask, as
    the Python runtime does: more decoder threads than usable cores make every barrier wait on a thread that
    is not running."""
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < cpus:
        pytest.skip(f"needs {cpus} usable cores")
    proc = run_native_env(native_cmd, f32_bundle, "hi", "--max-tokens", "2", "--stats", *flags,
                          preexec_fn=lambda: os.sched_setaffinity(0, usable[:cpus]))
    assert stats_of(proc)["n_threads"] == threads


@pytest.mark.parametrize("env, spin, displayed", [
    ({}, "GOMP_SPINCOUNT=10000", "10000"),  # the command's own short spin, seen by libgomp after the re-exec
    ({"GOMP_SPINCOUNT": "777"}, "GOMP_SPINCOUNT=777", "777"),  # the user's wins
    ({"OMP_WAIT_POLICY": "active"}, "OMP_WAIT_POLICY=active", None),
])
def test_openmp_threads_spin_briefly_unless_the_user_says(native_cmd: Path, f32_bundle: Path, golden, env: dict,
                                                          spin: str, displayed: str | None):
    """Catches libgomp's default 300000-round busy-wait at every barrier, which collapses decoding when another
    process wants a core (0.51 tok/s measured), and a command that overrides the user's own setting."""
    c = golden.cases["text_only"]
    proc = run_native_env(native_cmd, f32_bundle, c["text"], "--greedy", "--max-tokens", golden.max_new_tokens,
                          "--stats", env={**env, "OMP_DISPLAY_ENV": "verbose"})
    assert proc.stdout.decode("utf-8") == c["generated_text"] + "\n"
    stats = stats_of(proc)
    if stats["omp_spin"] == "no libgomp":
        pytest.skip("llama.cpp is built without libgomp here")
    assert stats["omp_spin"] == spin
    seen = re.findall(r"GOMP_SPINCOUNT = '(\d+)'", proc.stderr.decode())
    if displayed is not None:
        assert seen[-1] == displayed, seen  # what libgomp itself read in the process that decoded
