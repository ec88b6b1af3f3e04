"""The model contract: one module holds it, the GGUF carries it, nothing else keeps a copy.

- the contract's values are the SPEC's (the only place besides the golden data where they are written);
- no source file outside ``qwenvl_edge/contract.py`` spells a contract constant, and no code writes
  ``llama_cpp.Llama``'s privates;
- the runtime (``runtime/``) takes every model fact from the bundle: from the contract it imports only file,
  tensor and GGUF key names (the one exception: ``ModelInfo``'s field defaults, what the exporter's
  ``make_manifest`` writes, and ``preprocess.exporter_spec`` for tools that run before a bundle exists);
- ``llm.gguf`` carries every ``qwenvl.*`` key and a ChatML ``tokenizer.chat_template``, and
  llama-cpp-python's own ``create_chat_completion`` on it builds the runtime's text-only prompt ids;
- the shared multi-turn prompt fixture (also checked by the native tests) is what the runtime builds.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import gguf
import pytest

from qwenvl_edge import contract
from qwenvl_edge.runtime.pipeline import QwenVL
from qwenvl_edge.runtime.prompt import ImageRef, Turn, ids_with_image_slots

REPO = Path(__file__).resolve().parents[1]
PROMPT_FIXTURE = REPO / "tests" / "data" / "multi_turn_prompt.json"

# SPEC "Special tokens" and "Image preprocessing": the contract must say exactly this.
SPEC = {"EOS_ID": 151643, "IM_START_ID": 151644, "IM_END_ID": 151645, "REF_START_ID": 151851,
        "IMAGE_START_ID": 151857, "IMAGE_END_ID": 151858, "IMAGE_PAD_ID": 151859, "N_QUERIES": 256,
        "IMAGE_SIZE": 448, "IMAGE_MEAN": (0.48145466, 0.4578275, 0.40821073),
        "IMAGE_STD": (0.26862954, 0.26130258, 0.27577711), "SYSTEM_PROMPT": "You are a helpful assistant."}
# What may not be written anywhere else (sizes like 256 or 448 are too common to search for).
FORBIDDEN = [str(SPEC[k]) for k in SPEC if k.endswith("_ID")] + [
    *(repr(v) for v in SPEC["IMAGE_MEAN"] + SPEC["IMAGE_STD"]), SPEC["SYSTEM_PROMPT"]]
SOURCES = ("*.py", "*.cpp", "*.h", "*.c", "*.java", "*.kt")
EXEMPT = {REPO / "qwenvl_edge" / "contract.py", Path(__file__).resolve()}
SKIP_DIRS = {".venv", ".git", "native-build", "build", "golden", "node_modules", ".gradle"}
# llama_cpp.Llama's privates: the engine drives llama.cpp through _internals' resource classes instead
PRIVATES = re.compile(r"\._ctx\b|\._model\b|\.input_ids\b|(?<!raw)\.n_tokens\s*=(?!=)")


def source_files():
    for pattern in SOURCES:
        for path in REPO.rglob(pattern):
            if not SKIP_DIRS.intersection(path.relative_to(REPO).parts) and path.resolve() not in EXEMPT:
                yield path


def test_the_contract_is_the_spec() -> None:
    for name, value in SPEC.items():
        assert getattr(contract, name) == value, name
    assert contract.SPECIAL_TOKENS.index("<img>") + contract.EOS_ID == contract.IMAGE_START_ID
    assert contract.SPECIAL_TOKENS.index("<ref>") + contract.EOS_ID == contract.REF_START_ID
    assert contract.SPECIAL_TOKENS.index("<imgpad>") + contract.EOS_ID == contract.IMAGE_PAD_ID


def test_no_copy_of_a_contract_constant() -> None:
    found = [f"{path.relative_to(REPO)}: {needle}" for path in source_files()
             for needle in FORBIDDEN if needle in path.read_text(encoding="utf-8", errors="replace")]
    assert found == []


RUNTIME = REPO / "runtime"
# what the runtime may take from the contract: names of files, tensors and GGUF keys, never a model fact
NAMES = {"MANIFEST_FILE", "VISION_FILE", "LLM_FILE", "VISION_INPUT", "VISION_OUTPUT", "GGUF_PREFIX"}
# where a runtime module may read a fact anyway: the exporter's side of a shared module (module, class/function)
WRITER_SIDE = {("bundle.py", "ModelInfo"), ("preprocess.py", "exporter_spec")}


def allowed_name(name: str) -> bool:
    return name in NAMES or name.startswith("KEY_")


def contract_uses(tree: ast.AST) -> list[tuple[str, int, str | None]]:
    """(name, line, enclosing top-level class or function) of every contract name the module reads."""
    found: list[tuple[str, int, str | None]] = []
    for top in tree.body:
        owner = top.name if isinstance(top, ast.ClassDef | ast.FunctionDef) else None
        for node in ast.walk(top):
            if isinstance(node, ast.ImportFrom) and node.module == "qwenvl_edge.contract":
                found += [(alias.name, node.lineno, owner) for alias in node.names]
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and node.value.id == "contract"):
                found.append((node.attr, node.lineno, owner))
    return found


def test_runtime_takes_model_facts_only_from_the_bundle() -> None:
    """Catches a runtime module that reads image size, mean/std, rows, ids or tags from contract.py."""
    bad = []
    for path in sorted(RUNTIME.glob("*.py")):
        for name, line, owner in contract_uses(ast.parse(path.read_text(encoding="utf-8"))):
            if not allowed_name(name) and (path.name, owner) not in WRITER_SIDE:
                bad.append(f"runtime/{path.name}:{line}: contract.{name}")
    assert bad == []


def test_writer_side_facts_are_not_read_back() -> None:
    """The exporter's defaults stay on the writer's side: no runtime module calls exporter_spec, and the
    preprocessing calls of the runtime pass the bundle's spec."""
    calls = []
    for path in sorted(RUNTIME.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name | ast.Attribute):
                name = node.func.id if isinstance(node.func, ast.Name) else node.func.attr
                if name == "exporter_spec" or (name in ("preprocess_image", "preprocess_batch")
                                               and len(node.args) + len(node.keywords) < 2):
                    calls.append(f"runtime/{path.name}:{node.lineno}: {name}")
    calls = [c for c in calls if not c.startswith("runtime/preprocess.py")]  # its own fallback
    assert calls == []


