"""What the CLI tests share: a temporary HOME and XDG folders, running the CLI in-process or as a process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwenvl_edge.cli import main


@pytest.fixture(autouse=True)
def temp_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HOME and the XDG folders in tmp_path: nothing a test runs writes into the user's home."""
    home = tmp_path / "home"
    for name, sub in {"HOME": "", "XDG_CACHE_HOME": ".cache", "XDG_STATE_HOME": ".local/state",
                      "XDG_CONFIG_HOME": ".config", "XDG_DATA_HOME": ".local/share"}.items():
        (home / sub).mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(name, str(home / sub))
    monkeypatch.delenv("QWENVL_EDGE_BUNDLE", raising=False)
    return home


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """``qwenvl-edge ARGS`` in this process: (exit code, stdout, stderr)."""
    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def run_process(args: list[str], stdin: bytes | None = None, timeout: float = 120,
                **kw) -> subprocess.CompletedProcess:
    """``python -m qwenvl_edge ARGS`` as its own process (the environment as the test set it)."""
    return subprocess.run([sys.executable, "-m", "qwenvl_edge", *args], input=stdin, capture_output=True,
                          timeout=timeout, env=dict(os.environ), **kw)


def assert_one_line_error(rc: int, err: str, *fragments: str) -> None:
    assert rc == 2, err
    assert err.startswith("qwenvl-edge: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
