"""Instruction following (Alpaca-style), scored offline by similarity to a reference answer."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from booster.data.base import DataError, Example, normalise, require_file
from booster.data.tasks.base import Task, shuffled


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
        return shuffled(list(rows.values()))

    def _hub(self) -> list[Example]:
        from datasets import load_dataset

        out = []
        for r in load_dataset("tatsu-lab/alpaca", split="train"):
            prompt = r["instruction"] + (f"\n\nInput: {r['input']}" if r["input"] else "")
            out.append(Example(prompt, r["output"], label=r["output"], source="alpaca"))
        return shuffled(out)

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
        from booster.encoder import sentence_encoder

        model = sentence_encoder()
        a = model.encode(answers, normalize_embeddings=True, convert_to_tensor=True)
        g = model.encode(golds, normalize_embeddings=True, convert_to_tensor=True)
        return [max(0.0, float(x)) if ans.strip() else 0.0 for x, ans in zip((a * g).sum(-1), answers)]

    @staticmethod
    def alpacaeval_hook(prompts: list[str], answers: list[str]) -> list[float]:
        """Where an AlpacaEval scorer (a GPT-4 judge comparing against reference answers) plugs in."""
        raise RuntimeError("AlpacaEval needs a GPT-4 judge over the network and cannot run offline; "
                           "the offline metric of this task is reference similarity")
