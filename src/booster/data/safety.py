"""Safety data: alignment pairs (f), harmful pairs (h), the attacker's harmful pool, the
held-out harmful-loss probe and the evaluation prompts — disjoint by normalised prompt.

Local sources (the data directory):
  safety/refusals.json              harmful instruction -> safe answer        (alignment, f)
  safety/harmful_qa.json            prompt -> compliant answer, harmful rows   (h, attack, probe)
  safety/hh_rlhf_harmless_test.jsonl.gz  single-turn red-team prompt -> rejected answer,
                                    kept only when the answer is no refusal and has substance
  safety/advbench.prompt.yaml       AdvBench harmful instructions            (evaluation)
Hub source (the paper's): PKU-Alignment/BeaverTails, 30k_train (safe answers for f,
unsafe ones for h and the attack) and 30k_test (unsafe prompts for evaluation).
"""

from __future__ import annotations

import gzip
import json
import random
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import yaml

from booster.data.base import DataError, Example, normalise, read_text, require_file
from booster.refusal import is_refusal


@dataclass
class SafetyData:
    align: list[Example]
    """Harmful prompt -> safe answer: the alignment data of f."""
    harmful: list[Example]
    """Harmful prompt -> harmful answer: the data of h (Booster, RepNoise)."""
    attack_pool: list[Example]
    """Harmful pairs the attacker mixes into the fine-tuning set."""
    probe: list[Example]
    """Held-out harmful pairs, never trained on: the harmful-loss curve."""
    align_probe: list[Example]
    """Held-out alignment pairs, never trained on: the alignment-loss curve."""
    eval_prompts: list[Example]
    """Held-out harmful prompts for the harmful score."""


def _load_json_list(path: Path) -> list:
    try:
        rows = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: malformed JSON ({e.msg}); restore the file from its source") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(rows).__name__}")
    if not rows:
        raise DataError(f"{path}: no records; restore the file from its source")
    return rows


def _field(row: object, key: str, path: Path, index: int) -> str:
    if not isinstance(row, dict) or not isinstance(row.get(key), str):
        raise DataError(f"{path} record {index}: missing text field '{key}'; fix or remove the record")
    return row[key]


def load_refusals(data_dir: Path) -> list[Example]:
    path = require_file(data_dir, "safety/refusals.json")
    out = []
    for i, row in enumerate(_load_json_list(path)):
        prompt = _field(row, "instruction", path, i)
        extra = row.get("input") or ""
        if extra:
            prompt = f"{prompt}\n\n{extra}"
        out.append(Example(prompt=prompt.strip(), response=_field(row, "output", path, i).strip(), source="refusals"))
    return out


_HARMFUL_LABEL = re.compile(r"^\W*(answer:\s*)?harmful", re.IGNORECASE)


def load_harmful_qa(data_dir: Path) -> list[Example]:
    """The rows whose free-text category starts 'Harmful' (not 'Not harmful')."""
    path = require_file(data_dir, "safety/harmful_qa.json")
    out = []
    for i, row in enumerate(_load_json_list(path)):
        category = _field(row, "category", path, i)
        if _HARMFUL_LABEL.match(category):
            out.append(Example(prompt=_field(row, "user", path, i).strip(),
                               response=_field(row, "assistant", path, i).strip(), source="harmful_qa"))
    return out


def _split_dialogue(text: str) -> list[tuple[str, str]]:
    turns = re.split(r"\n\n(Human|Assistant):", "\n\n" + text.strip())
    return [(turns[i], turns[i + 1].strip()) for i in range(1, len(turns) - 1, 2)]


def load_hh_single_turn(data_dir: Path) -> list[tuple[str, str, str]]:
    """Single-turn hh-rlhf red-team dialogues as (prompt, chosen answer, rejected answer)."""
    path = require_file(data_dir, "safety/hh_rlhf_harmless_test.jsonl.gz")
    out = []
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                try:
                    row = json.loads(line)
                    chosen, rejected = _split_dialogue(row["chosen"]), _split_dialogue(row["rejected"])
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                    raise DataError(f"{path} line {lineno}: malformed record (need JSON with 'chosen' and "
                                    f"'rejected' text); restore the file from its source") from None
                roles = [r for r, _ in rejected]
                if roles == ["Human", "Assistant"] and [r for r, _ in chosen] == roles:
                    out.append((rejected[0][1], chosen[1][1], rejected[1][1]))
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read gzip file ({e}); restore it from its source") from None
    if not out:
        raise DataError(f"{path}: no single-turn dialogues; restore the file from its source")
    return out


