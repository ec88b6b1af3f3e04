"""The README's Python example runs as written (on the tiny bundle, placed where the example looks)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_python() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_example_runs(f32_bundle: Path, golden, tmp_path: Path, monkeypatch, capsys) -> None:
    home = tmp_path / "home"
    (home / ".cache" / "qwenvl-edge").mkdir(parents=True)
    (home / ".cache" / "qwenvl-edge" / "bundle").symlink_to(f32_bundle)  # the example's "~/.cache/..." path
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    shutil.copy(golden.images["sign"], tmp_path / "photo.jpg")  # a PNG under the example's name: content decides
    exec(compile(readme_python(), "README.md", "exec"), {})  # noqa: S102 - the README is this repo's own text
    out = capsys.readouterr().out
    assert "prompt_tokens" in out and "completion_tokens" in out  # the usage dict was printed
    assert any((home / ".cache" / "qwenvl-edge" / "rows").rglob("*.qvl"))  # the default cache under ~
