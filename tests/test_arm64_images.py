"""PNG and JPEG photos on ARM64: the cross-built ``qwenvl-native`` decodes them as x86-64 does (long suite).

The aarch64 build links Debian's arm64 libpng and libjpeg-turbo (multiarch packages, the same versions as
x86-64's: native/cmake/aarch64-linux-gnu.cmake), so a phone photo goes in as it is, no PPM copy. What it
pins down, under ``qemu-aarch64 -cpu cortex-a76`` (the decoders' NEON code is the same on every ARM64 CPU):
- the pixels: the FP32 vision rows of a JPEG stored sideways (EXIF 6), a PNG with an EXIF rotation (eXIf 8)
  and a JPEG over 16 MP (decoded at 1/8 DCT scale, as Pillow's draft) equal, bit for bit, the rows of PPM
  copies of what the Python runtime reads from them (read_image: exif_transpose, draft); and they match
  x86-64's own ``qwenvl-native`` on the same files within 1e-4 (the existing FP32 rule);
- the answers: on the golden F32 bundle the ARM64 answer to the JPEG and the PNG equals x86-64's exactly; on
  the trained tiny model's Q4_0 bundle (INT8 vision) it equals x86-64's, or differs only by a near-tie of
  x86-64's own decoder (tests/test_native_arm64.py's NEAR_TIE rule).
Before the multiarch libraries the aarch64 command refused both ("PNG: this build has no libpng").
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qwenvl_edge import contract
from qwenvl_edge.evaluation.evaluate import synthetic_items
from tests.conftest import export_for_tests
from tests.native_arm64_data import write_ppm
from tests.native_build import BUILD_ROOT, build_native
from tests.test_native_arm64 import (
    BUILD,
    NEAR_TIE,
    TASK_SEED,
    TASK_TOKENS,
    below_greedy,
    native_arm64,
    run_sh,
    vision_rows_arm64,
)

pytestmark = pytest.mark.long
CPU = "cortex-a76"
LARGE = (4200, 4100)  # 17.2 MP, over runtime/preprocess.py's DRAFT_ABOVE (2**24): decoded at 1/8 scale


@pytest.fixture(scope="module")
def arm64_cmd() -> Path:
    """The aarch64 qwenvl-native (run.sh --build-only: nothing to do when .ci/run built it)."""
    run_sh("--build-only")
    return BUILD / "bin" / "qwenvl-native"


@pytest.fixture(scope="module")
def x86_cmd() -> Path:
    return build_native(BUILD_ROOT / "host") / "qwenvl-native"


def smooth(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like RGB image: smooth colour fields with fine detail (what a JPEG's DCT is made for)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (height // 40 + 2, width // 40 + 2, 3), dtype=np.uint8), "RGB")
    base = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-12, 13, (height, width, 1), dtype=np.int16)
    return Image.fromarray((base + grain).clip(0, 255).astype(np.uint8), "RGB")


def save_rotated(image: Image.Image, path: Path, orientation: int, **options) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif.tobytes(), **options)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A sideways JPEG (EXIF 6), a PNG with an EXIF rotation (8) and a JPEG over the draft threshold."""
    folder = tmp_path_factory.mktemp("arm64_photos")
    return {
        "jpeg": save_rotated(smooth(640, 480, 1), folder / "photo.jpg", 6, quality=90),
        "png": save_rotated(smooth(480, 360, 2), folder / "photo.png", 8),
        "large": save_rotated(smooth(*LARGE, 3), folder / "large.jpg", 6, quality=85),
    }


