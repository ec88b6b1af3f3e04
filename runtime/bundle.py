"""The bundle as the runtime sees it: ``manifest.json`` plus the files it lists.

The manifest is the only description of the model the runtime gets (it never sees the
checkpoint), so this module owns the format: the exporter writes it through
``make_manifest`` and the runtime reads it through ``Bundle.open``, which checks that every
listed file is there with its recorded size before any engine loads it.

Every model fact the runtime uses (image side, mean/std, rows per image, special token ids, grounding
tags, system prompt, sampling defaults) is read from the bundle: the manifest's ``model`` section, and
for a fact an older manifest lacks, the GGUF's ``qwenvl.*`` metadata (the tags: its vocabulary). The
defaults of ``ModelInfo`` are the exporter's (``qwenvl_edge/contract.py``), used only when writing.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from numbers import Real
from pathlib import Path
from typing import Any

from qwenvl_edge import contract
from qwenvl_edge.errors import BundleError
from qwenvl_edge.paths import ENV_BUNDLE, default_bundle_dir, demo_bundle_dir  # noqa: F401 (re-exported)
from qwenvl_edge.runtime.gguf_header import read_gguf_metadata, read_gguf_tokens
from qwenvl_edge.runtime.preprocess import ImageSpec
from qwenvl_edge.validate import json_file, plain_name

BUNDLE_FORMAT = "qwenvl-edge-bundle"
BUNDLE_VERSION = 1
MANIFEST, VISION_FILE, LLM_FILE = contract.MANIFEST_FILE, contract.VISION_FILE, contract.LLM_FILE

LLM_ARCH = "qwen"  # llama.cpp's architecture for Qwen-7B: a GGUF of any other one answers wrongly
SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_ID = 2**31 - 1
# GGUF key (after "qwen.") -> the manifest's value it must equal: (section, key) in ``model`` or ``source.config``
GGUF_FACTS = {
    "embedding_length": ("model", "hidden_size"),
    "vocab_size": ("model", "vocab_size"),
    "context_length": ("model", "seq_length"),
    "block_count": ("config", "num_hidden_layers"),
    "attention.head_count": ("config", "num_attention_heads"),
    "feed_forward_length": ("config", "intermediate_size"),
}
# ModelInfo field -> the GGUF key that states the same fact (the fallback for an older manifest without it)
GGUF_KEYS = {
    "eos_token_id": contract.KEY_EOS_ID, "im_start_id": contract.KEY_IM_START_ID,
    "im_end_id": contract.KEY_IM_END_ID, "ref_start_id": contract.KEY_REF_START_ID,
    "image_start_id": contract.KEY_IMAGE_START_ID, "n_queries": contract.KEY_N_QUERIES,
    "image_size": contract.KEY_IMAGE_SIZE, "image_mean": contract.KEY_IMAGE_MEAN,
    "image_std": contract.KEY_IMAGE_STD, "system_prompt": contract.KEY_SYSTEM_PROMPT,
    "top_p": contract.KEY_TOP_P, "top_k": contract.KEY_TOP_K, "max_new_tokens": contract.KEY_MAX_NEW_TOKENS,
}
GGUF_TOKENS = "tokenizer.ggml.tokens"
N_GROUNDING_TAGS = 6  # <ref> </ref> <box> </box> <quad> </quad>: consecutive ids from ref_start_id
FactSource = Callable[[set[str]], dict[str, Any]]  # GGUF keys -> their values (read only when needed)


@dataclass(frozen=True)
class ModelInfo:
    """What the runtime must know about the model beyond what the GGUF and ONNX files say.

    The runtime's one object of model facts: built from the bundle by ``from_dict`` (manifest, then the
    GGUF), passed whole to whatever needs a fact. The field defaults are what the exporter writes
    (``make_manifest``); ``from_dict`` never falls back on them.
    """

    hidden_size: int
    vocab_size: int
    seq_length: int
    image_size: int
    n_queries: int
    image_start_id: int  # <img>; </img> and <imgpad> follow it
    eos_token_id: int = contract.EOS_ID
    im_start_id: int = contract.IM_START_ID
    im_end_id: int = contract.IM_END_ID
    ref_start_id: int = contract.REF_START_ID  # <ref> </ref> <box> </box> <quad> </quad> follow it
    system_prompt: str = contract.SYSTEM_PROMPT
    image_mean: tuple[float, float, float] = contract.IMAGE_MEAN
    image_std: tuple[float, float, float] = contract.IMAGE_STD
    top_p: float = contract.TOP_P
    top_k: int = contract.TOP_K
    max_new_tokens: int = contract.MAX_NEW_TOKENS
    grounding: tuple[str, ...] = contract.GROUNDING_TAGS  # the texts of ref_start_id .. ref_start_id + 5

    @property
    def image_end_id(self) -> int:
        return self.image_start_id + 1

    @property
    def image_spec(self) -> ImageSpec:
        """What preprocessing needs: the vision model's side and normalisation."""
        return ImageSpec(self.image_size, self.image_mean, self.image_std)

    @property
    def positions_per_image(self) -> int:
        """``<img>``, the image's rows, ``</img>``."""
        return self.n_queries + 2

    @property
    def grounding_tags(self) -> dict[str, int]:
        """The tags that stay special in user text (how a prompt asks for a box)."""
        return {name: self.ref_start_id + i for i, name in enumerate(self.grounding)}

    def gguf_facts(self) -> dict[str, Any]:
        """The ``qwenvl.*`` values the GGUF must state for this manifest (checked when the vocabulary loads)."""
        facts = {key: getattr(self, name) for name, key in GGUF_KEYS.items()}
        facts[contract.KEY_IMAGE_END_ID] = self.image_start_id + 1
        facts[contract.KEY_IMAGE_PAD_ID] = self.image_start_id + 2
        return facts

    @property
    def stop_ids(self) -> frozenset[int]:
        return frozenset({self.im_end_id, self.im_start_id, self.eos_token_id})

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "manifest model", gguf: FactSource | None = None,
                  gguf_where: str = "the GGUF") -> ModelInfo:
        """Checked: every field of the right type and range (see ``_check_model_field``), ids inside the vocabulary.

        A fact the manifest lacks is read from the GGUF (``gguf``: its ``qwenvl.*`` keys, the grounding tags
        from its vocabulary); one that neither states is refused, never assumed.
        """
        if not isinstance(data, dict):
            raise BundleError(f"{where}: not a JSON object")
        kwargs = {}
        absent = []
        for f in fields(cls):
            if f.name in data:
                kwargs[f.name] = _check_model_field(f.name, str(f.type), data[f.name], where)
            elif gguf is None or (f.name not in GGUF_KEYS and f.name != "grounding"):
                raise BundleError(f"{where}: missing {f.name}")
            else:
                absent.append(f.name)
        kwargs.update(_facts_from_gguf(absent, kwargs, gguf, gguf_where))
        info = cls(**kwargs)
        for name in ("image_start_id", "eos_token_id", "im_start_id", "im_end_id", "ref_start_id"):
            last = getattr(info, name) + (5 if name == "ref_start_id" else 2 if name == "image_start_id" else 0)
            if last >= info.vocab_size:
                raise BundleError(f"{where}: {name} {getattr(info, name)} is outside the vocabulary "
                                  f"({info.vocab_size})")
        return info


