"""model.dtype=auto on mocked hardware, its warning and stage hashes; the time estimate's arithmetic."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from booster import models
from booster.estimate import (Rates, RunTimer, StageWork, eval_work, padded_prompt_tokens, probe_count, say,
                              training_work)
from booster.pipeline import Pipeline
from booster.train import checkpoint_step
from booster.stages import align_payload, stage_key


@pytest.fixture
def hardware(monkeypatch):
    """Pretend to be a machine: 'gpu', 'native' (x86 with AVX512-BF16), 'avx2' (x86 without),
    'avx512' (AVX-512 but no BF16), or 'arm:<ratio>' (bf16 matmul ratio of the micro-benchmark)."""

    def make(kind: str) -> None:
        models.resolve_dtype.cache_clear()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: kind == "gpu")
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: kind == "gpu")
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "H100")
        capability = {"native": "AVX512", "avx512": "AVX512", "avx2": "AVX2"}.get(kind, "DEFAULT")
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: kind == "native", raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
        arm = kind.startswith("arm")
        monkeypatch.setattr(models.platform, "machine", lambda: "aarch64" if arm else "x86_64")
        if arm:
            monkeypatch.setattr(models, "_bf16_matmul_ratio", lambda: float(kind.split(":")[1]))

    yield make
    models.resolve_dtype.cache_clear()


@pytest.mark.parametrize("kind, expected", [
    ("gpu", "bfloat16"), ("native", "bfloat16"), ("avx2", "float32"), ("avx512", "float32"),
    ("arm:0.6", "bfloat16"), ("arm:12", "float32"),
])
def test_auto_picks_bfloat16_only_where_it_is_native(hardware, kind, expected):
    hardware(kind)
    choice = models.resolve_dtype("auto")
    assert choice.resolved == expected and not choice.emulated
    assert choice.message().startswith(f"model.dtype=auto -> {expected}: ")
    assert models.resolve_dtype("float32").resolved == "float32"


def test_explicit_bfloat16_on_a_cpu_without_it_runs_with_a_warning(hardware):
    hardware("avx2")
    choice = models.resolve_dtype("bfloat16")
    assert choice.resolved == "bfloat16" and choice.emulated
    msg = choice.message()
    assert "\n" not in msg and "~30x slower" in msg and "model.dtype=auto or float32" in msg
    hardware("native")
    assert not models.resolve_dtype("bfloat16").emulated


def test_auto_stages_are_the_stages_of_the_dtype_they_resolve_to(hardware, data_dir, tmp_path, caplog):
    # the demo's cached stages (docs/results.md) keep their hashes: auto on a bf16 CPU is the
    # bf16 demo's alignment, auto on an AVX2 CPU the float32 demo's
    from booster.config import load_config

    def key(*overrides):
        cfg = load_config("demo", [f"run.out_dir={tmp_path}", f"data.dir={data_dir}", "grid={}", *overrides])
        pipe = Pipeline(cfg)
        point = pipe.resolve_dtypes([cfg])[0]
        return stage_key("align", align_payload(point)), pipe

    hardware("native")
    assert key("align.defense=sft")[0] == key("align.defense=sft", "model.dtype=bfloat16")[0] == "align-8ee8a035da"
    hardware("avx2")
    with caplog.at_level(logging.INFO, logger="booster"):
        k, pipe = key("align.defense=booster", "align.booster.every=1")
    assert k == key("align.defense=booster", "align.booster.every=1", "model.dtype=float32")[0] == "align-633c0f667f"
    assert "model.dtype=auto -> float32: CPU without native bfloat16 (PyTorch capability AVX2" in caplog.text
    assert pipe.dtypes["float32"].requested == "auto"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="booster"):
        key("model.dtype=bfloat16")
    assert [r.levelname for r in caplog.records if "model.dtype" in r.message] == ["WARNING"]


def test_meta_records_the_dtype_choice(hardware, tiny_cfg):
    hardware("avx2")
    cfg = tiny_cfg("model.dtype=auto", "grid={}", "attack.enabled=false", "run.controls=false")
    Pipeline(cfg).run(until="align")
    (stage,) = (Path(cfg.run.out_dir) / "stages").iterdir()
    meta = json.loads((stage / "meta.json").read_text())
    assert meta["dtype"]["requested"] == "auto" and meta["dtype"]["resolved"] == "float32"
    assert "dtype" not in json.loads((stage / "config.json").read_text()).get("model", {})  # float32: the default


def test_estimate_arithmetic():
    rates = Rates(train_token_s=1e-3, forward_token_s=2e-4, decode_step_s=0.5)
    # 200 Booster steps (3 passes) of 4 rows padded to 100 tokens, 21 probes of 5,000 tokens
    align = training_work("align", steps=200, passes=3, batch_size=4, grad_accum=1, length=100.0,
                          probes=probe_count(200, 10), probe_tokens=5000)
    assert probe_count(200, 10) == 21 and probe_count(205, 10) == 22 and probe_count(100, 0) == 0
    assert align.seconds(rates) == pytest.approx(200 * 3 * 4 * 100 * 1e-3 + 21 * 5000 * 2e-4)
    # 100 harmful answers of up to 64 tokens and 100 SST-2 answers of 8, in batches of 16
    ev = eval_work("eval", 100, 64, 100, 8, 16, prompt_tokens=1000)
    assert ev.decode_steps == 7 * 64 + 7 * 8 and ev.seconds(rates) == pytest.approx(7 * 72 * 0.5 + 1000 * 2e-4)
    # prompts of 5, 3, 9, 2, 4 tokens in batches of 2, longest first: (9, 5), (4, 3), (2) -> 18 + 8 + 2
    assert padded_prompt_tokens([5, 3, 9, 2, 4], 2) == 28
    assert StageWork("attack").seconds(rates) == 0
    assert [say(s) for s in (20, 52 * 60, 95 * 60)] == ["under a minute", "about 52 min", "about 1 h 35 min"]


def test_time_left_corrects_itself_by_the_finished_stages():
    timer = RunTimer({"align-a": 600.0, "attack-b": 1200.0, "eval-c": 600.0, "eval-d": 600.0})
    assert timer.left() == 3000
    assert timer.starting("align-a") == "stage 1/4 align-a: about 10 min; the run: about 50 min left"
    timer.finished("align-a", 1200.0)  # training twice as slow as estimated: the other training doubles
    assert timer.left() == 2400 + 1200 and "stage 2/4 attack-b: about 40 min" in timer.starting("attack-b")
    timer.finished("attack-b", 2400.0)
    timer.finished("eval-c", 300.0)  # evaluation twice as fast: the other evaluation halves
    assert timer.left() == 300


def test_a_run_logs_its_estimate_before_the_first_stage(tiny_cfg, caplog):
    cfg = tiny_cfg("grid={}", "align.defense=booster")
    with caplog.at_level(logging.INFO, logger="booster"):
        Pipeline(cfg).run()
    lines = [r.message for r in caplog.records]
    first = next(i for i, m in enumerate(lines) if m.startswith("estimate: 5 stages to run"))
    assert first < next(i for i, m in enumerate(lines) if m.startswith("stage "))
    assert "2 evaluations" not in lines[first] and "3 evaluations" in lines[first] and "1 alignments" in lines[first]
    assert sum(m.startswith("stage ") for m in lines) == 5
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="booster"):
        Pipeline(cfg).run()  # all done: nothing to estimate, nothing timed
    assert not any(r.message.startswith("estimate") for r in caplog.records)


def test_a_resumed_stage_is_priced_by_the_steps_it_has_left(tiny_cfg, monkeypatch):
    # A stage resumed at 800 of 1000 steps once logged the whole stage (45 min for 8) and then
    # scaled every later training stage by 8/45 ("about 23 min left" with 1 h 30 min to go).
    from booster import estimate
    from booster.config import expand_grid

    monkeypatch.setattr(estimate, "measure_run", lambda *a: Rates(1e-3, 2e-4, 0.5))  # the same rates twice
    pipe = Pipeline(tiny_cfg("grid={}", "align.defense=sft"))
    points = pipe.resolve_dtypes(expand_grid(pipe.cfg))
    pipe.points = points
    pipe.estimate(points)
    whole = dict(pipe.timer.estimates)
    align = next(k for k in whole if k.startswith("align"))
    steps = pipe._stage_work("align", points[0]).steps
    half = StageWork("x", 10.0, 4.0, steps=steps).after(steps // 2)
    assert steps > 1 and half.steps == steps - steps // 2
    assert half.train_tokens == pytest.approx(10.0 * half.steps / steps) and half.forward_tokens == pytest.approx(4.0 * half.steps / steps)
    ckpt = pipe.root / "stages" / align / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"step": steps // 2}))
    assert checkpoint_step(ckpt.parent) == steps // 2
    pipe.estimate(points)
    resumed = pipe.timer.estimates
    assert resumed[align] == pytest.approx(whole[align] * (steps - steps // 2) / steps)
    assert all(resumed[k] == whole[k] for k in whole if k != align)


@pytest.mark.parametrize("kind, dtype, batch", [("avx2", "auto", 100), ("native", "auto", 16), ("native", "float32", 100),
                                               ("gpu", "float32", 16), ("gpu", "auto", 16)])
def test_an_unset_eval_batch_follows_the_resolved_dtype(hardware, data_dir, tmp_path, caplog, kind, dtype, batch):
    # float32 on a CPU generates 100 answers at once (the same answers, ~1.8x faster); bfloat16
    # and GPUs keep 16. The resolved number decides the stage: a bf16 run's evaluations keep the
    # names their cached stages have under an explicit 16.
    from booster.config import load_config
    from booster.stages import eval_payload

    hardware(kind)
    cfg = load_config("demo", [f"run.out_dir={tmp_path}", f"data.dir={data_dir}", "grid={}", f"model.dtype={dtype}"])
    assert cfg.eval.batch_size is None
    with caplog.at_level(logging.INFO, logger="booster"):
        point = Pipeline(cfg).resolve_dtypes([cfg])[0]
    assert point.eval.batch_size == batch and f"eval.batch_size unset -> {batch}" in caplog.text
    explicit = load_config("demo", [f"run.out_dir={tmp_path}", f"data.dir={data_dir}", "grid={}",
                                    f"model.dtype={point.model.dtype}", f"eval.batch_size={batch}"])
    assert eval_payload(point, "x") == eval_payload(explicit, "x")
    set_cfg = load_config("demo", [f"run.out_dir={tmp_path}", f"data.dir={data_dir}", "grid={}", "eval.batch_size=7"])
    assert Pipeline(set_cfg).resolve_dtypes([set_cfg])[0].eval.batch_size == 7


def test_the_estimate_prices_amortised_booster_by_its_mean_passes(data_dir, tmp_path):
    # three passes at each refresh, one in between: (k + 2) / k per step
    from booster.config import load_config
    from booster.defenses import DEFENSES

    def passes(*overrides):
        cfg = load_config("demo", [f"run.out_dir={tmp_path}", f"data.dir={data_dir}", "grid={}", *overrides])
        return DEFENSES[cfg.align.defense].mean_passes(cfg.align)

    assert passes("align.defense=booster", "align.booster.every=1") == 3.0
    assert passes("align.defense=booster") == 1.25  # the demo's every=8
    assert passes("align.defense=sft") == 1.0
