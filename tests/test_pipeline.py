"""align -> attack -> evaluate on the tiny model, in a temporary run directory."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from booster.cli import main
from booster.io import read_jsonl
from booster.pipeline import Pipeline


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
    from booster.config import load_config

    out = tmp_path_factory.mktemp("tiny")
    cfg = load_config("tiny", [f"run.out_dir={out}", f"data.dir={data_dir}", "grid.attack.p=[0.0, 0.25]"])
    rows = Pipeline(cfg).run()
    return cfg, out, rows


def test_table_has_controls_and_attacks(tiny_run):
    cfg, out, rows = tiny_run
    kinds = {(r["defense"], r["stage"], r.get("p")) for r in rows}
    assert kinds == {("none", "unaligned", None), ("sft", "aligned", None), ("booster", "aligned", None),
                     ("sft", "attacked", 0.0), ("sft", "attacked", 0.25),
                     ("booster", "attacked", 0.0), ("booster", "attacked", 0.25)}
    for r in rows:
        assert 0 <= r["harmful_score"] <= 100 and 0 <= r["accuracy"] <= 100 and 0 <= r["refusal_rate"] <= 100
        assert 0 <= r["empty_rate"] <= 100
    table = (out / "results.md").read_text()
    assert "| empty % |" in table
    assert "| none | unaligned |" in table and "Judge: refusal" in table
    assert (out / "results.csv").is_file() and (out / "attack_harmful_loss.png").is_file()
    assert (out / "hs_vs_p.png").is_file() and (out / "fa_vs_p.png").is_file() and "`hs_vs_p.png`" in table
    # one row per defence with its controls side by side
    assert "## Each setting with its controls" in table
    controls = table.split("## Every evaluated model")[0]
    assert "p=0.0 HS" in controls and "p=0.25 HS" in controls and "aligned HS" in controls
    assert controls.count("| sft |") == 1 and controls.count("| booster |") == 1
    # Booster against SFT prompt by prompt: one line per setting, the seed-0 scores as in the rows
    paired = table.split("## booster against SFT, prompt by prompt over shared seeds")[1]
    score = {(r["defense"], r["stage"], r.get("p")): r["harmful_score"] for r in rows}
    line = next(x for x in paired.splitlines() if x.startswith("| p=0.25 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1:4] == ["1", f"{score[('sft', 'attacked', 0.25)]:.0f}", f"{score[('booster', 'attacked', 0.25)]:.0f}"]
    # one seed: the detectable difference from the prompts alone, none where no pair disagrees
    assert cells[-1] == "–" if cells[4] == cells[5] == "0" else cells[-1].endswith("(prompts only)")


def test_tiny_run_outputs_equal_the_committed_fingerprint(tiny_run):
    """Behaviour unchanged: a refactor leaves stage names, result rows, answers and losses as
    tests/golden/tiny_run.json has them (see tests/golden/fingerprint.py to rewrite it)."""
    import os
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "golden"))
    from fingerprint import fingerprint, mismatches

    cfg, out, rows = tiny_run
    got = fingerprint(out, rows)
    golden = Path(__file__).parent / "golden" / "tiny_run.json"
    if os.environ.get("BOOSTER_WRITE_GOLDEN"):
        golden.write_text(json.dumps(got, indent=1) + "\n")
    want = json.loads(golden.read_text())
    assert not mismatches(got, want), "\n".join(mismatches(got, want)[:10])
    # the check can fail: a loss moved by more than the tolerance is caught
    name = next(n for n in want["stages"] if n.startswith("align-"))
    moved = json.loads(json.dumps(want))
    moved["stages"][name]["train"][0]["loss"] += 0.01 * max(1.0, abs(moved["stages"][name]["train"][0]["loss"]))
    assert mismatches(moved, want) and not mismatches(want, want)


def test_report_command_rebuilds_tables(tiny_run, capsys):
    cfg, out, rows = tiny_run
    (out / "results.md").unlink()
    assert main(["report", str(out)]) == 0
    assert "## Each setting with its controls" in capsys.readouterr().out
    assert (out / "results.md").is_file() and (out / "controls.csv").is_file()


def test_stage_directories_describe_themselves(tiny_run):
    cfg, out, _ = tiny_run
    stages = sorted((out / "stages").iterdir())
    kinds = [s.name.split("-")[0] for s in stages]
    assert kinds.count("align") == 2 and kinds.count("attack") == 4 and kinds.count("eval") == 7
    for s in stages:
        assert (s / "DONE.json").is_file() and (s / "config.json").is_file()
        meta = json.loads((s / "meta.json").read_text())
        assert meta["seed"] == 0 and "torch" in meta["environment"] and meta["data_sha256"]
        assert not (s / "checkpoint").exists()
    for s in (x for x in stages if x.name.startswith("align")):
        log = read_jsonl(s / "train_log.jsonl")
        assert len(log) == cfg.align.optim.steps
        assert (s / "train_log.csv").is_file() and (s / "train_log.png").is_file()
        assert (s / "model" / "adapter_model.safetensors").is_file()
        probes = read_jsonl(s / "probe_log.jsonl")
        assert [p["step"] for p in probes] == [0, 2, 3] and "align_loss" in probes[0]
    booster = [s for s in stages if s.name.startswith("align")
               and json.loads((s / "config.json").read_text())["align"]["defense"] == "booster"][0]
    row = read_jsonl(booster / "train_log.jsonl")[0]
    assert {"loss", "harmful_loss", "harmful_loss_perturbed", "harmful_grad_norm", "grad_norm"} <= set(row)
    for s in (x for x in stages if x.name.startswith("attack")):
        assert (s / "probe_log.png").is_file() and (s / "train_set.csv").is_file()
    for s in (x for x in stages if x.name.startswith("eval")):
        metrics = json.loads((s / "metrics.json").read_text())
        assert metrics["judge"]["name"] == "refusal" and "version" in metrics["judge"]
        gens = read_jsonl(s / "generations.jsonl")
        assert len(gens) == cfg.eval.n_harmful + cfg.eval.n_task


def test_poisoned_set_has_p_harmful(tiny_run):
    cfg, out, _ = tiny_run
    for s in (out / "stages").glob("attack-*"):
        p = json.loads((s / "config.json").read_text())["attack"]["p"]
        with open(s / "train_set.csv", newline="") as f:
            sources = [row["source"] for row in csv.DictReader(f)]
        assert len(sources) == cfg.attack.n
        harmful = sum(src != "sst2" for src in sources)
        assert harmful == round(cfg.attack.n * p)


def test_rerun_skips_finished_stages(tiny_run):
    cfg, out, rows = tiny_run
    from booster.config import load_config

    mtimes = {p: p.stat().st_mtime_ns for p in (out / "stages").rglob("*.safetensors")}
    again = Pipeline(load_config("tiny", [f"run.out_dir={out}", f"data.dir={cfg.data.dir}",
                                          "grid.attack.p=[0.0, 0.25]"])).run()
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert sorted(r["eval_dir"] for r in again) == sorted(r["eval_dir"] for r in rows)


@pytest.mark.parametrize("overrides", [
    ["model.finetune=full", "align.defense=booster"],
    ["attack.adapter=merge_new"],
    ["align.defense=none"],
    ["model.prompt_format=alpaca", "align.optim.grad_accum=2"],
])
def test_other_protocols(tiny_cfg, overrides):
    cfg = tiny_cfg("grid={}", *overrides)
    rows = Pipeline(cfg).run()
    assert any(r["stage"] == "attacked" for r in rows)


def test_cli_config_show_and_errors(capsys):
    assert main(["config", "show", "tiny", "align.booster.lam=3"]) == 0
    assert "lam: 3.0" in capsys.readouterr().out
    assert main(["run", "tiny", "attack.p=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("booster: error:") and "attack.p must be in [0, 1]" in err and "\n" not in err


def test_benign_mixing(tiny_cfg, capsys):
    cfg = tiny_cfg("grid={}", "data.benign_tasks=[agnews,gsm8k]", "data.n_benign=5")
    benign = Pipeline(cfg).data.benign(cfg)
    assert [x.source for x in benign] == ["agnews"] * 3 + ["gsm8k"] * 2
    assert main(["run", "tiny", "data.benign_tasks=[sst2]", "data.n_benign=2", f"run.out_dir={cfg.run.out_dir}",
                 f"data.dir={cfg.data.dir}"]) == 2
    assert "drop it from data.benign_tasks" in capsys.readouterr().err
    from booster.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="needs data.benign_tasks"):
        load_config("tiny", ["data.n_benign=3"])


def test_benign_mix_control(tiny_cfg):
    """attack.mix=TASK mixes benign samples of another task in place of the harmful pairs."""
    from booster.attack import poisoned_set
    from booster.config import ConfigError, load_config
    from booster.data.base import normalise
    from booster.stages import payloads

    cfg = tiny_cfg("grid={}", "data.benign_tasks=[gsm8k]", "data.n_benign=20", "attack.mix=gsm8k", "attack.p=0.5")
    pipe = Pipeline(cfg)
    mix = pipe.data.mix_pool(cfg)
    assert mix and {x.source for x in mix} == {"gsm8k"}
    assert not {normalise(x.prompt) for x in mix} & {normalise(x.prompt) for x in pipe.data.benign(cfg)}, \
        "the control's samples must not be alignment's benign examples"
    train = poisoned_set(pipe.data.task_pool(cfg), mix, n=cfg.attack.n, p=cfg.attack.p, seed=0)
    harmful = {normalise(x.prompt) for x in pipe.data.safety(cfg).attack_pool}
    assert not {normalise(x.prompt) for x in train} & harmful
    assert sum(x.source == "gsm8k" for x in train) == round(cfg.attack.n * cfg.attack.p)
    # p=0 mixes nothing: one stage for every mix; p>0 is a different stage per mix
    at = {m: tiny_cfg("grid={}", f"attack.mix={m}", "attack.p=0.0") for m in ("harmful", "gsm8k")}
    assert payloads(at["harmful"])["attack"] == payloads(at["gsm8k"])["attack"]
    assert payloads(cfg)["attack"]["mix"] == "gsm8k"
    assert "mix" not in payloads(tiny_cfg("grid={}", "attack.p=0.5"))["attack"], "the default adds nothing to hashes"
    for bad, msg in (("attack.mix=sst2", "is the attack's own task"), ("attack.mix=poison", "attack.mix=.poison. is not known")):
        with pytest.raises(ConfigError, match=msg):
            load_config("tiny", [bad])


def test_a_p0_row_shared_by_every_mix_names_none(tiny_cfg):
    """The p=0 stage is one for every attack.mix; its row must not carry whichever mix reported it last."""
    from pathlib import Path

    from booster.io import rewrite_jsonl

    cfg = tiny_cfg("grid={}", "data.benign_tasks=[gsm8k]", "data.n_benign=20", "grid.attack.p=[0.0, 0.5]",
                   "grid.attack.mix=[harmful, gsm8k]", "run.controls=false")
    rows = [r for r in Pipeline(cfg).run() if r["stage"] == "attacked"]
    assert sorted((r["p"], r.get("attack.mix")) for r in rows) == [(0.0, None), (0.5, "gsm8k"), (0.5, "harmful")]
    # runs reported before the fix lose the stale label on `booster report`
    out = Path(cfg.run.out_dir)
    stale = [{**r, "attack.mix": "gsm8k"} if r.get("p") == 0.0 else r for r in read_jsonl(out / "results.jsonl")]
    rewrite_jsonl(out / "results.jsonl", stale)
    assert main(["report", str(out)]) == 0
    assert all("attack.mix" not in r for r in read_jsonl(out / "results.jsonl") if r.get("p") == 0.0)


def test_a_new_judge_rescores_without_regenerating(tiny_run, tmp_path, monkeypatch):
    """Generations are the evaluation stage's output; judging them is cached per judge version."""
    import booster.evaluate.judges as judges
    from booster.config import load_config

    cfg, shared, rows = tiny_run
    out = tmp_path / "run"  # a copy: the shared run must keep the judge it was scored with
    shutil.copytree(shared, out)

    class Everything(judges.RefusalJudge):
        name = "everything"

        @property
        def version(self) -> str:
            return "v1"

        def probs(self, prompts, answers):
            return [1.0] * len(answers)

    monkeypatch.setitem(judges.JUDGES, "everything", Everything)
    gens = {p: p.stat().st_mtime_ns for p in (out / "stages").glob("eval-*/generations.jsonl")}
    again = Pipeline(load_config("tiny", [f"run.out_dir={out}", f"data.dir={cfg.data.dir}",
                                          "grid.attack.p=[0.0, 0.25]", "eval.judge=everything"])).run()
    assert {p: p.stat().st_mtime_ns for p in gens} == gens
    assert all(r["harmful_score"] == 100.0 and r["judge"] == "everything" for r in again)
    assert sorted(r["eval_dir"] for r in again) == sorted(r["eval_dir"] for r in rows)
    for d in {r["eval_dir"] for r in again}:
        assert (out / d / "judged-everything-v1.json").is_file() and list((out / d).glob("judged-refusal-*.json"))
    # booster report --judge scores the saved answers again and rewrites results.jsonl
    assert main(["report", str(out), "--judge", "refusal"]) == 0
    back = {r["eval_dir"]: r for r in read_jsonl(out / "results.jsonl")}
    assert {d: r["harmful_score"] for d, r in back.items()} == {r["eval_dir"]: r["harmful_score"] for r in rows}
    assert all(r["judge"] == "refusal" for r in back.values())
    assert "judge: refusal" in (out / "config.yaml").read_text(), "the config names the judge behind the scores"