def x86_answer(cmd: Path, *args: str | Path | int) -> str:
    proc = subprocess.run([str(cmd), "run", *map(str, args), "--threads", "2"], capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout.decode("utf-8")


@pytest.fixture(scope="module")
def f32_run(arm64_cmd: Path, x86_cmd: Path, f32_bundle: Path, golden, photos, tmp_path_factory) -> dict:
    """One question about the three photos on the golden F32 bundle, on ARM64 and on x86-64: answers and rows.
    The vision step encodes one image at a time, so an image's rows do not depend on the others."""
    out = tmp_path_factory.mktemp("f32_run")
    images = [photos["jpeg"], photos["png"], photos["large"]]
    args = (f32_bundle, *images, golden.cases["one_image"]["text"], "--greedy", "--max-tokens",
            golden.max_new_tokens)
    arm = native_arm64(CPU, *args, "--rows-out", out / "arm.f32")
    x86 = x86_answer(x86_cmd, *args, "--rows-out", out / "x86.f32")
    rows = {name: np.fromfile(out / f"{name}.f32", dtype="<f4").reshape(len(images), contract.N_QUERIES, -1)
            for name in ("arm", "x86")}
    return {"images": images, "arm": arm, "x86": x86, **{f"{k}_rows": v for k, v in rows.items()}}


def test_arm64_decodes_photos_as_pillow(f32_run: dict, f32_bundle: Path, tmp_path: Path):
    """Catches an ARM64 decoder, orientation or DCT scaling that gives other pixels than the Python runtime."""
    images = f32_run["images"]
    copies = list(write_ppm({p.name: p for p in images}, tmp_path / "ppm").values())
    arm_ppm = vision_rows_arm64(CPU, f32_bundle, copies, tmp_path / "arm_ppm.f32").reshape(f32_run["arm_rows"].shape)
    for k, image in enumerate(images):
        arm, x86 = f32_run["arm_rows"][k], f32_run["x86_rows"][k]
        assert np.array_equal(arm, arm_ppm[k]), f"{image.name}: ARM64 decodes other pixels than Pillow"
        print(f"{image.name}: ARM64 vs x86-64 rows max abs diff {np.abs(arm - x86).max():.3g}")
        assert np.abs(arm - x86).max() <= 1e-4, image.name


def test_arm64_answers_photos_as_x86_at_f32(f32_run: dict):
    """Catches photos that ARM64 reads differently enough to change the golden model's answer."""
    assert f32_run["x86"].strip()
    assert f32_run["arm"] == f32_run["x86"]


@pytest.fixture(scope="module")
def trained_q4_0(trained_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained tiny model with INT8 vision and a Q4_0 decoder (ARM's repacked q4_0_4x4 on cortex-a76)."""
    return export_for_tests(trained_ckpt, tmp_path_factory.mktemp("bundle") / "Q4_0", "int8", "Q4_0")


@pytest.fixture(scope="module")
def task_photos(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, str]]:
    """A colour task image as a sideways JPEG (tests/test_arm64_package.py asks Q4_0 about a PNG)."""
    folder = tmp_path_factory.mktemp("arm64_task_photos")
    items = {it.task: it for it in synthetic_items(1, TASK_SEED)}
    colour = items["colour"]
    jpeg = save_rotated(colour.image.rotate(90, expand=True), folder / "colour.jpg", 6, quality=92)  # upright again
    return [(jpeg, colour.question)]


def test_arm64_answers_photos_as_x86_quantized(arm64_cmd: Path, x86_cmd: Path, trained_q4_0: Path, task_photos):
    """Catches ARM64 JPEG/PNG decoding that, through INT8 vision and Q4_0, changes the trained model's answer."""
    differ = []
    for image, question in task_photos:
        args = (trained_q4_0, image, question, "--greedy", "--max-tokens", TASK_TOKENS)
        x86, arm = x86_answer(x86_cmd, *args), native_arm64(CPU, *args)
        print(f"{image.name}: ARM64 {arm.strip()!r}, x86-64 {x86.strip()!r}")
        if arm != x86:
            gap = max(below_greedy(trained_q4_0, image, question, arm.removesuffix("\n")))
            if gap > NEAR_TIE:
                differ.append((image.name, arm, x86, gap))
    assert not differ, differ
