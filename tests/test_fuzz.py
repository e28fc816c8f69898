"""Fuzzing: the config loader and the data loaders fail only with their own clear errors."""

from __future__ import annotations

import gzip
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from booster.config import ConfigError, ExperimentConfig, load_config
from booster.data import safety
from booster.data.base import DataError
from booster.data.tasks import get_task

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

KEYS = ["model", "data", "align", "attack", "eval", "run", "grid", "optim", "booster", "lr", "lam", "alpha", "p",
        "n", "name", "steps", "defense", "judge", "lora", "r", "targets", "seed", "dtype", "bogus", "every",
        "align.defense", "attack.p", "vaccine", "rho", "lisa"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["sft", "booster", "tiny", "lora", "float32", "sst2"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)),
                      max_leaves=12)


@FUZZ
@given(doc=st.dictionaries(st.sampled_from(KEYS), values, max_size=5))
def test_config_from_random_mappings(tmp_path, doc):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        assert isinstance(load_config(path), ExperimentConfig)
    except ConfigError as e:
        assert "\n" not in str(e)


@FUZZ
@given(text=st.text(max_size=200))
def test_config_from_random_text(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError:
        pass


@FUZZ
@given(overrides=st.lists(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(
    ["align.optim.lr", "attack.p", "grid.attack.p", "model.lora.r", "eval.judge", "align.booster.alpha", "grid",
     "run.seed", "attack.n", "data.n_align", "grid.align.booster.lam"]), st.text(max_size=10)), max_size=3))
def test_overrides(overrides):
    try:
        load_config("tiny", overrides)
    except ConfigError:
        pass


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


LOADERS = {
    "safety/refusals.json": lambda d: safety.load_refusals(d),
    "safety/harmful_qa.json": lambda d: safety.load_harmful_qa(d),
    "safety/advbench.prompt.yaml": lambda d: safety.load_advbench(d),
    "sst2/train.tsv": lambda d: get_task("sst2").pool(d),
    "agnews/test.csv": lambda d: get_task("agnews").eval_set(d),
    "gsm8k/test.jsonl": lambda d: get_task("gsm8k").eval_set(d),
}
SAMPLES = {  # near-valid starting points, so the fuzzer reaches past the first parse
    "safety/refusals.json": b'[{"instruction": "a", "output": "b", "input": ""}]',
    "safety/harmful_qa.json": b'[{"user": "a", "assistant": "b", "category": "Harmful"}]',
    "safety/advbench.prompt.yaml": b"seeds:\n- value: do harm\n",
    "sst2/train.tsv": b"label\tsentence\n1\tgood\n",
    "agnews/test.csv": b'"1","t","d"\n',
    "gsm8k/test.jsonl": b'{"question": "q", "answer": "#### 3"}\n',
}


@FUZZ
@given(rel=st.sampled_from(sorted(LOADERS)), cut=st.integers(0, 60), junk=st.binary(max_size=40))
def test_data_loaders_on_corrupted_files(tmp_path, rel, cut, junk):
    sample = SAMPLES[rel]
    _write(tmp_path / rel, sample[:cut] + junk + sample[cut:])
    try:
        assert isinstance(LOADERS[rel](tmp_path), list)
    except DataError as e:
        assert str(tmp_path) in str(e) or "no examples" in str(e)


@FUZZ
@given(data=st.binary(max_size=80), compress=st.booleans())
def test_hh_rlhf_loader_on_corrupted_files(tmp_path, data, compress):
    _write(tmp_path / "safety/hh_rlhf_harmless_test.jsonl.gz", gzip.compress(data) if compress else data)
    try:
        safety.load_hh_single_turn(tmp_path)
    except DataError:
        pass