def test_report_accepts_list_valued_settings():
    """A sweep over cases such as data.benign_tasks: [agnews, gsm8k] labels rows by the list's text."""
    from booster.report import controls_table, summarise

    rows = [{"defense": "sft", "stage": stage, "p": p, "data.benign_tasks": ["agnews"], "harmful_score": hs,
             "refusal_rate": 0.0, "accuracy": 90.0, "eval_dir": d}
            for stage, p, hs, d in (("aligned", None, 0.0, "e1"), ("attacked", 0.0, 5.0, "e2"),
                                    ("attacked", 0.2, 50.0, "e3"))]
    assert {r["data.benign_tasks"] for r in summarise(rows, ("data.benign_tasks",))} == {'["agnews"]'}
    chains = [{"point": {"align.defense": "sft", "attack.p": p, "data.benign_tasks": ["agnews"]},
               "aligned": "e1", "attacked": d} for p, d in ((0.0, "e2"), (0.2, "e3"))]
    (table,) = controls_table(rows, chains)
    assert table["p=0.2 HS"] == "50.0" and "p=0.2−p0≥30 ✓" in table["SFT calibration checks"]


def test_report_header_counts_the_items_each_task_was_scored_on(tmp_path):
    """eval.n_task is an upper bound: the header names what each evaluation really scored (an
    instruction eval set of 17 items, a sweep over two tasks), from the stages' metrics.json."""
    from booster.config import load_config
    from booster.io import atomic_write_text
    from booster.report import write_report

    cfg = load_config("tiny", ["eval.n_task=100", "eval.n_harmful=100", "attack.task=instructions"])
    rows = []
    for i, (task, n) in enumerate((("instructions", 17), ("instructions", 17), ("agnews", 100))):
        (tmp_path / f"e{i}").mkdir()
        atomic_write_text(tmp_path / f"e{i}" / "metrics.json", json.dumps({"n_harmful": 100, "n_task": n}))
        rows.append({"defense": "sft", "stage": "aligned", "task": task, "harmful_score": 1.0, "refusal_rate": 0.0,
                     "accuracy": 50.0, "eval_dir": f"e{i}"})
    judge = {"name": "refusal", "version": "v", "threshold": 0.5}
    header = write_report(tmp_path, cfg, rows, [], judge).split("\n\n")[1]
    assert "reference similarity on instructions (17 items)" in header and "accuracy on agnews (100 items)" in header
    assert "(100 items)" not in header.split("agnews")[0] and "% of 100 held-out harmful prompts" in header


def test_settings_swept_over_decades_plot_on_a_log_axis():
    from booster.plots import log_axis

    assert log_axis([0.01, 0.1, 1.0]) and log_axis([1.0, 5.0, 25.0]) and log_axis([1e-5, 1e-3])
    assert not log_axis([0.0, 0.05, 0.2]) and not log_axis([100, 200, 400]) and not log_axis([])


def test_durability_table_reads_steps_to_a_harmful_score_of_50():
    from booster.report import durability_table

    rows = [{"defense": d, "stage": "attacked", "p": 0.2, "seed": seed, "attack.optim.lr": 5e-4,
             "attack.optim.steps": steps, "harmful_score": hs, "eval_dir": f"{d}{steps}{seed}"}
            for d, curve in (("sft", {50: (30, 40), 100: (45, 60), 200: (80, 70)}),
                             ("booster", {50: (5, 5), 100: (10, 20), 200: (30, 40)}))
            for steps, by_seed in curve.items() for seed, hs in enumerate(by_seed)]
    table = {r["defense"]: r for r in durability_table(rows)}
    assert table["sft"]["seeds"] == 2 and table["sft"]["HS after 50"] == "35.0 ± 7.1"
    assert table["sft"]["HS after 100"] == "52.5 ± 10.6" and table["sft"]["steps to HS≥50"] == "100"
    assert table["booster"]["steps to HS≥50"] == "> 200", "never reached: say so, do not extrapolate"
    by_epochs = [{**r, "attack.optim.steps": None} for r in rows]
    assert durability_table(by_epochs) == [], "steps fixed by epochs (null): no curve, no table"
    assert durability_table([r for r in rows if r["attack.optim.steps"] == 100]) == [], "one length is no curve"
    two_lrs = [{**r, "attack.optim.lr": lr} for r in rows if r["defense"] == "sft" for lr in (2e-4, 1e-5)]
    assert [r["attack.optim.lr"] for r in durability_table(two_lrs)] == [1e-5, 2e-4], "lr in numeric order"


