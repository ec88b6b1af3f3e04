"""The README's lists of LLM types and INT8 schemes are the registries' own names (``quant/registry.py``), no
more and no fewer, so a type added to the registry cannot be missing from the docs or the other way round."""

from __future__ import annotations

import re
from pathlib import Path

from qwenvl_edge.quant.registry import LLM_FILE_TYPES, SCHEMES

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def _between(first: str, last: str) -> str:
    start = README.index(first) + len(first)
    return README[start:README.index(last, start)]


def test_the_readme_lists_every_llm_type_of_the_registry() -> None:
    listed = re.findall(r"`([A-Z0-9_]+)`", _between("`--llm TYPE` in any case:", ": every llama.cpp type"))
    assert sorted(listed) == sorted(LLM_FILE_TYPES)


def test_the_readme_lists_every_int8_scheme_of_the_registry() -> None:
    listed = re.search(r"`--vision-scheme ([a-z0-9|-]+)`", README).group(1).split("|")
    assert sorted(listed) == sorted(SCHEMES)
