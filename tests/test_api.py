"""Booster in a user's own loop (booster.BoosterStep): the hand-computed gradient, exact
restore, the same weights as the project's own fit, accumulation as one large batch, bf16."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model

from booster import BoosterStep, booster_backward
from booster.config import AlignConfig, BoosterConfig, OptimConfig
from booster.defenses import make_defense
from booster.models import tiny_model
from booster.text import pad_batch
from booster.train import Stream, fit

VOCAB = 101


def rows(n, seed, length=10, prompt=4):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def lora_tiny(dtype=torch.float32):
    torch.manual_seed(0)
    return get_peft_model(tiny_model(VOCAB).to(dtype), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def test_hand_computed_gradient_added_to_what_is_there():
    # the toy of tests/test_booster_math.py: f = ½‖w − a‖², h = ½‖w − b‖², w = (1, 2), a = 0,
    # b = (4, 6): g = ∇f + 5·(∇h(w) − ∇h(w̃)) = (0.7, 1.6)
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    a, b = torch.zeros(2), torch.tensor([4.0, 6.0])

    def loss(batch):
        return 0.5 * ((w - (a if batch["kind"] == "f" else b)) ** 2).sum()

    w.grad = torch.tensor([1.0, 1.0])  # a gradient already there is kept and added to
    step = BoosterStep(torch.nn.Module(), lam=5.0, alpha=0.1, loss_fn=loss, params=[w])
    metrics = step.backward({"kind": "f"}, {"kind": "h"})
    torch.testing.assert_close(w.grad, torch.tensor([1.7, 2.6]), rtol=0, atol=1e-6)
    torch.testing.assert_close(w.detach(), torch.tensor([1.0, 2.0]), rtol=0, atol=0)
    assert metrics["harmful_grad_norm"] == pytest.approx(5.0) and metrics["loss"] == pytest.approx(2.5)


def test_weights_restored_bit_for_bit_and_the_function_equals_the_object():
    model = lora_tiny()
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    align, harmful = pad_batch(rows(3, 0), 0), pad_batch(rows(3, 1), 0)
    booster_backward(model, align, harmful, lam=5.0, alpha=0.1)
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    once = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    BoosterStep(model).backward(align, harmful)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, once))


def test_a_plain_loop_gives_the_weights_of_the_projects_own_fit(tmp_path):
    steps, optim = 3, OptimConfig(lr=1e-2, batch_size=3, steps=3, checkpoint_every=10)
    streams = {"main": Stream(rows(12, 0), 3, 0, 0, "main"), "harmful": Stream(rows(12, 1), 3, 0, 0, "harmful")}

    ours = lora_tiny()
    fit(ours, make_defense("booster", AlignConfig(booster=BoosterConfig())), streams, optim, tmp_path,
        accelerator=Accelerator(cpu=True), steps=steps)

    model = lora_tiny()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
    step = BoosterStep(model, lam=5.0, alpha=0.1)
    for i in range(steps):
        step.backward(streams["main"].batch(i), streams["harmful"].batch(i))
        torch.nn.utils.clip_grad_norm_(params, optim.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    theirs = dict(ours.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, theirs[name]), name


def rows_of(prompts, length=10, seed=3):
    """Rows of one length whose prompts (masked) take ``prompts[i]`` tokens: unequal answers."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for prompt in prompts:
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def test_micro_batches_together_are_one_large_batch():
    # answers of 8, 7 tokens in the first micro-batch and 2, 1 in the second: weighted by their
    # tokens, the two give the large batch's token-mean loss and gradient
    model = lora_tiny()
    params = [p for p in model.parameters() if p.requires_grad]
    align, harmful = rows_of([2, 3, 8, 9]), rows_of([9, 2, 8, 3], seed=4)
    step = BoosterStep(model)
    small = step.backward([pad_batch(align[:2], 0), pad_batch(align[2:], 0)],
                          [pad_batch(harmful[:2], 0), pad_batch(harmful[2:], 0)])
    micro = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    large = step.backward(pad_batch(align, 0), pad_batch(harmful, 0))
    assert small["loss"] == pytest.approx(large["loss"], rel=1e-6)
    assert small["harmful_loss"] == pytest.approx(large["harmful_loss"], rel=1e-6)
    for a, b in zip(micro, (p.grad for p in params)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_micro_batch_without_answer_tokens_adds_nothing():
    # answers cut away by max_length: the mean over no tokens would be 0/0 (NaN) and abort training
    model = lora_tiny()
    params = [p for p in model.parameters() if p.requires_grad]
    align, harmful = rows_of([2, 3]), rows_of([4, 5], seed=4)
    empty = pad_batch(rows_of([10, 10], seed=5), 0)
    step = BoosterStep(model)
    with_empty = step.backward([pad_batch(align, 0), empty], [empty, pad_batch(harmful, 0)])
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    without = step.backward(pad_batch(align, 0), pad_batch(harmful, 0))
    assert with_empty == pytest.approx(without, rel=1e-6)
    for a, p in zip(grads, params):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, p.grad, rtol=1e-6, atol=1e-8)


