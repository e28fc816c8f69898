"""Every PNG a run writes: training and probe logs per stage, the harmful-loss curves of
all finished alignments and attacks of a run directory (the paper's Figure 3), and the line
styles that keep one defence's curves apart. The tables' own plots (a score against a swept
setting) are drawn by ``booster.report`` with ``plot_series``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from booster.config import flatten
from booster.io import read_json, read_jsonl, write_csv

_NUMBER = re.compile(r"(-?\d+(?:\.\d*)?(?:e[-+]?\d+)?)")


def natural_key(name: str) -> list[tuple[int, float, str]]:
    """Sort key that reads the numbers in a name as numbers: "lr=1e-05" before "lr=0.0002",
    "seed=2" before "seed=10", which plain string order gets wrong."""
    return [(0, float(part), "") if i % 2 else (1, 0.0, part) for i, part in enumerate(_NUMBER.split(name))]


def line_styles(names: list[str]) -> dict[str, tuple[str, str, str]]:
    """(colour, line style, marker) per series, in natural order (natural_key): names that share
    their first word (the defence, in the run plots) share a colour and differ by style, then by
    marker once the styles run out, so that the eye groups lines by defence rather than by the order
    the runs finished in, and no two lines of one defence look alike."""
    styles, markers = ("-", "--", ":", "-."), ("o", "s", "^", "x", "D")
    colours: dict[str, str] = {}
    seen: dict[str, int] = {}
    out = {}
    for name in sorted(names, key=natural_key):
        head = name.split(" ", 1)[0]
        colours.setdefault(head, f"C{len(colours) % 10}")
        i = seen.get(head, 0)
        out[name] = (colours[head], styles[i % len(styles)], markers[i // len(styles) % len(markers)])
        seen[head] = i + 1
    return out


def log_axis(values: list[float]) -> bool:
    """Settings swept over decades (α 0.01-1, λ 1-25, lr 1e-5-1e-3) read on a log axis; a linear
    one squeezes the small values together. Ratios from 0 (p) and short ranges (n) stay linear."""
    return bool(values) and min(values) > 0 and max(values) / min(values) >= 20


def plot_series(series: dict[str, tuple[list[float], list[float]]], path: Path, *, title: str, xlabel: str,
                ylabel: str, logx: bool = False) -> None:
    """One line per named series of (x, y) points, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for name, (color, style, marker) in line_styles(list(series)).items():
        xs, ys = series[name]
        ax.plot(xs, ys, label=name, color=color, linestyle=style, marker=marker if len(xs) < 30 else None,
                markersize=3)
    if logx:
        ax.set_xscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def plot_log(rows: list[dict[str, Any]], path: Path, *, title: str, keys: list[str] | None = None) -> None:
    """Every loss-like column of a training or probe log against the step."""
    if not rows:
        return
    keys = keys or [k for k in rows[0] if "loss" in k or k == "regulariser"]
    series = {k: ([r["step"] for r in rows if k in r], [r[k] for r in rows if k in r]) for k in keys}
    plot_series(series, path, title=title, xlabel="step", ylabel="loss")


def write_stage_logs(d: Path, title: str) -> None:
    """A finished stage's training and probe logs as CSV beside their JSONL, each with its plot."""
    for name in ("train_log", "probe_log"):
        rows = read_jsonl(d / f"{name}.jsonl")
        if rows:
            write_csv(d / f"{name}.csv", rows)
            plot_log(rows, d / f"{name}.png", title=f"{title} ({name.replace('_', ' ')})")


def distinct_names(names: list[str], settings: list[dict[str, Any]]) -> list[str]:
    """Each curve's name, plus the settings that tell apart curves of the same name (a λ or n
    sweep: stage configs keep only non-default values, so an absent key reads 'default').
    Without this, curves of one defence and p overwrite each other in a plot."""
    out = []
    for name, own in zip(names, settings):
        peers = [s for n, s in zip(names, settings) if n == name]
        keys = sorted({k for s in peers for k in s if len({repr(p.get(k)) for p in peers}) > 1})
        extra = [f"{k.split('.')[-1]}={own[k] if k in own else 'default'}" for k in keys]
        out.append(" ".join([name, *extra]))
    return out


