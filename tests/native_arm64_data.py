"""The files the ARM64 run of the native tests reads (native/arm64/run.sh, under qemu-aarch64).

Written here on x86-64 by the project's own tooling, read there by the aarch64 binaries:
- the folder ``QWENVL_TEST_DATA`` names for ctest (``write_test_data`` of tests/test_native_core.py:
  the golden cases, rows and pixels, and the tiny golden checkpoint's decoder as ``tiny-F32.gguf``);
- ``tiny-Q4_0.gguf``: the same decoder in Q4_0, which llama.cpp repacks into its ARM layouts
  (q4_0_4x4 with dot-product, q4_0_4x8 with i8mm), for ``qwenvl_cpu_probe``.

``write_ppm`` writes the upright 8-bit RGB the Python runtime reads from an image as binary PPM (the
command's own decoder, no library): tests/test_native_arm64.py feeds the pipeline those pixels, and
tests/test_arm64_images.py compares the aarch64 command's PNG/JPEG decoding (libpng, libjpeg-turbo from
Debian's arm64 multiarch packages) against them.

    python -m tests.native_arm64_data OUT     # what run.sh calls when QWENVL_TEST_DATA is not set
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from PIL import Image

from qwenvl_edge.export.checkpoint import CheckpointReader
from qwenvl_edge.export.llm_gguf import write_llm_gguf
from qwenvl_edge.export.synthetic_checkpoint import write_checkpoint
from qwenvl_edge.quant.gguf_quant import quantize_gguf
from qwenvl_edge.runtime.preprocess import read_image

F32_NAME, Q4_0_NAME = "tiny-F32.gguf", "tiny-Q4_0.gguf"


def write_arm64_data(out: Path, golden, ckpt: Path) -> Path:
    """Everything run.sh reads, in ``out`` (golden: tests.conftest.Golden; ckpt: the tiny golden checkpoint)."""
    from tests.test_native_core import write_test_data

    out.mkdir(parents=True, exist_ok=True)
    reader = CheckpointReader(ckpt)
    gguf = write_llm_gguf(reader, out / F32_NAME, "F32")
    write_test_data(out, golden, gguf, reader.config.hidden_size)
    quantize_gguf(gguf, out / Q4_0_NAME, "Q4_0", n_threads=2)
    return out


def write_ppm(images: Mapping[str, Image.Image | Path], out: Path) -> dict[str, Path]:
    """Each image as ``out/NAME.ppm``: the upright RGB the runtime reads from it, for the aarch64 ``qwenvl-native``."""
    out.mkdir(parents=True, exist_ok=True)
    written = {name: out / f"{name}.ppm" for name in images}
    for name, image in images.items():
        read_image(image).image.save(written[name])
    return written


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tests.native_arm64_data OUT", file=sys.stderr)
        return 2
    out = Path(argv[0]).resolve()  # cases.txt names the GGUF by this path; ctest runs elsewhere
    from tests import conftest  # Golden; importing it points HOME at a temp folder, removed below

    try:
        with tempfile.TemporaryDirectory(prefix="qwenvl-arm64-ckpt-") as tmp:
            ckpt = write_checkpoint(Path(tmp) / "tiny", "tiny", seed=0)
            write_arm64_data(out, conftest.Golden(), ckpt)
    finally:
        shutil.rmtree(conftest.TEST_HOME, ignore_errors=True)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
