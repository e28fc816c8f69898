"""``booster export STAGE_DIR OUT``: a trained stage as a plain Hugging Face model directory.

Owns turning a stage's recipe (base weights, adapters merged in order, the live adapter) into
one merged model: ``model.safetensors``, ``config.json``, the tokenizer with its chat template,
and a model card (``README.md``) naming the base, the defence and its settings, the attack if
there was one, and the scores the run measured for this model. It loads with
``AutoModelForCausalLM.from_pretrained(OUT)`` and is the layout vLLM serves. (A stage's own
``model/`` directory is already a PEFT adapter for ``PeftModel.from_pretrained``.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from booster.config import build_config
from booster.io import atomic_dir, read_json
from booster.models import ModelRecipe, build_model, load_tokenizer


class ExportError(ValueError):
    """A directory that cannot be exported; the message says what to pass instead."""


def _scores(root: Path, stage: str) -> list[dict[str, Any]]:
    """The evaluations of ``stage`` in its run directory (one per task / evaluation setting)."""
    out = []
    for d in sorted((root / "stages").glob("eval-*")):
        if (d / "metrics.json").is_file() and read_json(d / "config.json").get("upstream") == stage:
            m = read_json(d / "metrics.json")
            out.append({"task": m.get("task"), "harmful_score": m.get("harmful_score"),
                        "refusal_rate": m.get("refusal_rate"), "accuracy": m.get("accuracy"),
                        "n_harmful": m.get("n_harmful"), "judge": m.get("judge", {}).get("name"),
                        "judge_version": m.get("judge", {}).get("version"), "evaluation": d.name})
    return out


def _lineage(root: Path, stage: str) -> list[dict[str, Any]]:
    """This stage and the stages it starts from, oldest first."""
    chain = []
    while stage and (root / "stages" / stage / "config.json").is_file():
        cfg = read_json(root / "stages" / stage / "config.json")
        chain.insert(0, {"stage": stage, **cfg})
        stage = cfg.get("upstream")
    return chain


def model_card(root: Path, stage_dir: Path) -> str:
    chain = _lineage(root, stage_dir.name)
    lines = [f"# {stage_dir.name}, exported by `booster export`", "",
             f"Base: `{chain[0]['model'].get('name', 'smollm2')}` (settings that differ from the defaults: "
             f"`{json.dumps(chain[0]['model'])}`).", ""]
    for link in chain:
        if "align" in link:
            lines.append(f"- Alignment `{link['stage']}`: defence **{link['align'].get('defense')}**, settings "
                         f"`{json.dumps(link['align'])}`, seed {link.get('seed')}.")
        if "attack" in link:
            lines.append(f"- Fine-tuning (the simulated attack) `{link['stage']}`: harmful ratio p = "
                         f"{link['attack'].get('p')}, settings `{json.dumps(link['attack'])}`, seed {link.get('seed')}.")
    lines += ["", "Scores the run measured for this model (harmful score: % of held-out harmful prompts whose "
              "answer the judge flags; accuracy: the task's metric):", ""]
    scores = _scores(root, stage_dir.name)
    lines += [f"- {s['task']}: harmful score {s['harmful_score']} ({s['judge']} {s['judge_version']}, "
              f"{s['n_harmful']} prompts), refusal rate {s['refusal_rate']}, accuracy {s['accuracy']} "
              f"(`{s['evaluation']}`)" for s in scores] or ["- none: the run did not evaluate this stage."]
    lines += ["", "Weights: the stage's adapters merged into the base (`merge_and_unload`), in the base's dtype.", ""]
    return "\n".join(lines)


def export(stage_dir: str | Path, out: str | Path) -> Path:
    """Write the merged model of a finished align-* or attack-* stage to ``out``."""
    stage_dir = Path(stage_dir).resolve()
    root = stage_dir.parent.parent
    if not (stage_dir / "DONE.json").is_file():
        raise ExportError(f"{stage_dir} is no finished stage (no DONE.json); pass runs/NAME/stages/align-... or "
                          "attack-...")
    if not (stage_dir / "recipe.json").is_file():
        raise ExportError(f"{stage_dir} trained no model (no recipe.json); export an align-* or attack-* stage")
    model_cfg = build_config([("stage config", {"model": read_json(stage_dir / "config.json")["model"]})]).model
    tokenizer = load_tokenizer(model_cfg)
    model = build_model(model_cfg, tokenizer, ModelRecipe.load(stage_dir / "recipe.json"), root, train=None)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    out = Path(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "README.md").write_text(model_card(root, stage_dir), encoding="utf-8")
    return out
