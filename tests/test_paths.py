"""Every layer finds the same folders: ``$XDG_CACHE_HOME`` is honoured for the bundle, the demo, the store and
the export's resume folders, and a missing bundle's error points at the demo's bundle when there is one."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwenvl_edge.bundler.export_stages import export_cache_root
from qwenvl_edge.paths import cache_root, default_bundle_dir, default_demo_dir, demo_bundle_dir
from qwenvl_edge.runtime.store import default_store_dir
from tests.cli_helpers import run_cli, temp_home  # noqa: F401 (autouse fixture)


@pytest.fixture
def xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """XDG_CACHE_HOME outside HOME, as many users set it."""
    folder = tmp_path / "elsewhere" / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(folder))
    return folder


def test_every_cache_folder_follows_xdg_cache_home(xdg: Path) -> None:
    root = xdg / "qwenvl-edge"
    assert cache_root() == root
    assert default_store_dir() == root
    assert default_bundle_dir() == root / "bundle"
    assert default_demo_dir() == root / "demo"
    assert export_cache_root() == root / "export"


def test_the_bundle_variable_wins_and_the_home_is_the_fallback(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("QWENVL_EDGE_BUNDLE", str(tmp_path / "mine"))
    assert default_bundle_dir() == tmp_path / "mine"
    monkeypatch.delenv("QWENVL_EDGE_BUNDLE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_bundle_dir() == Path.home() / ".cache" / "qwenvl-edge" / "bundle"


def test_missing_bundle_names_the_demo_bundle_when_the_demo_built_one(xdg: Path, capsys) -> None:
    demo = demo_bundle_dir()
    demo.mkdir(parents=True)
    (demo / "manifest.json").write_text("{}")
    rc, _out, err = run_cli(["run", "Hello?"], capsys)
    assert rc == 2
    assert err.count("\n") == 1 and str(demo) in err and "--bundle" in err, err


def test_missing_bundle_without_a_demo_says_how_to_make_one(xdg: Path, capsys) -> None:
    rc, _out, err = run_cli(["run", "Hello?"], capsys)
    assert rc == 2
    assert err.count("\n") == 1 and "qwenvl-edge demo" in err and "qwenvl-edge export" in err, err


def test_an_explicit_bundle_that_is_the_demo_gets_no_advice_to_use_itself(xdg: Path, capsys) -> None:
    demo = demo_bundle_dir()
    demo.mkdir(parents=True)
    rc, _out, err = run_cli(["run", "--bundle", str(demo), "Hello?"], capsys)
    assert rc == 2 and "--bundle" not in err.split("missing", 1)[1], err
