"""The training loop: every defence trains, runs resume exactly, NaN stops with a clear error."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model

from booster.config import AlignConfig, AttackConfig, LisaConfig, OptimConfig
from booster.defenses import DEFENSES, make_defense
from booster.models import tiny_model
from booster.train import Stream, TrainingError, fit

VOCAB = 101


def rows(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (10,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 4 + ids[4:]})
    return out


def lora_tiny():
    torch.manual_seed(0)
    return get_peft_model(tiny_model(VOCAB), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def streams():
    return {"main": Stream(rows(12, 0), 3, 0, 0, "main"), "harmful": Stream(rows(12, 1), 3, 0, 0, "harmful"),
            "align": Stream(rows(12, 2), 3, 0, 0, "align")}


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_every_defence_trains(name, tmp_path, accelerator):
    model = lora_tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    stage = AlignConfig() if "align" in DEFENSES[name].stages else AttackConfig(
        lisa=LisaConfig(align_steps=1, finetune_steps=1, proximal_warmup=0.0))
    defense = make_defense(name, stage)
    optim = OptimConfig(lr=1e-2, steps=3, checkpoint_every=10)
    result = fit(model, defense, streams(), optim, tmp_path, accelerator=accelerator, steps=3)
    assert len(result.log) == 3
    ours = [h for m in model.modules() for h in m._forward_hooks.values()
            if "output_capturing" not in getattr(h, "__qualname__", "")]  # transformers' own hidden-state hooks
    assert not ours, "a defence left hooks behind"
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.log)
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed


def test_resume_matches_uninterrupted(tmp_path, accelerator):
    optim = OptimConfig(lr=1e-2, steps=4, checkpoint_every=2)
    cfg = AlignConfig(defense="booster")

    full = lora_tiny()
    fit(full, make_defense("booster", cfg), streams(), optim, tmp_path / "a", accelerator=accelerator, steps=4)

    part = lora_tiny()
    fit(part, make_defense("booster", cfg), streams(), optim, tmp_path / "b", accelerator=accelerator, steps=2)
    resumed = lora_tiny()  # a fresh process would rebuild the model from scratch
    result = fit(resumed, make_defense("booster", cfg), streams(), optim, tmp_path / "b", accelerator=accelerator,
                 steps=4)
    assert [r["step"] for r in result.log] == [0, 1, 2, 3]
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7, msg=n)


def test_stream_is_deterministic_and_covers_each_epoch():
    s = Stream([{"input_ids": [i], "labels": [i]} for i in range(10)], 5, 0, seed=3, name="x")
    first = torch.cat([s.batch(0)["input_ids"], s.batch(1)["input_ids"]]).flatten().tolist()
    assert sorted(first) == list(range(10))
    again = Stream([{"input_ids": [i], "labels": [i]} for i in range(10)], 5, 0, seed=3, name="x")
    assert torch.equal(again.batch(1)["input_ids"], s.batch(1)["input_ids"])
    with pytest.raises(TrainingError, match="empty"):
        Stream([], 2, 0, 0, "empty")


def test_nan_loss_stops_with_a_clear_error(tmp_path, accelerator):
    model = lora_tiny()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"became nan at step \d; lower the learning rate"):
        fit(model, make_defense("sft", None), streams(), OptimConfig(steps=2), tmp_path, accelerator=accelerator,
            steps=2)


def test_missing_stream_is_named(tmp_path, accelerator):
    with pytest.raises(TrainingError, match=r"needs data stream\(s\) \['harmful'\]"):
        fit(lora_tiny(), make_defense("booster", SimpleNamespace(booster=AlignConfig().booster)),
            {"main": streams()["main"]}, OptimConfig(steps=1), tmp_path, accelerator=accelerator, steps=1)


def test_warmup_applies_to_a_constant_schedule(tmp_path, accelerator):
    # transformers' plain 'constant' schedule ignores num_warmup_steps; the log holds the rate each step used
    optim = OptimConfig(lr=1e-2, steps=4, warmup_steps=2, checkpoint_every=10)
    result = fit(lora_tiny(), make_defense("sft", None), streams(), optim, tmp_path, accelerator=accelerator, steps=4)
    assert [round(r["lr"], 6) for r in result.log] == [0.0, 0.005, 0.01, 0.01]


def test_snapshots_run_after_their_step_and_probe_it(tmp_path, accelerator):
    seen = []
    optim = OptimConfig(lr=1e-2, steps=3, checkpoint_every=10)
    result = fit(lora_tiny(), make_defense("sft", None), streams(), optim, tmp_path, accelerator=accelerator, steps=3,
                 probes={"p": lambda m: 0.0}, probe_every=2, snapshots={1: seen.append})
    assert seen == [1]
    assert [r["step"] for r in result.probes] == [0, 1, 2, 3]


def padded_rows(n, seed):
    """Rows of different lengths with prompts of different lengths (padding and masked prompts)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length, prompt = 6 + i % 5, 2 + i % 3
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def test_answer_positions_loss_is_the_models_own():
    # the LM head applied to answer positions only: the same loss and gradients as the model's
    # own forward over every position (bit-identical on SmolLM2 on the CPUs tried; close here)
    from booster.evaluate.probe import mean_answer_loss
    from booster.models import answer_head
    from booster.text import pad_batch
    from booster.train import causal_lm_loss

    model = lora_tiny()
    assert answer_head(model) is not None
    params = [p for p in model.parameters() if p.requires_grad]
    batch = pad_batch(padded_rows(5, 0), 0)

    def grads(loss_fn):
        for p in params:
            p.grad = None
        loss = loss_fn(batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    fast_loss, fast = grads(causal_lm_loss(model))
    own_loss, own = grads(lambda b: model(**b, use_cache=False).loss)
    torch.testing.assert_close(fast_loss, own_loss, rtol=1e-6, atol=0)
    for a, b in zip(fast, own):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    probe = mean_answer_loss(model, padded_rows(5, 0), 0, batch_size=2)
    assert probe == pytest.approx(own_loss.item(), rel=1e-6)


def test_answer_positions_loss_only_where_it_is_the_same_computation(monkeypatch):
    from booster.models import answer_head

    full = tiny_model(VOCAB)  # full fine-tuning: the (tied) head trains, its gradient needs every position
    assert answer_head(full) is None
    frozen = lora_tiny()
    monkeypatch.setattr(frozen.get_base_model().config, "model_type", "gemma2")  # soft-capped logits
    assert answer_head(frozen) is None
    monkeypatch.setattr(frozen.get_base_model().config, "model_type", "llama")

    class Wrapper(torch.nn.Module):  # what DDP and FSDP wrappers look like: the model as .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert answer_head(Wrapper(frozen)) is None
    frozen._original_forward = frozen.forward  # accelerate's autocast wraps forward alone
    assert answer_head(frozen) is None
