"""The bundle as the runtime sees it: ``manifest.json`` plus the files it lists.

The manifest is the only description of the model the runtime gets (it never sees the
checkpoint), so this module owns the format: the exporter writes it through
``make_manifest`` and the runtime reads it through ``Bundle.open``, which checks that every
listed file is there with its recorded size before any engine loads it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qwenvl_edge.errors import BundleError
from qwenvl_edge.runtime.preprocess import IMAGE_MEAN, IMAGE_STD

BUNDLE_FORMAT = "qwenvl-edge-bundle"
BUNDLE_VERSION = 1
MANIFEST = "manifest.json"
VISION_FILE = "vision.onnx"
LLM_FILE = "llm.gguf"
ENV_BUNDLE = "QWENVL_EDGE_BUNDLE"

SYSTEM_PROMPT = "You are a helpful assistant."


@dataclass(frozen=True)
class ModelInfo:
    """What the runtime must know about the model beyond what the GGUF and ONNX files say."""

    hidden_size: int
    vocab_size: int
    seq_length: int
    image_size: int
    n_queries: int
    image_start_id: int  # <img>; </img> and <imgpad> follow it
    eos_token_id: int = 151643
    im_start_id: int = 151644
    im_end_id: int = 151645
    ref_start_id: int = 151851  # <ref> </ref> <box> </box> <quad> </quad> follow it
    system_prompt: str = SYSTEM_PROMPT
    image_mean: tuple[float, float, float] = IMAGE_MEAN
    image_std: tuple[float, float, float] = IMAGE_STD
    top_p: float = 0.3
    top_k: int = 0
    max_new_tokens: int = 512

    @property
    def image_end_id(self) -> int:
        return self.image_start_id + 1

    @property
    def grounding_tags(self) -> dict[str, int]:
        """The tags that stay special in user text (how a prompt asks for a box)."""
        names = ["<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>"]
        return {name: self.ref_start_id + i for i, name in enumerate(names)}

    @property
    def stop_ids(self) -> frozenset[int]:
        return frozenset({self.im_end_id, self.im_start_id, self.eos_token_id})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelInfo:
        fields = cls.__dataclass_fields__
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in fields}
        return cls(**kwargs)


def file_entry(path: Path) -> dict[str, Any]:
    """Size and sha256 of one bundle file (streamed: GGUF files are many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def make_manifest(folder: Path, model: ModelInfo, vision: dict[str, Any], llm: dict[str, Any],
                  source: dict[str, Any], created_by: str) -> dict[str, Any]:
    """The manifest of a finished bundle folder: every file in it, with sizes and checksums."""
    files = {p.name: file_entry(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    return {"format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION, "created_by": created_by,
            "model": asdict(model), "vision": vision, "llm": llm, "files": files, "source": source}


def default_bundle_dir() -> Path:
    """``$QWENVL_EDGE_BUNDLE`` if set, else ``~/.cache/qwenvl-edge/bundle``."""
    env = os.environ.get(ENV_BUNDLE)
    return Path(env) if env else Path.home() / ".cache" / "qwenvl-edge" / "bundle"


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
        folder = Path(folder) if folder is not None else default_bundle_dir()
        path = folder / MANIFEST
        if not path.is_file():
            hint = "" if folder.is_dir() else " (no such folder; make one with `qwenvl-edge export` or `demo`)"
            raise BundleError(f"{path}: missing: not a qwenvl-edge bundle{hint}")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            if manifest.get("format") != BUNDLE_FORMAT:
                raise BundleError(f"{path}: not a qwenvl-edge manifest")
            if manifest.get("format_version") != BUNDLE_VERSION:
                raise BundleError(f"{path}: format_version {manifest.get('format_version')} is not "
                                  f"{BUNDLE_VERSION}; re-export the bundle")
            model = ModelInfo.from_dict(manifest["model"])
            files = manifest["files"]
            manifest["vision"], manifest["llm"]  # noqa: B018 - required sections
        except (KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
            raise BundleError(f"{path}: corrupt manifest ({type(e).__name__}: {e})") from None
        bundle = cls(folder, manifest, model)
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
        return bundle

    def verify_checksums(self) -> None:
        """Full sha256 check of every file (slow for multi-GB files; ``qwenvl-edge verify``)."""
        for name, entry in self.manifest["files"].items():
            if file_entry(self.folder / name)["sha256"] != entry["sha256"]:
                raise BundleError(f"{self.folder / name}: checksum differs from the manifest")