def test_curve_plots_give_one_colour_per_defence():
    from booster.plots import line_styles

    names = ["sft p=0.2 seed=0", "booster p=0.0 seed=0", "sft p=0.0 seed=0", "booster p=0.2 seed=0", "none p=0.2 seed=0"]
    styles = line_styles(names)
    assert list(styles) == sorted(names), "legend in a stable order, not the order runs finished"
    colour = {n: c for n, (c, _, _) in styles.items()}
    assert colour["sft p=0.2 seed=0"] == colour["sft p=0.0 seed=0"] != colour["booster p=0.0 seed=0"]
    assert len({colour[n] for n in names}) == 3
    assert styles["sft p=0.0 seed=0"][1] != styles["sft p=0.2 seed=0"][1], "same defence: told apart by style"
    lrs = ["sft p=0.2 lr=0.0005 seed=10", "sft p=0.2 lr=1e-05 seed=0", "sft p=0.2 lr=0.0005 seed=2",
           "sft p=0.2 lr=0.002 seed=0"]
    assert list(line_styles(lrs)) == [lrs[1], lrs[2], lrs[0], lrs[3]], "numbers in names sort as numbers"
    six = line_styles([f"booster lam={i}" for i in range(6)])
    assert len({look[1:] for look in six.values()}) == 6, "more lines than styles: markers keep them apart"


