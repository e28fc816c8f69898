"""The defences, by name. An explicit registry: adding a defence means adding a line here, and
its name and stages to ``booster.names.DEFENSES`` (what the config checks names against)."""

from __future__ import annotations

from booster.defenses.base import Defense, StepContext
from booster.defenses.booster import Booster
from booster.defenses.booster_ablation import BoosterNoLastTerm
from booster.defenses.booster_vaccine import BoosterVaccine
from booster.defenses.lisa import Lisa
from booster.defenses.repnoise import RepNoise
from booster.defenses.sft import SFT
from booster.defenses.vaccine import Vaccine

DEFENSES: dict[str, type[Defense]] = {
    SFT.name: SFT,
    Booster.name: Booster,
    Vaccine.name: Vaccine,
    RepNoise.name: RepNoise,
    BoosterVaccine.name: BoosterVaccine,
    BoosterNoLastTerm.name: BoosterNoLastTerm,
    Lisa.name: Lisa,
}


def make_defense(name: str, stage_cfg) -> Defense:
    if name not in DEFENSES:
        raise ValueError(f"unknown defence '{name}'; choose one of: {', '.join(DEFENSES)}")
    return DEFENSES[name](stage_cfg)


__all__ = ["DEFENSES", "Defense", "StepContext", "make_defense"]
