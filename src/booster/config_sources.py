"""Where a config comes from: the packaged YAML files, a file of your own, the command line.

Owns reading those into plain mappings (malformed YAML, a list where a section belongs and
``key=value`` overrides each give one line naming the place and the fix) and the wording of
OmegaConf's errors; ``config.py`` merges the mappings over the typed defaults and validates.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf.errors import OmegaConfBaseException

from booster.checks import ConfigError


def format_omegaconf_error(e: OmegaConfBaseException, source: str) -> str:
    msg = str(e).split("\n")[0].strip()
    key = getattr(e, "full_key", None)
    if "not in" in msg and key:
        return f"{source}: unknown key '{key}'; check its spelling against `booster config show`"
    return f"{source}: {f'{key}: ' if key else ''}{msg}"


def packaged_configs() -> dict[str, Path]:
    root = resources.files("booster") / "configs"
    return {p.name[:-5]: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def resolve_config_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.exists():
        return path
    known = packaged_configs()
    if str(name_or_path) in known:
        return known[str(name_or_path)]
    raise ConfigError(f"config '{name_or_path}' is neither a file nor a packaged config "
                      f"({', '.join(sorted(known))})")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: malformed YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections (model:, align:, ...), "
                          f"not {type(data).__name__}")
    return data


def parse_overrides(overrides: list[str]) -> tuple[list[str], dict[str, list[Any]] | None, bool]:
    """(plain dotted overrides, grid entries, whether the file's grid is cleared by `grid={}`)."""
    plain, grid, clear = [], {}, False
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value, e.g. align.optim.lr=1e-3")
        key, value = item.split("=", 1)
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"override '{item}': the value is not valid YAML; quote it or fix it") from None
        if key == "grid":
            if parsed not in ({}, None):
                raise ConfigError("grid=... only clears the grid and the cases (grid={}); set entries with grid.KEY=[...]")
            clear = True
        elif key.startswith("grid."):
            grid[key[5:]] = parsed if isinstance(parsed, list) else [parsed]
        else:
            plain.append(item)
    return plain, grid, clear
