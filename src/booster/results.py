"""A result row: one evaluated model, the line of ``results.jsonl`` every table is built from.

Owns the row's columns (``ResultRow``), how an evaluation becomes a row (``result_row``),
the one reader of a run directory's rows (``read_rows``), which brings rows written by older
versions up to date in one place (``upgrade``), and the row filters the pooling scripts
share (``selected``, ``column``, ``parse_labels``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypedDict

from booster.io import read_jsonl

OWN_COLUMNS = ("align.defense", "attack.p", "run.seed")
"""Grid keys that have a column of their own (defense, p, seed) instead of their dotted name."""


class ResultRow(TypedDict, total=False):
    """One evaluated model. Besides these columns a row carries, under their dotted names
    (``attack.optim.lr``, ``data.benign_tasks``), the grid values that decide its stage and
    are not own columns (``OWN_COLUMNS``); a control row carries only those that decide it,
    as it is shared by every grid point that differs in the rest."""

    stage: str
    """``unaligned`` (the base model), ``aligned`` (before the attack) or ``attacked``."""
    task: str
    """The attack's fine-tuning task, whose accuracy is ``accuracy``."""
    defense: str
    """The alignment defence; ``ALIGN+ATTACK`` when the attack runs a defence of its own
    (Lisa); ``none`` for the unaligned model."""
    seed: int
    """run.seed; absent from the unaligned row (the base model has no seed)."""
    p: float
    """Attacked rows: the share of harmful samples in the attack."""
    n: int
    """Attacked rows: the number of fine-tuning samples."""
    adapter: str
    """Attacked rows: the attack's adapter protocol (attack.adapter)."""
    harmful_score: float
    """% of held-out harmful prompts whose answer the judge flags."""
    refusal_rate: float
    """% of those answers with a refusal phrase (second opinion, no judge)."""
    empty_rate: float
    """% of those answers that are empty (harmless by silence)."""
    accuracy: float | None
    """The task's metric x 100 (None without task items)."""
    judge: str
    """Name of the judge behind ``harmful_score``."""
    eval_dir: str
    """The evaluation stage's directory, relative to the run directory: the row's key."""
    harmful_score_by_source: dict[str, float]
    """The harmful score per prompt source, only when the answered prompts come from more than
    one (``eval.prompts``)."""


def result_row(labels: dict[str, Any], metrics: dict[str, Any], empty: float, eval_dir: str,
               by_source: dict[str, float] | None = None) -> ResultRow:
    """The row of an evaluation: its labels, then its judged ``metrics`` (metrics.json)."""
    row: ResultRow = {**labels, "harmful_score": metrics["harmful_score"], "refusal_rate": metrics["refusal_rate"],
                      "empty_rate": empty, "accuracy": metrics.get("accuracy"), "judge": metrics["judge"]["name"],
                      "eval_dir": eval_dir}
    if by_source:
        row["harmful_score_by_source"] = by_source
    return row


def upgrade(rows: list[dict[str, Any]], run_dir: Path) -> bool:
    """Bring rows written by older versions up to date, in place; whether any changed.

    - ``empty_rate`` did not exist: computed from the stage's saved answers (left absent when
      the results were copied without their stages);
    - an attacked row at p = 0 carried ``attack.mix``, although its stage is shared by every mix.
    """
    from booster.evaluate.stage import empty_rate, generations_path  # only old rows need it, and it brings the model code

    changed = False
    for row in rows:
        gens = generations_path(Path(run_dir) / row.get("eval_dir", ""))
        if "empty_rate" not in row and gens.is_file():
            row["empty_rate"] = empty_rate(gens.parent)
            changed = True
        if row.get("stage") == "attacked" and not row.get("p") and row.pop("attack.mix", None):
            changed = True
    return changed


def read_rows(run_dir: Path) -> list[ResultRow]:
    """The rows of a run directory's results.jsonl, up to date (``upgrade``); [] without one."""
    rows = read_jsonl(Path(run_dir) / "results.jsonl")
    upgrade(rows, run_dir)
    return rows  # type: ignore[return-value]


def column(row: ResultRow) -> str:
    """The column of a row in the pooled tables: the aligned model, or the attack's ratio."""
    return "aligned" if row["stage"] == "aligned" else f"p={row['p']}"


def _base_value(run_dir: Path, key: str) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.select(OmegaConf.load(Path(run_dir) / "config.yaml"), key)


def _matches(row: ResultRow, run_dir: Path, key: str, value: str) -> bool:
    got = row[key] if key in row else _base_value(run_dir, key)  # type: ignore[literal-required]
    return str(got) == value or (isinstance(got, (int, float)) and float(got) == float(value))


def selected(row: ResultRow, run_dir: Path, where: list[list[str]]) -> bool:
    """Whether a row of a defence passes every ``KEY=VALUE`` of ``where``. A key the grid did
    not vary comes from the sweep's config; an aligned row is held only to the keys it has, so
    an attack setting (p, lr) does not drop the model every attack starts from."""
    if row["stage"] == "unaligned":
        return False
    return all(_matches(row, run_dir, k, v) for k, v in where if row["stage"] == "attacked" or k in row)


def parse_labels(specs: list[str]) -> dict[tuple[Path, str], str]:
    """``--label DIR:DEFENCE=NAME`` options as {(DIR, DEFENCE): NAME}: renames a defence of one
    run directory (runs whose base configs differ outside the grid)."""
    labels = {}
    for spec in specs:
        target, name = spec.split("=", 1)
        run_dir, defense = target.rsplit(":", 1)
        labels[(Path(run_dir), defense)] = name
    return labels
