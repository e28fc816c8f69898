"""Typed experiment configuration: nested dataclasses, YAML files, dotted overrides.

A config file only states what differs from the defaults below. Unknown keys and wrong
types are rejected (OmegaConf structured configs), ranges are checked in ``__post_init__``,
and every error is one line that names the key and the fix. Task and judge names are checked
against the plain lists of ``booster.names``, defence names against the defence registry; the files and the command line are
read by ``booster.config_sources``.

    cfg = load_config("demo", ["align.optim.lr=1e-3", "grid.attack.p=[0,0.1]"])
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from booster.checks import ConfigError
from booster.checks import check as _check
from booster.checks import one_of as _one_of
from booster.config_sources import format_omegaconf_error, parse_overrides, read_yaml, resolve_config_path
# Each defence's settings live beside it; the stage configs below hold them as sections, and the
# defence names are the registry's (the package holds no data or model code, only the classes).
from booster.defenses import defense_names
from booster.defenses.booster import BoosterConfig
from booster.defenses.lisa import LisaConfig
from booster.defenses.repnoise import RepNoiseConfig
from booster.defenses.vaccine import VaccineConfig
from booster.names import JUDGES, TASKS
from booster.tracking import tracker_names


@dataclass
class LoraConfig:
    r: int = 32
    """LoRA rank (paper: 32)."""
    alpha: float = 4.0
    """LoRA alpha; the update is scaled by alpha/r (paper: 4, so 0.125)."""
    dropout: float = 0.0
    """LoRA dropout (paper: 0)."""
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])
    """Module names that get adapters (paper: q, k, v projections)."""

    def __post_init__(self) -> None:
        _check(self.r > 0, f"model.lora.r must be > 0, got {self.r}")
        _check(self.alpha > 0, f"model.lora.alpha must be > 0, got {self.alpha}")
        _check(0 <= self.dropout < 1, f"model.lora.dropout must be in [0, 1), got {self.dropout}")
        _check(len(self.targets) > 0, "model.lora.targets is empty; name at least one module, e.g. [q_proj]")


@dataclass
class ModelConfig:
    name: str = "smollm2"
    """'smollm2' (the packaged SmolLM2-135M-Instruct GGUF, converted once to a cache),
    'tiny' (a random 2-layer Llama for tests), a local model directory, or a hub id."""
    dtype: str = "float32"
    """Weights of the frozen base: float32, bfloat16, or auto (bfloat16 where the hardware runs it
    natively: a GPU that supports it, a CPU with AVX512-BF16 or AMX; float32 elsewhere, since a CPU
    without it emulates bfloat16 ~30x slower). Trainable LoRA weights stay float32. A stage is
    hashed and recorded under the dtype auto resolved to (``booster.models.resolve_dtype``)."""
    finetune: str = "lora"
    """'lora' (peft adapters, the paper's setting) or 'full' (every weight trains)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    prompt_format: str = "chat"
    """'chat' uses the tokenizer's chat template; 'alpaca' the Alpaca prompt (reference code)."""
    max_length: int = 256
    """Longest training sequence in tokens, prompt and answer together (paper: 256)."""
    trust_remote_code: bool = False
    """Allow a hub model to run its own Python code. Off unless you trust the repository."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for a hub id."""

    def __post_init__(self) -> None:
        _check(bool(self.name.strip()), "model.name is empty; use smollm2, tiny, a directory or a hub id")
        _one_of(self.dtype, ("float32", "bfloat16", "auto"), "model.dtype")
        _one_of(self.finetune, ("lora", "full"), "model.finetune")
        _one_of(self.prompt_format, ("chat", "alpaca"), "model.prompt_format")
        _check(self.max_length >= 16, f"model.max_length must be >= 16 tokens, got {self.max_length}")


@dataclass
class DataConfig:
    dir: str | None = None
    """Data directory. Unset: $BOOSTER_DATA_DIR, else ../shared/data beside the checkout."""
    source: str = "local"
    """'local' reads the data directory; 'hub' loads BeaverTails and the task from the Hub."""
    n_align: int = 1000
    """Alignment pairs (harmful prompt -> safe answer), the data of f."""
    n_harmful: int = 300
    """Harmful pairs (harmful prompt -> harmful answer) used in alignment, the data of h."""
    n_probe: int = 50
    """Held-out harmful pairs for the harmful-loss probe (and as many held-out alignment pairs for
    the alignment-loss probe); never trained on. Each probe costs a forward pass per pair."""
    split_seed: int = 0
    """Seed of the fixed split into alignment / harmful / attack / probe / evaluation sets."""
    benign_tasks: list[str] = field(default_factory=list)
    """Tasks whose training examples are mixed into the alignment data (f), so that alignment
    teaches to refuse harmful requests *and* answer benign ones (paper: none)."""
    n_benign: int = 0
    """Benign examples mixed into alignment, drawn evenly from data.benign_tasks."""

    def __post_init__(self) -> None:
        _one_of(self.source, ("local", "hub"), "data.source")
        for task in self.benign_tasks:
            _one_of(task, tuple(TASKS), "data.benign_tasks[]")
        _check(self.n_benign >= 0, f"data.n_benign must be >= 0, got {self.n_benign}")
        _check(not self.n_benign or self.benign_tasks, "data.n_benign > 0 needs data.benign_tasks, e.g. [agnews, gsm8k]")
        for key in ("n_align", "n_harmful", "n_probe"):
            _check(getattr(self, key) >= 1, f"data.{key} must be >= 1, got {getattr(self, key)}")


@dataclass
class OptimConfig:
    lr: float = 5e-4
    """AdamW learning rate, constant unless schedule says otherwise."""
    weight_decay: float = 0.1
    batch_size: int = 10
    """Examples per micro-batch, per data stream, over all processes together: under
    ``accelerate launch`` with N processes each takes batch_size/N of them (a multiple of N)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; the defence sees them together. SFT, Booster and Lisa
    weight each by its answer tokens (one large batch, token for token); Vaccine and RepNoise
    average the micro-batches' means (defenses/base.py)."""
    steps: int | None = None
    """Optimizer steps. Unset: epochs over the main data stream."""
    epochs: float = 20.0
    schedule: str = "constant"
    """'constant', 'linear' or 'cosine' (transformers schedulers)."""
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    """Clip the combined gradient (after the defence has built it) to this norm; null: no
    clipping. 1.0 is what the reference inherited from the HF Trainer."""
    checkpoint_every: int = 50
    """Save a resumable checkpoint every this many steps (and at the end)."""

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.batch_size >= 1, f"optim.batch_size must be >= 1, got {self.batch_size}")
        _check(self.grad_accum >= 1, f"optim.grad_accum must be >= 1, got {self.grad_accum}")
        _check(self.steps is None or self.steps >= 1, f"optim.steps must be >= 1, got {self.steps}")
        _check(self.epochs > 0, f"optim.epochs must be > 0, got {self.epochs}")
        _one_of(self.schedule, ("constant", "linear", "cosine"), "optim.schedule")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(self.max_grad_norm is None or self.max_grad_norm > 0,
               f"optim.max_grad_norm must be > 0 or null, got {self.max_grad_norm}")
        _check(self.checkpoint_every >= 1, f"optim.checkpoint_every must be >= 1, got {self.checkpoint_every}")


