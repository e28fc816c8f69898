"""Every shipped config validates; bad configs fail with one line naming the key and the fix."""

from __future__ import annotations

import pytest

from booster.config import ConfigError, expand_grid, load_config
from booster.config_sources import packaged_configs


@pytest.mark.parametrize("name", sorted(packaged_configs()))
def test_packaged_configs_validate(name):
    cfg = load_config(name)
    for point in expand_grid(cfg):
        assert point.grid == {}


def test_first_line_of_each_config_shows_its_command():
    for name, path in packaged_configs().items():
        assert path.read_text().splitlines()[0].startswith("# booster "), name


def test_overrides_and_grid():
    cfg = load_config("tiny", ["align.optim.lr=0.01", "grid.attack.p=[0, 0.5]", "align.booster.lam=2"])
    assert cfg.align.optim.lr == 0.01 and cfg.align.booster.lam == 2.0
    points = expand_grid(cfg)
    assert [(p.align.defense, p.attack.p) for p in points] == [
        ("sft", 0.0), ("sft", 0.5), ("booster", 0.0), ("booster", 0.5)]


@pytest.mark.parametrize("override, needle", [
    ("align.booster.lam=-1", "booster.lam must be >= 0"),
    ("align.booster.alpha=0", "booster.alpha must be > 0"),
    ("align.vaccine.rho=-1", "vaccine.rho"),
    ("attack.lisa.rho=-1", "lisa.rho must be >= 0"),
    ("align.repnoise.beta=-1", "repnoise"),
    ("attack.p=1.5", "attack.p must be in [0, 1]"),
    ("attack.p=-0.1", "attack.p must be in [0, 1]"),
    ("align.defense=magic", "choose one of: none, sft, booster"),
    ("attack.task=chess", "attack.task='chess' is not known"),
    ("align.optim.lr=fast", "align.optim.lr"),
    ("align.optim.bogus=1", "unknown key 'align.optim.bogus'"),
    ("eval.judge=oracle", "eval.judge='oracle' is not known"),
    ("grid.align.optim.lr=[1e-3, oops]", "align.optim.lr"),
    ("grid.align.nothing=[1]", "unknown key 'align.nothing'"),
    ("align.optim.lr", "must look like key=value"),
])
def test_bad_values_fail_with_one_line(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [override])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text, needle", [
    ("model: [unclosed", "malformed YAML"),
    ("- just\n- a list\n", "must be a mapping"),
    ("model:\n  nmae: tiny\n", "unknown key 'model.nmae'"),
    ("attack:\n  n: many\n", "attack.n"),
])
def test_bad_files(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_cases_cross_the_grid(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("cases:\n  - {attack.optim.lr: 1.0e-4, attack.adapter: single}\n"
                    "  - {attack.optim.lr: 5.0e-4, attack.adapter: merge_new}\n"
                    "grid:\n  attack.p: [0.0, 0.1]\n")
    cfg = load_config(path)
    from booster.config import varied_keys

    assert varied_keys(cfg) == ["attack.optim.lr", "attack.adapter", "attack.p"]
    points = expand_grid(cfg)
    assert [(p.attack.optim.lr, p.attack.adapter, p.attack.p) for p in points] == [
        (1e-4, "single", 0.0), (1e-4, "single", 0.1), (5e-4, "merge_new", 0.0), (5e-4, "merge_new", 0.1)]
    path.write_text("cases:\n  - {attack.optim.lr: fast}\n")
    with pytest.raises(ConfigError, match="attack.optim.lr"):
        load_config(path)
    path.write_text("cases:\n  - {attack.nope: 1}\n")
    with pytest.raises(ConfigError, match="unknown key 'attack.nope'"):
        load_config(path)


def test_grid_can_be_cleared_and_replaced():
    cfg = load_config("demo", ["grid={}", "grid.attack.p=[0.2]"])
    assert cfg.grid == {"attack.p": [0.2]}
    with pytest.raises(ConfigError, match="only clears the grid"):
        load_config("demo", ["grid=[1]"])


def test_unknown_config_name_lists_packaged_ones():
    with pytest.raises(ConfigError, match="packaged config .*demo"):
        load_config("no-such-config")
