"""How far two hand raters of the same answers agree, and where the judge stands between them.

    python scripts/rater_agreement.py                       # the two raters of the 100 validation labels
    python scripts/rater_agreement.py --judge classifier    # ... and the default judge against each
    python scripts/rater_agreement.py A.jsonl B.jsonl --judge classifier --judge-path DIR --out agreement.json

The two files must hold the same (prompt, answer) rows in the same order (the second rater's
file is written that way). Rater agreement bounds what agreement with one rater can mean: a
judge cannot be expected to agree with one rater more often than two careful raters agree
with each other. Prints Markdown; --out writes every number and the disputed rows as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from booster.evaluate import judge_data
from booster.evaluate.judge_metrics import binary_metrics, cohen_kappa

PACKAGED = (judge_data.HAND_LABELS, "smollm2_hand_labels_rater2.jsonl")


def compare(first: list[dict], second: list[dict], probs: list[float] | None = None,
            threshold: float = 0.5) -> dict:
    """Rater-vs-rater numbers; with the judge's probabilities, the judge against each rater,
    on the rows both raters agree on, and its call on each disputed row."""
    for i, (r, s) in enumerate(zip(first, second)):
        if (r["prompt"], r["answer"]) != (s["prompt"], s["answer"]):
            raise SystemExit(f"row {i + 1} differs between the two files: they must label the same answers in the same order")
    if len(first) != len(second):
        raise SystemExit(f"the files hold {len(first)} and {len(second)} rows: they must label the same answers")
    a, b = [r["label"] for r in first], [r["label"] for r in second]
    n = len(a)
    out = {"n": n, "harmful": [sum(a), sum(b)], "agreement": round(sum(x == y for x, y in zip(a, b)) / n, 4),
           "kappa": round(cohen_kappa(a, b), 4),
           "first_only": sum(x == 1 and y == 0 for x, y in zip(a, b)),
           "second_only": sum(x == 0 and y == 1 for x, y in zip(a, b))}
    agreed = [i for i in range(n) if a[i] == b[i]]
    disputed = [i for i in range(n) if a[i] != b[i]]
    if probs is not None:
        out["judge_vs_first"] = binary_metrics(a, probs, threshold)
        out["judge_vs_second"] = binary_metrics(b, probs, threshold)
        out["judge_on_agreed"] = binary_metrics([a[i] for i in agreed], [probs[i] for i in agreed], threshold)
        out["judge_kappa"] = [round(cohen_kappa([int(p > threshold) for p in probs], labels), 4) for labels in (a, b)]
    out["disputed"] = [{"row": i + 1, "prompt": first[i]["prompt"], "answer": first[i]["answer"], "first": a[i], "second": b[i],
                        "first_note": first[i].get("note", ""), "second_note": second[i].get("note", ""),
                        **({"judge_prob": round(probs[i], 4)} if probs is not None else {})} for i in disputed]
    return out


def markdown(res: dict, threshold: float | None) -> str:
    lines = ["| compared | n | agreement | Cohen's kappa | harmful (first / second) |", "|---|---|---|---|---|",
             f"| first rater vs second rater | {res['n']} | {res['agreement']:.0%} | {res['kappa']:.2f} | "
             f"{res['harmful'][0]} / {res['harmful'][1]} |"]
    if "judge_vs_first" in res:
        for key, name, kappa in (("judge_vs_first", "judge vs first rater", res["judge_kappa"][0]),
                                 ("judge_vs_second", "judge vs second rater", res["judge_kappa"][1]),
                                 ("judge_on_agreed", "judge on the rows both raters agree on", None)):
            m = res[key]
            c = m["confusion"]
            lines.append(f"| {name} (fp {c['fp']}, fn {c['fn']}) | {m['n']} | {m['accuracy']:.0%} | "
                         f"{'' if kappa is None else f'{kappa:.2f}'} | {m['positives']} |")
    lines += ["", f"Disputed rows ({len(res['disputed'])}): first rater / second rater"
              + (f" / judge probability (threshold {threshold})" if threshold is not None else "")]
    for d in res["disputed"]:
        judge = f" / {d['judge_prob']:.2f}" if "judge_prob" in d else ""
        lines.append(f"- row {d['row']}: {d['first']} / {d['second']}{judge}: {d['prompt'][:70]!r}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="*", type=Path, help="two label files (default: the two raters of the validation labels)")
    ap.add_argument("--judge", help="also score the rows with this judge (e.g. classifier)")
    ap.add_argument("--judge-path", help="the judge's weights (default: its default build)")
    ap.add_argument("--data-dir", help="data directory, if the classifier must be built")
    ap.add_argument("--out", type=Path, help="write the numbers and disputed rows as JSON")
    args = ap.parse_args()
    paths = args.files or [judge_data._packaged(name) for name in PACKAGED]
    if len(paths) != 2:
        ap.error("give two label files (or none for the packaged pair)")
    first, second = (judge_data.read_label_file(p) for p in paths)
    probs, threshold, described = None, None, None
    if args.judge:
        from booster.evaluate.judges import make_judge

        judge = make_judge(args.judge, args.judge_path, data_dir=args.data_dir)
        probs, threshold, described = judge.probs([r["prompt"] for r in first], [r["answer"] for r in first]), judge.threshold, judge.describe()
    res = compare(first, second, probs, threshold if threshold is not None else 0.5)
    res["files"] = [str(p) for p in paths]
    if described is not None:
        res["judge"] = described
    print(markdown(res, threshold))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
