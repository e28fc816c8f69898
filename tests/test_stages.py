"""Stage keys that deliberately moved: a stage trained with grad_accum > 1 before micro-batches
were weighted by their answer tokens must not be reused."""

from __future__ import annotations

from booster.config import load_config
from booster.io import stable_hash
from booster.stages import STAGE_VERSION, align_payload, stage_key


def test_accumulated_stages_get_keys_of_their_own_and_others_keep_theirs():
    plain = align_payload(load_config("tiny"))
    accumulated = align_payload(load_config("tiny", ["align.optim.grad_accum=2"]))
    assert stage_key("align", plain) == f"align-{stable_hash({'v': STAGE_VERSION, **plain})}"
    old = f"align-{stable_hash({'v': STAGE_VERSION, **accumulated})}"
    assert stage_key("align", accumulated) != old
