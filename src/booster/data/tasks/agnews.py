"""AG News: 4-way topic of a news article; its test file is split into a fine-tuning pool
and a fixed held-out slice."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from booster.data.base import DataError, Example, read_text, require_file
from booster.data.tasks.base import Task, shuffled


class AGNews(Task):
    name = "agnews"
    files = ("agnews/test.csv",)
    instruction = ("Categorize the news article given in the input into one of the 4 categories: "
                   "World, Sports, Business, Sci/Tech.")
    labels = ("World", "Sports", "Business", "Sci/Tech")
    held_out = 1000
    """Items of the (shuffled, fixed-seed) test file kept for evaluation; the rest is the pool."""
    _pattern = re.compile(r"\b(world|sports?|business|sci\s*[/-]\s*tech|science|technology)\b")

    def _rows(self, data_dir: Path, source: str) -> list[Example]:
        if source == "hub":
            from datasets import load_dataset

            raw = [(r["label"], r["text"]) for r in load_dataset("fancyzhx/ag_news", split="test")]
        else:
            path = require_file(data_dir, "agnews/test.csv")
            raw = []
            try:
                rows = list(csv.reader(io.StringIO(read_text(path), newline="")))
            except csv.Error as e:
                raise DataError(f"{path}: malformed CSV ({e}); restore the file from its source") from None
            for lineno, row in enumerate(rows, 1):
                if len(row) != 3 or row[0] not in ("1", "2", "3", "4"):
                    raise DataError(f"{path} line {lineno}: expected \"class\",\"title\",\"description\" with "
                                    "class 1-4; fix or remove the line")
                raw.append((int(row[0]) - 1, f"{row[1].strip()}. {row[2].strip()}".replace("\\", " ")))
        if not raw:
            raise DataError(f"AG News ({source}): no examples")
        rows = [Example(self.prompt(text), self.labels[c], label=self.labels[c], source="agnews") for c, text in raw]
        return shuffled(rows)

    def pool(self, data_dir: Path, source: str = "local") -> list[Example]:
        return self._rows(data_dir, source)[self.held_out:]

    def eval_set(self, data_dir: Path, source: str = "local") -> list[Example]:
        return self._rows(data_dir, source)[:self.held_out]

    def parse(self, answer: str) -> str | None:
        found = self._pattern.findall(answer.lower())
        if not found:
            return None
        word = found[0]
        if word.startswith("sport"):
            return "Sports"
        if word in ("world", "business"):
            return word.capitalize()
        return "Sci/Tech"