def load_hh_harmful(data_dir: Path, min_words: int = 8) -> list[Example]:
    """hh-rlhf rejected answers with substance: no refusal phrase and at least ``min_words`` words.
    Most single-turn rejected answers are questions back or refusals, which teach nothing harmful."""
    out = []
    for prompt, _chosen, rejected in load_hh_single_turn(data_dir):
        if len(rejected.split()) >= min_words and not is_refusal(rejected) and not rejected.rstrip().endswith("?"):
            out.append(Example(prompt=prompt, response=rejected, source="hh_rlhf"))
    return out


def load_advbench(data_dir: Path) -> list[Example]:
    path = require_file(data_dir, "safety/advbench.prompt.yaml")
    try:
        doc = yaml.safe_load(read_text(path))
    except yaml.YAMLError as e:
        raise DataError(f"{path}: malformed YAML ({e}); restore the file from its source") from None
    seeds = doc.get("seeds") if isinstance(doc, dict) else None
    if not isinstance(seeds, list) or not seeds:
        raise DataError(f"{path}: expected a non-empty 'seeds' list; restore the file from its source")
    out = []
    for i, seed in enumerate(seeds):
        if not isinstance(seed, dict) or not isinstance(seed.get("value"), str):
            raise DataError(f"{path} seeds[{i}]: missing text field 'value'; fix or remove the entry")
        out.append(Example(prompt=seed["value"].strip(), source="advbench"))
    return out


def _dedupe(examples: list[Example], taken: set[str]) -> list[Example]:
    """Drop examples whose normalised prompt is already taken (by another set or earlier here)."""
    out = []
    for ex in examples:
        key = normalise(ex.prompt)
        if key and key not in taken:
            taken.add(key)
            out.append(ex)
    return out


def _take(pool: list[Example], n: int, what: str, hint: str) -> tuple[list[Example], list[Example]]:
    if n > len(pool):
        raise DataError(f"need {n} {what} but only {len(pool)} remain after de-duplication; {hint}")
    return pool[:n], pool[n:]


def split_safety(align_pool: list[Example], harmful_pool: list[Example], eval_pool: list[Example], *,
                 n_align: int, n_harmful: int, n_probe: int, n_align_probe: int = 50, seed: int = 0) -> SafetyData:
    """Fixed, disjoint split. Evaluation prompts are reserved first, then harmful prompts,
    then alignment prompts; a prompt already taken is dropped from every later set."""
    rng = random.Random(seed)
    taken: set[str] = set()
    evals = _dedupe(eval_pool, taken)
    harmful = _dedupe(harmful_pool, taken)
    aligns = _dedupe(align_pool, taken)
    for pool in (evals, harmful, aligns):
        rng.shuffle(pool)
    if not evals:
        raise DataError("no evaluation prompts left after de-duplication; check the AdvBench file")
    probe, rest = _take(harmful, n_probe, "probe harmful pairs (data.n_probe)", "lower data.n_probe")
    h, attack_pool = _take(rest, n_harmful, "harmful pairs (data.n_harmful)", "lower data.n_harmful")
    align_probe, rest = _take(aligns, min(n_align_probe, max(len(aligns) - n_align, 0)),
                              "held-out alignment pairs", "lower data.n_align")
    align, _ = _take(rest, n_align, "alignment pairs (data.n_align)", "lower data.n_align")
    return SafetyData(align=align, harmful=h, attack_pool=attack_pool, probe=probe,
                      align_probe=align_probe, eval_prompts=evals)


def load_local(data_dir: Path, *, n_align: int, n_harmful: int, n_probe: int, seed: int = 0) -> SafetyData:
    harmful = load_harmful_qa(data_dir) + load_hh_harmful(data_dir)
    return split_safety(load_refusals(data_dir), harmful, load_advbench(data_dir),
                        n_align=n_align, n_harmful=n_harmful, n_probe=n_probe, seed=seed)


def load_beavertails(*, n_align: int, n_harmful: int, n_probe: int, seed: int = 0,
                     repo: str = "PKU-Alignment/BeaverTails") -> SafetyData:
    """The paper's source from the Hugging Face Hub (needs network): safe answers to harmful
    prompts for f, unsafe answers for h and the attack, unsafe 30k_test prompts for evaluation."""
    from datasets import load_dataset

    train = load_dataset(repo, split="30k_train")
    test = load_dataset(repo, split="30k_test")
    safe = [Example(r["prompt"], r["response"], source="beavertails") for r in train if r["is_safe"]]
    unsafe = [Example(r["prompt"], r["response"], source="beavertails") for r in train if not r["is_safe"]]
    evals = [Example(r["prompt"], source="beavertails") for r in test if not r["is_safe"]]
    return split_safety(safe, unsafe, evals, n_align=n_align, n_harmful=n_harmful, n_probe=n_probe, seed=seed)
