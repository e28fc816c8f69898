"""booster publish: a run directory as it goes into git (answers gzipped, no weights), which
booster report rescores with another judge on its own, without the original run."""

from __future__ import annotations

import gzip
import json
import shutil

from booster.cli import main
from booster.io import read_jsonl
from booster.pipeline import Pipeline


def test_a_published_run_rescores_without_the_run(tiny_cfg, tmp_path, capsys):
    pipe = Pipeline(tiny_cfg("run.estimate=false", "grid={}", "align.defense=sft"))
    rows = pipe.run()
    out = tmp_path / "published"
    assert main(["publish", str(pipe.root), str(out)]) == 0
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
