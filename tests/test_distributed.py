"""Two processes (accelerate launch, gloo on CPU) give the update one process gives on the same
global batch, for SFT and Booster, under DDP and FSDP2; unsupported launches fail first.

How: ``tests/dist_worker.py`` trains a tiny model with ``fit`` (2 steps, 2 micro-batches per
step, global micro-batch 4, so 2 rows per process; gradient clipping at 1.0; a loss probe every
step) and records every step's combined gradient (what the defence leaves in ``.grad``, before
clipping), the logged metrics, the probe, the trained weights and the files the pipeline's
save path writes. Cases: SFT and Booster with LoRA, Booster resumed from a checkpoint after
one step, Booster with full fine-tuning (tied embeddings included). The rows differ in
length and answer length, so the two halves of a micro-batch hold different numbers of target
tokens: a per-process mean loss would be visibly wrong.

Tolerance: the model runs in float64, so only summation order separates the runs. Every
gradient, weight and saved tensor must agree to ‖a − b‖ / ‖b‖ ≤ 1e-12 (measured: ≤ 2.1e-14
for gradients, ≤ 3.1e-14 for weights; a per-process token mean or a per-shard norm gives
> 1e-2). Logged losses come out of transformers' float32 cross-entropy: rel 1e-6 (the
regulariser, a difference of two such losses: abs 1e-6). In float32 (DIST_WORKER_DTYPE=float32)
the same runs agree to ≤ 1.4e-5 (gradients) and ≤ 2.1e-5 (weights after two AdamW steps).

FSDP on CPU: accelerate selects FSDP only on accelerators (an FSDP config runs as DDP on
CPU), so the worker switches accelerate's state to FSDP2 with the plugin accelerate built
from configs/accelerate/fsdp.yaml; the model is then prepared by accelerate's own FSDP2 path.
Takes about 1.5-2 minutes on 2 cores: three launches of two processes each.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import booster
from booster.config import load_config
from booster.distributed import DistributedError, check_supported
from booster.train import LOSS_DENOMINATOR, Stream

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = ROOT / "configs" / "accelerate"
SRC = Path(booster.__file__).resolve().parents[1]
CASES = ["sft", "booster", "booster-resumed", "booster-full", "booster-low-memory"]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _worker():
    spec = importlib.util.spec_from_file_location("dist_worker", Path(__file__).with_name("dist_worker.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: Path, *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    """accelerate launch with two CPU processes, on a free port, one thread each."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--main_process_port", str(_free_port()), *args]
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# ------------------------------------------------------------------ data sharding (no processes)
def test_shards_partition_each_global_micro_batch():
    w = _worker()
    rows = w.rows(16, 0)
    one = Stream(rows, 4, 0, seed=0, name="main")
    halves = [one.shard(r, 2) for r in range(2)]
    for index in range(6):  # crosses an epoch boundary (16 rows, 4 per micro-batch)
        full = one.batch(index)
        assert LOSS_DENOMINATOR not in full  # one process: the batch is what it always was
        parts = [h.batch(index) for h in halves]
        assert [p["input_ids"].shape[0] for p in parts] == [2, 2]
        for k, part in enumerate(parts):
            width = part["input_ids"].shape[1]
            torch.testing.assert_close(part["input_ids"], full["input_ids"][2 * k:2 * k + 2, :width])
            assert not full["attention_mask"][2 * k:2 * k + 2, width:].any()  # only padding cut off
        targets = int((full["labels"][:, 1:] != -100).sum())
        assert [float(p[LOSS_DENOMINATOR]) for p in parts] == [targets / 2, targets / 2]
    counts = [int((h.batch(0)["labels"][:, 1:] != -100).sum()) for h in halves]
    assert counts[0] != counts[1], "the test data must give the two processes different token counts"
    assert one.shard(0, 1) is one


def test_uneven_split_of_the_global_batch_is_refused():
    with pytest.raises(Exception, match="batch_size=5 .* multiple of 2"):
        Stream(_worker().rows(8, 0), 5, 0, seed=0, name="main").shard(0, 2)


# ------------------------------------------------------------------ unsupported launches
def _stub(kind: str, **state):
    return SimpleNamespace(distributed_type=kind, state=SimpleNamespace(**state), num_processes=2)


