"""How good is a judge: metrics on labelled pairs, by source, and agreement with hand labels
(``booster judge eval``). The metrics themselves are ``judge_metrics``'s.
"""

from __future__ import annotations

import time
from typing import Any

from booster.evaluate.judge_metrics import binary_metrics, metrics_by_kind
from booster.evaluate.judges import Judge


def report_on(judge: Judge, pairs: list[Any]) -> dict[str, Any]:
    """Metrics of ``judge`` on ``pairs`` (objects with prompt, answer, label, source): all of
    them, each source kind, and 'human' (judge_labels + smollm2, the human-labelled rows)."""
    started = time.time()
    probs = judge.probs([p.prompt for p in pairs], [p.answer for p in pairs])
    seconds = time.time() - started
    return {"judge": judge.describe(), "metrics": metrics_by_kind(pairs, probs, judge.threshold), "seconds": round(seconds, 2),
            "answers_per_second": round(len(pairs) / seconds, 1) if seconds > 0 else None,
            "truncated": judge.last_truncated, "probs": [round(p, 4) for p in probs]}


def stage_kind(row: dict[str, Any]) -> str:
    """unaligned / aligned / attacked p=0 / attacked p>0, from a hand-label row; an attacked row
    without its p (the stage name does not carry it) is "attacked, p unknown", not guessed.
    Corpus rows name their model kind (``unaligned``, ``sft``, ``sft+attack(p=0.2,lr=0.001)``)."""
    kind = row.get("kind")
    if isinstance(kind, str) and kind:
        if kind == "unaligned":
            return "unaligned"
        if "+attack(p=" in kind:
            return "attacked p=0" if float(kind.split("+attack(p=")[1].split(",")[0]) == 0 else "attacked p>0"
        return "aligned"
    stage = str(row.get("stage", ""))
    if stage.startswith("base"):
        return "unaligned"
    if stage.startswith("align"):
        return "aligned"
    if stage.startswith("attack"):
        if row.get("p") is None:
            return "attacked, p unknown"
        return "attacked p=0" if float(row["p"]) == 0 else "attacked p>0"
    return "other"


def agreement(judge: Judge, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Agreement of ``judge`` with hand labels, overall and per stage kind, with the confusion matrix."""
    probs = judge.probs([r["prompt"] for r in rows], [r["answer"] for r in rows])
    out = {"all": binary_metrics([r["label"] for r in rows], probs, judge.threshold)}
    for kind in sorted({stage_kind(r) for r in rows}):
        idx = [i for i, r in enumerate(rows) if stage_kind(r) == kind]
        out[kind] = binary_metrics([rows[i]["label"] for i in idx], [probs[i] for i in idx], judge.threshold)
    return {"judge": judge.describe(), "metrics": out, "truncated": judge.last_truncated,
            "probs": [round(p, 4) for p in probs]}


def markdown(report: dict[str, Any]) -> str:
    """The tables `booster judge eval` prints."""
    lines = []
    cols = ("n", "accuracy", "precision", "recall", "f1", "ece")
    for section, title in (("heldout", "Held-out split (by prompt; never trained on)"),
                           ("hand_labels", "Agreement with the SmolLM2 hand labels")):
        if section not in report:
            continue
        lines += [f"### {title}", "", "| judge | subset | " + " | ".join(cols) + " | tp | fp | fn | tn |",
                  "|---" * (len(cols) + 6) + "|"]
        for name, res in report[section].items():
            for subset, m in res["metrics"].items():
                c = m["confusion"]
                vals = [str(m["n"])] + [f"{m[k]:.3f}" for k in cols[1:]]
                lines.append(f"| {name} | {subset} | " + " | ".join(vals) + f" | {c['tp']} | {c['fp']} | {c['fn']} | "
                             f"{c['tn']} |")
        lines.append("")
    for name, res in report.get("heldout", {}).items():
        if res.get("answers_per_second"):
            lines.append(f"- {name}: {res['answers_per_second']} answers/s on the held-out split; "
                         f"{res['truncated']} answers truncated")
    return "\n".join(lines) + "\n"


def run_eval(settings: Any, *, data_dir: Any = None, path: str | None = None, judges: list[str] | None = None,
             beaver_path: str | None = None, labels: str | None = None) -> tuple[dict[str, Any], str]:
    """`booster judge eval`: each judge on the classifier's held-out split and on the hand labels."""
    from pathlib import Path

    from booster.evaluate import judge_data
    from booster.evaluate.classifier_train import build
    from booster.evaluate.judges import JudgeError, make_judge

    judges = [j.strip() for j in (judges or ["classifier", "refusal"]) if j.strip()]
    cls_dir = Path(path) if path else build(settings, data_dir)
    split_file = cls_dir / "split.jsonl"
    if not split_file.is_file():
        raise JudgeError(f"{cls_dir} has no split.jsonl (the split it was trained on); rebuild it with "
                         "`booster judge train --force`")
    _, test = judge_data.read_split(split_file)
    label_file = Path(labels) if labels else judge_data._packaged(judge_data.HAND_LABELS)
    hand = judge_data.read_label_file(label_file) if label_file.is_file() else []
    report: dict[str, Any] = {"classifier_dir": str(cls_dir), "labels": str(label_file), "heldout": {},
                              "hand_labels": {}}
    paths = {"classifier": str(cls_dir), "beaver_dam": beaver_path}  # the command's flags; other judges: defaults
    for name in judges:
        judge = make_judge(name, paths.get(name))
        report["heldout"][name] = report_on(judge, test)
        if hand:
            report["hand_labels"][name] = agreement(judge, hand)
    if not hand:
        report.pop("hand_labels")
    return report, markdown(report)
