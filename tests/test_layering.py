"""The one-way flow in the imports: export/ and quant/ never import each other (the bundle orchestration
above them, ``qwenvl_edge/bundler``, does); the runtime never imports the export side, the server, the CLI or
the jobs built on it; the server stands on the runtime alone (never the export side or the CLI); the
evaluation judges bundles through the runtime and never builds them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ABOVE_THE_RUNTIME = ("qwenvl_edge.server", "qwenvl_edge.cli", "qwenvl_edge.options", "qwenvl_edge.bundler",
                     "qwenvl_edge.evaluation", "qwenvl_edge.batch", "fastapi", "uvicorn")
EXPORT_SIDE = ("qwenvl_edge.export", "qwenvl_edge.quant", "qwenvl_edge.bundler", "onnx.", "gguf", "torch")
FORBIDDEN = {"export": ("qwenvl_edge.quant", "qwenvl_edge.bundler"),
             "quant": ("qwenvl_edge.export", "qwenvl_edge.bundler"),
             "runtime": (*EXPORT_SIDE, *ABOVE_THE_RUNTIME),
             "server": (*EXPORT_SIDE, "qwenvl_edge.cli", "qwenvl_edge.evaluation", "qwenvl_edge.batch"),
             # the evaluation measures with quant's metrics (row cosine, KL), but never exports
             "qwenvl_edge/evaluation": ("qwenvl_edge.export", "qwenvl_edge.bundler", "torch", "qwenvl_edge.server",
                                        "qwenvl_edge.cli", "qwenvl_edge.batch"),
             "qwenvl_edge/bundler": ("qwenvl_edge.server", "qwenvl_edge.cli", "qwenvl_edge.evaluation",
                                     "qwenvl_edge.batch")}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_room_does_not_import_what_its_place_in_the_flow_forbids(room: str) -> None:
    bad = sorted(f"{path.relative_to(REPO)} imports {name}" for path in (REPO / room).rglob("*.py")
                 for name in imported_modules(path)
                 if any(name == prefix.rstrip(".") or name.startswith(prefix.rstrip(".") + ".")
                        for prefix in FORBIDDEN[room]))
    assert not bad, bad


RAY_HOME = REPO / "qwenvl_edge" / "batch" / "on_ray.py"  # the optional `ray` extra: imported here and nowhere else
PACKAGE_FOLDERS = ("qwenvl_edge", "export", "quant", "runtime", "server", "training", "benchmarks")


def imports_ray(path: Path) -> bool:
    """Any import of ray, at the top or inside a function (``import_module("ray")`` would hide it: none is used)."""
    return any(name == "ray" or name.startswith("ray.") for name in imported_modules(path))


def test_only_the_batch_ray_runner_imports_ray() -> None:
    bad = sorted(str(path.relative_to(REPO)) for folder in PACKAGE_FOLDERS for path in (REPO / folder).rglob("*.py")
                 if path != RAY_HOME and imports_ray(path))
    assert not bad, f"ray is an optional extra, imported only by {RAY_HOME.relative_to(REPO)}: {bad}"
    assert imports_ray(RAY_HOME)  # the rule guards a real import, not a file that moved
