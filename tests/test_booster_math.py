"""Booster's combined gradient against hand computations, exact restore, zero gradient."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

from booster.config import BoosterConfig
from booster.defenses import make_defense
from booster.defenses.base import StepContext


def toy(w0, a, b, dtype=torch.float32):
    """One parameter vector w; f(w) = ½‖w − a‖², h(w) = ½‖w − b‖² (mean over the micro-batch
    items, which carry their own target b_i when given)."""
    w = torch.nn.Parameter(torch.tensor(w0, dtype=dtype))
    a = torch.tensor(a, dtype=dtype)

    def loss(batch):
        target = a if batch["kind"] == "f" else batch["b"].to(dtype)
        return 0.5 * ((w - target) ** 2).sum(dim=-1).mean()

    acc = Accelerator(cpu=True)
    ctx = StepContext(model=torch.nn.Module(), params=[w], loss=loss, accelerator=acc)
    return w, ctx


def booster(lam=5.0, alpha=0.1):
    return make_defense("booster", SimpleNamespace(booster=BoosterConfig(lam=lam, alpha=alpha)))


def test_combined_gradient_matches_hand_computation():
    # w = (1, 2), a = (0, 0), b = (4, 6):
    #   ∇f(w) = w − a = (1, 2);  ∇h(w) = w − b = (−3, −4), ‖∇h‖ = 5
    #   w̃ = w − 0.1·(−3, −4)/5 = (1.06, 2.08);  ∇h(w̃) = (−2.94, −3.92)
    #   g = ∇f + 5·(∇h(w) − ∇h(w̃)) = (1, 2) + 5·(−0.06, −0.08) = (0.7, 1.6)
    w, ctx = toy([1.0, 2.0], [0.0, 0.0], None)
    d = booster()
    d.setup(ctx)
    b = torch.tensor([[4.0, 6.0]])
    metrics = d.step(ctx, {"main": [{"kind": "f"}], "harmful": [{"kind": "h", "b": b}]})
    torch.testing.assert_close(w.grad, torch.tensor([0.7, 1.6]), rtol=0, atol=1e-6)
    assert metrics["harmful_grad_norm"] == pytest.approx(5.0)
    # h(w) = ½·25 = 12.5;  h(w̃) = ½(2.94² + 3.92²) = 12.005
    assert metrics["harmful_loss"] == pytest.approx(12.5)
    assert metrics["harmful_loss_perturbed"] == pytest.approx(12.005, abs=1e-5)
    assert metrics["regulariser"] == pytest.approx(0.495, abs=1e-5)


def test_lambda_zero_is_sft():
    w, ctx = toy([1.0, 2.0], [0.0, 0.0], None)
    d = booster(lam=0.0)
    d.setup(ctx)
    d.step(ctx, {"main": [{"kind": "f"}], "harmful": [{"kind": "h", "b": torch.tensor([[4.0, 6.0]])}]})
    torch.testing.assert_close(w.grad, torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_restored_bit_exactly(dtype):
    torch.manual_seed(0)
    w0 = torch.randn(257).tolist()
    w, ctx = toy(w0, [0.0] * 257, None, dtype=dtype)
    before = w.detach().clone()
    d = booster(alpha=0.37)
    d.setup(ctx)
    b = torch.randn(1, 257) * 3
    d.step(ctx, {"main": [{"kind": "f"}], "harmful": [{"kind": "h", "b": b}]})
    assert torch.equal(w.detach(), before)
    # and the naive restore would not have been exact in this dtype
    g = (before.float() - b[0]).to(dtype)
    naive = (before - 0.37 * g / g.float().norm()) + 0.37 * g / g.float().norm()
    if dtype == torch.bfloat16:
        assert not torch.equal(naive, before)


def test_zero_harmful_gradient_gives_alignment_gradient():
    # h has its minimum at w: ∇h(w) = 0, so the perturbation is undefined and skipped.
    w, ctx = toy([1.0, 2.0], [0.0, 0.0], None)
    d = booster()
    d.setup(ctx)
    metrics = d.step(ctx, {"main": [{"kind": "f"}], "harmful": [{"kind": "h", "b": torch.tensor([[1.0, 2.0]])}]})
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["harmful_grad_norm"] == 0.0
    torch.testing.assert_close(w.grad, torch.tensor([1.0, 2.0]))


def test_accumulation_equals_large_batch():
    targets = torch.tensor([[4.0, 6.0], [-2.0, 1.0], [0.5, 3.0], [7.0, -1.0]])
    w, ctx = toy([1.0, 2.0], [0.0, 0.0], None)
    d = booster()
    d.setup(ctx)
    d.step(ctx, {"main": [{"kind": "f"}], "harmful": [{"kind": "h", "b": targets}]})
    large = w.grad.clone()
    w.grad = None
    micro = [{"kind": "h", "b": targets[i:i + 2]} for i in (0, 2)]
    d.step(ctx, {"main": [{"kind": "f"}, {"kind": "f"}], "harmful": micro})
    torch.testing.assert_close(w.grad, large, rtol=0, atol=1e-6)


@pytest.mark.parametrize("low_memory", [False, True])
def test_matches_independent_autograd_on_a_tiny_llama(low_memory):
    """On a real (tiny) transformer with LoRA: the step equals ∇f + λ(∇h(w) − ∇h(w̃)) computed
    from scratch with torch.autograd.grad on copies of the weights."""
    from peft import LoraConfig, get_peft_model

    from booster.models import tiny_model

    torch.manual_seed(0)
    model = get_peft_model(tiny_model(97), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for n, p in model.named_parameters():  # B starts at zero; give it values so ∇ is generic
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    f_batch = {"input_ids": torch.randint(0, 97, (2, 9))}
    h_batch = {"input_ids": torch.randint(0, 97, (2, 9))}

    def loss(batch):
        return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    lam, alpha = 5.0, 0.1
    w = [p.detach().clone() for p in params]
    gh = torch.autograd.grad(loss(h_batch), params)
    norm = torch.sqrt(sum((g ** 2).sum() for g in gh))
    with torch.no_grad():
        for p, g in zip(params, gh):
            p.sub_(alpha * g / norm)
    gh_t = torch.autograd.grad(loss(h_batch), params)
    with torch.no_grad():
        for p, v in zip(params, w):
            p.copy_(v)
    gf = torch.autograd.grad(loss(f_batch), params)
    expected = [a + lam * (b - c) for a, b, c in zip(gf, gh, gh_t)]

    ctx = StepContext(model=model, params=params, loss=loss, accelerator=Accelerator(cpu=True))
    d = make_defense("booster", SimpleNamespace(booster=BoosterConfig(lam=lam, alpha=alpha, low_memory=low_memory)))
    d.setup(ctx)
    d.step(ctx, {"main": [f_batch], "harmful": [h_batch]})
    for p, e, v in zip(params, expected, w):
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-6)
        assert torch.equal(p.detach(), v)


def test_amortised_booster_reuses_the_regulariser_gradient():
    # every=2: step 0 computes R = λ(∇h(w0) − ∇h(w̃0)) = (−0.3, −0.4) (see the hand computation
    # above); step 1 adds the same R to ∇f at the new weights without touching harmful data.
    w, ctx = toy([1.0, 2.0], [0.0, 0.0], None)
    d = make_defense("booster", SimpleNamespace(booster=BoosterConfig(lam=5.0, alpha=0.1, every=2)))
    d.setup(ctx)
    harmful = [{"kind": "h", "b": torch.tensor([[4.0, 6.0]])}]
    assert d.streams_at(0) == ("main", "harmful")
    d.step(ctx, {"main": [{"kind": "f"}], "harmful": harmful})
    torch.testing.assert_close(w.grad, torch.tensor([0.7, 1.6]), rtol=0, atol=1e-6)
    w.grad = None
    with torch.no_grad():
        w.copy_(torch.tensor([2.0, 0.0]))
    ctx.step = 1
    assert d.streams_at(1) == ("main",)
    metrics = d.step(ctx, {"main": [{"kind": "f"}]})
    torch.testing.assert_close(w.grad, torch.tensor([2.0 - 0.3, 0.0 - 0.4]), rtol=0, atol=1e-6)
    assert "harmful_loss" not in metrics
    state = d.state_dict()  # a resumed run gets R back
    d2 = make_defense("booster", SimpleNamespace(booster=BoosterConfig(every=2)))
    d2.setup(ctx)
    d2.load_state_dict(state)
    assert d2.streams_at(1) == ("main",)


def test_ablation_without_last_term():
    # g = ∇f + λ∇h(w) = (1, 2) + 5·(−3, −4) = (−14, −18)
    w, ctx = toy([1.0, 2.0], [0.0, 0.0], None)
    d = make_defense("booster_no_last_term", SimpleNamespace(booster=BoosterConfig(lam=5.0)))
    d.step(ctx, {"main": [{"kind": "f"}], "harmful": [{"kind": "h", "b": torch.tensor([[4.0, 6.0]])}]})
    torch.testing.assert_close(w.grad, torch.tensor([-14.0, -18.0]))


def _spy_on_perturbed_pass(ctx):
    """Record, at every loss call, whether each parameter holds a gradient."""
    seen = []
    inner = ctx.loss

    def loss(batch):
        seen.append([p.grad is not None for p in ctx.params])
        return inner(batch)

    ctx.loss = loss
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_low_memory_matches_exact_within_the_rounding_bound(dtype):
    torch.manual_seed(0)
    w0 = (torch.randn(301) * 0.05).tolist()
    batches = {"main": [{"kind": "f"}], "harmful": [{"kind": "h", "b": torch.randn(1, 301)}]}
    grads = {}
    for low in (False, True):
        w, ctx = toy(w0, [0.0] * 301, None, dtype=dtype)
        before = w.detach().clone()
        seen = _spy_on_perturbed_pass(ctx)
        d = make_defense("booster", SimpleNamespace(booster=BoosterConfig(alpha=0.1, low_memory=low)))
        d.setup(ctx)
        metrics = d.step(ctx, batches)
        assert torch.equal(w.detach(), before)
        # calls: h at w, h at w~, f at w; low memory: no gradient is held through the 2nd and 3rd
        assert seen == [[False], [not low], [False]]
        grads[low] = w.grad.detach().clone()
    c = 0.1 / metrics["harmful_grad_norm"]
    # w~ = w − c·∇h(w) is rounded at most at |w| + α (the perturbation's length is α)
    bound = 5.0 * torch.finfo(dtype).eps * (before.abs().max().item() + 0.1) / c
    diff = (grads[True] - grads[False]).abs().max().item()
    assert diff <= bound
    assert bound < 1e-3 * grads[False].abs().max().item()  # and the bound is small here


def test_low_memory_keeps_bf16_gradients_exact():
    torch.manual_seed(0)
    w0 = torch.randn(64).tolist()
    batches = {"main": [{"kind": "f"}], "harmful": [{"kind": "h", "b": torch.randn(1, 64)}]}
    grads = []
    for low in (False, True):
        w, ctx = toy(w0, [0.0] * 64, None, dtype=torch.bfloat16)
        d = make_defense("booster", SimpleNamespace(booster=BoosterConfig(low_memory=low)))
        d.setup(ctx)
        d.step(ctx, batches)
        grads.append(w.grad.detach().clone())
    assert torch.equal(grads[0], grads[1])
