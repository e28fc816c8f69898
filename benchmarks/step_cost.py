"""Step cost of every defence, as ratios to SFT measured in the same run.

    python benchmarks/step_cost.py --model smollm2 --finetune lora --batch 4 --seq 128 --reps 7

Time: one process, one model, the same synthetic batch (batch x seq tokens, loss on the
second half) for every data stream; rounds interleave the defences so that machine noise
hits them alike; each step is the training loop's own ``train_step`` (defence, clipping,
optimizer). Memory: each defence in a fresh child process. GPU: peak allocated. CPU: the
peak of the bytes that tensors hold, from the profiler's allocation records (each op's own
allocations and every free, in time order), counted from just before the defence allocates
its buffers through the warm-up and two measured steps: weights and the batch are not in it,
optimizer states, gradients, activations and the defence's buffers are. (Peak resident
memory cannot see these differences under the model load.) Not part of the test run:
timings on shared machines are noisy, so only ratios measured side by side are reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def build(args: argparse.Namespace, setup: bool = True):
    from accelerate import Accelerator

    from booster.config import OptimConfig, load_config
    from booster.defenses import DEFENSES, make_defense
    from booster.defenses.base import StepContext
    from booster.models import ModelRecipe, build_model, load_tokenizer
    from booster.train import causal_lm_loss

    cfg = load_config(None, [f"model.name={args.model}", f"model.finetune={args.finetune}",
                             f"model.dtype={args.dtype}"])
    tok = load_tokenizer(cfg.model)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = build_model(cfg.model, tok, ModelRecipe(), Path("."), train="full" if args.finetune == "full" else "new_lora")
    model.to(accelerator.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    ctx = StepContext(model=model, params=params, loss=causal_lm_loss(model), accelerator=accelerator)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, len(tok), (args.batch, args.seq), generator=g)
    labels = ids.clone()
    labels[:, : args.seq // 2] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    optim = OptimConfig(lr=1e-5)
    defenses = {}
    for spec in args.defenses.split(","):
        # NAME or NAME:key=value:key=value, e.g. booster:every=4 (settings of that defence's section).
        name, *settings = spec.split(":")
        if name not in DEFENSES:
            sys.exit(f"unknown defence {name}; choose from {', '.join(DEFENSES)}")
        stage = "align" if "align" in DEFENSES[name].stages else "attack"
        stage_cfg = getattr(load_config(None, [f"{stage}.defense={name}"] + [f"{stage}.{name}.{kv}" for kv in settings]), stage)
        defenses[spec] = make_defense(name, stage_cfg)
        if setup:
            defenses[spec].setup(ctx)
    n_trainable = sum(p.numel() for p in params)
    return ctx, optimizer, optim, batch, defenses, n_trainable


def one_step(ctx, defense, batch, optimizer, optim, step: int) -> float:
    from booster.train import train_step

    ctx.step = step
    batches = {s: [batch] for s in defense.streams_at(step)}
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    train_step(ctx, defense, batches, optimizer, optim)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def amortised_split(ref_times: list[float], times: list[float], full: list[bool],
                    periods: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 200)) -> dict | None:
    """For a defence whose steps differ (an amortised one: some steps run the regulariser's
    extra passes, the rest reuse it), the two kinds of step as ratios to the reference step of
    the same round (pairing cancels the machine's drift), and the mean cost they imply for a
    refresh every k steps. None for a defence whose steps are all alike."""
    if all(full) or not any(full):
        return None
    paired = [t / r for t, r in zip(times, ref_times)]
    refresh = statistics.fmean(x for x, f in zip(paired, full) if f)
    reuse = statistics.fmean(x for x, f in zip(paired, full) if not f)
    return {"refresh_ratio": refresh, "reuse_ratio": reuse, "n_refresh": sum(full),
            "n_reuse": len(full) - sum(full),
            "projected_ratio": {k: (refresh + (k - 1) * reuse) / k for k in periods}}


def cpu_peak_bytes(fn) -> int:
    """Peak net bytes allocated by tensors while ``fn`` runs (CPU), from the profiler's records."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # self (not inclusive) usage: an allocation is counted once, by the op that made it
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def memory_child(args: argparse.Namespace) -> None:
    ctx, optimizer, optim, batch, defenses, _ = build(args, setup=False)
    (name, defense), = defenses.items()

    def run() -> None:
        defense.setup(ctx)
        for step in range(args.warmup + 2):
            one_step(ctx, defense, batch, optimizer, optim, step)

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        run()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = cpu_peak_bytes(run)
    print(json.dumps({"defense": name, "peak_bytes": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--finetune", default="lora", choices=["lora", "full"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--defenses", default="sft,booster", help="comma-separated; the first is the reference")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args)

    ctx, optimizer, optim, batch, defenses, n_trainable = build(args)
    times: dict[str, list[float]] = {n: [] for n in defenses}
    full: dict[str, list[bool]] = {n: [] for n in defenses}  # did the step run every stream?
    # Each defence counts its own steps: an amortised one must see steps 0, 1, 2, ... in turn.
    for rnd in range(args.warmup + args.reps):
        for name, defense in defenses.items():
            is_full = len(defense.streams_at(rnd)) == len(defense.streams)
            t = one_step(ctx, defense, batch, optimizer, optim, rnd)
            if rnd >= args.warmup:
                times[name].append(t)
                full[name].append(is_full)

    peaks: dict[str, float] = {}
    if not args.no_memory:
        for name in defenses:
            cmd = [sys.executable, __file__, "--memory-child", "--defenses", name, "--model", args.model,
                   "--finetune", args.finetune, "--dtype", args.dtype, "--batch", str(args.batch),
                   "--seq", str(args.seq), "--warmup", str(args.warmup)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            peaks[name] = json.loads(out)["peak_bytes"]

    ref = next(iter(defenses))
    ref_t = statistics.median(times[ref])
    device = "cuda:" + torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()}"
    print(f"\n{args.model} {args.finetune} {args.dtype}, batch {args.batch} x {args.seq} tokens, {device}, "
          f"{n_trainable / 1e6:.2f}M trainable parameters ({n_trainable * 4 / 2**20:.0f} MiB in fp32), "
          f"{args.reps} reps\n")
    # An amortised defence alternates cheap and expensive steps: its cost is the mean over many
    # steps, so ratios use means; the median is shown beside it for the exact defences.
    ref_mean = statistics.fmean(times[ref])
    trainable_bytes = sum(p.numel() * p.element_size() for p in ctx.params)
    print(f"| defence | passes | s/step median | mean | min–max | × {ref} (mean) | peak MiB | extra MiB vs {ref} "
          f"| extra ÷ trainable |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = []
    for name, defense in defenses.items():
        med, mean = statistics.median(times[name]), statistics.fmean(times[name])
        row = {"defense": name, "passes": defense.passes, "median_s": med, "mean_s": mean, "min_s": min(times[name]),
               "max_s": max(times[name]), "ratio": mean / ref_mean, "ratio_median": med / ref_t,
               "times": times[name]}
        mem = extra = ratio = "–"
        if peaks:
            row["peak_mib"] = peaks[name] / 2**20
            row["extra_mib"] = (peaks[name] - peaks[ref]) / 2**20
            row["extra_over_trainable"] = (peaks[name] - peaks[ref]) / trainable_bytes
            mem, extra = f"{row['peak_mib']:.0f}", f"{row['extra_mib']:+.1f}"
            ratio = f"{row['extra_over_trainable']:+.2f}"
        results.append(row)
        print(f"| {name} | {defense.passes} | {med:.3f} | {mean:.3f} | {min(times[name]):.3f}–{max(times[name]):.3f} | "
              f"{row['ratio']:.2f} | {mem} | {extra} | {ratio} |")
    for row in results:
        split = amortised_split(times[ref], times[row["defense"]], full[row["defense"]])
        if split:
            row.update(split)
            projected = ", ".join(f"k={k}: {v:.2f}" for k, v in split["projected_ratio"].items())
            print(f"\n{row['defense']}: refresh steps {split['refresh_ratio']:.2f}x {ref} ({split['n_refresh']}), "
                  f"reuse steps {split['reuse_ratio']:.2f}x ({split['n_reuse']}); a refresh every k steps "
                  f"costs (refresh + (k-1) reuse) / k: {projected}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "device": device,
                                         "n_trainable": n_trainable, "results": results}, indent=2))


if __name__ == "__main__":
    main()
