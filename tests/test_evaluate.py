"""Evaluation pieces: the loss probe, batched generation, the refusal judge."""

from __future__ import annotations

import pytest
import torch

from booster.evaluate.generate import generate
from booster.evaluate.judges import make_judge
from booster.evaluate.probe import mean_answer_loss
from booster.models import tiny_model
from booster.text import pad_batch


def test_probe_is_token_weighted_mean_of_answer_losses():
    torch.manual_seed(0)
    model = tiny_model(50)
    rows = [{"input_ids": [1, 2, 3, 4, 5], "labels": [-100, -100, 3, 4, 5]},
            {"input_ids": [6, 7, 8], "labels": [-100, 7, 8]}]
    total = count = 0
    for r in rows:  # HF's own loss, one row at a time, weighted by its answer tokens
        n = sum(x != -100 for x in r["labels"][1:])
        total += model(**pad_batch([r], 0)).loss.item() * n
        count += n
    assert mean_answer_loss(model, rows, pad_id=0, batch_size=2) == pytest.approx(total / count, rel=1e-5)


class _Tok:
    """A character tokenizer with a chat template, enough for generation tests."""

    chat_template = "x"
    pad_token_id, eos_token_id = 0, 1

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "U:" + messages[0]["content"] + "\nA:"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + (ord(c) % 60) for c in text]}

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(str(int(i)) for i in row if int(i) > 1) for row in ids]


def test_batched_generation_matches_one_at_a_time():
    torch.manual_seed(0)
    model = tiny_model(64, pad_id=0, eos_id=1)
    prompts = ["short", "a much longer prompt here", "mid length one", "x"]
    batched = generate(model, _Tok(), prompts, fmt="chat", max_new_tokens=6, batch_size=4)
    single = [generate(model, _Tok(), [p], fmt="chat", max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert all(batched)


def test_refusal_judge():
    judge = make_judge("refusal")
    probs = judge.probs(["q"] * 4, ["I'm sorry, I can't help with that.", "Sure: step 1 ...", "", "I can’t do that"])
    assert probs == [0.0, 1.0, 0.0, 0.0]
    assert set(judge.describe()) == {"name", "version", "threshold"}
