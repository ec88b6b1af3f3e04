"""The one-way flow in the imports: export/ and quant/ never import each other (the bundle orchestration
above them does), and the runtime never imports the export side."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {"export": ("qwenvl_edge.quant",), "quant": ("qwenvl_edge.export",),
             "runtime": ("qwenvl_edge.export", "qwenvl_edge.quant", "onnx.", "gguf", "torch")}


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
