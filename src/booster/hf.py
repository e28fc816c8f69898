"""Booster in a Hugging Face ``Trainer`` with your own ``TrainingArguments``.

    trainer = BoosterTrainer(model=model, args=TrainingArguments(...), train_dataset=alignment_rows,
                             data_collator=collate, harmful_dataset=harmful_rows,
                             booster_lam=5.0, booster_alpha=0.1)
    trainer.train()

Each optimizer step leaves g = ∇f(w) + λ(∇h(w) − ∇h(w̃)), w̃ = w − α∇h(w)/‖∇h(w)‖, in ``.grad``
(``booster.api.BoosterStep``, the class ``booster run`` trains with); the Trainer then clips
(``max_grad_norm``), steps its optimizer and scheduler, logs, checkpoints as usual. f is the
loss on the ``train_dataset`` batches, h on batches of ``harmful_dataset``.

- ``gradient_accumulation_steps = k``: the Trainer's k micro-batches are held until the last one
  of the window arrives and then go to Booster together with k harmful micro-batches, each
  counted by its answer tokens: the step's loss is the large batch's token mean and ‖∇h‖ is
  taken over all of them, as one large batch. (The reference implementation's ``training_step`` zeroes the gradients of the
  earlier micro-batches instead; TamperBench's inherits that.)
- Harmful micro-batch j of optimizer step s is a pure function of (``args.seed``, s·k + j): the
  rows of ``harmful_dataset`` reshuffled every epoch, padded to their longest. A run resumed from
  a checkpoint therefore sees the harmful batches the uninterrupted run saw.
- ``harmful_dataset``: rows with ``input_ids`` and ``labels`` (token lists, -100 on the prompt),
  as ``booster.text.encode_pair`` or your own SFT preprocessing makes them. Padding uses the
  tokenizer's pad id (``processing_class``), else 0.
- bf16 (``bf16=True`` or a bf16 model) works; fp16 does not (its loss scaler would scale ∇h before
  its norm is taken): use bf16 or fp32. DeepSpeed and the Trainer's FSDP are refused; DDP works
  (``accelerate launch``): gradients are synchronised once per pass on its last micro-batch.

TRL (``pip install 'booster[trl]'``): ``booster.hf.BoosterSFTTrainer`` is the mixin in front of
``trl.SFTTrainer``, with your ``SFTConfig``. Its ``harmful_dataset`` may be in any format SFTTrainer
takes (prompt/completion, messages, text): rows without ``input_ids`` are tokenised by SFTTrainer's
own preparation, as the alignment rows are, so f and h see the same template and loss mask.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from transformers import Trainer

from booster.api import BoosterStep, PlainBackward


class BoosterTrainerMixin:
    """Booster's step inside a Trainer's ``training_step`` (see the module docstring)."""

    def __init__(self, *args: Any, harmful_dataset: Any, booster_lam: float = 5.0, booster_alpha: float = 0.1,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        if getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False):
            raise ValueError("BoosterTrainer runs under one process or DDP; DeepSpeed and the Trainer's FSDP would "
                             "shard the weights Booster copies and restores (booster run supports FSDP2)")
        if self.args.fp16:
            raise ValueError("BoosterTrainer: fp16's loss scaling would scale ∇h before its norm is taken; "
                             "use bf16=True or fp32")
        rows = self.tokenise_harmful([dict(r) for r in harmful_dataset])
        if not rows or not all("input_ids" in r and "labels" in r for r in rows):
            raise ValueError("harmful_dataset needs rows with input_ids and labels (token lists, -100 on the prompt)")
        self.harmful_rows = rows
        self.booster_lam, self.booster_alpha = booster_lam, booster_alpha
        self._booster: BoosterStep | None = None
        self._pending: list[dict[str, Any]] = []
        self._harmful = None
        self._booster_metrics: dict[str, float] = {}

    def tokenise_harmful(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Harmful rows as token lists; a plain Trainer takes them as given."""
        return rows

    def harmful_batch(self, index: int) -> dict[str, torch.Tensor]:
        """Harmful micro-batch ``index`` (= step·k + j), the size of a training micro-batch."""
        from booster.train import Stream

        if self._harmful is None:
            pad = getattr(self.processing_class, "pad_token_id", None)
            self._harmful = Stream(self.harmful_rows, self.args.per_device_train_batch_size,
                                   0 if pad is None else pad, self.args.seed, "harmful")
        return self._harmful.batch(index)

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        model.train()
        self._pending.append(self._prepare_inputs(inputs))
        if not self.accelerator.sync_gradients:  # not the last micro-batch of the window: wait for it
            return torch.zeros((), device=self.args.device)
        if self._booster is None:
            self._booster = BoosterStep(model, lam=self.booster_lam, alpha=self.booster_alpha,
                                        accelerator=PlainBackward(self.accelerator))
        k = len(self._pending)
        harmful = [self._prepare_inputs(self.harmful_batch(self.state.global_step * k + j)) for j in range(k)]
        with self.compute_loss_context_manager():
            metrics = self._booster.backward(self._pending, harmful)
        self._pending = []
        self._booster_metrics = metrics
        # the Trainer sums what its micro-batches return: the window's total is the mean f
        return torch.tensor(metrics["loss"], device=self.args.device)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._booster_metrics:
            logs = {**logs, **{f"booster_{k}": v for k, v in self._booster_metrics.items() if k != "loss"}}
        super().log(logs, *args, **kwargs)


class BoosterTrainer(BoosterTrainerMixin, Trainer):
    """A ``transformers.Trainer`` whose every optimizer step is Booster's (module docstring)."""


def __getattr__(name: str) -> Any:
    # TRL is an optional extra: the class exists once someone asks for it and TRL is there
    if name == "BoosterSFTTrainer":
        return _sft_trainer()
    raise AttributeError(f"module 'booster.hf' has no attribute {name!r}")


@functools.cache
def _sft_trainer() -> type:
    try:
        from trl import SFTTrainer
    except ImportError:
        raise ImportError("booster.hf.BoosterSFTTrainer needs TRL: pip install 'booster[trl]'") from None

    class BoosterSFTTrainer(BoosterTrainerMixin, SFTTrainer):
        """``trl.SFTTrainer`` whose every optimizer step is Booster's (module docstring)."""

        def tokenise_harmful(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
            if not rows or all("input_ids" in r for r in rows):
                return rows
            from datasets import Dataset

            # SFTTrainer's own (private) preparation, the one its train_dataset went through; a TRL
            # release that changes it fails tests/test_trl.py rather than tokenising h differently
            done = self._prepare_dataset(Dataset.from_list(rows), self.processing_class, self.args, packing=False,
                                         formatting_func=None, dataset_name="harmful")
            return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in done]

    BoosterSFTTrainer.__module__ = __name__
    return BoosterSFTTrainer
