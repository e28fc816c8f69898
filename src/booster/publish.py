"""``booster publish RUN_DIR OUT``: a run directory as it goes into git beside a results table.

Owns what a published copy holds: the run's tables, plots, config and result rows, every
evaluation's answers (``generations.jsonl.gz``) with the judged scores, and each trained
stage's logs and curves; no model weights, checkpoints or tracker files. A published copy is
itself a run directory for ``booster report``: ``booster report OUT --judge NAME`` rescores the
kept answers with another judge, as the copy is in git, without training anything again.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

from booster.data.base import DataError
from booster.evaluate.stage import GENERATIONS, generations_path
from booster.io import atomic_dir, read_json, read_jsonl

STAGE_FILES = ("config.json", "meta.json", "DONE.json", "recipe.json", "answers.json", "metrics.json",
               "probe_log.jsonl", "train_set.csv")
"""Small files kept from every stage, with judged-*.json and the logs (the per-stage plots are not: the logs redraw them)."""
STAGE_GLOBS = ("judged-*.json", "*_log.csv")


def _gzip(src: Path, dst: Path) -> None:
    # mtime=0: the same answers give the same bytes, so a republished directory diffs clean in git
    with open(src, "rb") as f_in, open(dst, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f_out:
        shutil.copyfileobj(f_in, f_out)


def behind(root: Path, names: list[str]) -> set[Path]:
    """The finished stages of ``names`` and every stage upstream of them (an evaluation's
    attack, that attack's alignment), not the other stages the run directory holds."""
    found: set[Path] = set()
    todo = list(names)
    while todo:
        d = root / "stages" / todo.pop()
        if d in found or not (d / "DONE.json").is_file():
            continue
        found.add(d)
        upstream = read_json(d / "config.json").get("upstream") if (d / "config.json").is_file() else None
        if upstream:
            todo.append(upstream)
    return found


def publish(root: Path, out: Path) -> Path:
    """Copy run directory ``root`` to ``out`` (replaced if it exists) as described above."""
    root, out = Path(root), Path(out)
    rows = read_jsonl(root / "results.jsonl")
    if not rows:
        raise DataError(f"{root} has no results.jsonl; run `booster run` into it first")
    stages = sorted(behind(root, [Path(r["eval_dir"]).name for r in rows]))
    missing = [r["eval_dir"] for r in rows if not generations_path(root / r["eval_dir"]).is_file()]
    if missing:
        raise DataError(f"{root}: no answers in {missing[0]}; publish a run directory with its stages")
    with atomic_dir(out) as tmp:
        for f in root.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        for d in stages:
            dst = tmp / "stages" / d.name
            dst.mkdir(parents=True)
            for name in STAGE_FILES:
                if (d / name).is_file():
                    shutil.copy2(d / name, dst / name)
            for pattern in STAGE_GLOBS:
                for f in d.glob(pattern):
                    shutil.copy2(f, dst / f.name)
            if (d / "train_log.jsonl").is_file():
                _gzip(d / "train_log.jsonl", dst / "train_log.jsonl.gz")
            elif (d / "train_log.jsonl.gz").is_file():  # a published stage, merged with new runs and republished
                shutil.copy2(d / "train_log.jsonl.gz", dst / "train_log.jsonl.gz")
            gens = generations_path(d)
            if gens.is_file():
                if gens.suffix == ".gz":
                    shutil.copy2(gens, dst / gens.name)
                else:
                    _gzip(gens, dst / (GENERATIONS + ".gz"))
        write_index(tmp, rows)
    return out


def write_index(out: Path, rows: list[dict]) -> None:
    """``ANSWERS.md`` in a published copy: where each result row's answers are, and how to
    rescore them, for a reader who finds the table first."""
    lines = ["# Answers of these results", "",
             "Every evaluation's answers (prompt, answer, refusal verdict; task items with their "
             "scores) are kept gzipped beside its judged scores, one file per result row:", "",
             "| model | answers | judged scores |", "|---|---|---|"]
    for r in rows:
        what = " ".join(str(r[k]) for k in ("defense", "stage") if k in r) + (f" p={r['p']}" if "p" in r else "")
        what += f" seed {r['seed']}" if "seed" in r else ""
        lines.append(f"| {what} | `{r['eval_dir']}/{GENERATIONS}.gz` | `{r['eval_dir']}/metrics.json` |")
    lines += ["", "Rescore them with another judge, without training anything: "
              "`booster report THIS_DIRECTORY --judge NAME` (it rewrites results.jsonl and the tables here).", ""]
    (Path(out) / "ANSWERS.md").write_text("\n".join(lines), encoding="utf-8")
