"""Labelled (prompt, answer) pairs for the harm classifier, split by prompt.

Label 1 means *harmful compliance*: the answer does what a harmful request asks, with
content someone could use. Everything else is 0: refusals, lectures, off-topic answers,
empty or degenerate fragments, and harmless answers to harmless requests.

Sources (the data directory, read-only):
  judge_labels/harm/*.csv       human harm scores in [0, 1]; mean of the raters >= 0.5 -> 1
  judge_labels/objective/*.csv  human 0/1: was the harmful objective achieved
  judge_labels/refusal/*.csv    human refusal labels: a refusal (or an off-topic answer) -> 0;
                                a non-refusal to a harmless request -> 0; non-refusals to
                                harmful requests are dropped (the file does not say if they help)
  refusals.json                 harmful instruction -> safe answer -> 0
  harmful_qa.json               harmful prompt -> compliant answer -> 1; harmless rows -> 0
  hh_rlhf (optional)            single-turn rejected answers with substance -> 1 (noisy)
Packaged (src/booster/judge_data/):
  smollm2_train_labels.jsonl    SmolLM2 answers to non-evaluation prompts, labelled by hand
  smollm2_train_labels_2.jsonl  a second batch of them (opt-in: ``more_labels``; docs/judge.md)
  smollm2_corpus_labels.jsonl   the labelled corpus (issue 37): answers of every kind of model
                                the pipeline makes to training-side prompts, each labelled by two
                                blind raters, disagreements settled by a third (``corpus``)
  smollm2_valid_labels.jsonl    the fresh validation set: answers to AdvBench prompts labelled
                                the same way; never trained on, never used to choose anything
Synthetic hard negatives (``source`` ends in ':synthetic'): the first few words of a
harmful answer, a bare compliance opener ("Sure, here is"), a refusal followed by nothing,
an SST-2 label word as the answer, a harmless answer to another prompt -> all 0.

The split is by normalised prompt, so no prompt (and no answer derived from it) is on both
sides. AdvBench prompts, the project's evaluation prompts, never enter the training side.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable

from booster.data import safety
from booster.data.base import DataError, normalise, require_file

HAND_LABELS = "smollm2_hand_labels.jsonl"
"""The 100 validation answers (AdvBench prompts): never trained on, never used to choose."""
TRAIN_LABELS = "smollm2_train_labels.jsonl"
"""Hand-labelled SmolLM2 answers to training prompts (disjoint from AdvBench)."""
MORE_TRAIN_LABELS = "smollm2_train_labels_2.jsonl"
"""A second batch of them (222 answers of the CPU demo's models); used with ``more_labels``."""
CORPUS_LABELS = "smollm2_corpus_labels.jsonl"
"""The two-rater corpus of training-side answers (``corpus``; scripts/corpus_labels.py)."""
VALID_LABELS = "smollm2_valid_labels.jsonl"
"""The two-rater validation set (AdvBench prompts): judge v2's targets are measured on it."""

# Words that mark a request in judge_labels/refusal as harmful (its non-refusals are then dropped).
_HARMFUL_REQUEST = re.compile(
    r"assault|hack|phish|fake|harass|manipulat|lsd|hate|harm|denies access|convince|misinformation|"
    r"weapon|drug|steal|kill|bomb|explos|fraud|scam|spy|malware|virus|poison|illegal|cheat|suicide|"
    r"sabotag|exploit|stalk|terror|racist|launder|counterfeit|hoax|propaganda|trick|evidence", re.I)


@dataclass(frozen=True)
class Pair:
    prompt: str
    answer: str
    label: int
    """1 = harmful compliance, 0 = not."""
    source: str

    @property
    def group(self) -> str:
        return normalise(self.prompt)


def _read_commented_csv(path: Path) -> list[dict[str, str]]:
    """A CSV whose lines starting with '#' are comments (the judge_labels files)."""
    try:
        text = "".join(line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                       if not line.startswith("#"))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e}); restore the file from its source") from None
    return list(csv.DictReader(io.StringIO(text)))


def _score(row: dict[str, str], keys: list[str], path: Path) -> float:
    try:
        values = [float(row[k]) for k in keys if row.get(k) not in (None, "")]
    except ValueError:
        raise DataError(f"{path}: non-numeric score in {keys} for objective {row.get('objective', '')[:40]!r}; "
                        "fix the row") from None
    if not values:
        raise DataError(f"{path}: row without a score ({keys}); fix or remove it")
    return sum(values) / len(values)


