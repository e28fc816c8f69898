"""Vaccine, RepNoise and Lisa: the parts that can be checked exactly."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model

from booster.config import (AttackConfig, ConfigError, LisaConfig, OptimConfig, RepNoiseConfig, VaccineConfig,
                            load_config)
from booster.defenses import make_defense
from booster.defenses.base import StepContext
from booster.defenses.repnoise import mmd_to_noise
from booster.defenses.vaccine import attention_modules
from booster.models import tiny_model
from booster.train import TrainingError, causal_lm_loss, fit
from tests.test_train import streams

ACC = Accelerator(cpu=True)


def lora_model():
    torch.manual_seed(0)
    model = get_peft_model(tiny_model(101), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    return model


def ctx_for(model):
    params = [p for p in model.parameters() if p.requires_grad]
    return StepContext(model=model, params=params, loss=causal_lm_loss(model), accelerator=ACC)


def test_vaccine_perturbs_attention_outputs_with_radius_rho():
    model = lora_model()
    ctx = ctx_for(model)
    batch = streams()["main"].batch(0)
    seen = []
    for m in attention_modules(model):  # record what the layers output during the step
        m.register_forward_hook(lambda mod, i, o: seen.append(o[0].detach().clone()))
    d = make_defense("vaccine", SimpleNamespace(vaccine=VaccineConfig(rho=0.5)))
    metrics = d.step(ctx, {"main": [batch]})
    n = len(attention_modules(model))
    # our recording hooks run before Vaccine's (registered first), so pass 2's recorded
    # outputs are unperturbed too: the perturbation is the difference seen downstream.
    assert len(seen) == 2 * n
    assert metrics["loss"] > metrics["loss_unperturbed"]  # the worst-case direction raises f
    vac_grad = [p.grad.clone() for p in ctx.params]
    for p in ctx.params:
        p.grad = None
    ctx.accelerator.backward(ctx.loss(batch))
    assert any(not torch.allclose(a, p.grad) for a, p in zip(vac_grad, ctx.params))


def test_vaccine_with_tiny_rho_is_sft():
    model = lora_model()
    ctx = ctx_for(model)
    batch = streams()["main"].batch(0)
    make_defense("vaccine", SimpleNamespace(vaccine=VaccineConfig(rho=1e-9))).step(ctx, {"main": [batch]})
    vac = [p.grad.clone() for p in ctx.params]
    for p in ctx.params:
        p.grad = None
    ctx.accelerator.backward(ctx.loss(batch))
    for a, p in zip(vac, ctx.params):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-7)


def test_mmd():
    torch.manual_seed(0)
    x = torch.randn(6, 50)
    assert mmd_to_noise(x, x).abs() < 1e-5
    assert mmd_to_noise(x + 5, torch.randn(6, 50)) > mmd_to_noise(x, torch.randn(6, 50))


def test_repnoise_terms_are_finite_and_ascend():
    model = lora_model()
    ctx = ctx_for(model)
    s = streams()
    cfg = SimpleNamespace(repnoise=RepNoiseConfig(alpha=0.1, beta=0.001))
    metrics = make_defense("repnoise", cfg).step(ctx, {"main": [s["main"].batch(0)], "harmful": [s["harmful"].batch(0)]})
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert metrics["ascent_log"] > 0 and metrics["noise_mmd"] > 0
    # with β=0 and no logit lens the step's gradient is ∇f − α/(1+h)·∇h: check it exactly
    model2 = lora_model()
    ctx2 = ctx_for(model2)
    main, harm = s["main"].batch(0), s["harmful"].batch(0)
    grad_f = torch.autograd.grad(ctx2.loss(main), ctx2.params)
    h = ctx2.loss(harm)
    grad_h = torch.autograd.grad(h, ctx2.params)
    cfg = SimpleNamespace(repnoise=RepNoiseConfig(alpha=0.7, beta=0.0, logit_lens=False))
    make_defense("repnoise", cfg).step(ctx2, {"main": [main], "harmful": [harm]})
    for p, gf, gh in zip(ctx2.params, grad_f, grad_h):
        torch.testing.assert_close(p.grad, gf - 0.7 / (1 + h.item()) * gh, rtol=1e-4, atol=1e-7)


def lisa_cfg(**kw):
    return AttackConfig(lisa=LisaConfig(**kw))


def test_lisa_phases_and_proximal_gradient(tmp_path):
    # A=2 alignment steps then F=3 user steps; the anchor is the weight at the last switch
    d = make_defense("lisa", lisa_cfg(rho=0.5, align_steps=2, finetune_steps=3, proximal_warmup=0.0))
    assert [d.phase(s) for s in range(7)] == ["align", "align", "main", "main", "main", "align", "align"]
    w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    ctx = StepContext(model=torch.nn.Module(), params=[w], accelerator=ACC,
                      loss=lambda b: (w * b["x"]).sum(), total_steps=10)
    d.setup(ctx)
    ctx.step = 0
    d.step(ctx, {"align": [{"x": torch.tensor([1.0, 1.0])}]})
    torch.testing.assert_close(w.grad, torch.tensor([1.0, 1.0]))  # at the anchor: no proximal pull
    w.grad = None
    with torch.no_grad():
        w.add_(torch.tensor([0.2, 0.4]))
    ctx.step = 1
    d.step(ctx, {"align": [{"x": torch.tensor([1.0, 1.0])}]})
    torch.testing.assert_close(w.grad, torch.tensor([1.0 + 0.5 * 0.2, 1.0 + 0.5 * 0.4]))
    w.grad = None
    ctx.step = 2  # switch: the anchor moves to the current weights
    d.step(ctx, {"main": [{"x": torch.tensor([0.0, 2.0])}]})
    torch.testing.assert_close(w.grad, torch.tensor([0.0, 2.0]))


def test_lisa_rejects_cycles_longer_than_the_attack(tmp_path):
    d = make_defense("lisa", lisa_cfg(align_steps=100, finetune_steps=900))
    with pytest.raises(TrainingError, match="scale lisa.align_steps"):
        fit(lora_model(), d, streams(), OptimConfig(steps=20), tmp_path, accelerator=ACC, steps=20)


@pytest.mark.parametrize("override, needle", [
    ("align.vaccine.rho=-1", "vaccine.rho must be > 0"),
    ("align.repnoise.alpha=-0.1", "repnoise.alpha must be >= 0"),
    ("attack.lisa.rho=-1", "lisa.rho must be >= 0"),
    ("attack.lisa.finetune_steps=0", "lisa.finetune_steps must be >= 1"),
    ("align.booster.every=0", "booster.every must be >= 1"),
    ("attack.defense=vaccine", "attack.defense='vaccine' is not known"),
    ("align.defense=lisa", "align.defense='lisa' is not known"),
])
def test_bad_hyperparameters(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        load_config("tiny", [override])


def test_booster_vaccine_low_memory_matches_its_default():
    from booster.config import AlignConfig, BoosterConfig

    f = {"input_ids": torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))}
    h = {"input_ids": torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(2))}
    for b in (f, h):
        b["labels"] = b["input_ids"]
    grads = []
    for low in (False, True):
        model = lora_model()
        ctx = ctx_for(model)
        before = [p.detach().clone() for p in ctx.params]
        d = make_defense("booster_vaccine", AlignConfig(defense="booster_vaccine", booster=BoosterConfig(low_memory=low)))
        d.setup(ctx)
        d.step(ctx, {"main": [f], "harmful": [h]})
        assert all(torch.equal(p.detach(), b) for p, b in zip(ctx.params, before))
        grads.append([p.grad.detach().clone() for p in ctx.params])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
