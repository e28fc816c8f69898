"""The defences, by name. An explicit registry: adding a defence means one file and one line
here; the config checks ``align.defense`` / ``attack.defense`` against this dict (through
``defense_names``), so a defence registered at run time is a valid name at once."""

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


def defense_names(stage: str) -> tuple[str, ...]:
    """The defences that can run in ``stage`` ('align' or 'attack'), in the registry's order."""
    return tuple(name for name, cls in DEFENSES.items() if stage in cls.stages)


def make_defense(name: str, stage_cfg) -> Defense:
    if name not in DEFENSES:
        raise ValueError(f"unknown defence '{name}'; choose one of: {', '.join(DEFENSES)}")
    return DEFENSES[name](stage_cfg)


__all__ = ["DEFENSES", "Defense", "StepContext", "defense_names", "make_defense"]
