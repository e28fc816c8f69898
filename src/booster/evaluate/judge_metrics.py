"""Quality metrics of a judge's probabilities against labels, overall and by source kind.

Accuracy, precision, recall and F1 treat label 1 (harmful compliance) as the positive
class at the judge's own threshold; ECE (expected calibration error, 10 equal-width bins)
says how far its probabilities are from the observed share of harmful answers. Below both
the classifier's build (its held-out report) and ``judge_report`` (``booster judge eval``).
"""

from __future__ import annotations

import math

from typing import Any


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float] | None:
    """The Wilson score interval (95% by default) of a proportion k/n; None when n is 0. Unlike
    p ± z·se it stays inside [0, 1] and is not empty at k = 0 or k = n."""
    if n <= 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)


def cohen_kappa(a: list[int], b: list[int]) -> float:
    """Agreement of two raters beyond what raters with these label rates would reach by chance."""
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b)) / n
    pa, pb = sum(a) / n, sum(b) / n
    chance = pa * pb + (1 - pa) * (1 - pb)
    return (observed - chance) / (1 - chance) if chance < 1 else 1.0


def rater_agreement(a: list[int], b: list[int]) -> dict[str, Any]:
    """Two raters' labels of the same answers: n, agreement with its Wilson interval, kappa."""
    n = len(a)
    if not n:
        return {"n": 0}
    k = sum(x == y for x, y in zip(a, b))
    return {"n": n, "agreement": round(k / n, 4), "ci95": wilson_interval(k, n), "kappa": round(cohen_kappa(a, b), 4)}


def binary_metrics(labels: list[int], probs: list[float], threshold: float, bins: int = 10) -> dict[str, Any]:
    pred = [int(p > threshold) for p in probs]
    tp = sum(1 for y, q in zip(labels, pred) if y == 1 and q == 1)
    fp = sum(1 for y, q in zip(labels, pred) if y == 0 and q == 1)
    fn = sum(1 for y, q in zip(labels, pred) if y == 1 and q == 0)
    tn = len(labels) - tp - fp - fn
    n = max(len(labels), 1)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    ece = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, p in enumerate(probs) if lo < p <= hi or (b == 0 and p <= lo)]
        if idx:
            conf = sum(probs[i] for i in idx) / len(idx)
            acc = sum(labels[i] for i in idx) / len(idx)
            ece += len(idx) / n * abs(conf - acc)
    return {"n": len(labels), "positives": sum(labels), "accuracy": round((tp + tn) / n, 4),
            "precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4), "ece": round(ece, 4),
            "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
            "ci95": {"accuracy": wilson_interval(tp + tn, len(labels)), "precision": wilson_interval(tp, tp + fp),
                     "recall": wilson_interval(tp, tp + fn)}}


def kind_of(source: str) -> str:
    """Coarse source of a pair: judge_labels (human labels), smollm2 (hand labels of the
    project's models), safety (refusals, harmful_qa, hh_rlhf), synthetic (hard negatives)."""
    if source.endswith(":synthetic"):
        return "synthetic"
    if source.startswith("judge_labels"):
        return "judge_labels"
    if source.startswith("smollm2"):
        return "smollm2"
    return "safety"


def metrics_by_kind(pairs: list[Any], probs: list[float], threshold: float) -> dict[str, Any]:
    """Metrics on all ``pairs``, each source kind, and 'human' (judge_labels + smollm2)."""
    kinds: dict[str, list[int]] = {"all": list(range(len(pairs)))}
    for i, p in enumerate(pairs):
        kinds.setdefault(kind_of(p.source), []).append(i)
        if kind_of(p.source) in ("judge_labels", "smollm2"):
            kinds.setdefault("human", []).append(i)
    return {k: binary_metrics([pairs[i].label for i in idx], [probs[i] for i in idx], threshold)
            for k, idx in kinds.items()}
