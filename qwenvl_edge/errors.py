"""The one exception type that the CLI turns into a one-line message and a non-zero exit.

Anything raised as ``QwenVLError`` is the user's input being wrong (a file, an image, a
prompt, an option), never a bug: its message names the offending thing and fits on one line.
"""

from __future__ import annotations


class QwenVLError(Exception):
    """A problem with what the user gave us (checkpoint, bundle, image, prompt, option)."""

    def __str__(self) -> str:  # names taken from hostile files may hold line breaks: keep the message one line
        return super().__str__().replace("\r", "\\r").replace("\n", "\\n")


class CheckpointError(QwenVLError):
    """The checkpoint folder is not a readable Qwen-VL checkpoint."""


class BundleError(QwenVLError):
    """The bundle folder is missing a part or its parts do not belong together."""


class ImageError(QwenVLError):
    """An image cannot be decoded, is not an image type we accept, or is not safe to decode."""


class PromptError(QwenVLError):
    """The prompt is empty, not text, or does not fit the context."""


class OptionError(QwenVLError):
    """An option or API argument (n_ctx, threads, temperature, ...) has the wrong type or range."""