@dataclass
class AlignConfig:
    defense: str = "sft"
    """Alignment-stage defence: none (the unaligned model), sft, booster, vaccine, repnoise,
    booster_vaccine, booster_no_last_term (the rebuttal's ablation)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4, epochs=20))
    booster: BoosterConfig = field(default_factory=BoosterConfig)
    vaccine: VaccineConfig = field(default_factory=VaccineConfig)
    repnoise: RepNoiseConfig = field(default_factory=RepNoiseConfig)
    eval_every: int = 10
    """Measure held-out harmful and alignment loss every this many steps (0: never)."""

    def __post_init__(self) -> None:
        _one_of(self.defense, ("none", *defense_names("align")), "align.defense")
        _check(self.eval_every >= 0, f"align.eval_every must be >= 0, got {self.eval_every}")


@dataclass
class AttackConfig:
    enabled: bool = True
    """False: stop after alignment (evaluate the aligned model only)."""
    task: str = "sst2"
    """Fine-tuning task of the simulated user."""
    n: int = 1000
    """Fine-tuning samples (paper: 1000)."""
    p: float = 0.1
    """Fraction of the n samples replaced by harmful pairs (paper: 0.1)."""
    mix: str = "harmful"
    """What the p·n mixed-in samples are: 'harmful' (the attack), or a task name for a benign
    control with the attack's mixing, e.g. 'gsm8k' (long benign answers): it separates what
    harmful content does from what any long answers in the mix do."""
    adapter: str = "single"
    """'single': keep training the alignment LoRA (Booster's protocol in the reference);
    'merge_new': merge the alignment LoRA into the weights, then train a new LoRA
    (the reference's protocol for the baselines). Ignored for full fine-tuning."""
    defense: str = "sft"
    """Fine-tuning-stage defence: sft (a plain attack) or lisa."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, epochs=20))
    lisa: LisaConfig = field(default_factory=LisaConfig)
    probe_every: int = 10
    """Measure the harmful loss on held-out harmful pairs every this many steps (0: never)."""

    def __post_init__(self) -> None:
        _one_of(self.task, tuple(TASKS), "attack.task")
        _one_of(self.adapter, ("single", "merge_new"), "attack.adapter")
        _one_of(self.mix, ("harmful", *TASKS), "attack.mix")
        _check(self.mix != self.task, f"attack.mix={self.mix} is the attack's own task; mix in 'harmful' or another task")
        _one_of(self.defense, defense_names("attack"), "attack.defense")
        _check(self.n >= 1, f"attack.n must be >= 1, got {self.n}")
        _check(0.0 <= self.p <= 1.0, f"attack.p must be in [0, 1], got {self.p}")
        _check(self.probe_every >= 0, f"attack.probe_every must be >= 0, got {self.probe_every}")


@dataclass
class EvalConfig:
    n_harmful: int = 100
    """Held-out harmful prompts (AdvBench locally, BeaverTails test on the hub) to answer."""
    n_task: int = 200
    """Task evaluation items (SST-2: from the dev split)."""
    max_new_tokens: int = 64
    """Answer length for harmful prompts (paper: 512; judged on what is generated)."""
    task_max_new_tokens: int | None = None
    """Answer length for task items. Unset: the task's own (SST-2 8, GSM8K 256, ...)."""
    batch_size: int | None = None
    """Prompts generated together. Unset: 100 for a float32 model on a CPU, 16 otherwise
    (``booster.evaluate.generate.eval_batch_size``; the resolved number decides the stage)."""
    engine: str = "hf"
    """Generation engine: 'hf' (transformers, batched, KV cache; CPU or GPU) or 'vllm' (GPU only,
    optional package; the model is merged into one directory first)."""
    judge: str = "classifier"
    """Harmfulness judge: classifier (judge v2, the offline MiniLM harm classifier, built on first
    use; docs/judge.md), classifier_v1 (the first one), refusal (phrase matcher), beaver_dam (the
    paper's 7B judge, GPU), raters (two blind raters' settled labels from a labelled file)."""
    judge_path: str | None = None
    """Judge weights: a built classifier directory (`booster judge train --out DIR`), or for
    beaver_dam a local copy or hub id, or for raters the labelled file. Unset: the judge's default."""
    prompts: str | None = None
    """Your own harmful prompts: a .txt file (one per line) or .jsonl (a 'prompt' field, optionally
    a 'source'); the harmful score is also reported per source. Trained stages are reused: only
    the answers are new. Its content (not its path) decides the evaluation stage."""
    prompts_mode: str = "replace"
    """replace: the file's prompts instead of the held-out AdvBench ones; add: the first
    eval.n_harmful AdvBench prompts, then the file's."""

    def __post_init__(self) -> None:
        _check(self.n_harmful >= 1, f"eval.n_harmful must be >= 1, got {self.n_harmful}")
        _check(self.n_task >= 0, f"eval.n_task must be >= 0, got {self.n_task}")
        _check(self.max_new_tokens >= 1, f"eval.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _check(self.task_max_new_tokens is None or self.task_max_new_tokens >= 1,
               f"eval.task_max_new_tokens must be >= 1, got {self.task_max_new_tokens}")
        _check(self.batch_size is None or self.batch_size >= 1, f"eval.batch_size must be >= 1, got {self.batch_size}")
        _one_of(self.judge, tuple(JUDGES), "eval.judge")
        _one_of(self.engine, ("hf", "vllm"), "eval.engine")
        _one_of(self.prompts_mode, ("replace", "add"), "eval.prompts_mode")


@dataclass
class RunConfig:
    out_dir: str = "runs/demo"
    """Run directory; stages are cached under <out_dir>/stages by their config hash."""
    seed: int = 0
    threads: int | None = None
    """CPU threads for torch. Unset: all cores."""
    controls: bool = True
    """Also evaluate the unaligned model and every aligned model before the attack."""
    estimate: bool = True
    """Before the first stage, time a few training steps, a probe batch and a few decoding
    steps here and log how long the stages still to run will take (``booster.estimate``)."""
    log_with: str = "none"
    """Experiment trackers (accelerate's): none, tensorboard, wandb, mlflow, or several joined by
    commas. Every training step's loss terms and every probe, one tracker run per stage, files
    under <out_dir>/tracking (``booster.tracking``)."""

    def __post_init__(self) -> None:
        try:
            tracker_names(self.log_with)
        except ValueError as e:
            raise ConfigError(str(e)) from None


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    """Dotted key -> list of values; the experiment runs every combination, e.g.
    {align.defense: [sft, booster], attack.p: [0.0, 0.1]}."""
    cases: list[dict[str, Any]] = field(default_factory=list)
    """Explicit settings, each a mapping of dotted keys to values, each crossed with the grid:
    for sweeps that are a list of chosen settings rather than a full product."""


def build_config(layers: list[tuple[str, dict[str, Any]]]) -> ExperimentConfig:
    """Merge mappings over the defaults, each tagged with where it came from for errors."""
    merged = OmegaConf.structured(ExperimentConfig)
    for source, layer in layers:
        try:
            merged = OmegaConf.merge(merged, OmegaConf.create(layer))
        except OmegaConfBaseException as e:
            raise ConfigError(format_omegaconf_error(e, source)) from None
        except (TypeError, ValueError) as e:  # e.g. a list where a section (mapping) belongs
            raise ConfigError(f"{source}: {str(e).splitlines()[0]}; each section (model:, grid:, ...) "
                              "is a mapping of keys") from None
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(format_omegaconf_error(e, "config")) from None
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"config: {str(e).splitlines()[0]}") from None
    for key, values in cfg.grid.items():
        _check(isinstance(values, list) and len(values) > 0, f"grid.{key} must be a non-empty list")
        for v in values:
            _apply(cfg, {key: v}, f"grid.{key}")  # validates the key and the value's type
    for i, case in enumerate(cfg.cases):
        _check(isinstance(case, dict) and case, f"cases[{i}] must be a non-empty mapping of dotted keys to values")
        _apply(cfg, case, f"cases[{i}]")
    return cfg


def load_config(name_or_path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    layers: list[tuple[str, dict[str, Any]]] = []
    plain, grid, clear = parse_overrides(overrides or [])
    if name_or_path is not None:
        path = resolve_config_path(name_or_path)
        layer = read_yaml(path)
        if clear:
            layer.pop("grid", None)
            layer.pop("cases", None)
        layers.append((str(path), layer))
    if plain:
        try:
            layers.append(("command line", OmegaConf.to_container(OmegaConf.from_dotlist(plain))))
        except OmegaConfBaseException as e:
            raise ConfigError(format_omegaconf_error(e, "command line")) from None
    if grid:
        layers.append(("command line", {"grid": grid}))
    return build_config(layers)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _apply(cfg: ExperimentConfig, settings: dict[str, Any], source: str) -> ExperimentConfig:
    """A copy of ``cfg`` with dotted ``settings`` applied and re-validated (grid and cases dropped)."""
    layer: dict[str, Any] = {}
    for key, value in settings.items():
        parts = str(key).split(".")
        _check(parts[0] not in ("grid", "cases"), f"{source}: {key} cannot vary the grid or the cases")
        node = layer
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            _check(isinstance(node, dict), f"{source}: {key} conflicts with another key of the same setting")
        node[parts[-1]] = value
    base = to_dict(cfg)
    base.pop("grid")
    base.pop("cases")
    return build_config([("defaults", base), (source, layer)])


def varied_keys(cfg: ExperimentConfig) -> list[str]:
    """The dotted keys a sweep varies: those of its cases, then those of its grid."""
    keys = [k for case in cfg.cases for k in case]
    return list(dict.fromkeys(keys + list(cfg.grid)))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested settings dict (a stage's config.json) as dotted keys, the grid's spelling."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def get_dotted(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def expand_grid(cfg: ExperimentConfig) -> list[ExperimentConfig]:
    """Every case crossed with every combination of the grid's values, each a concrete config."""
    if not cfg.grid and not cfg.cases:
        return [cfg]
    keys = list(cfg.grid)
    points = []
    for case in cfg.cases or [{}]:
        for values in itertools.product(*(cfg.grid[k] for k in keys)):
            points.append(_apply(cfg, {**case, **dict(zip(keys, values))}, "sweep point"))
    return points
