"""What a fine-tuning task is: a training pool, an evaluation set, a scorer, and its files.

A task turns its raw rows into plain examples (instruction + input as the prompt, the gold
answer as the response) and scores a generated answer by parsing the label out of it,
since a chatty small model rarely answers with the bare label. The fine-tune accuracy of
the paper is the mean item score × 100. Each task names the files it reads (``files``),
which every stage that reads them hashes into its ``meta.json``.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from pathlib import Path

from booster.data.base import Example


class Task(ABC):
    name: str = ""
    instruction: str = ""
    max_new_tokens: int = 8
    """Answer length that fits a full answer (eval.task_max_new_tokens overrides it)."""
    metric: str = "accuracy"
    files: tuple[str, ...] = ()
    """What the task reads from the data directory (glob patterns), hashed into each stage's
    meta.json."""

    def prompt(self, text: str) -> str:
        return f"{self.instruction}\n\nInput: {text}"

    @abstractmethod
    def pool(self, data_dir: Path, source: str = "local") -> list[Example]:
        """Examples the attacker can fine-tune on (response = gold answer)."""

    @abstractmethod
    def eval_set(self, data_dir: Path, source: str = "local") -> list[Example]:
        """Held-out examples (label = gold answer), in a fixed order."""

    @abstractmethod
    def parse(self, answer: str) -> str | None:
        """The label found in a generated answer, or None."""

    def correct(self, answer: str, gold: str) -> bool:
        return self.parse(answer) == gold

    def scores(self, answers: list[str], golds: list[str]) -> list[float]:
        """Per-item score in [0, 1]; the task's metric is their mean × 100."""
        return [float(self.correct(a, g)) for a, g in zip(answers, golds)]


def shuffled(rows: list[Example], seed: int = 0) -> list[Example]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows
