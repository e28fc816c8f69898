"""RepNoise (Rosati et al., NeurIPS 2024): push harmful representations toward noise.

    L = f(w)  +  β · (1/L) Σ_l MMD( m_l(x_h) ⊙ M,  N(0, I) ⊙ M )  −  α · log( 1 + h̄(w) )

f: the alignment (harmless) loss. m_l: the output of layer l's MLP block on the harmful
batch; M masks the harmful answer tokens; MMD with a sum of 5 RBF kernels whose bandwidth
is the mean pairwise squared distance (as in the official code). h̄: the harmful loss read
out at every layer through the final norm and the LM head ("logit lens") and averaged with
the model's own output loss — the official code's ascent term (``repnoise.logit_lens``);
the log damps the ascent so it saturates instead of diverging.

Differences from the official code, on purpose: the mask comes from the harmful batch's
own answer tokens (our alignment and harmful prompts are different sets, so the official
token-inequality mask between paired batches does not apply — and the Booster repository's
unpaired variant wrongly masks prompts too); the final hidden state is not normed twice.
Hyperparameters (Booster paper's comparison): α = ``repnoise.alpha`` = 0.1,
β = ``repnoise.beta`` = 0.001 (official repository: α = 1).

Cost: 2 forward/backward passes per step (harmless, harmful), the harmful one with one LM-head
projection per layer on the answer tokens. Extra memory: the captured MLP outputs.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from booster.checks import check
from booster.defenses.base import Batch, Defense, StepContext
from booster.text import IGNORE


def mmd_to_noise(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Biased MMD² between the rows of x and y, 5 RBF kernels around the mean squared distance."""
    z = torch.cat([x, y]).float()
    sq = z.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * z @ z.T).clamp_min(0)
    n_all = len(z)
    bandwidth = (d2.detach().sum() / max(n_all * n_all - n_all, 1)).clamp_min(1e-12)
    kernel = sum(torch.exp(-d2 / (bandwidth * 2 ** (i - 2))) for i in range(5))
    n = len(x)
    return kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2 * kernel[:n, n:].mean()


def _unwrap(model: Any) -> Any:
    model = getattr(model, "module", model)  # DDP
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@dataclass
class RepNoiseConfig:
    alpha: float = 0.1
    """Weight of the gradient ascent on the harmful loss, -alpha*log(1 + CE) (Booster paper: 0.1;
    RepNoise repository: 1)."""
    beta: float = 0.001
    """Weight of the MMD between harmful representations and Gaussian noise (paper: 0.001)."""
    logit_lens: bool = True
    """Ascend the harmful loss read out at every layer (as the official code does), not only at the last."""

    def __post_init__(self) -> None:
        check(self.alpha >= 0, f"repnoise.alpha must be >= 0, got {self.alpha}")
        check(self.beta >= 0, f"repnoise.beta must be >= 0, got {self.beta}")


class RepNoise(Defense):
    name = "repnoise"
    stages = ("align",)
    passes = 2
    config_sections = {"repnoise": RepNoiseConfig}
    streams = ("main", "harmful")

    def __init__(self, stage_cfg) -> None:
        super().__init__(stage_cfg)
        self.alpha = stage_cfg.repnoise.alpha
        self.beta = stage_cfg.repnoise.beta
        self.logit_lens = stage_cfg.repnoise.logit_lens

    def _harmful_terms(self, ctx: StepContext, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, float]:
        base = _unwrap(ctx.model)
        mlps = [m for name, m in base.named_modules() if name.endswith(".mlp")]
        if not mlps:
            raise ValueError("repnoise found no MLP blocks named '*.mlp'; it supports Llama-style decoders")
        captured: list[torch.Tensor] = []
        handles = [m.register_forward_hook(lambda mod, inp, out: captured.append(out)) for m in mlps]
        device = next(p.device for p in ctx.model.parameters())
        batch = {k: v.to(device) for k, v in batch.items()}
        try:
            out = ctx.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            output_hidden_states=True, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE
        losses = [F.cross_entropy(out.logits[:, :-1][keep].float(), targets[keep])]
        if self.logit_lens:
            norm, head = base.get_decoder().norm, base.get_output_embeddings()
            for hidden in out.hidden_states[:-1]:  # the last one is already normed: it made out.logits
                losses.append(F.cross_entropy(head(norm(hidden[:, :-1][keep])).float(), targets[keep]))
        ascent = 1 + torch.stack(losses).mean()
        mask = (batch["labels"] != IGNORE).unsqueeze(-1)
        noise = torch.stack([mmd_to_noise((a * mask).flatten(1), (torch.randn_like(a) * mask).flatten(1))
                             for a in captured]).mean()
        return noise, ascent, losses[0].item()

    def step(self, ctx: StepContext, batches: dict[str, list[Batch]]) -> dict[str, float]:
        pairs = list(zip(batches["main"], batches["harmful"]))
        k = len(pairs)
        totals = {"loss": 0.0, "harmful_loss": 0.0, "noise_mmd": 0.0, "ascent_log": 0.0}
        for j, (harmless, harmful) in enumerate(pairs):
            with ctx.accelerator.no_sync(ctx.model):
                align = ctx.loss(harmless)
                ctx.accelerator.backward(align / k)
            sync = contextlib.nullcontext() if j == k - 1 else ctx.accelerator.no_sync(ctx.model)
            with sync:
                noise, ascent, harmful_ce = self._harmful_terms(ctx, harmful)
                ctx.accelerator.backward((self.beta * noise - self.alpha * torch.log(ascent)) / k)
            totals["loss"] += align.item() / k
            totals["harmful_loss"] += harmful_ce / k
            totals["noise_mmd"] += noise.item() / k
            totals["ascent_log"] += math.log(ascent.item()) / k
        return totals
