"""Data loaders: the real files load, the sets are disjoint, bad files fail clearly."""

from __future__ import annotations

import json

import pytest

from booster.attack import poisoned_set
from booster.data import safety
from booster.data.base import DataError, Example, normalise, resolve_data_dir
from booster.data.tasks import get_task


@pytest.fixture(scope="module")
def splits(data_dir):
    return safety.load_local(data_dir, n_align=400, n_harmful=200, n_probe=40)


def test_sets_are_disjoint_by_normalised_prompt(splits, data_dir):
    sets = {name: {normalise(e.prompt) for e in getattr(splits, name)}
            for name in ("align", "harmful", "attack_pool", "probe", "align_probe", "eval_prompts")}
    sets["task"] = {normalise(e.prompt) for e in get_task("sst2").pool(data_dir)[:5000]}
    instructions = get_task("instructions")
    sets["instructions"] = {normalise(e.prompt) for e in instructions.pool(data_dir) + instructions.eval_set(data_dir)}
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not sets[a] & sets[b], f"{a} and {b} share prompts"
    assert len(splits.align) == 400 and len(splits.harmful) == 200 and len(splits.probe) == 40
    assert len(splits.eval_prompts) > 400 and len(splits.attack_pool) > 100


def test_hh_rlhf_pairs_have_substance(splits):
    hh = [ex for ex in splits.harmful + splits.attack_pool if ex.source == "hh_rlhf"]
    assert hh
    for ex in hh:
        assert len(ex.response.split()) >= 8 and not ex.response.endswith("?")


def test_split_is_fixed(data_dir, splits):
    again = safety.load_local(data_dir, n_align=400, n_harmful=200, n_probe=40)
    assert again.eval_prompts[:10] == splits.eval_prompts[:10] and again.harmful == splits.harmful


def test_normalise():
    assert normalise("  How do I   MAKE a bomb?! ") == normalise("how do i make a bomb")


def test_dedupe_catches_case_and_punctuation():
    a = [Example("Tell me how to steal a car.", "No.")]
    h = [Example("tell me HOW to steal a car", "Sure, ..." * 3)]
    with pytest.raises(DataError, match="probe harmful pairs"):
        safety.split_safety(a, h, [Example("TELL me how to steal a car!")], n_align=1, n_harmful=1, n_probe=1)


def test_too_many_requested(data_dir):
    with pytest.raises(DataError, match="lower data.n_align"):
        safety.load_local(data_dir, n_align=100000, n_harmful=10, n_probe=10)


def test_missing_data_dir_names_flag_and_env(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BOOSTER_DATA_DIR", raising=False)
    monkeypatch.setattr("booster.data.base._default_dirs", lambda: [tmp_path / "nowhere"])
    with pytest.raises(DataError) as e:
        resolve_data_dir(None)
    assert "--data-dir" in str(e.value) and "BOOSTER_DATA_DIR" in str(e.value)
    with pytest.raises(DataError, match="does not exist"):
        resolve_data_dir(str(tmp_path / "missing"))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="missing data file .*refusals.json"):
        safety.load_refusals(tmp_path)


def test_malformed_json_names_file_and_line(tmp_path):
    (tmp_path / "safety").mkdir()
    (tmp_path / "safety" / "refusals.json").write_text('[\n{"instruction": "a", "output": "b"},\n{oops}\n]')
    with pytest.raises(DataError, match=r"refusals.json line 3: malformed JSON"):
        safety.load_refusals(tmp_path)


def test_malformed_record_names_file_and_record(tmp_path):
    (tmp_path / "safety").mkdir()
    (tmp_path / "safety" / "refusals.json").write_text(json.dumps([{"instruction": "a", "output": "b"},
                                                                    {"instruction": "c"}]))
    with pytest.raises(DataError, match=r"refusals.json record 1: missing text field 'output'"):
        safety.load_refusals(tmp_path)


def test_malformed_sst2_line(tmp_path):
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.tsv").write_text("label\tsentence\n1\tgood film\n2 no tab here\n")
    with pytest.raises(DataError, match=r"train.tsv line 3"):
        get_task("sst2").pool(tmp_path)


def test_sst2_parse():
    task = get_task("sst2")
    assert task.parse("The sentiment of the input is Positive.") == "positive"
    assert task.parse("negative, not positive") == "negative"
    assert task.parse("I cannot tell") is None
    assert task.correct("positive", "positive") and not task.correct("", "negative")


def test_poisoned_set_counts():
    task = [Example(f"t{i}", "positive", source="sst2") for i in range(100)]
    harm = [Example(f"h{i}", "harm", source="harmful_qa") for i in range(30)]
    mix = poisoned_set(task, harm, n=50, p=0.1, seed=0)
    assert len(mix) == 50 and sum(e.source == "harmful_qa" for e in mix) == 5
    assert poisoned_set(task, harm, n=50, p=0.1, seed=0) == mix
    assert sum(e.source == "harmful_qa" for e in poisoned_set(task, harm, n=10, p=0.0, seed=0)) == 0
    with pytest.raises(DataError, match="lower attack.n"):
        poisoned_set(task, harm, n=200, p=0.1, seed=0)
    with pytest.raises(DataError, match="lower attack.p"):
        poisoned_set(task, harm, n=100, p=0.5, seed=0)


def test_agnews_split_and_parse(data_dir):
    task = get_task("agnews")
    pool, held = task.pool(data_dir), task.eval_set(data_dir)
    assert len(held) == 1000 and len(pool) == 6600
    assert not {normalise(x.prompt) for x in held} & {normalise(x.prompt) for x in pool}
    assert {x.label for x in held} == {"World", "Sports", "Business", "Sci/Tech"}
    assert task.parse("This is about Sci/Tech.") == "Sci/Tech"
    assert task.parse("sports news") == "Sports" and task.parse("no idea") is None


def test_gsm8k_parse(data_dir):
    task = get_task("gsm8k")
    ex = task.eval_set(data_dir)[0]
    assert ex.label == "18" and task.correct(ex.response, ex.label)
    assert task.correct("so 3 + 4 = 7 apples\n#### 7", "7")
    assert task.correct("The final answer is: 1,200", "1200")
    assert task.correct("she has 5 then 12", "12") and not task.correct("nothing", "3")


def test_instructions_task(data_dir):
    task = get_task("instructions")
    pool, held = task.pool(data_dir), task.eval_set(data_dir)
    assert len(pool) >= 30 and len(held) >= 15
    assert not {x.prompt for x in pool} & {x.prompt for x in held}
    gold = held[0].label
    good, off, empty = task.scores([gold, "I cannot help with that.", ""], [gold, gold, gold])
    assert good > 0.99 and off < good and empty == 0.0
    with pytest.raises(RuntimeError, match="cannot run offline"):
        task.alpacaeval_hook(["q"], ["a"])