def finished_probe_logs(root: Path, kind: str):
    """(stage config with its directory name under 'stage', probe rows) of every finished
    stage of this kind in the run directory that logged probes."""
    for d in sorted((root / "stages").glob(f"{kind}-*")):
        rows = read_jsonl(d / "probe_log.jsonl")
        if rows and (d / "DONE.json").is_file():
            yield {**read_json(d / "config.json"), "stage": d.name}, rows


def plot_attack_curves(root: Path) -> str:
    """Harmful loss on the held-out pairs over the attack, absolute and relative to its start
    (the paper's Figure 3), one line per finished attack in the run directory."""
    series, relative = {}, {}
    logs = list(finished_probe_logs(root, "attack"))
    names, settings = [], []
    for cfg, _ in logs:
        up = cfg["upstream"]
        att = cfg["attack"]
        upstream = root / "stages" / up / "config.json"
        upcfg = read_json(upstream) if upstream.is_file() else {}
        name = (upcfg["align"]["defense"] if upcfg else up) if up.startswith("align") else "none"
        name += f"+{att['defense']}" if "defense" in att else ""
        name += f" p={att.get('p')}" + (f" lr={att['optim']['lr']:g}" if "lr" in att.get("optim", {}) else "")
        names.append(name + f" seed={cfg['seed']}")
        settings.append({**flatten(att, "attack."), **flatten(upcfg.get("align", {}), "align."),
                         **flatten(upcfg.get("data", {}), "data.")})
    for name, (_, rows) in zip(distinct_names(names, settings), logs):
        xs, ys = [r["step"] for r in rows], [r["harmful_loss"] for r in rows]
        series[name] = (xs, ys)
        relative[name] = (xs, [y - ys[0] for y in ys])
    if not series:
        return ""
    plot_series(series, root / "attack_harmful_loss.png", title="harmful loss during the attack",
                xlabel="fine-tuning step", ylabel="harmful loss (held-out pairs)")
    plot_series(relative, root / "attack_harmful_loss_relative.png",
                title="harmful loss during the attack, minus its start", xlabel="fine-tuning step",
                ylabel="Δ harmful loss")
    return "\nPlots: attack_harmful_loss.png, attack_harmful_loss_relative.png\n"


def plot_alignment_curves(root: Path) -> str:
    """Harmful loss (held-out harmful pairs) and alignment loss (held-out refusal pairs) over
    the alignment steps, one line per finished alignment: the rebuttal's question whether
    SFT's harmful loss rises while Booster's barely moves."""
    harmful, align = {}, {}
    logs = list(finished_probe_logs(root, "align"))
    names = distinct_names([f"{cfg['align']['defense']} seed={cfg['seed']}" for cfg, _ in logs],
                           [{**flatten(cfg["align"], "align."), **flatten(cfg.get("data", {}), "data.")}
                            for cfg, _ in logs])
    for name, (cfg, rows) in zip(names, logs):
        xs = [r["step"] for r in rows]
        harmful[name] = (xs, [r["harmful_loss"] for r in rows])
        align[name] = (xs, [r["align_loss"] for r in rows])
    if not harmful:
        return ""
    plot_series(harmful, root / "align_harmful_loss.png", title="harmful loss during alignment",
                xlabel="alignment step", ylabel="harmful loss (held-out harmful pairs)")
    plot_series(align, root / "align_loss.png", title="alignment loss during alignment",
                xlabel="alignment step", ylabel="alignment loss (held-out refusal pairs)")
    return "Plots: align_harmful_loss.png, align_loss.png\n"
