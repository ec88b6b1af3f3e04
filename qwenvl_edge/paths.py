"""Where qwenvl-edge keeps things on disk: one home for the folder rules every layer follows.

Stdlib only, so the runtime, the export orchestration, the CLI and the server all read the same
answer (``$XDG_CACHE_HOME`` honoured everywhere, as the XDG base-directory spec asks).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_BUNDLE = "QWENVL_EDGE_BUNDLE"


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/qwenvl-edge`` (``~/.cache/qwenvl-edge`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "qwenvl-edge"


def state_root() -> Path:
    """``$XDG_STATE_HOME/qwenvl-edge`` (``~/.local/state/qwenvl-edge`` when unset): chat history, and the
    state file and log of each resident server (``servers/``)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base).expanduser() / "qwenvl-edge"


def servers_dir() -> Path:
    """Where each running ``qwenvl-edge serve`` keeps its state file (pid, port, bundle) and its log."""
    return state_root() / "servers"


def default_bundle_dir() -> Path:
    """``$QWENVL_EDGE_BUNDLE`` if set, else ``bundle/`` in the cache root."""
    env = os.environ.get(ENV_BUNDLE)
    return Path(env).expanduser() if env else cache_root() / "bundle"


def default_demo_dir() -> Path:
    """Where ``qwenvl-edge demo`` writes its checkpoint, bundle and pictures."""
    return cache_root() / "demo"


def demo_bundle_dir() -> Path:
    """The bundle ``qwenvl-edge demo`` builds (named in the missing-bundle error)."""
    return default_demo_dir() / "tiny-bundle"