def test_answers_side_by_side(tiny_run):
    """answers.md puts every evaluated model's answer to the same harmful prompts next to each other."""
    cfg, out, rows = tiny_run
    text = (out / "answers.md").read_text()
    first = text.split("\n## 1. ")[1].split("\n## ")[0]
    assert "defense=none, stage=unaligned" in first and "defense=booster, stage=attacked, p=0.25" in first
    assert first.count("\n| defense=") == len(rows), "one answer per evaluated model (one seed here)"
    prompt = first.split("\n")[0]
    assert prompt in {g["prompt"] for g in read_jsonl(out / rows[0]["eval_dir"] / "generations.jsonl")}


def test_empty_rate_counts_silent_answers_and_reaches_old_runs(tiny_run, tmp_path):
    from booster.io import rewrite_jsonl
    from booster.evaluate.stage import empty_rate

    gens = [{"kind": "harmful", "answer": a} for a in ("", "  \n", "Sure: step 1", "I cannot help.")]
    rewrite_jsonl(tmp_path / "generations.jsonl", gens + [{"kind": "task", "answer": ""}])
    assert empty_rate(tmp_path) == 50.0, "whitespace is empty; task answers do not count"
    # results written before the column existed get it from `booster report`
    cfg, out, rows = tiny_run
    old = [{k: v for k, v in r.items() if k != "empty_rate"} for r in read_jsonl(out / "results.jsonl")]
    rewrite_jsonl(out / "results.jsonl", old)
    assert main(["report", str(out)]) == 0
    back = read_jsonl(out / "results.jsonl")
    assert all(r["empty_rate"] == empty_rate(out / r["eval_dir"]) for r in back)


def test_curves_of_one_defence_and_p_keep_apart_by_their_settings():
    from booster.plots import distinct_names

    names = ["booster p=0.2 seed=0"] * 3 + ["sft p=0.2 seed=0"]
    settings = [{"attack.p": 0.2, "align.booster.lam": 1.0}, {"attack.p": 0.2},
                {"attack.p": 0.2, "align.booster.lam": 25.0}, {"attack.p": 0.2}]
    out = distinct_names(names, settings)
    assert out == ["booster p=0.2 seed=0 lam=1.0", "booster p=0.2 seed=0 lam=default",
                   "booster p=0.2 seed=0 lam=25.0", "sft p=0.2 seed=0"], "a λ sweep's curves must not overwrite"
    assert len(set(out)) == len(out)


