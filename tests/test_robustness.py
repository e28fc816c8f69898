"""Runs that survive: SIGKILL mid-stage and resume, determinism, bad input, safe loading."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from booster.cli import main
from booster.data.tasks import TASKS
from booster.io import read_jsonl

# A tiny run slow enough to be caught mid-stage: Booster alignment, an attack, evaluations
# that generate one answer at a time.
SLOW = ["grid={}", "align.defense=booster", "align.optim.steps=12", "align.optim.checkpoint_every=2",
        "attack.optim.steps=12", "attack.optim.checkpoint_every=2", "eval.n_harmful=12", "eval.batch_size=1",
        "eval.max_new_tokens=24", "run.threads=1"]


def _cmd(out: Path, data_dir: Path) -> list[str]:
    return [sys.executable, "-m", "booster.cli", "run", "tiny", *SLOW, f"run.out_dir={out}", f"data.dir={data_dir}"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _metrics(out: Path) -> dict[str, tuple]:
    return {r["stage"]: (r["harmful_score"], r["refusal_rate"], r["accuracy"])
            for r in read_jsonl(out / "results.jsonl")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("reference")
    subprocess.run(_cmd(out, data_dir), env=_env(), check=True, capture_output=True)
    return out


def _kill_when(out: Path, data_dir: Path, ready, timeout: float = 240) -> None:
    proc = subprocess.Popen(_cmd(out, data_dir), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            if ready(out):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return
            time.sleep(0.02)
        raise AssertionError(f"the run ended (code {proc.poll()}) before the kill point was reached")
    finally:
        if proc.poll() is None:
            proc.kill()


def _lines(out: Path, pattern: str, name: str) -> int:
    return max((len(read_jsonl(d / name)) for d in (out / "stages").glob(pattern)), default=0) \
        if (out / "stages").is_dir() else 0


@pytest.mark.parametrize("where, ready", [
    ("alignment", lambda out: _lines(out, "align-*", "train_log.jsonl") >= 5),
    ("attack", lambda out: _lines(out, "attack-*", "train_log.jsonl") >= 5),
    ("evaluation", lambda out: any(len(read_jsonl(p)) >= 3 for p in out.glob("stages/eval-*/generations.partial.jsonl"))),
])
def test_sigkill_then_resume_gives_the_same_metrics(where, ready, reference, tmp_path, data_dir):
    out = tmp_path / "run"
    _kill_when(out, data_dir, ready)
    done_before = {d.name for d in (out / "stages").iterdir() if (d / "DONE.json").is_file()}
    mtimes = {d.name: (d / "DONE.json").stat().st_mtime_ns for d in (out / "stages").iterdir()
              if d.name in done_before}
    subprocess.run(_cmd(out, data_dir), env=_env(), check=True, capture_output=True)
    # finished stages were not recomputed
    assert {d: (out / "stages" / d / "DONE.json").stat().st_mtime_ns for d in done_before} == mtimes
    # every log has each step exactly once, and the metrics match the uninterrupted run
    for d in (out / "stages").glob("*-*"):
        steps = [r["step"] for r in read_jsonl(d / "train_log.jsonl")]
        assert steps == sorted(set(steps))
    got, want = _metrics(out), _metrics(reference)
    assert got.keys() == want.keys()
    for stage in want:
        assert got[stage] == pytest.approx(want[stage], abs=1e-6), stage


def test_same_seed_same_metrics_and_weights(reference, tmp_path, data_dir):
    out = tmp_path / "again"
    subprocess.run(_cmd(out, data_dir), env=_env(), check=True, capture_output=True)
    assert _metrics(out) == _metrics(reference)
    from safetensors.torch import load_file

    for path in (reference / "stages").glob("*/model/adapter_model.safetensors"):
        a, b = load_file(str(path)), load_file(str(out / path.relative_to(reference)))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_each_stage_records_seed_versions_and_data_hashes(reference):
    for d in (reference / "stages").iterdir():
        meta = json.loads((d / "meta.json").read_text())
        assert meta["seed"] == 0
        assert {"torch", "transformers", "peft", "python"} <= set(meta["environment"])
        assert "safety/refusals.json" in meta["data_sha256"] and len(meta["data_sha256"]["sst2/train.tsv"]) == 16


def test_every_task_a_stage_reads_is_hashed(tmp_path, data_dir):
    # AG News, GSM8K and instruction runs once recorded no hash of their task files
    from booster.config import load_config
    from booster.pipeline import Pipeline

    cfg = load_config("tiny", [f"run.out_dir={tmp_path}", f"data.dir={data_dir}", "attack.task=agnews",
                               "attack.mix=gsm8k", "data.benign_tasks=[instructions]", "data.n_benign=4"])
    hashes = Pipeline(cfg).data.data_hashes(cfg)
    assert {"agnews/test.csv", "gsm8k/train.jsonl", "gsm8k/test.jsonl", "safety/refusals.json"} <= set(hashes)
    assert any(k.startswith("safety/judge_labels/refusal/") for k in hashes)  # the instructions' source
    assert not any(k.startswith("sst2/") for k in hashes)  # not read by this stage


def test_no_pickle_anywhere_in_a_run(reference):
    files = [p for p in reference.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    assert any(p.suffix == ".safetensors" for p in files)


# ---------------------------------------------------------------- bad input, before training


def _run_cli(capsys, *args: str) -> tuple[int, str]:
    """Exit code and the error line (the last line on stderr, after logs and progress bars)."""
    code = main(list(args))
    lines = capsys.readouterr().err.strip().splitlines()
    return code, lines[-1] if lines else ""


@pytest.mark.parametrize("overrides, needle", [
    (["attack.n=100000"], "lower attack.n"),
    (["attack.n=2000", "attack.p=1.0"], "lower attack.p"),
    (["eval.n_harmful=100000"], "lower eval.n_harmful"),
    (["data.n_align=100000"], "lower data.n_align"),
    (["model.name=/no/such/model"], "no existing directory"),
    (["model.name=no such model"], "no existing directory"),
    (["attack.defense=lisa", "attack.optim.steps=50"], "scale lisa.align_steps"),
])
def test_bad_runs_fail_before_training(capsys, tmp_path, data_dir, overrides, needle):
    out = tmp_path / "run"
    code, err = _run_cli(capsys, "run", "tiny", *overrides, f"run.out_dir={out}", f"data.dir={data_dir}")
    assert code == 2 and needle in err and err.startswith("booster: error:")
    assert not (out / "stages").exists()


def test_missing_data_dir(capsys, tmp_path):
    code, err = _run_cli(capsys, "run", "tiny", f"run.out_dir={tmp_path}", f"data.dir={tmp_path / 'nowhere'}")
    assert code == 2 and "does not exist" in err


def test_empty_data_file(capsys, tmp_path, data_dir):
    bad = tmp_path / "data"
    for sub in ("safety", "sst2"):
        (bad / sub).mkdir(parents=True)
    for f in (data_dir / "safety").iterdir():
        if f.is_file():
            (bad / "safety" / f.name).symlink_to(f)
    for f in (data_dir / "sst2").iterdir():
        (bad / "sst2" / f.name).symlink_to(f)
    (bad / "safety" / "refusals.json").unlink()
    (bad / "safety" / "refusals.json").write_text("[]")
    code, err = _run_cli(capsys, "run", "tiny", f"run.out_dir={tmp_path / 'run'}", f"data.dir={bad}")
    assert code == 2 and "refusals.json: no records" in err


def test_tokenizer_without_chat_template(capsys, tmp_path, data_dir):
    from booster.models import smollm2_tokenizer_dir, tiny_model
    from transformers import AutoTokenizer

    model_dir = tmp_path / "model"
    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    tok.chat_template = None
    tok.save_pretrained(model_dir)
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    tiny_model(len(tok)).save_pretrained(model_dir)
    code, err = _run_cli(capsys, "run", "tiny", f"model.name={model_dir}", f"run.out_dir={tmp_path / 'run'}",
                         f"data.dir={data_dir}")
    assert code == 2 and "no chat template; set model.prompt_format=alpaca" in err


def test_pickle_only_model_is_refused(capsys, tmp_path, data_dir):
    from booster.models import smollm2_tokenizer_dir, tiny_model
    from transformers import AutoTokenizer

    model_dir = tmp_path / "model"
    AutoTokenizer.from_pretrained(smollm2_tokenizer_dir()).save_pretrained(model_dir)
    model = tiny_model(49152)
    model.config.save_pretrained(model_dir)
    torch.save(model.state_dict(), model_dir / "pytorch_model.bin")
    code, err = _run_cli(capsys, "run", "tiny", f"model.name={model_dir}", "grid={}", "align.defense=none",
                         f"run.out_dir={tmp_path / 'run'}", f"data.dir={data_dir}")
    assert code == 2 and "cannot load model" in err


def test_disk_full_is_one_clear_line_and_keeps_finished_work(capsys, tmp_path, data_dir, monkeypatch):
    import booster.evaluate.stage as evaluation

    out = tmp_path / "run"
    real = evaluation.rewrite_jsonl

    def full(path, rows):
        if Path(path).name == "generations.jsonl":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, rows)

    monkeypatch.setattr(evaluation, "rewrite_jsonl", full)
    code, err = _run_cli(capsys, "run", "tiny", "grid={}", "align.defense=none", "attack.enabled=false",
                         f"run.out_dir={out}", f"data.dir={data_dir}")
    assert code == 2 and "disk is full" in err and err.startswith("booster: error:")
    partial = list(out.glob("stages/eval-*/generations.partial.jsonl"))
    assert partial and len(read_jsonl(partial[0])) > 0  # the answers generated so far are kept
    assert not list(out.glob("stages/eval-*/DONE.json"))
    monkeypatch.setattr(evaluation, "rewrite_jsonl", real)
    code, _ = _run_cli(capsys, "run", "tiny", "grid={}", "align.defense=none", "attack.enabled=false",
                       f"run.out_dir={out}", f"data.dir={data_dir}")
    assert code == 0 and list(out.glob("stages/eval-*/DONE.json"))


def test_trust_remote_code_is_off_by_default():
    from booster.config import ModelConfig

    assert ModelConfig().trust_remote_code is False


def test_vllm_engine_is_refused_without_a_gpu(capsys, tmp_path, data_dir):
    code, err = _run_cli(capsys, "run", "tiny", "eval.engine=vllm", f"run.out_dir={tmp_path}", f"data.dir={data_dir}")
    assert code == 2 and "eval.engine=vllm needs a GPU" in err


@pytest.mark.parametrize("task", sorted(TASKS))
def test_a_task_names_its_files_and_every_stage_on_it_hashes_them(task, tmp_path, data_dir):
    """Each task's own file names (Task.files) reach meta.json's data hashes, whether the task
    is the attack's, the benign control's or alignment's benign data."""
    from booster.config import load_config
    from booster.rundata import DataServer

    files = {str(p.relative_to(data_dir)) for pattern in TASKS[task].files for p in data_dir.glob(pattern)
             if p.is_file()}
    assert files and all(list(data_dir.glob(pattern)) for pattern in TASKS[task].files), \
        f"{task}: a pattern of Task.files matches nothing in the data directory"
    other = "gsm8k" if task != "gsm8k" else "sst2"
    for overrides in ([f"attack.task={task}"], [f"attack.task={other}", f"attack.mix={task}"],
                      [f"attack.task={other}", f"data.benign_tasks=[{task}]", "data.n_benign=2"]):
        cfg = load_config("tiny", [f"run.out_dir={tmp_path}", f"data.dir={data_dir}", *overrides])
        hashes = DataServer(data_dir).data_hashes(cfg)
        assert files <= set(hashes), (overrides, files - set(hashes))
        assert all(len(hashes[f]) == 16 for f in files)
