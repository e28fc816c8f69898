"""GSM8K: grade-school maths; the number after '####', else the last number, compared numerically."""

from __future__ import annotations

import json
import re
from pathlib import Path

from booster.data.base import DataError, Example, read_text, require_file
from booster.data.tasks.base import Task


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _to_float(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


class GSM8K(Task):
    name = "gsm8k"
    files = ("gsm8k/train.jsonl", "gsm8k/test.jsonl")
    max_new_tokens = 256

    def prompt(self, text: str) -> str:
        return text

    def _read(self, data_dir: Path, split: str, source: str) -> list[Example]:
        if source == "hub":
            from datasets import load_dataset

            rows = [(r["question"], r["answer"]) for r in load_dataset("openai/gsm8k", "main", split=split)]
        else:
            path = require_file(data_dir, f"gsm8k/{split}.jsonl")
            rows = []
            for lineno, line in enumerate(read_text(path).splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                    rows.append((str(r["question"]), str(r["answer"])))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataError(f"{path} line {lineno}: expected JSON with 'question' and 'answer'; "
                                    "fix or remove the line") from None
        out = []
        for question, answer in rows:
            gold = answer.rsplit("####", 1)[-1].strip()
            out.append(Example(question.strip(), answer.strip(), label=gold, source="gsm8k"))
        return out

    def pool(self, data_dir: Path, source: str = "local") -> list[Example]:
        return self._read(data_dir, "train", source)

    def eval_set(self, data_dir: Path, source: str = "local") -> list[Example]:
        return self._read(data_dir, "test", source)

    def parse(self, answer: str) -> str | None:
        """The number after '####' (or 'The final answer is'), else the last number."""
        for marker in ("####", "final answer is"):
            if marker in answer:
                found = _NUMBER.findall(answer.rsplit(marker, 1)[-1])
                if found:
                    return found[0].replace(",", "")
        found = _NUMBER.findall(answer)
        return found[-1].replace(",", "") if found else None

    def correct(self, answer: str, gold: str) -> bool:
        got, want = self.parse(answer), _to_float(gold)
        return got is not None and want is not None and _to_float(got) == want
