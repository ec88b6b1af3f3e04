"""How the decoder loads its GGUF: ``run`` maps it as it is, ``--load read`` reads it for llama.cpp to repack.

Both give the golden answer (the F32 bundle; repacking changes only the Q4_K kernels), and the choice
reaches llama.cpp: a mapped GGUF shows in the process's memory map while the decoder is loaded, a
read one does not.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qwenvl_edge.runtime.pipeline import QwenVL
from tests.cli_helpers import run_cli, temp_home  # noqa: F401

TEXT_QUESTION = "Hello! Who are you?"


@pytest.mark.parametrize("load", ["map", "read"])
def test_both_load_modes_give_the_golden_answer(load: str, f32_bundle: Path, golden, capsys) -> None:
    rc, out, err = run_cli(["run", "-q", "--load", load, "--bundle", str(f32_bundle), "--greedy", "--max-tokens", "24",
                            "--no-cache", TEXT_QUESTION], capsys)
    assert rc == 0, err
    assert out == golden.cases["text_only"]["generated_text"] + "\n"


def mapped(path: Path) -> bool:
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


@pytest.mark.parametrize(("use_mmap", "repack"), [(True, False), (False, True)])
def test_the_load_mode_reaches_llama_cpp(use_mmap: bool, repack: bool, f32_bundle: Path) -> None:
    with QwenVL(f32_bundle, n_threads=1, cache_dir=None, use_mmap=use_mmap, repack=repack) as m:
        m.generate([], TEXT_QUESTION, max_tokens=1, temperature=0)
        assert mapped(m.bundle.llm_path) == use_mmap
    assert not mapped(f32_bundle / "llm.gguf")
