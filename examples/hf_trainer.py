"""Booster in a Hugging Face Trainer with your own TrainingArguments (here: gradient
accumulation 2, clipping 1.0, a linear schedule, a checkpoint at the end).

    python examples/hf_trainer.py --steps 10            # ~3 min on 2 CPU cores (float32)
    python examples/hf_trainer.py --model tiny --steps 3   # a random 2-layer model, seconds

TRL: `class BoosterSFTTrainer(BoosterTrainerMixin, SFTTrainer)` (booster.hf) takes the same
harmful_dataset, booster_lam and booster_alpha.
"""

import argparse

from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, TrainingArguments

from booster.config import ModelConfig
from booster.data.base import resolve_data_dir
from booster.data.safety import load_local
from booster.hf import BoosterTrainer
from booster.models import load_tokenizer, smollm2_dir, tiny_model
from booster.text import encode_pair, pad_batch

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
ap.add_argument("--steps", type=int, default=10)
ap.add_argument("--data-dir")
ap.add_argument("--out", default="runs/example-hf-trainer")
args = ap.parse_args()

tok = load_tokenizer(ModelConfig(name=args.model))
if args.model == "tiny":
    base = tiny_model(len(tok), tok.pad_token_id, tok.eos_token_id)
else:
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir())
model = get_peft_model(base, LoraConfig(r=32, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj"],
                                        task_type="CAUSAL_LM"))

data = load_local(resolve_data_dir(args.data_dir), n_align=64, n_harmful=32, n_probe=8)
align = [encode_pair(tok, ex, "chat", 128) for ex in data.align]
harmful = [encode_pair(tok, ex, "chat", 128) for ex in data.harmful]

training = TrainingArguments(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=2e-3, lr_scheduler_type="linear",
                             max_grad_norm=1.0, logging_steps=1, save_strategy="steps", save_steps=args.steps,
                             report_to=[], use_cpu=True, remove_unused_columns=False)
trainer = BoosterTrainer(model=model, args=training, train_dataset=align, processing_class=tok,
                         data_collator=lambda rows: pad_batch(rows, tok.pad_token_id),
                         harmful_dataset=harmful, booster_lam=5.0, booster_alpha=0.1)
trainer.train()
for row in trainer.state.log_history[:3]:
    print(row)
