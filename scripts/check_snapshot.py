"""Check on the real model that a shorter attack saved on the way through a longer one is the
attack run on its own: same stage hash, same weights, same train and probe logs.

    python scripts/check_snapshot.py [--out runs/snapcheck] [--short 50] [--long 100]

Runs exp-durability's SFT arm at lr 1e-3, p=0.2 (align once, up to the attack stage): first the
short attack alone, then, in a second run directory holding a copy of the same aligned stage,
the short and the long attack as one grid (the short one a snapshot of the long one). Prints
the largest |difference| over all weight tensors and whether the logs match; exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from booster.io import read_jsonl

SETTINGS = ["grid={}", "align.defense=sft", "attack.optim.lr=1e-3", "attack.p=0.2"]


def booster_attack(out: Path, *settings: str) -> None:
    cmd = [sys.executable, "-m", "booster.cli", "attack", "exp-durability", *SETTINGS, *settings, "--out-dir", str(out)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def attack_stages(root: Path) -> dict[str, Path]:
    return {d.name: d for d in (root / "stages").glob("attack-*") if (d / "DONE.json").exists()}


def compare(a: Path, b: Path) -> bool:
    same = True
    wa, wb = (load_file(next((d / "model").glob("*.safetensors"))) for d in (a, b))
    if wa.keys() != wb.keys():
        print(f"weight names differ: {sorted(wa.keys() ^ wb.keys())[:5]}")
        return False
    worst = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    print(f"{len(wa)} weight tensors, max |difference| {worst:g}")
    same &= worst == 0.0
    for name in ("train_log", "probe_log"):
        # train_log's "seconds" is wall-clock time: it differs between any two runs
        ra, rb = ([{k: v for k, v in r.items() if k != "seconds"} for r in read_jsonl(d / f"{name}.jsonl")]
                  for d in (a, b))
        print(f"{name}: {len(ra)} vs {len(rb)} rows, {'equal' if ra == rb else 'DIFFERENT'}")
        same &= ra == rb
    same &= (a / "train_set.csv").read_bytes() == (b / "train_set.csv").read_bytes()
    return same


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/snapcheck")
    ap.add_argument("--short", type=int, default=50)
    ap.add_argument("--long", type=int, default=100)
    args = ap.parse_args()
    alone, shared = Path(args.out) / "alone", Path(args.out) / "shared"
    booster_attack(alone, f"attack.optim.steps={args.short}")
    (shared / "stages").mkdir(parents=True, exist_ok=True)
    for d in (alone / "stages").glob("align-*"):
        if not (shared / "stages" / d.name).exists():
            shutil.copytree(d, shared / "stages" / d.name)
    booster_attack(shared, f"grid.attack.optim.steps=[{args.short},{args.long}]")
    short_alone = attack_stages(alone)
    both = attack_stages(shared)
    (key,) = short_alone
    if key not in both:
        print(f"the shared run has no stage {key} (it has {sorted(both)}): the hashes differ")
        return 1
    info = json.loads((both[key] / "DONE.json").read_text())
    print(f"{key}: in the shared run a snapshot of {info.get('snapshot_of')} at step {info.get('steps')}")
    ok = info.get("snapshot_of") is not None and compare(short_alone[key], both[key])
    print("IDENTICAL" if ok else "DIFFERENT")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
