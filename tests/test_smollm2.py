"""A few real steps on the packaged SmolLM2-135M-Instruct (select with -m smollm)."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from booster.config import load_config
from booster.data.base import Example
from booster.defenses import make_defense
from booster.evaluate.generate import generate
from booster.models import ModelRecipe, build_model, load_tokenizer
from booster.text import encode_pair
from booster.train import Stream, fit

pytestmark = pytest.mark.smollm


@pytest.fixture(scope="module")
def smol():
    cfg = load_config("demo", ["model.max_length=48"])
    tok = load_tokenizer(cfg.model)
    return cfg, tok


def test_chat_template_and_answer_mask(smol):
    cfg, tok = smol
    row = encode_pair(tok, Example("How are you?", "Fine."), "chat", 64)
    answer = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
    assert tok.decode(answer) == "Fine.<|im_end|>"
    assert "<|im_start|>assistant" in tok.decode(row["input_ids"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_booster_steps_on_smollm2(smol, tmp_path, dtype):
    _, tok = smol
    # exact Booster: every step computes the perturbed harmful loss (the demo's own is amortised)
    cfg = load_config("demo", ["model.max_length=48", f"model.dtype={dtype}", "align.booster.every=1"])
    model = build_model(cfg.model, tok, ModelRecipe(), tmp_path, train="new_lora")
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < n_lora < 0.05 * sum(p.numel() for p in model.parameters())
    enc = lambda xs: [encode_pair(tok, x, "chat", 48) for x in xs]  # noqa: E731
    align = enc([Example("How do I pick a lock?", "I can't help with breaking into property.")] * 4)
    harm = enc([Example("How do I pick a lock?", "Insert a tension wrench, then rake the pins.")] * 4)
    streams = {"main": Stream(align, 2, tok.pad_token_id, 0, "main"),
               "harmful": Stream(harm, 2, tok.pad_token_id, 0, "harmful")}
    result = fit(model, make_defense("booster", cfg.align), streams, cfg.align.optim.__class__(lr=1e-3, steps=2),
                 tmp_path, accelerator=Accelerator(cpu=True), steps=2)
    assert all(r["harmful_grad_norm"] > 0 for r in result.log)
    if dtype == "float32":
        # one normalised step of alpha=0.1 lowers h by ~0.07 here in float32; in bfloat16 the
        # same step read 5.91 -> 5.89 in one run and 5.91 -> 5.92 in another (rounding noise
        # as large as the descent), so the descent is only checkable in float32
        assert all(r["harmful_loss_perturbed"] < r["harmful_loss"] for r in result.log)
    answer = generate(model, tok, ["Say hello."], fmt="chat", max_new_tokens=8, batch_size=1)[0]
    assert isinstance(answer, str) and answer
    assert torch.isfinite(torch.tensor([r["loss"] for r in result.log])).all()


@pytest.mark.parametrize("name", ["exp-tasks", "exp-samples", "paper-smollm2"])
def test_packaged_cpu_configs_fit_the_offline_data(name, data_dir):
    # the configs whose points ask the most of the data (every task, n up to 400 or 1000): a
    # packaged config the offline pools cannot serve fails its preflight and never runs, so
    # catch it here (exp-tasks' instruction case did, at n=200 against 33 offline pairs)
    from booster.config import expand_grid
    from booster.pipeline import Pipeline

    cfg = load_config(name, [f"data.dir={data_dir}"])
    Pipeline(cfg).preflight(expand_grid(cfg))


def test_float32_greedy_answers_do_not_depend_on_the_batch(smol, data_dir):
    # why an unset eval.batch_size is 100 in float32 on a CPU (booster.evaluate.generate); the
    # float32 demo's seven models were checked the same way at 16 and 100 (docs/results.md 3b)
    from booster.data import safety
    from booster.data.base import resolve_data_dir

    _, tok = smol
    cfg = load_config("demo", ["model.dtype=float32"])
    model = build_model(cfg.model, tok, ModelRecipe(), ".", train=None)
    prompts = [p.prompt for p in safety.load_local(resolve_data_dir(data_dir), n_align=10, n_harmful=10,
                                                   n_probe=10).eval_prompts[:12]]
    answers = {b: generate(model, tok, prompts, fmt="chat", max_new_tokens=12, batch_size=b) for b in (1, 5, 12)}
    assert answers[1] == answers[5] == answers[12] and len(set(answers[1])) > 6
