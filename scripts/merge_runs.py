"""Merge run directories of one config into one, as if a single sweep had run their grids.

    python scripts/merge_runs.py OUT runs/pr-sft runs/pr-b-p0.1 runs/pr-b-p0.2
    booster publish OUT docs/results/NAME     # tables, paired comparison and plots over all of them

Side-by-side chains on a small machine run as separate sweeps, each in its own out_dir (two
sweeps must not share one: each rewrites results.jsonl). This puts their stages (hard links,
no copy; weights and checkpoints left out), result rows and chains in OUT and writes a config
whose grid is the union of theirs, so `booster report` and `booster publish` see one run.
The configs must agree outside grid and run (else the merged directory would describe runs it
does not hold): the first key that differs is a one-line error. An unset ``eval.batch_size``
(each run resolves it from its dtype) counts as the batch its evaluation stages record. A stage in several inputs is
taken once; two inputs giving one evaluation different scores is an error.

A published directory (``booster publish``: stages without weights, answers gzipped) is an input
like any run, so new seeds join results whose runs are gone (runs/ does not survive a change of
machine):

    python scripts/merge_runs.py OUT docs/results/NAME runs/new-seed && booster publish OUT docs/results/NAME
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from booster.config import flatten
from booster.evaluate.generate import EVAL_BATCH
from booster.io import read_json, read_jsonl, rewrite_jsonl

SKIP = shutil.ignore_patterns("*.safetensors", "checkpoint*", "merged_model")


def merged_config(configs: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    first = configs[0]
    def settings(cfg: dict[str, Any]) -> dict[str, Any]:
        return flatten({k: v for k, v in cfg.items() if k not in ("grid", "run")})
    for cfg, name in zip(configs[1:], names[1:]):
        a, b = settings(first), settings(cfg)
        key = next((k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)), None)
        if key:
            raise SystemExit(f"{name}: config differs from {names[0]} at {key}; merge only runs of one config")
    grid: dict[str, list] = {}
    for cfg in configs:
        for key, values in (cfg.get("grid") or {}).items():
            grid.setdefault(key, [])
            grid[key] += [v for v in values if v not in grid[key]]
    return {**first, "grid": grid}


def link_tree(src: Path, dst: Path) -> None:
    """Stage files as hard links where the file system allows, copies where it does not."""
    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
    shutil.copytree(src, dst, ignore=SKIP, copy_function=link)


def resolve_eval_batch(cfg: dict[str, Any], run: Path) -> dict[str, Any]:
    """``cfg`` with an unset eval.batch_size replaced by the one the run's evaluations used (their
    stage configs carry it when it is not EVAL_BATCH); left unset if they used several."""
    if (cfg.get("eval") or {}).get("batch_size") is not None:
        return cfg
    evals = {r["eval_dir"] for r in read_jsonl(run / "results.jsonl")}
    used = {(read_json(run / d / "config.json").get("eval") or {}).get("batch_size", EVAL_BATCH)
            for d in evals if (run / d / "config.json").is_file()}
    return {**cfg, "eval": {**(cfg.get("eval") or {}), "batch_size": used.pop()}} if len(used) == 1 else cfg


def rebuilt_chains(rows: list[dict[str, Any]], chains: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chains for attacked rows that no chain names (an earlier merge kept one seed's chains per
    grid point): the point of another seed's chain at the same defence, p and row values, with
    this row's seed, the one unaligned evaluation and the aligned one of the same defence and seed."""
    named = {c.get("attacked") for c in chains}
    unaligned = [r["eval_dir"] for r in rows if r.get("stage") == "unaligned"]
    aligned: dict[tuple, list[str]] = {}
    for r in rows:
        if r.get("stage") == "aligned":
            aligned.setdefault((r.get("defense"), r.get("seed")), []).append(r["eval_dir"])
    out = []
    for r in rows:
        if r.get("stage") != "attacked" or r["eval_dir"] in named:
            continue
        same = [c for c in chains if c["point"].get("align.defense") == r.get("defense")
                and c["point"].get("attack.p") == r.get("p")
                and all(r.get(k) == v for k, v in c["point"].items() if k not in ("align.defense", "attack.p", "run.seed"))]
        mine = aligned.get((r.get("defense"), r.get("seed")), [])
        if not same or len(unaligned) != 1 or len(mine) != 1:
            continue  # not rebuilt where it would be a guess
        out.append({"point": {**same[0]["point"], "run.seed": r.get("seed")}, "unaligned": unaligned[0],
                    "aligned": mine[0], "attacked": r["eval_dir"]})
    return out


def merge(out: Path, runs: list[Path]) -> dict[str, int]:
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not empty; name a new directory")
    for run in runs:
        if not (run / "results.jsonl").is_file() or not (run / "config.yaml").is_file():
            raise SystemExit(f"{run} has no results.jsonl or config.yaml: not a finished run directory")
    configs = [resolve_eval_batch(yaml.safe_load((r / "config.yaml").read_text()), r) for r in runs]
    config = merged_config(configs, [str(r) for r in runs])
    rows: dict[str, dict] = {}
    chains: dict[str, dict] = {}
    for run, cfg in zip(runs, configs):
        for row in read_jsonl(run / "results.jsonl"):
            seen = rows.get(row["eval_dir"])
            if seen is not None and seen.get("harmful_score") != row.get("harmful_score"):
                raise SystemExit(f"{row['eval_dir']}: scored {seen.get('harmful_score')} in one run and "
                                 f"{row.get('harmful_score')} in {run}; rescore both with one judge first")
            rows.setdefault(row["eval_dir"], row)
        seed = (cfg.get("run") or {}).get("seed", 0)
        for chain in read_jsonl(run / "chains.jsonl") if (run / "chains.jsonl").is_file() else []:
            # a run's seed is in its config, not its grid points: without it the seeds' chains collapse
            chain = {**chain, "point": {**chain["point"], "run.seed": chain["point"].get("run.seed", seed)}}
            chains.setdefault(repr(sorted(chain["point"].items())), chain)
    for chain in rebuilt_chains(list(rows.values()), list(chains.values())):
        chains.setdefault(repr(sorted(chain["point"].items())), chain)
    (out / "stages").mkdir(parents=True, exist_ok=True)
    for run in runs:
        for stage in sorted((run / "stages").iterdir()):
            if not (out / "stages" / stage.name).exists():
                link_tree(stage, out / "stages" / stage.name)
    config.setdefault("run", {})["out_dir"] = str(out)
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    rewrite_jsonl(out / "results.jsonl", list(rows.values()))
    rewrite_jsonl(out / "chains.jsonl", list(chains.values()))
    return {"rows": len(rows), "chains": len(chains), "stages": len(list((out / "stages").iterdir()))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="the merged run directory to write (new)")
    ap.add_argument("runs", nargs="+", type=Path, help="run directories of one config")
    args = ap.parse_args()
    print(merge(args.out, args.runs))


if __name__ == "__main__":
    main()
