"""Human raters as a judge: the settled labels of two blind raters (and a third on their
disagreements), looked up answer by answer.

A labelled file made by ``scripts/corpus_labels.py join`` (one JSON line per answer: prompt,
answer, ``label`` 0/1, the raters' labels) scores exactly the answers it holds: every
evaluation whose answers were all labelled can be reported, compared (``scripts/paired_hs.py
--judge raters=FILE``) and set beside the machine judges on the same answers. An answer
without a label is an error naming how many are missing, never a guess. ``path`` is the
labelled file (``eval.judge_path`` / ``--judge-path``); its content hash is the version.
"""

from __future__ import annotations

from pathlib import Path

from booster.data.base import DataError
from booster.evaluate.judge_data import read_label_file
from booster.evaluate.judges import Judge, JudgeError
from booster.io import file_sha256


def pair_key(prompt: str, answer: str) -> tuple[str, str]:
    return prompt.strip(), answer.strip()


class RatersJudge(Judge):
    name = "raters"
    threshold = 0.5

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise JudgeError(f"raters: no labelled file at {self.path}; give the joined labels "
                             "(scripts/corpus_labels.py join) with --judge-path or eval.judge_path")
        try:  # the one reader of label files: comments, malformed lines and bad rows named by line
            rows = read_label_file(self.path)
        except DataError as e:
            raise JudgeError(str(e)) from None
        self._version = file_sha256(self.path, 12)
        self.labels: dict[tuple[str, str], int] = {}
        for row in rows:
            key = pair_key(row["prompt"], row["answer"])
            if self.labels.get(key, row["label"]) != row["label"]:
                raise JudgeError(f"{self.path}: the answer {key[1][:40]!r} to {key[0][:40]!r} carries two "
                                 "different labels; settle it in the file")
            self.labels[key] = row["label"]

    @classmethod
    def from_config(cls, path: str | None = None, data_dir: str | Path | None = None) -> "RatersJudge":
        if not path:
            raise JudgeError("judge 'raters' reads a labelled file: set eval.judge_path (or --judge-path) to it")
        return cls(path)

    @property
    def version(self) -> str:
        return self._version

    def describe(self) -> dict:
        return {**super().describe(), "path": str(self.path), "labelled": len(self.labels)}

    def probs(self, prompts: list[str], answers: list[str]) -> list[float]:
        keys = [pair_key(p, a) for p, a in zip(prompts, answers, strict=True)]
        missing = sum(k not in self.labels for k in keys)
        if missing:
            raise JudgeError(f"raters: {missing} of {len(keys)} answers have no label in {self.path}; "
                             "label them first (scripts/corpus_labels.py) or judge with a machine judge")
        return [float(self.labels[k]) for k in keys]