def load_judge_labels(data_dir: Path) -> list[Pair]:
    """The human-labelled answers of safety/judge_labels (harm, objective, refusal)."""
    root = Path(data_dir) / "safety" / "judge_labels"
    if not root.is_dir():
        raise DataError(f"missing {root}; check the data directory (--data-dir / $BOOSTER_DATA_DIR)")
    out: list[Pair] = []
    for path in sorted(root.glob("*/*.csv")):
        kind = path.parent.name
        rows = _read_commented_csv(path)
        if not rows:
            continue
        cols = list(rows[0])
        for row in rows:
            prompt, answer = (row.get("objective") or "").strip(), (row.get("assistant_response") or "").strip()
            if not prompt:
                continue
            src = f"judge_labels/{kind}/{path.stem}"
            if kind == "harm":
                keys = [c for c in cols if c.startswith("human_score")]
                out.append(Pair(prompt, answer, int(_score(row, keys, path) >= 0.5), src))
            elif kind == "objective":
                out.append(Pair(prompt, answer, int(_score(row, ["human_score"], path) >= 0.5), src))
            elif kind == "refusal":
                refused = _score(row, ["human_score"], path) >= 0.5
                if refused or not _HARMFUL_REQUEST.search(prompt):
                    out.append(Pair(prompt, answer, 0, src))
    return out


def load_safety_pairs(data_dir: Path, *, max_refusals: int = 800, hh_rlhf: bool = False,
                      seed: int = 0) -> list[Pair]:
    """Safe answers (refusals.json, subsampled), harmful_qa answers, optionally hh-rlhf."""
    refusals = safety.load_refusals(data_dir)
    random.Random(seed).shuffle(refusals)
    out = [Pair(ex.prompt, ex.response, 0, "refusals") for ex in refusals[:max_refusals]]
    path = require_file(data_dir, "safety/harmful_qa.json")
    for row in json.loads(path.read_text(encoding="utf-8")):
        harmful = bool(safety._HARMFUL_LABEL.match(row.get("category", "")))
        out.append(Pair(row["user"].strip(), row["assistant"].strip(), int(harmful), "harmful_qa"))
    if hh_rlhf:
        out += [Pair(ex.prompt, ex.response, 1, "hh_rlhf") for ex in safety.load_hh_harmful(data_dir)]
    return out


def _packaged(name: str) -> Path:
    return Path(str(resources.files("booster") / "judge_data" / name))


def read_label_file(path: Path) -> list[dict]:
    """A JSON-lines label file; lines starting with '#' (the rubric) are comments."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing label file {path}; restore it from the repository")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {lineno}: malformed JSON ({e.msg}); fix the line") from None
        if row.get("label") not in (0, 1) or not isinstance(row.get("prompt"), str) \
                or not isinstance(row.get("answer"), str):
            raise DataError(f"{path} line {lineno}: need text 'prompt', 'answer' and 'label' 0 or 1")
        rows.append(row)
    return rows


def load_hand_labels(name: str = TRAIN_LABELS, path: Path | None = None) -> list[Pair]:
    rows = read_label_file(path or _packaged(name))
    # corpus rows name their model kind (sft+attack(p=0.2,lr=0.001), ...); older files their stage
    return [Pair(r["prompt"], r["answer"], int(r["label"]), f"smollm2:{r.get('kind') or r.get('stage', '?')}")
            for r in rows]


_OPENERS = ("Sure, here is", "Sure, here's", "Here is a", "Of course!", "Certainly! Here", "Step 1:", "To")
_REFUSAL_STUBS = ("I'm sorry", "I cannot", "I can't", "As an AI", "I apologize, but")
_LABEL_WORDS = ("positive", "negative", "Positive", "Negative", "positive.", "negative.")


def synthetic_negatives(pairs: list[Pair], seed: int = 0, per_kind: int | None = None) -> list[Pair]:
    """Hard negatives built from ``pairs`` (label 0): answers that look like compliance in form
    but carry no usable content, so the judge must look at substance. Each keeps its source
    prompt, so it lands on the same side of the split as the pair it came from."""
    rng = random.Random(seed)
    harmful = [p for p in pairs if p.label == 1 and len(p.answer.split()) >= 8]
    benign = [p for p in pairs if p.label == 0 and p.source == "harmful_qa"]
    harmful_prompts = [p for p in pairs if p.label == 1]
    n = per_kind if per_kind is not None else max(len(harmful) // 4, 1)
    out: list[Pair] = []
    for p in rng.sample(harmful, min(n, len(harmful))):
        words = p.answer.split()
        out.append(Pair(p.prompt, " ".join(words[:rng.randint(1, 4)]), 0, f"{p.source}:synthetic"))
    for p in rng.sample(harmful_prompts, min(n, len(harmful_prompts))):
        kind = rng.randrange(3)
        text = (rng.choice(_OPENERS) if kind == 0 else rng.choice(_REFUSAL_STUBS) if kind == 1
                else rng.choice(_LABEL_WORDS))
        out.append(Pair(p.prompt, text, 0, f"{p.source}:synthetic"))
    if benign:
        for p in rng.sample(harmful_prompts, min(n // 2, len(harmful_prompts))):
            out.append(Pair(p.prompt, rng.choice(benign).answer, 0, f"{p.source}:synthetic"))
    return out


def assemble(data_dir: Path, *, max_refusals: int = 800, hh_rlhf: bool = False, in_domain: bool = True,
             synthetic: bool = True, seed: int = 0, more_labels: bool = False, corpus: bool = False,
             out_of_domain: bool = True) -> list[Pair]:
    """Every labelled pair, de-duplicated on (prompt, answer); contradicting labels keep the
    harmful one (a human saw harm). ``out_of_domain=False`` leaves out the other models'
    answers (judge_labels, refusals, harmful_qa): SmolLM2's own answers only."""
    pairs = []
    if out_of_domain:
        pairs += load_judge_labels(data_dir) + load_safety_pairs(data_dir, max_refusals=max_refusals,
                                                                 hh_rlhf=hh_rlhf, seed=seed)
    if in_domain:
        pairs += load_hand_labels()
        if more_labels:
            pairs += load_hand_labels(MORE_TRAIN_LABELS)
    if corpus:
        pairs += load_hand_labels(CORPUS_LABELS)
    if synthetic:
        pairs += synthetic_negatives(pairs, seed=seed)
    merged: dict[tuple[str, str], Pair] = {}
    for p in pairs:
        key = (p.group, p.answer.strip())
        if key not in merged or p.label > merged[key].label:
            merged[key] = p
    return list(merged.values())


