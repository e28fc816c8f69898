"""Loss probes: mean answer-token cross-entropy of a model on fixed, held-out pairs.

During the attack this traces the harmful loss over fine-tuning steps (the paper's
Figure 3); during alignment it traces harmful and alignment loss (the rebuttal's table).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from booster.models import answer_head, answer_loss
from booster.text import IGNORE, pad_batch


def mean_answer_loss(model: Any, rows: list[dict[str, list[int]]], pad_id: int, batch_size: int = 16) -> float:
    """Token-weighted mean cross-entropy over all answer tokens of ``rows``."""
    device = next(model.parameters()).device
    parts = answer_head(model)
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in pad_batch(rows[start:start + batch_size], pad_id).items()}
        with torch.no_grad():
            if parts is not None:  # the head on answer positions only: a probe is ~25% cheaper
                total += answer_loss(parts, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                     reduction="sum").item()
            else:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               use_cache=False).logits
                labels = batch["labels"][:, 1:]
                keep = labels != IGNORE  # score answer tokens only; avoids copying the whole logit tensor
                total += torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), labels[keep],
                                                           reduction="sum").item()
        count += int((batch["labels"][:, 1:] != IGNORE).sum())
    return total / max(count, 1)


def loss_probe(rows: list[dict[str, list[int]]], pad_id: int) -> Callable[[Any], float]:
    return lambda model: mean_answer_loss(model, rows, pad_id)
