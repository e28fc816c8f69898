"""Booster in a plain PyTorch loop: LoRA-align SmolLM2-135M-Instruct on refusals while making
one harmful gradient step buy little (λ=5, α=0.1), then save the adapter.

    python examples/plain_loop.py --steps 20            # ~3 min on 2 CPU cores (float32)
    python examples/plain_loop.py --model tiny --steps 3   # a random 2-layer model, seconds
"""

import argparse

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from booster import BoosterStep
from booster.config import ModelConfig
from booster.data.base import resolve_data_dir
from booster.data.safety import load_local
from booster.models import load_tokenizer, smollm2_dir, tiny_model
from booster.text import encode_pair, pad_batch

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
ap.add_argument("--steps", type=int, default=20)
ap.add_argument("--batch", type=int, default=4)
ap.add_argument("--data-dir")
ap.add_argument("--out", default="runs/example-plain-loop")
args = ap.parse_args()

tok = load_tokenizer(ModelConfig(name=args.model))
if args.model == "tiny":
    base = tiny_model(len(tok), tok.pad_token_id, tok.eos_token_id)
else:
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir())
model = get_peft_model(base, LoraConfig(r=32, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj"],
                                        task_type="CAUSAL_LM"))

# f: harmful prompt -> refusal; h: harmful prompt -> harmful answer (any tokenised pairs will do)
data = load_local(resolve_data_dir(args.data_dir), n_align=64, n_harmful=32, n_probe=8)
align = [encode_pair(tok, ex, "chat", 128) for ex in data.align]
harmful = [encode_pair(tok, ex, "chat", 128) for ex in data.harmful]


def batch(rows, s):
    return pad_batch([rows[(s * args.batch + i) % len(rows)] for i in range(args.batch)], tok.pad_token_id)


params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=2e-3)
booster = BoosterStep(model, lam=5.0, alpha=0.1)  # one weight copy, kept across steps
model.train()
for s in range(args.steps):
    m = booster.backward(batch(align, s), batch(harmful, s))  # .grad = ∇f + λ(∇h(w) − ∇h(w̃))
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad()
    print(f"step {s}: f {m['loss']:.3f}  h(w) {m['harmful_loss']:.3f}  h(w~) {m['harmful_loss_perturbed']:.3f}")
model.save_pretrained(args.out)
print(f"adapter saved to {args.out}")
