"""Command line: booster run | align | attack | evaluate | config | judge."""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from pathlib import Path

COMMANDS = {
    "run": "Run the whole experiment: controls, alignment, attack, evaluation; print the table.",
    "sweep": "Run every point of the config's grid (defence x p x n x task x lambda x alpha x seed ...), reusing "
             "each aligned model across its attacks, skipping finished stages, logging progress and time left.",
    "align": "Run only the alignment stage(s) of the config (cached by config hash).",
    "attack": "Run alignment (if not cached) and the harmful fine-tuning attack.",
    "evaluate": "Evaluate the models the config ends with (running missing stages), without the controls.",
}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default="demo",
                   help="YAML file or packaged config name (default: demo; see `booster config list`)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. align.optim.lr=1e-3 or grid.attack.p=[0,0.1]")
    p.add_argument("--data-dir", help="data directory (overrides data.dir and $BOOSTER_DATA_DIR)")
    p.add_argument("--out-dir", help="run directory (overrides run.out_dir)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="booster",
        description="Booster (Huang et al., ICLR 2025): align an LLM so that harmful fine-tuning buys little, "
                    "attack it with poisoned fine-tuning, and measure harmful score and task accuracy.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in COMMANDS.items():
        _add_common(sub.add_parser(name, help=text, description=text))
    rep = sub.add_parser("report", help="Rebuild a run directory's tables (Markdown, CSV) and plots (PNG).",
                         description="Rebuild a run directory's tables (Markdown, CSV) and plots (PNG).")
    rep.add_argument("run_dir", help="a run directory written by booster run / sweep")
    rep.add_argument("--judge", help="score every saved answer again with this judge first (classifier, refusal, "
                     "beaver_dam, raters); answers are not regenerated")
    rep.add_argument("--judge-path", help="the judge's weights (eval.judge_path); for raters, the labelled file")
    exp = sub.add_parser("export", help="Write a trained stage as a merged Hugging Face model directory.",
                         description="Write a finished align-* or attack-* stage as one merged Hugging Face model "
                                     "directory (safetensors, tokenizer, chat template, a model card with the "
                                     "defence, its settings and the run's scores), loadable by "
                                     "AutoModelForCausalLM.from_pretrained.")
    exp.add_argument("stage_dir", help="e.g. runs/demo/stages/align-80beed07fb")
    exp.add_argument("out", help="the directory to write")
    pub = sub.add_parser("publish", help="Copy a run directory for git: tables, result rows, answers (gzipped), "
                         "logs; no weights.",
                         description="Copy a run directory as it goes into git beside a results table: its tables, "
                                     "plots, config and result rows, every evaluation's answers "
                                     "(generations.jsonl.gz) and judged scores, each trained stage's logs; no "
                                     "weights. `booster report OUT --judge NAME` rescores the copy.")
    pub.add_argument("run_dir", help="a run directory written by booster run / sweep")
    pub.add_argument("out", help="the directory to write, e.g. docs/results/cpu-demo")
    cfg = sub.add_parser("config", help="Show configs.", description="Show the packaged configs or a resolved one.")
    cfg_sub = cfg.add_subparsers(dest="action", required=True)
    cfg_sub.add_parser("list", help="List the packaged configs.")
    show = cfg_sub.add_parser("show", help="Print a config with every default filled in and validated.")
    _add_common(show)
    judge = sub.add_parser("judge", help="Build and measure the offline harm classifier judge.",
                           description="Build the offline harm classifier (cached by data + settings) and "
                                       "measure judges on the held-out split and the SmolLM2 hand labels.")
    judge_sub = judge.add_subparsers(dest="action", required=True)
    train = judge_sub.add_parser("train", help="Train the classifier into the cache (or --out DIR).")
    ev = judge_sub.add_parser("eval", help="Report judges' quality: held-out split and hand-label agreement.")
    for p in (train, ev):
        p.add_argument("settings", nargs="*", metavar="KEY=VALUE",
                       help="classifier settings, e.g. mode=frozen epochs=2 (see booster.evaluate.classifier_model)")
        p.add_argument("--data-dir", help="data directory (default: $BOOSTER_DATA_DIR or ../shared/data)")
        p.add_argument("--threads", type=int, help="CPU threads for torch (default: all cores)")
    train.add_argument("--out", help="build into this directory instead of the cache")
    train.add_argument("--force", action="store_true", help="rebuild even if a build exists")
    ev.add_argument("--path", help="a built classifier directory (default: the cached build, trained if missing)")
    ev.add_argument("--judges", default="classifier,refusal", help="comma-separated judges to measure")
    ev.add_argument("--beaver-path", help="beaver_dam weights (a directory or hub id), if measuring beaver_dam")
    ev.add_argument("--labels", help="hand-label file (default: the packaged SmolLM2 validation labels)")
    ev.add_argument("--out", help="also write the full report (with every probability) as JSON here")
    return parser


def _load(args: argparse.Namespace):
    from booster.config import load_config

    overrides = list(args.overrides)
    if args.out_dir:
        overrides.append(f"run.out_dir={args.out_dir}")
    if args.data_dir:
        overrides.append(f"data.dir={args.data_dir}")
    return load_config(args.config, overrides)


def _setup_logging(out_dir: Path) -> None:
    from booster.distributed import launch_rank

    out_dir.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    root = logging.getLogger("booster")
    if launch_rank() != 0:  # under accelerate launch the main process logs; the others only warn
        root.setLevel(logging.WARNING)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"[rank {launch_rank()}] %(levelname)s %(message)s"))
        root.addHandler(handler)
        return
    root.setLevel(logging.INFO)
    for old in list(root.handlers):  # a second main() in one process (tests) must not stack handlers
        root.removeHandler(old)
        old.close()
    for handler in (logging.StreamHandler(sys.stderr), logging.FileHandler(out_dir / "booster.log")):
        handler.setFormatter(fmt)
        root.addHandler(handler)


