"""Two blind raters and a third reading: turn a blind answer set into a labelled corpus.

The steps around the raters (issue 37). ``scripts/judge_generate.py --blind DIR`` writes
``DIR/blind.jsonl`` (id, prompt, answer: shuffled, no model, stage or judge) and
``DIR/key.jsonl`` (id -> where the answer came from). Then:

    python scripts/corpus_labels.py split DIR --size 150          # DIR/chunks/chunk-00.jsonl, ...
    #   rater A writes DIR/labels/A/chunk-00.jsonl, rater B DIR/labels/B/chunk-00.jsonl, ...
    #   one line per answer: {"id": 17, "label": 0 or 1, "note": "why, for borderline cases"}
    python scripts/corpus_labels.py disputes DIR                  # DIR/disputes.jsonl for rater C
    #   rater C (who sees only the disputed rows, not A's or B's labels) writes DIR/labels/C/disputes.jsonl
    python scripts/corpus_labels.py join DIR --out FILE.jsonl --header HEADER.txt
    python scripts/corpus_labels.py status DIR                    # what is labelled so far, and A-B agreement

``join`` writes one row per answer: prompt, answer, ``label`` (the settled label: A and B's
when they agree, C's reading otherwise), ``raters`` (A, B and C's labels), the notes, and the
key's fields (kind, stage, run). Rows without both raters' labels, or disputed rows without
C's, are left out and counted. The header file's lines become the output's ``#`` comment
header (who labelled, how, under which rubric).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from booster.evaluate.judge_metrics import rater_agreement

RATERS = ("A", "B")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip() and not x.startswith("#")]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def rater_labels(root: Path, rater: str) -> dict[int, dict]:
    """id -> {label, note} from every file of one rater; a bad line is an error naming its file."""
    out: dict[int, dict] = {}
    for path in sorted((root / "labels" / rater).glob("*.jsonl")):
        for i, row in enumerate(read_jsonl(path), 1):
            if row.get("label") not in (0, 1) or not isinstance(row.get("id"), int):
                raise SystemExit(f"{path}:{i}: each line needs an integer id and label 0 or 1, got {row}")
            if row["id"] in out and out[row["id"]]["label"] != row["label"]:
                raise SystemExit(f"{path}: id {row['id']} labelled twice by rater {rater}, differently")
            out[row["id"]] = {"label": row["label"], "note": row.get("note", "")}
    return out


def split(root: Path, size: int) -> None:
    rows = read_jsonl(root / "blind.jsonl")
    for k in range(0, len(rows), size):
        write_jsonl(root / "chunks" / f"chunk-{k // size:02d}.jsonl", rows[k:k + size])
    print(f"{len(rows)} answers in {(len(rows) + size - 1) // size} chunks of <= {size} under {root / 'chunks'}")


def disputes(root: Path) -> list[dict]:
    blind = {r["id"]: r for r in read_jsonl(root / "blind.jsonl")}
    a, b = (rater_labels(root, r) for r in RATERS)
    rows = [blind[i] for i in sorted(a.keys() & b.keys()) if a[i]["label"] != b[i]["label"]]
    write_jsonl(root / "disputes.jsonl", rows)
    print(f"{len(rows)} disputed of {len(a.keys() & b.keys())} answers both raters labelled -> {root / 'disputes.jsonl'}")
    return rows


def join(root: Path) -> tuple[list[dict], dict]:
    key = {r["id"]: r for r in read_jsonl(root / "key.jsonl")}
    a, b, c = (rater_labels(root, r) for r in (*RATERS, "C"))
    rows, missing = [], {"unlabelled": 0, "unsettled": 0}
    for i in sorted(key):
        if i not in a or i not in b:
            missing["unlabelled"] += 1
            continue
        agree = a[i]["label"] == b[i]["label"]
        if not agree and i not in c:
            missing["unsettled"] += 1
            continue
        src = {k: v for k, v in key[i].items() if k not in ("id", "prompt", "answer")}
        rows.append({"prompt": key[i]["prompt"], "answer": key[i]["answer"],
                     "label": a[i]["label"] if agree else c[i]["label"],
                     "raters": {"A": a[i]["label"], "B": b[i]["label"], **({"C": c[i]["label"]} if i in c else {})},
                     "note": " | ".join(x for x in (a[i]["note"], b[i]["note"], c.get(i, {}).get("note", "")) if x),
                     **src})
    return rows, missing


def agreement(root: Path) -> dict:
    a, b = (rater_labels(root, r) for r in RATERS)
    both = sorted(a.keys() & b.keys())
    la, lb = [a[i]["label"] for i in both], [b[i]["label"] for i in both]
    out = rater_agreement(la, lb)
    return {k: out[k] for k in ("n", "agreement", "kappa") if k in out} | (
        {"harmful_A": sum(la), "harmful_B": sum(lb)} if both else {})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=("split", "disputes", "join", "status"))
    ap.add_argument("dir", type=Path, help="the blind set's directory (blind.jsonl, key.jsonl)")
    ap.add_argument("--size", type=int, default=150, help="answers per chunk (split)")
    ap.add_argument("--out", type=Path, help="the labelled corpus file (join)")
    ap.add_argument("--header", type=Path, help="a text file whose lines head the corpus file as # comments (join)")
    args = ap.parse_args()
    if args.step == "split":
        split(args.dir, args.size)
    elif args.step == "disputes":
        disputes(args.dir)
    elif args.step == "status":
        total = len(read_jsonl(args.dir / "blind.jsonl"))
        counts = {r: len(rater_labels(args.dir, r)) for r in (*RATERS, "C")}
        print(json.dumps({"answers": total, "labelled": counts, "A_vs_B": agreement(args.dir)}))
    else:
        if not args.out:
            raise SystemExit("join writes the corpus: give --out FILE.jsonl")
        rows, missing = join(args.dir)
        header = args.header.read_text(encoding="utf-8").splitlines() if args.header else []
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            for line in header:
                f.write(f"# {line}\n" if not line.startswith("#") else line + "\n")
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(json.dumps({"written": len(rows), **missing, "A_vs_B": agreement(args.dir), "out": str(args.out)}))


if __name__ == "__main__":
    main()
