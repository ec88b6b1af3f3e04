"""Shell completion: the scripts ``qwenvl-edge completion bash|zsh`` prints work in those shells."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.cli_helpers import run_cli, temp_home  # noqa: F401


def bash_complete(script: Path, line: str) -> list[str]:
    """What bash offers for ``line`` (completing its last word) with ``script`` sourced."""
    words = line.split(" ")
    program = f"""
source {script}
COMP_LINE={line!r}; COMP_POINT=${{#COMP_LINE}}
COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}
_shtab_qwenvl_edge qwenvl-edge {words[-1]!r} {words[-2]!r}
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    done = subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.fixture()
def bash_script(tmp_path: Path, capsys) -> Path:
    rc, out, err = run_cli(["completion", "bash"], capsys)
    assert rc == 0, err
    script = tmp_path / "qwenvl-edge.bash"
    script.write_text(out)
    return script


def test_bash_completes_commands_options_and_choices(bash_script: Path, tmp_path: Path) -> None:
    assert bash_complete(bash_script, "qwenvl-edge ch") == ["chat"]
    assert bash_complete(bash_script, "qwenvl-edge c") == ["chat", "cache", "completion"]
    assert bash_complete(bash_script, "qwenvl-edge run --n-") == ["--n-ctx"]
    assert "--release-vision" in bash_complete(bash_script, "qwenvl-edge chat --")
    assert bash_complete(bash_script, "qwenvl-edge export ck out --vision ") == ["int8", "fp32"]
    assert bash_complete(bash_script, "qwenvl-edge cache ") == ["show", "clear"]


def test_zsh_script_loads_as_a_completion_function(tmp_path: Path, capsys) -> None:
    rc, out, _ = run_cli(["completion", "zsh"], capsys)
    assert rc == 0 and out.startswith("#compdef qwenvl-edge")
    assert "run:" in out and "--n-ctx" in out
    zsh = shutil.which("zsh")
    if zsh is None:  # the static checks above still ran; CI installs zsh
        assert os.environ.get("CI") != "true", "zsh is missing: .ci/run installs it"
        return
    functions = tmp_path / "zfunc"
    functions.mkdir()
    (functions / "_qwenvl-edge").write_text(out)
    assert subprocess.run([zsh, "-n", str(functions / "_qwenvl-edge")], capture_output=True).returncode == 0
    program = (f"fpath=({functions} $fpath); autoload -Uz compinit; compinit -u -d {tmp_path}/zcompdump; "
               "print -r -- $_comps[qwenvl-edge]")
    done = subprocess.run([zsh, "-f", "-c", program], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.strip() == "_qwenvl-edge", done.stderr


def test_bash_completes_registry_names_and_both_verbosity_places(bash_script: Path) -> None:
    """--llm and --vision-scheme complete the registries' own names (quant/registry.py), not a hand-made copy."""
    assert bash_complete(bash_script, "qwenvl-edge export ck out --llm Q4_K") == ["Q4_K_M", "Q4_K_S"]
    assert bash_complete(bash_script, "qwenvl-edge demo --llm IQ4") == ["IQ4_NL", "IQ4_XS"]
    assert bash_complete(bash_script, "qwenvl-edge export ck out --vision-scheme dynamic-") == [
        "dynamic-u8", "dynamic-s7", "dynamic-per-tensor"]
    assert {"-q", "--quiet"} <= set(bash_complete(bash_script, "qwenvl-edge -"))
