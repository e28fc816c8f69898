"""Booster in TRL's SFTTrainer (pip install 'booster[trl]'): your SFTConfig, your datasets in any
format SFTTrainer takes (here prompt/completion conversations); the harmful rows are tokenised
by SFTTrainer itself, so f and h share the chat template and the completion-only loss.

    python examples/trl_sft.py --steps 10            # ~3 min (19 s/step on one core of a Zen 4, float32)
    python examples/trl_sft.py --model tiny --steps 3   # a random 2-layer model, seconds
"""

import argparse

from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from trl import SFTConfig

from booster.config import ModelConfig
from booster.data.base import resolve_data_dir
from booster.data.safety import load_local
from booster.hf import BoosterSFTTrainer
from booster.models import load_tokenizer, smollm2_dir, tiny_model

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
ap.add_argument("--steps", type=int, default=10)
ap.add_argument("--data-dir")
ap.add_argument("--out", default="runs/example-trl-sft")
args = ap.parse_args()

tok = load_tokenizer(ModelConfig(name=args.model))
if args.model == "tiny":
    base = tiny_model(len(tok), tok.pad_token_id, tok.eos_token_id)
else:
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir())
model = get_peft_model(base, LoraConfig(r=32, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj"],
                                        task_type="CAUSAL_LM"))


def conversations(examples):
    return [{"prompt": [{"role": "user", "content": ex.prompt}],
             "completion": [{"role": "assistant", "content": ex.response}]} for ex in examples]


data = load_local(resolve_data_dir(args.data_dir), n_align=64, n_harmful=32, n_probe=8)
config = SFTConfig(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=2,
                   gradient_accumulation_steps=2, learning_rate=2e-3, max_length=128, max_grad_norm=1.0,
                   bf16=False, gradient_checkpointing=False, use_cpu=True, logging_steps=1,
                   save_strategy="steps", save_steps=args.steps, report_to=[])
trainer = BoosterSFTTrainer(model=model, args=config, processing_class=tok,
                            train_dataset=Dataset.from_list(conversations(data.align)),
                            harmful_dataset=conversations(data.harmful), booster_lam=5.0, booster_alpha=0.1)
trainer.train()
for row in trainer.state.log_history[:3]:
    print(row)
