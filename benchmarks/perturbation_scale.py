"""How far does Booster's simulated harmful step reach, for a given α, on an aligned model?

    python benchmarks/perturbation_scale.py RUN_DIR ALIGN_STAGE [ATTACK_STAGE] [--alphas 0.1,1,3]

α is a step length in trainable-parameter space, so its meaning depends on that space: the
paper's α = 0.1 was chosen for Llama2-7B LoRA adapters. For the aligned model of a run,
this prints the harmful-loss gradient norm, the drop h(w) − h(w − α·∇h/‖∇h‖) for each α (on
harmful pairs and on the held-out probe pairs), and, given an attack stage on that model,
the L2 distance the attack moved the adapter — the scale a simulated attack step competes with.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from booster.config import load_config
from booster.models import ModelRecipe, build_model
from booster.pipeline import Pipeline
from booster.text import pad_batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("align_stage", help="e.g. align-072887e290")
    ap.add_argument("attack_stage", nargs="?", help="an attack stage on that aligned model")
    ap.add_argument("--alphas", default="0.1,0.3,1,3,10")
    ap.add_argument("--pairs", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)

    cfg = load_config(args.run_dir / "config.yaml", ["grid={}"])
    pipe = Pipeline(cfg)
    tok, data = pipe.data.tokenizer(cfg), pipe.data.safety(cfg)
    stage = args.run_dir / "stages" / args.align_stage
    model = build_model(cfg.model, tok, ModelRecipe.load(stage / "recipe.json"), args.run_dir, train="continue")
    params = [p for p in model.parameters() if p.requires_grad]
    harmful = pad_batch(pipe.data.encode(cfg, data.harmful[:args.pairs]), tok.pad_token_id)
    probe = pad_batch(pipe.data.encode(cfg, data.probe[:args.pairs]), tok.pad_token_id)

    def loss(batch) -> torch.Tensor:
        return model(**batch, use_cache=False).loss

    h = loss(harmful)
    grads = torch.autograd.grad(h, params)
    norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads)).item()
    weights = [p.detach().clone() for p in params]
    with torch.no_grad():
        h0, p0 = h.item(), loss(probe).item()
    print(f"{sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters, weight norm "
          f"{torch.sqrt(sum((w ** 2).sum() for w in weights)).item():.2f}; ‖∇h‖ = {norm:.4f} on {args.pairs} pairs\n")
    print("| α | h(w) − h(w̃), harmful pairs | same, held-out probe pairs |")
    print("|---|---|---|")
    for alpha in (float(a) for a in args.alphas.split(",")):
        with torch.no_grad():
            for p, w, g in zip(params, weights, grads):
                p.copy_(w - alpha * g / norm)
            print(f"| {alpha:g} | {h0 - loss(harmful).item():+.4f} | {p0 - loss(probe).item():+.4f} |")
    if args.attack_stage:
        before = load_file(str(stage / "model" / "adapter_model.safetensors"))
        after = load_file(str(args.run_dir / "stages" / args.attack_stage / "model" / "adapter_model.safetensors"))
        if before.keys() == after.keys():
            moved = torch.sqrt(sum(((after[k] - before[k]).float() ** 2).sum() for k in before)).item()
            print(f"\nthe attack {args.attack_stage} moved the adapter by {moved:.2f} (L2)")
        else:
            print("\nthe attack trained a new adapter (merge_new): no common space to measure")


if __name__ == "__main__":
    main()
