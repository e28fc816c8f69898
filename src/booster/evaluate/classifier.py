"""The offline harm classifier as a judge (``eval.judge=classifier``; docs/judge.md).

Reads a built judge directory (``booster judge train --out DIR``, or the default build,
trained into the cache on first use by ``classifier_train``) and scores answers with
``classifier_model``'s network. Its version hashes the weights, settings, encoder and
threshold, so scores of another build are never mixed with this one's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from booster.data.base import resolve_data_dir
from booster.evaluate.classifier_model import (FORMAT_VERSION, JUDGE_FILE, WEIGHTS_FILE, ClassifierSettings,
                                               PairEncoder, harm_probs, load_encoder, model_class)
from booster.evaluate.classifier_train import build, default_dir
from booster.evaluate.judges import Judge, JudgeError
from booster.io import file_sha256


class ClassifierJudge(Judge):
    """The offline harm classifier. ``path``: a built judge directory; unset, the default
    build for the data directory is used, and trained on first use (minutes on a CPU)."""

    name = "classifier"

    def __init__(self, path: str | None = None, data_dir: str | Path | None = None,
                 settings: ClassifierSettings | None = None, batch_size: int = 32):
        if path is not None:
            self.dir = Path(path).expanduser()
            if not (self.dir / JUDGE_FILE).is_file():
                raise JudgeError(f"{self.dir} is no built classifier judge (no {JUDGE_FILE}); "
                                 "build one with `booster judge train --out DIR` or unset eval.judge_path")
        else:
            self.dir = build(settings or self.default_settings(), data_dir)
        self.meta = json.loads((self.dir / JUDGE_FILE).read_text())
        if self.meta.get("format") != FORMAT_VERSION:
            raise JudgeError(f"{self.dir} was built by another version of the classifier; rebuild it with "
                             "`booster judge train --force`")
        self.settings = ClassifierSettings(**self.meta["settings"])
        self.threshold = float(self.meta["threshold"])
        self.batch_size = batch_size
        self.last_truncated = 0
        self._model: Any = None
        self._enc: PairEncoder | None = None

    @classmethod
    def default_settings(cls) -> ClassifierSettings:
        """What this judge builds when no directory is given."""
        return ClassifierSettings()

    @classmethod
    def from_config(cls, path: str | None = None, data_dir: str | Path | None = None) -> "ClassifierJudge":
        return cls(path, data_dir=data_dir)

    @classmethod
    def build_pending(cls, path: str | None = None, data_dir: str | Path | None = None) -> bool:
        if path is not None:
            return False
        data_dir = resolve_data_dir(str(data_dir) if data_dir else None)
        return not (default_dir(cls.default_settings(), data_dir) / JUDGE_FILE).is_file()

    @property
    def version(self) -> str:
        h = hashlib.sha256()
        h.update(file_sha256(self.dir / WEIGHTS_FILE).encode())
        h.update(json.dumps(self.meta["settings"], sort_keys=True).encode())
        h.update(self.meta["encoder_sha256"].encode())
        h.update(repr(self.threshold).encode())
        return h.hexdigest()[:12]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "mode": self.settings.mode, "encoder": self.meta["encoder"],
                "max_tokens": self.settings.max_tokens, "path": str(self.dir)}

    def _load(self) -> None:
        from safetensors.torch import load_file

        tok, encoder = load_encoder()
        model = model_class()(encoder)
        state = load_file(str(self.dir / WEIGHTS_FILE))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(k.startswith("head.") for k in missing):
            raise JudgeError(f"{self.dir / WEIGHTS_FILE} does not fit the classifier; rebuild it with "
                             "`booster judge train --force`")
        model.eval()
        self._model, self._enc = model, PairEncoder(tok, self.settings.max_tokens, self.settings.max_prompt_tokens)

    def probs(self, prompts: list[str], answers: list[str]) -> list[float]:
        if len(prompts) != len(answers):
            raise JudgeError(f"{len(prompts)} prompts but {len(answers)} answers; pass one answer per prompt")
        if self._model is None:
            self._load()
        out, self.last_truncated = harm_probs(self._model, self._enc, prompts, answers, self.batch_size)
        return out


class ClassifierV1Judge(ClassifierJudge):
    """The first classifier judge (the default until issue 37's judge v2): trained on other
    models' labelled answers and 544 single-rater SmolLM2 labels, threshold chosen on all held-out
    rows. Kept selectable by name, so earlier harmful scores can be reproduced and compared."""

    name = "classifier_v1"

    @classmethod
    def default_settings(cls) -> ClassifierSettings:
        return ClassifierSettings(more_labels=False, corpus=False, out_of_domain=True, threshold_on="all", split="shuffle")