@pytest.mark.parametrize("accelerator, defense, passes, accum, needle", [
    (_stub("DistributedType.DEEPSPEED"), "booster", 3, 1, "DeepSpeed steps the optimizer inside backward"),
    (_stub("DistributedType.DEEPSPEED"), "sft", 1, 2, "optim.grad_accum=1"),
    (_stub("DistributedType.DEEPSPEED", deepspeed_plugin=SimpleNamespace(zero_stage=3)), "sft", 1, 1, "ZeRO-3"),
    (_stub("DistributedType.FSDP", fsdp_plugin=SimpleNamespace(fsdp_version=1)), "sft", 1, 1, "fsdp_version: 2"),
])
def test_unsupported_launches_fail_with_one_line(accelerator, defense, passes, accum, needle):
    with pytest.raises(DistributedError, match=needle) as e:
        check_supported(accelerator, defense, passes, accum)
    assert "\n" not in str(e.value)


def test_supported_launches_pass():
    check_supported(_stub("DistributedType.DEEPSPEED"), "sft", 1, 1)
    check_supported(_stub("DistributedType.FSDP", fsdp_plugin=SimpleNamespace(fsdp_version=2)), "booster", 3, 4)
    check_supported(_stub("DistributedType.MULTI_GPU"), "booster", 3, 4)


def test_deepspeed_with_booster_fails_before_any_stage(tmp_path, data_dir):
    from accelerate.utils import DistributedType

    from booster.pipeline import Pipeline

    cfg = load_config("tiny", [f"run.out_dir={tmp_path / 'run'}", f"data.dir={data_dir}"])
    pipeline = Pipeline(cfg)
    pipeline.__dict__["accelerator"] = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=2,
                                                       is_main_process=True, state=SimpleNamespace())
    with pytest.raises(DistributedError, match="use DDP|DDP or FSDP"):
        pipeline.run()
    assert not (tmp_path / "run" / "stages").exists()


