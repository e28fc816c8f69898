"""What the tiny pipeline produces, reduced to what a refactor must leave unchanged.

``fingerprint(out_dir, rows)`` keeps, per result row, its stage names and judged metrics, and
per trained stage its logged losses and gradient norms (compared within 1e-3: CPUs differ in
the last bits, e.g. 10.8076 vs 10.8077 held to AVX2) and per evaluation stage a hash of its
answers (equal across AVX-512, AVX2 and the default kernels on the machine that wrote it). tests/test_pipeline.py
compares a fresh tiny run with ``tiny_run.json`` beside this file; a change that means to alter
the outputs rewrites it with ``BOOSTER_WRITE_GOLDEN=1 pytest tests/test_pipeline.py -k fingerprint``
and says why in its commit.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

METRICS = ("harmful_score", "accuracy", "refusal_rate", "empty_rate")


def _losses(path: Path) -> list:
    if not path.is_file():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [{k: round(v, 4) for k, v in sorted(r.items()) if isinstance(v, float) and k not in ("seconds", "lr")}
            for r in rows]


def fingerprint(out: Path, rows: list[dict]) -> dict:
    stages = {}
    for d in sorted((Path(out) / "stages").iterdir()):
        if d.name.startswith(("align-", "attack-")):
            stages[d.name] = {"train": _losses(d / "train_log.jsonl"), "probe": _losses(d / "probe_log.jsonl")}
        elif d.name.startswith("eval-"):
            # the answers themselves, not the file: a column added to it is not a changed answer
            gen = [json.loads(x) for x in (d / "generations.jsonl").read_text().splitlines() if x.strip()]
            text = json.dumps([[r["kind"], r["prompt"], r["answer"]] for r in gen])
            stages[d.name] = {"answers_sha256": hashlib.sha256(text.encode()).hexdigest()[:16]}
    table = sorted(({"defense": r["defense"], "stage": r["stage"], "p": r.get("p"),
                     "eval": Path(r["eval_dir"]).name if r.get("eval_dir") else None,
                     **{m: round(r[m], 6) for m in METRICS if r.get(m) is not None}} for r in rows),
                   key=lambda r: (r["defense"], r["stage"], r["p"] if r["p"] is not None else -1))
    return {"rows": table, "stages": stages}


def mismatches(got: dict, want: dict, tol: float = 1e-3) -> list[str]:
    """Where ``got`` differs from ``want``: exact for names, metrics and answers, ``tol`` for losses."""
    out = []
    if got["rows"] != want["rows"]:
        out.append(f"result rows: {got['rows']} != {want['rows']}")
    if sorted(got["stages"]) != sorted(want["stages"]):
        out.append(f"stage names: {sorted(got['stages'])} != {sorted(want['stages'])}")
        return out
    for name, stage in want["stages"].items():
        for part, value in stage.items():
            mine = got["stages"][name][part]
            if isinstance(value, str) or len(mine) != len(value):
                if mine != value:
                    out.append(f"{name} {part}: {mine} != {value}")
                continue
            for i, (a, b) in enumerate(zip(mine, value)):
                if a.keys() != b.keys() or any(abs(a[k] - b[k]) > tol * max(1.0, abs(b[k])) for k in b):
                    out.append(f"{name} {part}[{i}]: {a} != {b}")
    return out
