"""booster publish: a run directory as it goes into git (answers gzipped, no weights), which
booster report rescores with another judge on its own, without the original run."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from booster.cli import main
from booster.evaluate.judges import RefusalJudge
from booster.evaluate.stage import read_generations, verdict_flags
from booster.io import read_json, read_jsonl
from booster.pipeline import Pipeline
from booster.results import read_rows


def test_a_published_run_rescores_without_the_run(tiny_cfg, tmp_path, capsys):
    pipe = Pipeline(tiny_cfg("run.estimate=false", "grid={}", "align.defense=sft"))
    rows = pipe.run()
    out = tmp_path / "published"
    (pipe.root / "results.md").write_text("a stale table\n")  # a sweep still running keeps its last report
    assert main(["publish", str(pipe.root), str(out)]) == 0
    table = (out / "results.md").read_text()
    assert "stale" not in table and all(f"{r['harmful_score']:.1f}" in table for r in rows), "tables from the rows"
    assert not list(out.rglob("*.safetensors")) and not list(out.rglob("checkpoint"))
    index = (out / "ANSWERS.md").read_text()
    assert all(f"`{row['eval_dir']}/generations.jsonl.gz`" in index for row in rows)
    for row in rows:
        d = out / row["eval_dir"]
        assert not (d / "generations.jsonl").exists()
        with gzip.open(d / "generations.jsonl.gz", "rt") as f:
            assert [json.loads(x) for x in f] == read_jsonl(pipe.root / row["eval_dir"] / "generations.jsonl")
    again = out.with_name("again")
    main(["publish", str(pipe.root), str(again)])  # the same answers give the same bytes
    some = rows[0]["eval_dir"] + "/generations.jsonl.gz"
    assert (out / some).read_bytes() == (again / some).read_bytes()

    twice = out.with_name("twice")  # a published directory republishes whole (merged with new seeds)
    main(["publish", str(out), str(twice)])
    assert sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file()) == \
        sorted(str(f.relative_to(twice)) for f in twice.rglob("*") if f.is_file())
    assert list(out.rglob("train_log.jsonl.gz"))

    shutil.rmtree(pipe.root)  # the copy stands on its own
    for cached in out.rglob("judged-*.json"):  # so the judge reads the gzipped answers again
        cached.unlink()
    capsys.readouterr()
    assert main(["report", str(out), "--judge", "refusal"]) == 0
    rescored = {r["eval_dir"]: r for r in read_jsonl(out / "results.jsonl")}
    for row in rows:  # the tiny run was judged by the refusal matcher too: the same scores
        assert rescored[row["eval_dir"]]["harmful_score"] == row["harmful_score"]
    assert "harmful" in (out / "answers.md").read_text()


def test_publishing_a_directory_without_results_is_a_one_line_error(tmp_path, capsys):
    assert main(["publish", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "has no results.jsonl" in capsys.readouterr().err


PUBLISHED = Path(__file__).resolve().parents[1] / "docs" / "results"


def published_with_answers() -> list[Path]:
    return sorted(f.parent for f in PUBLISHED.rglob("results.jsonl")
                  if list(f.parent.glob("stages/eval-*/generations.jsonl.gz")))


def test_committed_scores_are_their_answers_verdicts():
    """Each committed row's harmful score is the share of its saved answers that its recorded
    judge flags (saved probabilities over the recorded threshold): a row edited by hand, or
    answers that are not the ones judged, fail here."""
    dirs = published_with_answers()
    assert len(dirs) >= 3, "the published directories with answers (docs/results.md) are in the clone"
    for d in dirs:
        for row in read_rows(d):
            gens = [g for g in read_generations(d / row["eval_dir"]) if g["kind"] == "harmful"]
            metrics = read_json(d / row["eval_dir"] / "metrics.json")
            assert len(metrics["harm_probs"]) == len(gens) == metrics["n_harmful"], (d, row["eval_dir"])
            flagged = sum(verdict_flags(metrics))
            assert row["harmful_score"] == pytest.approx(100.0 * flagged / len(gens)), (d, row["eval_dir"])


def test_a_committed_directory_rescores_in_a_fresh_clone(tmp_path, capsys):
    """booster report --judge on a directory as it is in git: the answers are read from the
    gzipped files and every row is scored again, with nothing from the run that made it."""
    src = min(published_with_answers(), key=lambda d: sum(f.stat().st_size for f in d.rglob("*")))
    before = {f: f.read_bytes() for f in src.rglob("*") if f.is_file()}
    copy = tmp_path / src.name
    shutil.copytree(src, copy)
    for cached in copy.rglob("judged-*.json"):
        cached.unlink()
    assert main(["report", str(copy), "--judge", "refusal"]) == 0
    judge = RefusalJudge()
    rows = read_rows(copy)
    assert rows and all(r["judge"] == "refusal" for r in rows)
    for row in rows:
        harmful = [g for g in read_generations(copy / row["eval_dir"]) if g["kind"] == "harmful"]
        probs = judge.probs([g["prompt"] for g in harmful], [g["answer"] for g in harmful])
        assert row["harmful_score"] == pytest.approx(100.0 * sum(p > judge.threshold for p in probs) / len(harmful))
        assert row["harmful_score"] == pytest.approx(100.0 - row["refusal_rate"] - row["empty_rate"])
    assert {f: f.read_bytes() for f in src.rglob("*") if f.is_file()} == before, "the committed copy is untouched"