def _facts_from_gguf(names: list[str], known: dict[str, Any], gguf: FactSource, where: str) -> dict[str, Any]:
    """The facts ``names`` as the GGUF states them, checked like the manifest's."""
    if not names:
        return {}
    keys = {GGUF_KEYS[n] for n in names if n in GGUF_KEYS}
    meta = gguf(keys) if keys else {}
    out: dict[str, Any] = {}
    kinds = {f.name: str(f.type) for f in fields(ModelInfo)}
    for name in names:
        if name == "grounding":
            continue
        value = meta.get(GGUF_KEYS[name])
        if value is None:
            raise BundleError(f"{where}: the manifest has no model.{name} and the GGUF no {GGUF_KEYS[name]}: "
                              "export the bundle again")
        if name in ("image_mean", "image_std") and isinstance(value, str):
            value = _float_triple(value)
        out[name] = _check_model_field(name, kinds[name], value, f"{where} {GGUF_KEYS[name]}")
    if "grounding" in names:
        first = {**known, **out}.get("ref_start_id")
        out["grounding"] = _grounding_from_vocab(gguf, first, where)
    return out


def check_gguf_facts(meta: dict[str, str], info: ModelInfo, path: Path) -> None:
    """The GGUF's ``qwenvl.*`` facts (llama.cpp's metadata strings) must be the manifest's: a manifest and a GGUF
    of different models would preprocess, prompt and stop by different rules. A key an older GGUF lacks is
    skipped, and so is top_p (float text is llama.cpp's rounding); mean/std compare as numbers."""
    for key, want in info.gguf_facts().items():
        have = meta.get(key)
        if have is None or isinstance(want, float):
            continue
        if isinstance(want, tuple):
            got = _float_triple(have)
            same = len(got) == 3 and all(isinstance(g, float) and math.isclose(g, w, rel_tol=1e-6, abs_tol=1e-9)
                                         for g, w in zip(got, want, strict=True))
        else:
            same = str(want) == have
        if not same:
            raise BundleError(f"{path}: {key} is {have!r:.60}, the manifest says {want!r:.60}: parts of different "
                              "models")


