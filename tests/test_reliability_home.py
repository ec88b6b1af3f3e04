"""The suite never writes into the user's home: HOME and XDG_CACHE_HOME are temp folders (tests/conftest.py)."""

from __future__ import annotations

import os
import pwd
import tempfile
from pathlib import Path

from qwenvl_edge.runtime.bundle import default_bundle_dir


def test_home_and_cache_are_temporary_folders() -> None:
    real_home = Path(pwd.getpwuid(os.getuid()).pw_dir).resolve()
    tmp = Path(tempfile.gettempdir()).resolve()
    for var in ("HOME", "XDG_CACHE_HOME"):
        folder = Path(os.environ[var]).resolve()
        assert folder.is_relative_to(tmp) and not folder.is_relative_to(real_home) or real_home == tmp, var
    assert Path.home().resolve().is_relative_to(tmp)
    assert default_bundle_dir().resolve().is_relative_to(Path(os.environ["XDG_CACHE_HOME"]).resolve())