def _judge(args: argparse.Namespace) -> int:
    import json

    import torch

    from booster.evaluate.classifier_model import JUDGE_FILE, settings_from_overrides
    from booster.evaluate.classifier_train import build

    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("booster").setLevel(logging.INFO)
    logging.getLogger("booster").addHandler(logging.StreamHandler(sys.stderr))
    settings = settings_from_overrides(args.settings)
    if args.action == "train":
        target = build(settings, args.data_dir, out=args.out, force=args.force)
        meta = json.loads((target / JUDGE_FILE).read_text())
        print(f"classifier judge: {target}")
        print(json.dumps({"n_train": meta["n_train"], "n_test": meta["n_test"], "seconds": meta["seconds"],
                          "threshold": meta["threshold"],
                          "heldout": {k: {m: v[m] for m in ("n", "accuracy", "precision", "recall", "f1", "ece")}
                                      for k, v in meta["heldout"]["metrics"].items()}}, indent=2))
        return 0
    from booster.evaluate.judge_report import run_eval

    report, table = run_eval(settings, data_dir=args.data_dir, path=args.path, judges=args.judges.split(","),
                             beaver_path=args.beaver_path, labels=args.labels)
    print(table, end="")
    if args.out:
        from booster.io import atomic_write_json

        atomic_write_json(Path(args.out), report)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from booster.config import ConfigError
    from booster.data.base import DataError
    from booster.distributed import DistributedError
    from booster.export import ExportError
    from booster.models import ModelError
    from booster.text import TemplateError
    from booster.evaluate.judges import JudgeError
    from booster.train import TrainingError

    try:
        if args.command == "judge":
            return _judge(args)
        if args.command == "report":
            from booster.report import report_run_dir

            print(report_run_dir(Path(args.run_dir), args.judge, args.judge_path))
            return 0
        if args.command == "export":
            from booster.export import export

            print(f"exported to {export(args.stage_dir, args.out)}")
            return 0
        if args.command == "publish":
            from booster.publish import publish
            from booster.report import report_run_dir

            out = publish(Path(args.run_dir), Path(args.out))
            # the copy's tables and plots are rebuilt from its own rows: a run directory's
            # results.md can lag its results.jsonl (a sweep still running, or stopped)
            report_run_dir(out)
            print(f"published to {out}")
            return 0
        if args.command == "config":
            from booster.config import to_yaml
            from booster.config_sources import packaged_configs

            if args.action == "list":
                for name, path in sorted(packaged_configs().items()):
                    print(f"{name}\t{path}")
            else:
                print(to_yaml(_load(args)), end="")
            return 0
        cfg = _load(args)
        if args.command == "evaluate":
            cfg.run.controls = False
        import torch

        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        _setup_logging(Path(cfg.run.out_dir))
        from booster.pipeline import Pipeline

        pipeline = Pipeline(cfg)
        until = {"run": "evaluate", "sweep": "evaluate", "evaluate": "evaluate", "align": "align",
                 "attack": "attack"}[args.command]
        pipeline.run(until=until)
        if until == "evaluate" and pipeline.main:
            print((Path(cfg.run.out_dir) / "results.md").read_text())
        return 0
    except (ConfigError, DataError, ModelError, TemplateError, TrainingError, DistributedError, JudgeError,
            ExportError) as e:
        print(f"booster: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno == errno.ENOSPC:
            print(f"booster: error: the disk is full ({e.filename or 'while writing'}); free space and rerun the "
                  "same command: finished stages and checkpoints are kept", file=sys.stderr)
        else:
            print(f"booster: error: {e.strerror or e} ({e.filename or 'file system'}); check the path and its "
                  "permissions", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