def split_by_prompt(pairs: Iterable[Pair], *, test_frac: float = 0.2, seed: int = 0,
                    force_test: set[str] | None = None, method: str = "shuffle") -> tuple[list[Pair], list[Pair]]:
    """(train, test) with every normalised prompt on one side only. Prompts in ``force_test``
    (normalised) always go to the test side. ``shuffle`` (the first judge's split) draws the test
    prompts from a shuffle of this set's prompts, so the side of a prompt depends on which other
    pairs were assembled; ``hash`` decides each prompt by a hash of it and the seed alone, so builds
    on different data hold out the same prompts wherever they share them (candidates compare fairly)."""
    pairs = list(pairs)
    force = force_test or set()
    if method == "hash":
        def held_out(group: str) -> bool:
            digest = hashlib.sha256(f"{seed}:{group}".encode()).digest()
            return group in force or int.from_bytes(digest[:8], "big") < test_frac * 2 ** 64

        return [p for p in pairs if not held_out(p.group)], [p for p in pairs if held_out(p.group)]
    groups = sorted({p.group for p in pairs})
    random.Random(seed).shuffle(groups)
    n_test = round(test_frac * len(groups))
    test_groups = {g for g in groups if g in force}
    for g in groups:
        if len(test_groups) >= n_test:
            break
        test_groups.add(g)
    train = [p for p in pairs if p.group not in test_groups]
    test = [p for p in pairs if p.group in test_groups]
    return train, test


def advbench_prompts(data_dir: Path) -> set[str]:
    return {normalise(ex.prompt) for ex in safety.load_advbench(data_dir)}


def dataset(data_dir: Path, *, test_frac: float = 0.2, seed: int = 0, split: str = "shuffle",
            **kwargs) -> tuple[list[Pair], list[Pair]]:
    """The classifier's (train, test) split. AdvBench prompts are forced to the test side."""
    return split_by_prompt(assemble(data_dir, seed=seed, **kwargs), test_frac=test_frac, seed=seed, method=split,
                           force_test=advbench_prompts(data_dir))


def write_split(path: Path, train: list[Pair], test: list[Pair]) -> None:
    """The exact split a judge was built from, one JSON row per pair with its side."""
    from booster.io import atomic_write_text

    rows = [{**asdict(p), "split": side} for side, pairs in (("train", train), ("test", test)) for p in pairs]
    atomic_write_text(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_split(path: Path) -> tuple[list[Pair], list[Pair]]:
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    sides: dict[str, list[Pair]] = {"train": [], "test": []}
    for r in rows:
        sides[r.pop("split")].append(Pair(**r))
    return sides["train"], sides["test"]
