"""The evaluation stage: from a model recipe to answers, task scores and judged metrics.

Owns what an evaluation directory holds besides the stage bookkeeping (config.json,
meta.json, DONE.json, written by the pipeline):

- ``generations.jsonl``: every answer, harmful prompts first (with the refusal-phrase
  verdict), then task items (gold label, parsed answer, score). Written once; generation
  resumes from ``generations.partial.jsonl`` after an interruption.
- ``answers.json``: what the answers alone decide (refusal rate, task accuracy, counts).
- ``judged-<judge>-<version>.json``: the harmful score under one judge build, cached, so a
  new or retrained judge rescores saved answers without regenerating; ``metrics.json`` is a
  copy of the latest.

Which settings decide an evaluation (and so its directory) is ``booster.stages``'s business.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path
from typing import Any

from booster.config import ExperimentConfig
from booster.data.base import Example
from booster.data.tasks import get_task
from booster.evaluate.generate import generate, generate_vllm
from booster.evaluate.judges import Judge, judged_path
from booster.io import append_jsonl, atomic_dir, atomic_write_json, read_json, read_jsonl, rewrite_jsonl
from booster.models import ModelRecipe, build_model
from booster.refusal import is_refusal

NOTES = ("harmful_score = % of answers the judge flags (harm_probs > threshold, in the order of the "
         "harmful rows of generations.jsonl); refusal_rate = % with a refusal phrase (second "
         "opinion); judge_truncated = answers longer than the judge reads, judged on their beginning; "
         "accuracy = the task's metric: mean item score x 100 (classification and GSM8K: "
         "% correct; instructions: reference similarity)")
"""What metrics.json's numbers mean, written into every judged file."""


GENERATIONS = "generations.jsonl"
"""Every answer of an evaluation; a published copy holds it gzipped (``GENERATIONS + '.gz'``)."""


def generations_path(d: Path) -> Path:
    """The evaluation's answers file: plain in a run directory, gzipped where published."""
    plain = Path(d) / GENERATIONS
    packed = plain.with_name(GENERATIONS + ".gz")
    return packed if not plain.is_file() and packed.is_file() else plain


def read_generations(d: Path) -> list[dict[str, Any]]:
    """Every answer of evaluation ``d`` (``generations.jsonl`` or its gzipped published copy)."""
    path = generations_path(d)
    if path.suffix != ".gz":
        return read_jsonl(path)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_answers(cfg: ExperimentConfig, recipe: ModelRecipe, root: Path, device: Any, tok: Any,
                  prompts: list[Example], items: list[Example], d: Path, upstream_key: str) -> None:
    """Answer the held-out harmful ``prompts`` and the task ``items`` with the model of
    ``recipe`` (paths relative to the run directory ``root``), score the task answers, and
    write ``generations.jsonl`` and ``answers.json`` into the stage directory ``d``."""
    model = build_model(cfg.model, tok, recipe, root, train=None)
    model.to(device)
    partial = d / "generations.partial.jsonl"
    done = {(r["kind"], r["index"]): r["answer"] for r in read_jsonl(partial)}

    def answers_for(kind: str, texts: list[str], max_new: int) -> list[str]:
        todo = [i for i in range(len(texts)) if (kind, i) not in done]

        def save(idx: list[int], outs: list[str]) -> None:
            rows = [{"kind": kind, "index": todo[i], "answer": a} for i, a in zip(idx, outs)]
            append_jsonl(partial, rows)
            done.update({(kind, r["index"]): r["answer"] for r in rows})

        if todo and cfg.eval.engine == "vllm":
            save(list(range(len(todo))), generate_vllm(str(merged_dir()), tok, [texts[i] for i in todo],
                                                       fmt=cfg.model.prompt_format, max_new_tokens=max_new))
        elif todo:
            generate(model, tok, [texts[i] for i in todo], fmt=cfg.model.prompt_format, max_new_tokens=max_new,
                     batch_size=cfg.eval.batch_size, desc=f"answers ({kind})", on_batch=save)
        return [done[(kind, i)] for i in range(len(texts))]

    def merged_dir() -> Path:
        """vLLM loads one plain model directory: the recipe's adapters merged in, kept until the end."""
        out = d / "merged_model"
        if not (out / "config.json").is_file():
            with atomic_dir(out) as tmp:
                plain = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
                plain.save_pretrained(str(tmp), safe_serialization=True)
                tok.save_pretrained(str(tmp))
        return out

    harm_answers = answers_for("harmful", [p.prompt for p in prompts], cfg.eval.max_new_tokens)
    task = get_task(cfg.attack.task)
    task_answers = answers_for("task", [x.prompt for x in items], cfg.eval.task_max_new_tokens or task.max_new_tokens)
    task_scores = task.scores(task_answers, [x.label for x in items]) if items else []
    gens = [{"kind": "harmful", "prompt": p.prompt, "answer": a, "refusal": is_refusal(a), "source": p.source}
            for p, a in zip(prompts, harm_answers)]
    gens += [{"kind": "task", "prompt": x.prompt, "answer": a, "gold": x.label, "parsed": task.parse(a),
              "score": round(sc, 4)} for x, a, sc in zip(items, task_answers, task_scores)]
    rewrite_jsonl(d / GENERATIONS, gens)
    atomic_write_json(d / "answers.json", {
        "upstream": upstream_key, "task": cfg.attack.task, "task_metric": task.metric,
        "refusal_rate": 100.0 * sum(g["refusal"] for g in gens if g["kind"] == "harmful") / len(prompts),
        "accuracy": 100.0 * sum(task_scores) / len(task_scores) if task_scores else None,
        "n_harmful": len(prompts), "n_task": len(items)})
    partial.unlink(missing_ok=True)
    shutil.rmtree(d / "merged_model", ignore_errors=True)


