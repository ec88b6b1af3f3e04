"""The Qwen-VL-Chat prompt, built the way the original ``make_context`` builds it.

A prompt is a flat list of units: token ids and ``ImageRef``s (one per image, standing for
its 256 embedding rows). The original tokenizes role names, ``"\\n"`` and each content
string separately and joins them with ``<|im_start|>`` / ``<|im_end|>`` ids; content
strings are split at the special tokens it allows and each piece is tokenized on its
own. We do the same, except that only the grounding tags are special in user text:
``<img>``, ``<|im_end|>`` and the rest typed by a user stay plain text, so images enter
only through image arguments.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from qwenvl_edge.errors import PromptError
from qwenvl_edge.runtime.bundle import ModelInfo

Tokenize = Callable[[str], list[int]]


@dataclass(frozen=True)
class ImageRef:
    """One image in a prompt: ``key`` is its content hash, ``size`` its upright (width, height) in pixels.

    ``n_rows``: the positions its rows take, the bundle's ``n_queries``; 0 until a ``PromptBuilder`` sets it.
    """

    key: str
    n_rows: int = 0
    size: tuple[int, int] = (0, 0)


Unit = int | ImageRef
Piece = int | str | ImageRef


@dataclass(frozen=True)
class Turn:
    """One exchange of a conversation: the user's question, its images and the answer (None: the open turn).

    ``images`` are anything ``QwenVL`` takes as an image (paths, PIL images, bytes, arrays) or the
    ``ImageRef``s of a ``GenerationResult``; the prompt builder sees only ``ImageRef``s.
    """

    question: str
    images: tuple[Any, ...] = ()
    answer: str | None = None


def n_positions(units: Sequence[Unit]) -> int:
    return sum(u.n_rows if isinstance(u, ImageRef) else 1 for u in units)


def ids_with_image_slots(units: Sequence[Unit]) -> list[int]:
    """Prompt ids with -1 at every image-row position (the golden ``input_ids`` convention)."""
    out: list[int] = []
    for u in units:
        out.extend([-1] * u.n_rows if isinstance(u, ImageRef) else [u])
    return out


class PromptBuilder:
    """Turns system prompt, history and the new question into units, trimming old turns to fit."""

    def __init__(self, info: ModelInfo, tokenize: Tokenize):
        self.info = info
        self.tokenize = tokenize
        tags = info.grounding_tags
        self._tags = tags
        self._tag_pattern = re.compile("(" + "|".join(re.escape(t) for t in tags) + ")")
        self._nl = tokenize("\n")

    def text_pieces(self, text: str) -> list[Piece]:
        """User or answer text: grounding tags become their ids, the rest stays text."""
        return [self._tags.get(part, part) for part in self._tag_pattern.split(text) if part]

    def encode(self, pieces: Sequence[Piece]) -> list[Unit]:
        """Tokenize runs of text between special ids and images, each run on its own."""
        units: list[Unit] = []
        text = ""
        for piece in [*pieces, None]:
            if isinstance(piece, str):
                text += piece
                continue
            if text:
                units.extend(self.tokenize(text))
                text = ""
            if piece is not None:
                units.append(piece)
        return units

    def content(self, turn: Turn) -> list[Piece]:
        """``Picture N: <img>rows</img>\\n`` per image, then the question (as from_list_format)."""
        pieces: list[Piece] = []
        for i, image in enumerate(turn.images, 1):
            if image.n_rows != self.info.n_queries:  # the model decides how many rows an image is
                image = replace(image, n_rows=self.info.n_queries)
            pieces += [f"Picture {i}: ", self.info.image_start_id, image, self.info.image_end_id, "\n"]
        return pieces + self.text_pieces(turn.question)

    def _message(self, role: str, pieces: Sequence[Piece]) -> list[Unit]:
        """``<|im_start|>role\\ncontent<|im_end|>``: role, newline and content tokenized apart."""
        return [self.info.im_start_id, *self.tokenize(role), *self._nl, *self.encode(pieces), self.info.im_end_id]

    def build(self, question_turn: Turn, history: Sequence[Turn] = (), system: str | None = None,
              n_ctx: int | None = None, reserve: int = 0) -> list[Unit]:
        """The whole prompt; the oldest history turns are dropped while it does not fit ``n_ctx - reserve``."""
        if not question_turn.question.strip() and not question_turn.images:
            raise PromptError("the question is empty")
        nl = self._nl
        head = self._message("system", [self.info.system_prompt if system is None else system])
        tail = [*nl, *self._message("user", self.content(question_turn)), *nl,
                self.info.im_start_id, *self.tokenize("assistant"), *nl]
        budget = None if n_ctx is None else n_ctx - reserve
        need = n_positions(head) + n_positions(tail)
        if budget is not None and need > budget:
            raise PromptError(f"the question needs {need} positions ({len(question_turn.images)} image(s) x "
                              f"{self.info.positions_per_image if question_turn.images else 0} + text) "
                              f"but the context has room for {budget} (n_ctx {n_ctx}, {reserve} kept for the answer)")
        middle: list[Unit] = []
        for turn in reversed(history):
            past = [*nl, *self._message("user", self.content(turn)), *nl,
                    *self._message("assistant", self.text_pieces(turn.answer or ""))]
            if budget is not None and need + n_positions(past) + n_positions(middle) > budget:
                break
            middle = past + middle
        return head + middle + tail
