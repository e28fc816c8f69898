"""The user's own harmful prompts for evaluation (``eval.prompts``): HarmBench, Do-Not-Answer,
a red-team set. A file of one prompt per line (``.txt``; blank lines skipped), or JSON lines
with a ``prompt`` field and optionally a ``source`` (``.jsonl``); the harmful score is reported
per source, and a file's prompts without one are named after the file."""

from __future__ import annotations

import json
from pathlib import Path

from booster.data.base import DataError, Example, normalise, read_text


def load_prompt_file(path: str | Path) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"eval.prompts: no file {path}; give a .txt (one prompt per line) or .jsonl (a 'prompt' "
                        "field per line) file")
    default = path.stem
    out: list[Example] = []
    if path.suffix == ".jsonl":
        for i, line in enumerate(read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {i}: not JSON ({e.msg}); one object per line, e.g. "
                                '{"prompt": "...", "source": "harmbench"}') from None
            prompt = row.get("prompt") if isinstance(row, dict) else None
            if not isinstance(prompt, str) or not prompt.strip():
                raise DataError(f"{path} line {i}: needs a non-empty 'prompt' string")
            source = row.get("source") or default
            out.append(Example(prompt=prompt.strip(), source=str(source)))
    elif path.suffix in (".txt", ""):
        out = [Example(prompt=line.strip(), source=default) for line in read_text(path).splitlines() if line.strip()]
    else:
        raise DataError(f"eval.prompts: {path} is neither .txt (one prompt per line) nor .jsonl (a 'prompt' field "
                        "per line)")
    if not out:
        raise DataError(f"eval.prompts: {path} holds no prompts")
    return out


def seen_in_training(prompts: list[Example], training: list[Example]) -> int:
    """How many of ``prompts`` a model of this run was trained on (normalised text)."""
    seen = {normalise(ex.prompt) for ex in training}
    return sum(normalise(p.prompt) in seen for p in prompts)
