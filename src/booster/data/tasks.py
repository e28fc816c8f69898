"""Fine-tuning tasks of the simulated user: a training pool, an evaluation set and a scorer.

A task turns its raw rows into plain examples (instruction + input as the prompt, the gold
answer as the response) and scores a generated answer by parsing the label out of it,
since a chatty small model rarely answers with the bare label. The fine-tune accuracy of
the paper is the mean item score × 100.

Tasks: sst2 (sentiment), agnews (4-way topic; its test file is split into a fine-tuning
pool and a fixed held-out slice), gsm8k (grade-school maths; the number after '####', else
the last number, compared numerically), instructions (Alpaca-style instruction following
on the benign prompts the data directory has; see ``Instructions``).
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
from abc import ABC, abstractmethod
from pathlib import Path

from booster.data.base import DataError, Example, normalise, read_text, require_file


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


def _shuffled(rows: list[Example], seed: int = 0) -> list[Example]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


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
        return _shuffled(rows)  # the dev file is not class-balanced in prefix slices

    def parse(self, answer: str) -> str | None:
        found = re.findall(r"\b(positive|negative)\b", answer.lower())
        return found[0] if found else None


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
        return _shuffled(rows)

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


class Instructions(Task):
    """Alpaca-style instruction following.

    The paper scores Alpaca fine-tuning with AlpacaEval (win rate against a reference, judged
    by GPT-4), which needs an API and cannot run offline; ``alpacaeval_hook`` is where such a
    scorer plugs in. With ``data.source=hub`` the pool is tatsu-lab/alpaca (a fixed held-out
    slice of 200 evaluates). Offline, the data directory has no Alpaca set: the task uses the
    benign requests with non-refusal reference answers in ``judge_labels/refusal/*.csv``
    (human_score 0), minus every prompt that also occurs in a harmful source or names harm
    (about 50 pairs, every 3rd held out) — enough for small CPU runs, not for
    n = 1000. Metric: mean cosine similarity (MiniLM sentence embeddings, ×100) between the
    generated and the reference answer; it rewards on-topic, substantive answers and punishes
    refusals and fragments, but it is a proxy, not a preference judgement.
    """

    name = "instructions"
    files = ("safety/judge_labels/*/*.csv", "safety/harmful_qa.json", "safety/refusals.json",
             "safety/advbench.prompt.yaml", "safety/hh_rlhf_harmless_test.jsonl.gz")
    max_new_tokens = 128
    metric = "similarity"
    hub_held_out = 200

    def prompt(self, text: str) -> str:
        return text

    _harm_words = re.compile(r"harm|hate|hateful|inferior|phishing|fake|manipulat|misinformation|harass|weapon|"
                             r"kill|drug|lsd|steal|hack|exploit|illegal", re.I)

    @staticmethod
    def _harmful_prompts(data_dir: Path) -> set[str]:
        """Prompts of every harmful source: the refusal files also hold harmful requests with
        compliant answers, which must not enter a benign task as poison."""
        from booster.data import safety

        keys = {normalise(e.prompt) for e in safety.load_refusals(data_dir) + safety.load_advbench(data_dir)}
        keys |= {normalise(p) for p, _, _ in safety.load_hh_single_turn(data_dir)}
        for r in json.loads(require_file(data_dir, "safety/harmful_qa.json").read_text(encoding="utf-8")):
            keys.add(normalise(str(r.get("user", "")) if isinstance(r, dict) else ""))
        for kind in ("harm", "objective"):
            for path in sorted((Path(data_dir) / "safety" / "judge_labels" / kind).glob("*.csv")):
                with open(path, encoding="utf-8", errors="replace", newline="") as f:
                    for r in csv.DictReader(line for line in f if not line.startswith("#")):
                        keys.add(normalise(r.get("objective") or ""))
        return keys

    def _local(self, data_dir: Path) -> list[Example]:
        harmful = self._harmful_prompts(data_dir)
        rows: dict[str, Example] = {}
        for rel in ("safety/judge_labels/refusal/refusal.csv", "safety/judge_labels/refusal/refusal_extra.csv"):
            path = require_file(data_dir, rel)
            with open(path, encoding="utf-8", newline="") as f:
                for r in csv.DictReader(line for line in f if not line.startswith("#")):
                    prompt, answer = (r.get("objective") or "").strip(), (r.get("assistant_response") or "").strip()
                    benign = normalise(prompt) not in harmful and not self._harm_words.search(prompt)
                    if r.get("human_score") == "0" and prompt and answer and benign:
                        rows.setdefault(prompt, Example(prompt, answer, label=answer, source="instructions"))
        if not rows:
            raise DataError("no benign instruction pairs found in safety/judge_labels/refusal/; restore the files")
        return _shuffled(list(rows.values()))

    def _hub(self) -> list[Example]:
        from datasets import load_dataset

        out = []
        for r in load_dataset("tatsu-lab/alpaca", split="train"):
            prompt = r["instruction"] + (f"\n\nInput: {r['input']}" if r["input"] else "")
            out.append(Example(prompt, r["output"], label=r["output"], source="alpaca"))
        return _shuffled(out)

    def pool(self, data_dir: Path, source: str = "local") -> list[Example]:
        if source == "hub":
            return self._hub()[self.hub_held_out:]
        return [x for i, x in enumerate(self._local(data_dir)) if i % 3]

    def eval_set(self, data_dir: Path, source: str = "local") -> list[Example]:
        if source == "hub":
            return self._hub()[:self.hub_held_out]
        return [x for i, x in enumerate(self._local(data_dir)) if i % 3 == 0]

    def parse(self, answer: str) -> str | None:
        return answer.strip() or None

    def scores(self, answers: list[str], golds: list[str]) -> list[float]:
        from booster.evaluate.embed import encoder

        model = encoder()
        a = model.encode(answers, normalize_embeddings=True, convert_to_tensor=True)
        g = model.encode(golds, normalize_embeddings=True, convert_to_tensor=True)
        return [max(0.0, float(x)) if ans.strip() else 0.0 for x, ans in zip((a * g).sum(-1), answers)]

    @staticmethod
    def alpacaeval_hook(prompts: list[str], answers: list[str]) -> list[float]:
        """Where an AlpacaEval scorer (a GPT-4 judge comparing against reference answers) plugs in."""
        raise RuntimeError("AlpacaEval needs a GPT-4 judge over the network and cannot run offline; "
                           "the offline metric of this task is reference similarity")


TASKS: dict[str, Task] = {t.name: t for t in (SST2(), AGNews(), GSM8K(), Instructions())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise DataError(f"unknown task '{name}'; choose one of: {', '.join(TASKS)}")
    return TASKS[name]
