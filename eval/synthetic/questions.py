"""A four-option multiple-choice question, and the rule that places its options."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .seeds import LETTERS


@dataclass(frozen=True)
class Question:
    """`options` are four distinct texts (no letters); `answer` is the index (0-3) of the correct one."""

    task: str
    question: str
    options: tuple[str, ...]
    answer: int

    @property
    def letter(self) -> str:
        """The correct letter, "A" to "D"."""
        return LETTERS[self.answer]

    @property
    def answer_text(self) -> str:
        return self.options[self.answer]

    def lettered(self) -> list[str]:
        """Video-MME's option strings: ["A. red", "B. blue", ...]."""
        return [f"{LETTERS[i]}. {o}" for i, o in enumerate(self.options)]


def arrange(task: str, question: str, correct: str, distractors: Iterable[str], letter: int,
            rng: np.random.Generator) -> Question:
    """Four options: `correct` at index `letter`, and the first three distinct `distractors` (callers list the
    most plausible first) in random order around it.

    Raises ValueError when fewer than three distractors differ from `correct`: a generator bug, never data.
    """
    picked: list[str] = []
    for d in distractors:
        if d != correct and d not in picked:
            picked.append(d)
            if len(picked) == 3:
                break
    if len(picked) < 3:
        raise ValueError(f"{task}: need 3 distractors distinct from {correct!r}, got {picked}")
    order = rng.permutation(3)
    others = [picked[i] for i in order]
    options = (*others[:letter], correct, *others[letter:])
    return Question(task, question, options, letter)


def shuffled(items: Iterable[str], rng: np.random.Generator) -> list[str]:
    """A shuffled copy of `items` (a helper for listing distractors in random order within a tier)."""
    out = list(items)
    if out:
        order = rng.permutation(len(out))
        out = [out[i] for i in order]
    return out