def _float_triple(text: str) -> list[Any]:
    """"0.5, 0.25, 0.125" (how the exporter writes three floats into one GGUF string) -> numbers; text if not."""
    try:
        return [float(v) for v in text.strip("[] ").split(",")]
    except ValueError:
        return [text]


def _grounding_from_vocab(gguf: FactSource, first: Any, where: str) -> tuple[str, ...]:
    """The texts of the grounding tokens, from the GGUF's vocabulary."""
    tokens = gguf({f"{GGUF_TOKENS}[{first + i}]" for i in range(N_GROUNDING_TAGS)}) if isinstance(first, int) else {}
    tags = tuple(tokens.get(f"{GGUF_TOKENS}[{first + i}]") for i in range(N_GROUNDING_TAGS))
    if not all(isinstance(t, str) and t for t in tags):
        raise BundleError(f"{where}: the manifest has no model.grounding and the GGUF's vocabulary does not "
                          "state the grounding tags: export the bundle again")
    return tags


def _check_model_field(name: str, kind: str, value: Any, where: str) -> Any:
    """One ``model`` field: ints (ids >= 0, sizes >= 1), a str, 3 finite floats, top_p in (0, 1], the 6 tag texts."""
    bad = f"{where}: {name} {value!r:.40} is not "
    if name == "grounding":
        ok = isinstance(value, list | tuple) and len(value) == N_GROUNDING_TAGS and all(
            isinstance(v, str) and v and not v.isspace() for v in value) and len(set(value)) == len(value)
        if not ok:
            raise BundleError(bad + f"{N_GROUNDING_TAGS} distinct non-empty strings")
        return tuple(value)
    if kind == "int":
        low = 0 if name.endswith("_id") or name == "top_k" else 1
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_ID:
            raise BundleError(bad + f"an integer in [{low}, {MAX_ID}]")
    elif kind == "str":
        if not isinstance(value, str):
            raise BundleError(bad + "a string")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, Real) or not 0 < value <= 1:
            raise BundleError(bad + "a number in (0, 1]")
    else:  # the mean/std triples
        ok = isinstance(value, list | tuple) and len(value) == 3 and all(
            isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        if not ok or (name == "image_std" and min(value) <= 0):
            raise BundleError(bad + "three finite numbers" + (" above 0" if name == "image_std" else ""))
        return tuple(float(v) for v in value)
    return value


def file_entry(path: Path) -> dict[str, Any]:
    """Size and sha256 of one bundle file, streamed in 16 MiB blocks (GGUF files are many GB); the pages
    read are dropped from the page cache after, so hashing does not fill a memory-limited export's cgroup."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def make_manifest(folder: Path, model: ModelInfo, vision: dict[str, Any], llm: dict[str, Any],
                  source: dict[str, Any], created_by: str,
                  files: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The manifest of a finished bundle folder: every file in it, with sizes and checksums (``files`` when
    the caller already has them, as the export does from its stage records; else hashed from ``folder``)."""
    if files is None:
        files = {p.name: file_entry(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    files = dict(sorted(files.items()))
    return {"format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION, "created_by": created_by,
            "model": asdict(model), "vision": vision, "llm": llm, "files": files, "source": source}


def _missing_hint(folder: Path) -> str:
    """Where to look instead: the demo's bundle when it exists, else how to make one."""
    if folder.is_dir():
        return ""
    demo = demo_bundle_dir()
    if (demo / MANIFEST).is_file() and folder.resolve() != demo.resolve():
        return f" (no such folder; the demo's bundle is {demo}: pass --bundle {demo} or set ${ENV_BUNDLE})"
    return " (no such folder; make one with `qwenvl-edge export`, or run `qwenvl-edge demo`)"


@dataclass(frozen=True)
class Bundle:
    """An opened, checked bundle folder."""

    folder: Path
    manifest: dict[str, Any]
    model: ModelInfo

    @property
    def vision_path(self) -> Path:
        return self.folder / self.manifest["vision"].get("file", VISION_FILE)

    @property
    def llm_path(self) -> Path:
        return self.folder / self.manifest["llm"].get("file", LLM_FILE)

    @property
    def vision_sha256(self) -> str:
        return self.manifest["files"][self.vision_path.name]["sha256"]

    @classmethod
    def open(cls, folder: Path | str | None = None) -> Bundle:
        """Read and check the manifest, every listed file's size, and the GGUF's facts against the manifest."""
        folder = Path(folder) if folder is not None else default_bundle_dir()
        path = folder / MANIFEST
        if not path.is_file():
            raise BundleError(f"{path}: missing: not a qwenvl-edge bundle{_missing_hint(folder)}")
        manifest = json_file(path, BundleError, "manifest")

        def gguf(keys: set[str]) -> dict[str, Any]:  # only for facts an older manifest lacks
            llm = folder / manifest["llm"].get("file", LLM_FILE)
            return read_gguf_tokens(llm, keys) if all("[" in k for k in keys) else read_gguf_metadata(llm, keys)

        bundle = cls(folder, manifest, check_manifest(manifest, str(path), gguf))
        files = manifest["files"]
        for needed in (bundle.vision_path, bundle.llm_path):
            if needed.name not in files:
                raise BundleError(f"{path}: lists no {needed.name}")
        for name, entry in files.items():
            part = folder / name
            if not part.is_file():
                raise BundleError(f"{part}: missing bundle file")
            if part.stat().st_size != entry["bytes"]:
                raise BundleError(f"{part}: {part.stat().st_size} bytes, manifest says {entry['bytes']}: "
                                  "truncated or from another export")
        bundle.check_llm_facts()
        return bundle

    def check_llm_facts(self) -> None:
        """The GGUF must be llama.cpp's ``qwen`` with the manifest's sizes: another model of the same width
        would load and answer wrongly without a word."""
        keys = {"general.architecture"} | {f"{LLM_ARCH}.{k}" for k in GGUF_FACTS}
        meta = read_gguf_metadata(self.llm_path, keys)
        arch = meta.get("general.architecture")
        if arch != LLM_ARCH:
            raise BundleError(f"{self.llm_path}: architecture {arch!r:.40}, expected {LLM_ARCH!r}: not this "
                              "bundle's language model")
        source = self.manifest.get("source")
        config = source.get("config") if isinstance(source, dict) else None
        sections = {"model": asdict(self.model), "config": config if isinstance(config, dict) else {}}
        for key, (section, field) in GGUF_FACTS.items():
            have, want = meta.get(f"{LLM_ARCH}.{key}"), sections[section].get(field)
            if want is None or (have is None and key == "vocab_size"):  # llama.cpp checks the vocabulary itself
                continue
            if have != want:
                raise BundleError(f"{self.llm_path}: {LLM_ARCH}.{key} is {have}, manifest says {field} {want}: "
                                  "parts from different exports")

    def verify_checksums(self) -> None:
        """Full sha256 check of every file (slow for multi-GB files; ``qwenvl-edge verify``)."""
        for name, entry in self.manifest["files"].items():
            if file_entry(self.folder / name)["sha256"] != entry["sha256"]:
                raise BundleError(f"{self.folder / name}: checksum differs from the manifest")


def _section(manifest: dict, key: str, where: str) -> dict:
    value = manifest.get(key)
    if not isinstance(value, dict):
        raise BundleError(f"{where}: {key} must be a JSON object, got {type(value).__name__}")
    return value


def check_manifest(manifest: Any, where: str, gguf: FactSource | None = None) -> ModelInfo:
    """Every field the runtime reads, checked once: format, file names and entries, model facts (those the
    manifest lacks from ``gguf``, the GGUF's metadata)."""
    if not isinstance(manifest, dict):
        raise BundleError(f"{where}: not a qwenvl-edge manifest (a JSON {type(manifest).__name__}, not an object)")
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{where}: not a qwenvl-edge manifest")
    version = manifest.get("format_version")
    if version != BUNDLE_VERSION or isinstance(version, bool):
        raise BundleError(f"{where}: format_version {version!r:.20} is not {BUNDLE_VERSION}; re-export the bundle")
    model_section = _section(manifest, "model", where)
    for part in ("vision", "llm"):
        section = _section(manifest, part, where)
        if "file" in section:
            plain_name(section["file"], f"{where} {part}.file", BundleError)
    for name, entry in _section(manifest, "files", where).items():
        plain_name(name, f"{where} files", BundleError)
        if not isinstance(entry, dict):
            raise BundleError(f"{where}: files.{name} must be a JSON object")
        size, digest = entry.get("bytes"), entry.get("sha256")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise BundleError(f"{where}: files.{name}.bytes {size!r:.30} is not a byte count")
        if not isinstance(digest, str) or not SHA256.fullmatch(digest):
            raise BundleError(f"{where}: files.{name}.sha256 {digest!r:.30} is not a sha256")
    return ModelInfo.from_dict(model_section, f"{where} model", gguf, where)
