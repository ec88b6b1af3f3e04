"""The one exception type that the CLI turns into a one-line message and a non-zero exit.

Anything raised as ``QwenVLError`` is the user's input being wrong (a file, an image, a
prompt), never a bug: its message names the offending thing and fits on one line.
"""

from __future__ import annotations


class QwenVLError(Exception):
    """A problem with what the user gave us (checkpoint, bundle, image, prompt)."""


class CheckpointError(QwenVLError):
    """The checkpoint folder is not a readable Qwen-VL checkpoint."""


class BundleError(QwenVLError):
    """The bundle folder is missing a part or its parts do not belong together."""


class ImageError(QwenVLError):
    """An image cannot be decoded or is not safe to decode."""


class PromptError(QwenVLError):
    """The prompt is empty or does not fit the context."""