def test_no_code_touches_llama_privates() -> None:
    found = [f"{path.relative_to(REPO)}:{i}: {line.strip()}" for path in source_files() if path.suffix == ".py"
             for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if PRIVATES.search(line) and "PRIVATES" not in line]
    assert found == []


def test_the_gguf_carries_the_contract(f32_bundle: Path) -> None:
    reader = gguf.GGUFReader(f32_bundle / contract.LLM_FILE)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    for key, want in contract.gguf_metadata().items():
        assert fields[key] == pytest.approx(want) if isinstance(want, (float, list)) else fields[key] == want, key
    template = fields[contract.KEY_CHAT_TEMPLATE]
    assert "<|im_start|>" in template and contract.SYSTEM_PROMPT in template


def test_llama_cpp_pythons_chat_completion_builds_the_runtime_prompt(f32_bundle: Path) -> None:
    """llama.cpp's tools see a ChatML text model: the same ids as the runtime for a text-only chat."""
    import llama_cpp

    seen: list[list[int]] = []

    def record(input_ids, scores):
        if not seen:
            seen.append([int(t) for t in input_ids])
        return scores

    messages = [{"role": "user", "content": "Hello! Who are you?"}, {"role": "assistant", "content": "A model."},
                {"role": "user", "content": "What can you do?"}]
    llm = llama_cpp.Llama(str(f32_bundle / contract.LLM_FILE), n_ctx=512, verbose=False)
    try:
        llm.create_chat_completion(messages, max_tokens=1, temperature=0,
                                   logits_processor=llama_cpp.LogitsProcessorList([record]))
    finally:
        llm.close()
    with QwenVL(f32_bundle, n_threads=2, cache_dir=None) as m:
        ours = m.prompt_ids([], "What can you do?", [Turn("Hello! Who are you?", (), "A model.")])
    assert seen[0] == ours


def test_the_shared_multi_turn_prompt_fixture(f32_bundle: Path) -> None:
    """tests/data/multi_turn_prompt.json: the prompt the Python and the native builders must both make."""
    fixture = json.loads(PROMPT_FIXTURE.read_text(encoding="utf-8"))
    with QwenVL(f32_bundle, n_threads=2, cache_dir=None) as m:
        history = [Turn(t["question"], tuple(ImageRef(f"image-{i}") for i in t["images"]), t["answer"])
                   for t in fixture["history"]]
        question = fixture["question"]
        units = m.session.prompts.build(Turn(question["question"],
                                             tuple(ImageRef(f"image-{i}") for i in question["images"])), history)
    assert ids_with_image_slots(units) == fixture["ids"]