def test_bfloat16_base_trains_and_restores():
    model = lora_tiny(torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    metrics = BoosterStep(model).backward(pad_batch(rows(3, 0), 0), pad_batch(rows(3, 1), 0))
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    assert all(torch.isfinite(p.grad).all() for p in params) and metrics["harmful_grad_norm"] > 0


def test_bad_settings_fail_with_one_line():
    from booster.config import ConfigError

    with pytest.raises(ConfigError, match="booster.alpha must be > 0"):
        BoosterStep(lora_tiny(), alpha=0.0)
    frozen = tiny_model(VOCAB).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        BoosterStep(frozen)


# ------------------------------------------------------------------ the Hugging Face Trainer
def _trainer(tmp_path, model, align, harmful, **args):
    from torch.utils.data import SequentialSampler
    from transformers import TrainingArguments

    from booster.hf import BoosterTrainer

    class InOrder(BoosterTrainer):  # the test's batches in the order the plain loop takes them
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(self.train_dataset)

    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=3, learning_rate=1e-2, weight_decay=0.1,
                    lr_scheduler_type="constant", max_grad_norm=1.0, optim="adamw_torch", report_to=[],
                    use_cpu=True, seed=0, logging_steps=1, save_strategy="no", remove_unused_columns=False,
                    dataloader_drop_last=True)
    settings.update(args)
    return InOrder(model=model, args=TrainingArguments(**settings), train_dataset=align,
                   data_collator=lambda rows_: pad_batch(rows_, 0), harmful_dataset=harmful)


def _plain_loop(align, harmful, steps, micro, k, autocast=False):
    model = lora_tiny()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    step = BoosterStep(model)
    stream = Stream(harmful, micro, 0, 0, "harmful")
    for s in range(steps):
        mbs = [pad_batch(align[(s * k + j) * micro:(s * k + j + 1) * micro], 0) for j in range(k)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # the Trainer's bf16
            step.backward(mbs, [stream.batch(s * k + j) for j in range(k)])
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


@pytest.mark.parametrize("k", [1, 2])
def test_the_trainer_gives_the_plain_loops_weights(tmp_path, k):
    align, harmful = rows(24, 0), rows(12, 1)
    trainer = _trainer(tmp_path, lora_tiny(), align, harmful, max_steps=3, gradient_accumulation_steps=k)
    trainer.train()
    logged = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logged) == 3 and {"booster_harmful_loss", "booster_regulariser"} <= set(logged[0])
    plain = dict(_plain_loop(align, harmful, 3, 3, k).named_parameters())
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, plain[name], rtol=1e-6, atol=1e-8, msg=name)


def test_the_trainer_resumes_where_it_stopped(tmp_path):
    align, harmful = rows(24, 0), rows(12, 1)
    whole = _trainer(tmp_path / "a", lora_tiny(), align, harmful, max_steps=4)
    whole.train()
    first = _trainer(tmp_path / "b", lora_tiny(), align, harmful, max_steps=4, save_strategy="steps", save_steps=2)
    first.train()
    resumed = _trainer(tmp_path / "b", lora_tiny(), align, harmful, max_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    ref = dict(whole.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, ref[name], rtol=1e-6, atol=1e-8, msg=name)


def test_the_trainer_refuses_harmful_rows_without_labels(tmp_path):
    with pytest.raises(ValueError, match="input_ids and labels"):
        _trainer(tmp_path, lora_tiny(), rows(6, 0), [{"input_ids": [1, 2]}], max_steps=1)


def test_under_autocast_the_perturbed_pass_sees_the_perturbed_weights():
    """torch.autocast caches its casts of the weights: without dropping them, the pass at w̃ would
    run with w's casts (and the rest of the step with w̃'s)."""
    align, harmful = pad_batch(rows(3, 0), 0), pad_batch(rows(3, 1), 0)
    grads = []
    for cache in (True, False):
        model = lora_tiny()
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=cache):
            metrics = BoosterStep(model).backward(align, harmful)
        assert metrics["harmful_loss_perturbed"] < metrics["harmful_loss"]
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for cached, uncached in zip(*grads):
        torch.testing.assert_close(cached, uncached, rtol=0, atol=0)


def test_the_trainer_in_bf16_is_the_plain_loop_under_bf16_autocast(tmp_path):
    align, harmful = rows(24, 0), rows(12, 1)
    trainer = _trainer(tmp_path, lora_tiny(), align, harmful, max_steps=2, gradient_accumulation_steps=2, bf16=True)
    trainer.train()
    plain = dict(_plain_loop(align, harmful, 2, 3, 2, autocast=True).named_parameters())
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32
            torch.testing.assert_close(p, plain[name], rtol=1e-6, atol=1e-8, msg=name)