# ------------------------------------------------------------------ two processes vs one
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, the same global batches (in this process; the loop's ordinary path)."""
    from accelerate import Accelerator

    w, out = _worker(), tmp_path_factory.mktemp("one")
    accelerator = Accelerator(cpu=True)
    return {case: w.run_case(accelerator, case, out / case) for case in CASES}


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Two processes per mode, each launched once for the module."""
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("two")
    fsdp_cpu = out / "fsdp_cpu.yaml"  # the shipped FSDP config, on CPU
    fsdp_cpu.write_text((ACCELERATE_CONFIGS / "fsdp.yaml").read_text().replace("use_cpu: false", "use_cpu: true"))
    configs = {"ddp": ACCELERATE_CONFIGS / "ddp_cpu.yaml", "fsdp": fsdp_cpu}
    cache: dict[str, dict] = {}

    def get(mode: str) -> dict:
        if mode not in cache:
            # a launch that died leaves finished checkpoints behind, and a relaunch into them would
            # resume at the last step and train nothing: every launch starts from an empty directory
            shutil.rmtree(out / mode, ignore_errors=True)
            launch(configs[mode], str(Path(__file__).with_name("dist_worker.py")), str(out), mode)
            cache[mode] = {"info": json.loads((out / f"{mode}.json").read_text()),
                           **{case: load_file(str(out / f"{mode}-{case}.safetensors")) for case in CASES}}
        return cache[mode]

    return get


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_ran_as_intended(launched, mode):
    info = launched(mode)["info"]
    assert info["num_processes"] == 2
    assert set(info["rows_per_micro_batch"]) == {2}  # each process took its half of the global micro-batch of 4
    assert info["not_restored_on_any_process"] == 0  # Booster's perturbed pass left every shard bit-exact
    if mode == "fsdp":
        assert info["distributed_type"].endswith("FSDP") and info["param_type"] == "DTensor"
        assert info["local_numel"] < info["numel"]  # the trainable weights really were sharded
    else:
        assert info["distributed_type"].endswith("MULTI_CPU") and info["local_numel"] == info["numel"]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("case", CASES)
def test_two_processes_match_one(launched, reference, mode, case):
    got, ref = launched(mode)[case], reference[case]
    assert set(got) == set(ref)
    for prefix in ("step1.grad.", "final.", "saved.", "probe2"):
        assert any(k.startswith(prefix) for k in ref), prefix
    # low memory recovers ∇h(w) from w − w̃: a last-bit difference in w̃ (the processes' summation
    # order) is amplified by 1/c = ‖∇h‖/α, so that case gets a looser (still float64-tight) bound
    tol = 1e-9 if case == "booster-low-memory" else 1e-12
    for key in sorted(ref):
        if key.startswith(("step", "final.", "saved.")):
            assert rel_err(got[key], ref[key]) <= tol, (key, rel_err(got[key], ref[key]))
        elif key.endswith(".regulariser"):
            assert abs(got[key].item() - ref[key].item()) <= 1e-6, key
        else:
            assert got[key].item() == pytest.approx(ref[key].item(), rel=1e-6, abs=1e-12), key


# ------------------------------------------------------------------ the whole pipeline, launched
def test_pipeline_under_accelerate_launch(tmp_path, data_dir):
    out = tmp_path / "run"
    result = launch(ACCELERATE_CONFIGS / "ddp_cpu.yaml", "-m", "booster.cli", "run", "tiny", "grid={}",
                    "align.defense=booster", "run.controls=false", f"--out-dir={out}", f"--data-dir={data_dir}")
    assert result.stdout.count("# Results:") == 1  # the table, printed by the main process only
    stages = sorted(p.name.split("-")[0] for p in (out / "stages").iterdir())
    assert stages == ["align", "attack", "eval"]
    for d in (out / "stages").iterdir():
        assert (d / "DONE.json").is_file(), d
        assert json.loads((d / "meta.json").read_text())["processes"] == 2
    cfg = load_config("tiny")
    for kind, steps in (("align", cfg.align.optim.steps), ("attack", cfg.attack.optim.steps)):
        (d,) = (out / "stages").glob(f"{kind}-*")
        log = [json.loads(line) for line in (d / "train_log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == list(range(steps))  # one writer: no duplicated rows
        assert (d / "model" / "adapter_model.safetensors").is_file() and not (d / "checkpoint").exists()
    metrics = json.loads(next((out / "stages").glob("eval-*")).joinpath("metrics.json").read_text())
    assert 0 <= metrics["harmful_score"] <= 100
    assert (out / "results.md").is_file() and "[rank 1]" not in (out / "booster.log").read_text()


# ------------------------------------------------------------------ shipped configs
def test_accelerate_configs_load_with_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file

    found = {p.stem: load_config_from_file(str(p)) for p in ACCELERATE_CONFIGS.glob("*.yaml")}
    assert {"ddp", "fsdp", "ddp_cpu"} <= set(found)
    assert str(found["fsdp"].distributed_type).endswith("FSDP") and found["fsdp"].fsdp_config["fsdp_version"] == 2
    assert found["ddp_cpu"].use_cpu and found["ddp_cpu"].num_processes == 2
    for path in ACCELERATE_CONFIGS.glob("*.yaml"):
        assert path.read_text().startswith("# accelerate launch --config_file configs/accelerate/"), path


GPU_CONFIGS = {"llama2-7b": "meta-llama/Llama-2-7b-hf", "gemma2-9b": "google/gemma-2-9b", "qwen2-7b": "Qwen/Qwen2-7B"}


@pytest.mark.parametrize("name", sorted(GPU_CONFIGS))
def test_gpu_configs_have_the_papers_settings(name):
    """They load and resolve without downloading anything (the beaver_dam judge is only named,
    not loaded)."""
    from booster.models import resolve_source

    cfg = load_config(name)
    assert cfg.eval.judge == "beaver_dam"
    assert resolve_source(cfg.model) == ("hub", GPU_CONFIGS[name])
    m, a, t = cfg.model, cfg.align, cfg.attack
    assert (m.dtype, m.finetune, m.max_length, m.prompt_format) == ("bfloat16", "lora", 256, "alpaca")
    assert (m.lora.r, m.lora.alpha, m.lora.dropout, m.lora.targets) == (32, 4.0, 0.0, ["q_proj", "k_proj", "v_proj"])
    assert (cfg.data.source, cfg.data.n_align, cfg.data.n_harmful) == ("hub", 5000, 5000)
    assert (a.booster.lam, a.booster.alpha) == (5.0, 0.1)
    assert (a.optim.lr, a.optim.epochs, a.optim.batch_size, a.optim.weight_decay, a.optim.schedule) == \
        (5e-4, 20.0, 10, 0.1, "constant")
    assert (t.n, t.p, t.task, t.adapter) == (1000, 0.1, "sst2", "single")
    assert (t.optim.lr, t.optim.epochs, t.optim.batch_size, t.optim.weight_decay) == (1e-5, 20.0, 10, 0.1)
    assert (cfg.eval.n_harmful, cfg.eval.max_new_tokens, cfg.eval.n_task) == (1000, 512, 872)
    assert cfg.grid == {"align.defense": ["sft", "booster"]}