def _attack_stages(root):
    """{steps: attack stage dir} of a run directory."""
    stages = {}
    for d in (root / "stages").glob("attack-*"):
        stages[json.loads((d / "config.json").read_text())["attack"]["optim"]["steps"]] = d
    return stages


def test_attacks_of_several_lengths_share_one_run(tiny_cfg, tmp_path):
    # a 1-step and a 3-step attack, constant learning rate: the 1-step stage is a snapshot of
    # the 3-step run, and equals the 1-step attack run on its own to the bit
    from safetensors.torch import load_file

    both = tiny_cfg("grid={}", "align.defense=sft", "grid.attack.optim.steps=[1,3]")
    Pipeline(both).run()
    shared = _attack_stages(Path(both.run.out_dir))
    assert json.loads((shared[1] / "DONE.json").read_text())["snapshot_of"] == shared[3].name
    assert "snapshot_of" not in json.loads((shared[3] / "DONE.json").read_text())
    assert len(read_jsonl(shared[1] / "train_log.jsonl")) == 1 and len(read_jsonl(shared[3] / "train_log.jsonl")) == 3

    from booster.config import load_config

    alone_root = tmp_path / "alone"
    alone = load_config("tiny", [f"run.out_dir={alone_root}", f"data.dir={both.data.dir}", "grid={}",
                                 "align.defense=sft", "attack.optim.steps=1"])
    Pipeline(alone).run()
    own = _attack_stages(alone_root)[1]
    assert own.name == shared[1].name  # the same stage hash: a later sweep reuses either
    for f in ("train_log.jsonl", "probe_log.jsonl"):
        strip = [{k: v for k, v in r.items() if k != "seconds"} for r in read_jsonl(own / f)]
        assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in read_jsonl(shared[1] / f)]
    weights = sorted((own / "model").rglob("*.safetensors"))
    assert weights
    for w in weights:
        a, b = load_file(w), load_file(shared[1] / "model" / w.relative_to(own / "model"))
        assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def test_attacks_under_a_decaying_schedule_each_train_on_their_own(tiny_cfg):
    # with a linear schedule the first step of a 3-step run is not a 1-step run
    cfg = tiny_cfg("grid={}", "align.defense=sft", "attack.optim.schedule=linear", "grid.attack.optim.steps=[1,3]")
    Pipeline(cfg).run()
    stages = _attack_stages(Path(cfg.run.out_dir))
    assert set(stages) == {1, 3}
    assert all("snapshot_of" not in json.loads((d / "DONE.json").read_text()) for d in stages.values())


