"""Where a run's time went: each finished stage's wall time (its DONE.json), by kind, in the
order the stages finished, with the dtype each trained in (meta.json).

    python scripts/stage_times.py runs/demo

A stage's time covers its own work (training with its probes; an evaluation's generation);
the judge's one-time build and the model conversion are not in any stage.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from booster.io import read_json


def stage_rows(root: Path) -> list[dict]:
    rows = []
    for d in (Path(root) / "stages").iterdir():
        if not (d / "DONE.json").is_file():
            continue
        done, meta = read_json(d / "DONE.json"), read_json(d / "meta.json") if (d / "meta.json").is_file() else {}
        cfg = read_json(d / "config.json")
        what = cfg.get("align", {}).get("defense") or (f"p={cfg['attack'].get('p')}" if "attack" in cfg else
                                                        f"of {cfg.get('upstream', '')}")
        rows.append({"stage": d.name, "kind": d.name.split("-")[0], "what": what, "seconds": done["seconds"],
                     "steps": done.get("steps", ""), "dtype": meta.get("dtype", {}).get("resolved", "?"),
                     "finished": (d / "DONE.json").stat().st_mtime, "snapshot": bool(done.get("snapshot_of"))})
    return sorted(rows, key=lambda r: r["finished"])


def table(rows: list[dict]) -> str:
    lines = ["| stage | kind | what | steps | dtype | min |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['kind']} | {r['what']} | {r['steps']} | {r['dtype']} | {r['seconds'] / 60:.1f} |"
              for r in rows]
    kinds: dict[str, list[float]] = {}
    for r in rows:
        if not r["snapshot"]:
            kinds.setdefault(r["kind"], []).append(r["seconds"])
    lines.append("")
    lines += [f"{k}: {len(v)} stages, {sum(v) / 60:.1f} min" for k, v in kinds.items()]
    lines.append(f"all stages: {sum(sum(v) for v in kinds.values()) / 60:.1f} min")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    print(table(stage_rows(Path(ap.parse_args().run_dir))))


if __name__ == "__main__":
    main()