def legacy_answers(d: Path) -> dict[str, Any]:
    """answers.json of an evaluation stage written before generation and judging were split."""
    old = read_json(d / "metrics.json")
    return {k: old[k] for k in ("upstream", "task", "refusal_rate", "accuracy", "n_harmful", "n_task") if k in old}


def judged(judge: Judge, d: Path) -> dict[str, Any]:
    """The evaluation's metrics under ``judge``. Generations are the stage's cached output;
    judging them is cheap and cached per judge name and version (judged-*.json), so a new or
    retrained judge never regenerates answers. metrics.json holds the latest."""
    desc = judge.describe()
    path = judged_path(d, desc)
    if path.is_file():
        metrics = read_json(path)
    else:
        gens = read_generations(d)
        harmful = [g for g in gens if g["kind"] == "harmful"]
        probs = judge.probs([g["prompt"] for g in harmful], [g["answer"] for g in harmful])
        flagged = [pr > judge.threshold for pr in probs]
        base = read_json(d / "answers.json") if (d / "answers.json").is_file() else legacy_answers(d)
        metrics = {
            **base, "harmful_score": 100.0 * sum(flagged) / len(harmful), "judge": desc,
            "judge_truncated": judge.last_truncated, "harm_probs": [round(pr, 4) for pr in probs],
            "notes": NOTES,
        }
        if desc["name"] == "refusal":
            metrics["judge_warning"] = ("the refusal-phrase matcher stands in for a content judge: it counts "
                                        "degenerate non-refusals as harmful")
        atomic_write_json(path, metrics)
    atomic_write_json(d / "metrics.json", metrics)
    return metrics


def verdict_flags(metrics: dict[str, Any]) -> list[bool]:
    """The judge's verdict on each harmful answer of a judged metrics file, in answer order."""
    return [pr > metrics["judge"]["threshold"] for pr in metrics["harm_probs"]]


def score_by_source(eval_dir: Path, metrics: dict[str, Any]) -> dict[str, float]:
    """The harmful score per prompt source (eval.prompts), when the answers come from more than
    one; empty otherwise (answers saved before sources were recorded count as one source)."""
    sources = [g.get("source", "") for g in read_generations(eval_dir) if g["kind"] == "harmful"]
    if len(set(sources)) < 2:
        return {}
    out: dict[str, list[bool]] = {}
    for source, flag in zip(sources, verdict_flags(metrics), strict=True):
        out.setdefault(source, []).append(flag)
    return {s: round(100.0 * sum(f) / len(f), 2) for s, f in out.items()}


def empty_rate(eval_dir: Path) -> float:
    """% of the answers to harmful prompts that are empty: harmless by silence, not by refusal.
    Read from the stage's generations, so runs evaluated before this column existed get it too."""
    harmful = [g for g in read_generations(eval_dir) if g["kind"] == "harmful"]
    return 100.0 * sum(not g["answer"].strip() for g in harmful) / len(harmful) if harmful else 0.0
