"""Plain examples, the data directory, and prompt normalisation for de-duplication."""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

DATA_ENV = "BOOSTER_DATA_DIR"


class DataError(ValueError):
    """Missing, empty or malformed data; the message names the file (and line) and the fix."""


@dataclass(frozen=True)
class Example:
    prompt: str
    """The user's request, without any template."""
    response: str = ""
    """The answer to train on (empty for evaluation prompts)."""
    label: str | None = None
    """Gold answer for scoring (task evaluation), if any."""
    source: str = ""
    """Where the example came from, e.g. 'harmful_qa' or 'sst2'."""


def normalise(text: str) -> str:
    """Lower-case, accents and punctuation stripped, whitespace collapsed: the key for de-duplication."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^a-z0-9 ]+", " ", text.lower())
    return re.sub(r"\s+", " ", text).strip()


def _default_dirs() -> list[Path]:
    here = Path(__file__).resolve()
    # ../shared/data beside the checkout: from the working directory, and from a source checkout.
    return [Path.cwd().parent / "shared" / "data", here.parents[4] / "shared" / "data"]


def resolve_data_dir(configured: str | None) -> Path:
    """The configured directory, else $BOOSTER_DATA_DIR, else ../shared/data if it exists."""
    if configured:
        path = Path(configured).expanduser()
        if not path.is_dir():
            raise DataError(f"data directory {path} does not exist; fix data.dir (or --data-dir)")
        return path
    env = os.environ.get(DATA_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise DataError(f"${DATA_ENV}={path} is not a directory; point it at the data directory")
        return path
    for path in _default_dirs():
        if path.is_dir():
            return path
    raise DataError(f"no data directory found: pass --data-dir DIR (or data.dir=DIR) or set ${DATA_ENV}; "
                    f"the default ../shared/data does not exist")


def require_file(data_dir: Path, rel: str) -> Path:
    path = Path(data_dir) / rel
    if not path.is_file():
        raise DataError(f"missing data file {path}; check the data directory (--data-dir / ${DATA_ENV})")
    return path


def read_text(path: Path) -> str:
    """A data file's text; undecodable or unreadable files become a DataError naming the file."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); restore the file from its source") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror}); check the file") from None
