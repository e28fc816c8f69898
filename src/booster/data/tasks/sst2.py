"""SST-2: binary sentiment of a movie-review sentence (positive / negative)."""

from __future__ import annotations

import re
from pathlib import Path

from booster.data.base import DataError, Example, read_text, require_file
from booster.data.tasks.base import Task, shuffled


class SST2(Task):
    name = "sst2"
    files = ("sst2/train.tsv", "sst2/dev.tsv")
    instruction = "Analyze the sentiment of the input, and respond only positive or negative."
    labels = ("negative", "positive")

    def _read_tsv(self, path: Path) -> list[Example]:
        out = []
        for lineno, line in enumerate(read_text(path).split("\n"), 1):
            if not line.strip():
                continue
            parts = line.rstrip("\r").split("\t", 1)
            if lineno == 1 and parts[0] == "label":
                continue
            if len(parts) != 2 or parts[0] not in ("0", "1") or not parts[1].strip():
                raise DataError(f"{path} line {lineno}: expected 'label<TAB>sentence' with label 0 or 1; "
                                "fix or remove the line")
            label = self.labels[int(parts[0])]
            out.append(Example(self.prompt(parts[1].strip()), label, label=label, source="sst2"))
        if not out:
            raise DataError(f"{path}: no examples; restore the file from its source")
        return out

    def _hub(self, split: str) -> list[Example]:
        from datasets import load_dataset

        rows = load_dataset("stanfordnlp/sst2", split=split)
        return [Example(self.prompt(r["sentence"].strip()), self.labels[r["label"]], label=self.labels[r["label"]],
                        source="sst2") for r in rows]

    def pool(self, data_dir: Path, source: str = "local") -> list[Example]:
        return self._hub("train") if source == "hub" else self._read_tsv(require_file(data_dir, "sst2/train.tsv"))

    def eval_set(self, data_dir: Path, source: str = "local") -> list[Example]:
        rows = self._hub("validation") if source == "hub" else self._read_tsv(require_file(data_dir, "sst2/dev.tsv"))
        return shuffled(rows)  # the dev file is not class-balanced in prefix slices

    def parse(self, answer: str) -> str | None:
        found = re.findall(r"\b(positive|negative)\b", answer.lower())
        return found[0] if found else None
