"""Batched greedy generation: prompts sorted by length (little padding), left-padded, KV cache."""

from __future__ import annotations

from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from booster.text import format_prompt, pad_batch


EVAL_BATCH = 16
"""eval.batch_size where the batch shape can change answers (bfloat16, GPUs); also the default
before an unset batch followed the dtype, so the stage hash leaves it out (``booster.stages``)."""

FLOAT32_CPU_BATCH = 100
"""eval.batch_size for a float32 model on a CPU. There the batch shape leaves greedy answers as
they are (the float32 demo's seven models, 1,400 answers, identical at 16 and 100 by
scripts/same_answers.py; docs/results.md 3b) and 100 harmful answers at once decode ~1.8x
faster on 2 cores than batches of 16. In bfloat16 it changes answers (50-59 of 100), so 16 stays."""


def eval_batch_size(dtype: str, device_type: str) -> int:
    """What an unset ``eval.batch_size`` becomes for a model in resolved ``dtype`` on ``device_type``."""
    return FLOAT32_CPU_BATCH if dtype == "float32" and device_type == "cpu" else EVAL_BATCH


def prompt_ids(tokenizer: Any, prompts: list[str], fmt: str) -> list[list[int]]:
    """The token ids the model sees before each answer."""
    return [tokenizer(format_prompt(tokenizer, p, fmt), add_special_tokens=False)["input_ids"] for p in prompts]


def generate(model: Any, tokenizer: Any, prompts: list[str], *, fmt: str, max_new_tokens: int, batch_size: int,
             desc: str = "generate", on_batch: Callable[[list[int], list[str]], None] | None = None,
             min_new_tokens: int | None = None) -> list[str]:
    """Greedy answers to ``prompts`` in their order. ``on_batch(indices, answers)`` is called
    after each batch, so a caller can save progress. ``min_new_tokens``: decode at least this
    many tokens (a timing run; answers end at their first end-of-answer otherwise)."""
    from transformers import GenerationConfig

    ids = prompt_ids(tokenizer, prompts, fmt)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    extra = {} if min_new_tokens is None else {"min_new_tokens": min_new_tokens}
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                               use_cache=True, **extra)
    device = next(model.parameters()).device
    answers: list[str] = [""] * len(prompts)
    model.eval()
    with tqdm(total=len(prompts), desc=desc, dynamic_ncols=True) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = pad_batch([{"input_ids": ids[i]} for i in chunk], tokenizer.pad_token_id, left=True)
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.no_grad():
                out = model.generate(**batch, generation_config=gen_cfg)
            texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            texts = [t.strip() for t in texts]
            for i, t in zip(chunk, texts):
                answers[i] = t
            if on_batch is not None:
                on_batch(chunk, texts)
            bar.update(len(chunk))
    return answers


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def generate_vllm(model_dir: str, tokenizer: Any, prompts: list[str], *, fmt: str, max_new_tokens: int) -> list[str]:
    """Greedy answers with vLLM (GPU only) from a merged model directory, in the prompts' order."""
    if not vllm_available():
        raise RuntimeError("eval.engine=vllm needs the vllm package on a GPU machine (pip install vllm); "
                           "or use eval.engine=hf")
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, tokenizer=model_dir, dtype="auto", trust_remote_code=False)
    texts = [format_prompt(tokenizer, p, fmt) for p in prompts]
    outs = llm.generate(texts, SamplingParams(temperature=0.0, max_tokens=max_new_tokens))
    return [o.outputs[0].text.strip() for o in outs]