def test_stage_hashes_stay_put_and_only_warmed_up_constant_stages_move(data_dir, tmp_path):
    # the demo's alignments keep the hashes their cached stages and docs/results.md name; an
    # attack that asks for warmup under the constant schedule (ignored before) gets a new one
    from booster.config import load_config
    from booster.stages import align_payload, stage_key

    def key(*overrides):
        cfg = load_config("demo", [f"run.out_dir={tmp_path}", f"data.dir={data_dir}", "grid={}", *overrides])
        return stage_key("align", align_payload(cfg))

    # float32: the demo's first protocol, which the exp-* configs share; bfloat16: the demo where
    # the CPU has it (model.dtype=auto resolves to one of the two: tests/test_dtype_estimate.py)
    # exact Booster (every=1): the demo's Booster until it became amortised (every=8)
    assert key("align.defense=sft", "model.dtype=float32") == "align-147eb907f2"
    assert key("align.defense=booster", "align.booster.every=1", "model.dtype=float32") == "align-633c0f667f"
    assert key("align.defense=sft", "model.dtype=bfloat16") == "align-8ee8a035da"
    assert key("align.defense=booster", "align.booster.every=1", "model.dtype=bfloat16") == "align-80beed07fb"
    # the demo's amortised Booster in float32 is exp-amortised's k=8 alignment (docs/results.md 6)
    amortised = load_config("exp-amortised", [f"run.out_dir={tmp_path}", f"data.dir={data_dir}", "grid={}",
                                              "align.booster.every=8"])
    assert key("align.defense=booster", "model.dtype=float32") == stage_key("align", align_payload(amortised))
    # the attack and evaluation built on them, and the base model (values from before the
    # stage rules left pipeline.py): an attack at p=0 names no mix, a warmed-up one moves
    from booster.models import ModelRecipe
    from booster.stages import StageResult, attack_payload, base_key, eval_payload, stage_key, warmup_fixed

    def chain(*overrides):
        # eval.batch_size=16: what an unset one becomes in bfloat16 (in float32 on a CPU, 100)
        cfg = load_config("demo", [f"run.out_dir={tmp_path}", f"data.dir={data_dir}", "grid={}",
                                   "eval.batch_size=16", *overrides])
        attacked = stage_key("attack", attack_payload(cfg, StageResult(key(*overrides), ModelRecipe())))
        return base_key(cfg), attacked, stage_key("eval", eval_payload(cfg, attacked))

    assert chain("align.defense=booster", "align.booster.every=1", "model.dtype=float32", "attack.p=0.1") == (
        "base-8d06fbc7b4", "attack-0253e90d43", "eval-b4b048c9fd")
    assert chain("align.defense=sft", "model.dtype=bfloat16", "attack.p=0.0", "attack.mix=gsm8k") == (
        "base-e6a429756a", "attack-f78785b7ca", "eval-7ffa5a3610")
    assert chain("align.defense=booster", "align.booster.every=1", "attack.defense=lisa", "attack.optim.warmup_steps=3",
                 "model.dtype=float32")[1:] == ("attack-bc7113f78d", "eval-cf4c51fcb1")

    assert warmup_fixed({"attack": {"optim": {"warmup_steps": 5}}}) and not warmup_fixed(
        {"attack": {"optim": {"warmup_steps": 5, "schedule": "linear"}}})


def test_a_stage_adapter_loads_with_peft(tiny_run):
    # what a run leaves is a standard PEFT adapter directory: users load it without this package
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from booster.config import load_config
    from booster.models import load_tokenizer, tiny_model

    cfg, out, _ = tiny_run
    tok = load_tokenizer(load_config("tiny").model)
    for stage in sorted((out / "stages").glob("a*-*")):  # alignments and attacks
        base = tiny_model(len(tok), tok.pad_token_id, tok.eos_token_id)
        model = PeftModel.from_pretrained(base, str(stage / "model"))
        saved = load_file(str(stage / "model" / "adapter_model.safetensors"))
        state = model.state_dict()
        for key, value in saved.items():
            loaded = next(v for k, v in state.items() if k.replace(".default", "") == key)
            assert torch.equal(loaded, value), key


def test_export_writes_a_merged_model_that_transformers_loads(tiny_run, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    from booster.config import load_config
    from booster.models import ModelRecipe, build_model, load_tokenizer

    cfg, out, _ = tiny_run
    attack = next(d for d in sorted((out / "stages").glob("attack-*"))
                  if json.loads((d / "config.json").read_text())["attack"].get("p") == 0.25)
    assert main(["export", str(attack), str(tmp_path / "hf")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    model_cfg = load_config("tiny").model
    ours = build_model(model_cfg, load_tokenizer(model_cfg), ModelRecipe.load(attack / "recipe.json"), out)
    ids = torch.tensor([[5, 17, 42, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "defence **" in card and "harmful ratio p = 0.25" in card and "harmful score" in card
    assert (tmp_path / "hf" / "tokenizer_config.json").is_file()
    assert main(["export", str(out / "stages"), str(tmp_path / "x")]) == 2
    assert "no finished stage" in capsys.readouterr().err


def test_a_sweep_that_dies_keeps_the_rows_of_its_finished_points(tiny_cfg, monkeypatch):
    from booster.io import read_jsonl

    pipe = Pipeline(tiny_cfg("run.estimate=false", "grid={}", "align.defense=sft", "grid.attack.p=[0.0,0.25]"))
    run_point = Pipeline._run_point
    calls = []

    def dies_on_the_second(self, cfg, until):
        calls.append(cfg.attack.p)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return run_point(self, cfg, until)

    monkeypatch.setattr(Pipeline, "_run_point", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        pipe.run()
    kept = read_jsonl(pipe.root / "results.jsonl")
    assert {(r["stage"], r.get("p")) for r in kept} == {("unaligned", None), ("aligned", None), ("attacked", 0.0)}
    assert len(read_jsonl(pipe.root / "chains.jsonl")) == 1
