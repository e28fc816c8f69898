"""Judges on the fresh validation set: agreement, precision and recall with 95% intervals, by
model kind, next to the raters' own agreement (issue 37's targets).

    python scripts/judge_validate.py                                   # packaged validation set
    python scripts/judge_validate.py --judge classifier=DIR_V2 --judge old=~/.cache/booster/judges/classifier-d768146806 \
        --judge refusal --threads 2 --out valid.json

``--judge NAME`` is a registered judge with its default build; ``LABEL=DIR`` a built classifier
directory shown as LABEL. The label file's rows carry the settled ``label`` and each rater's
(``raters``: A, B and, where they disagreed, C). Intervals are Wilson 95% intervals
(``judge_metrics.wilson_interval``); answers/s is measured on the whole file at ``--threads``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from booster.evaluate import judge_data
from booster.evaluate.judge_metrics import rater_agreement
from booster.evaluate.judge_report import agreement
from booster.evaluate.judges import make_judge

GROUPS = ("unaligned", "aligned", "attacked p=0", "attacked p>0")


def raters(rows: list[dict]) -> dict:
    both = [r for r in rows if "A" in r.get("raters", {}) and "B" in r.get("raters", {})]
    out = rater_agreement([r["raters"]["A"] for r in both], [r["raters"]["B"] for r in both])
    return out | ({"settled_by_third": sum("C" in r["raters"] for r in both)} if both else {})


def score(name: str, path: str | None, rows: list[dict]) -> dict:
    judge = make_judge("classifier" if path else name, path)
    started = time.time()
    res = agreement(judge, rows)  # overall and per model kind (judge_report.stage_kind)
    seconds = time.time() - started
    metrics = res["metrics"]
    return {"judge": res["judge"], "version": judge.version, "threshold": judge.threshold,
            "answers_per_second": round(len(rows) / seconds, 1) if seconds > 0 else None,
            "all": metrics["all"], "groups": {g: metrics[g] for g in GROUPS if g in metrics}, "probs": res["probs"]}


def fmt(m: dict, key: str) -> str:
    ci = m["ci95"][key]
    return f"{m[key]:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "–"


def markdown(report: dict) -> str:
    r = report["raters"]
    lines = [f"Validation set: {report['labels']} ({report['n']} answers, {report['positives']} labelled harmful).",
             f"Raters A vs B: agreement {r['agreement']:.3f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}], kappa "
             f"{r['kappa']:.2f}; {r['settled_by_third']} disagreements settled by a third reading.", "",
             "| judge | version | threshold | agreement | precision | recall | F1 | tp | fp | fn | tn | answers/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, res in report["judges"].items():
        m, c = res["all"], res["all"]["confusion"]
        lines.append(f"| {name} | {res['version']} | {res['threshold']} | {fmt(m, 'accuracy')} | {fmt(m, 'precision')} | "
                     f"{fmt(m, 'recall')} | {m['f1']:.3f} | {c['tp']} | {c['fp']} | {c['fn']} | {c['tn']} | "
                     f"{res['answers_per_second']} |")
    lines += ["", "By model kind (agreement; fp / fn):", "",
              "| kind | n (harmful) | " + " | ".join(report["judges"]) + " |", "|---|---|" + "---|" * len(report["judges"])]
    for group in GROUPS:
        cells, n = [], None
        for res in report["judges"].values():
            m = res["groups"].get(group)
            if m:
                n = f"{m['n']} ({m['positives']})"
                cells.append(f"{m['accuracy']:.3f} ({m['confusion']['fp']} / {m['confusion']['fn']})")
        if n:
            lines.append(f"| {group} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", default=None, help="label file (default: the packaged validation set)")
    ap.add_argument("--judge", action="append", default=None,
                    help="a judge name (its default build) or LABEL=CLASSIFIER_DIR; repeatable")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="write every number and probability as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = Path(args.labels) if args.labels else judge_data._packaged(judge_data.VALID_LABELS)
    rows = judge_data.read_label_file(path)
    report = {"labels": str(path), "n": len(rows), "positives": sum(r["label"] for r in rows),
              "raters": raters(rows), "judges": {}}
    for spec in args.judge or ["classifier", "refusal"]:
        name, _, judge_path = spec.partition("=")
        report["judges"][name] = score(name, str(Path(judge_path).expanduser()) if judge_path else None, rows)
    text = markdown(report)
    print(text)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
