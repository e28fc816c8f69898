#!/bin/bash
# One seed of the paper regime (config paper-regime, issue 39) on a 2-core CPU: both arms, the
# attack at p = 0, 0.1 and 0.2, as two one-thread workers side by side (a sweep's own order
# would leave one core idle for the Booster alignment's ~2 h):
#   worker A: the SFT sweep (alignment, then p = 0, 0.1, 0.2), then Booster at p = 0
#   worker B: the Booster alignment and p = 0.1, then Booster at p = 0.2
# Both arms take ~3.5-4 h of the two cores (Zen 4, bf16): more than one 3-hour session, and
# runs/ may not survive to the next. ARM runs one arm so that each fits a session:
#   ARM=sft      the SFT sweep alone, one thread (~2 h 15 min; the other core is free)
#   ARM=booster  the Booster alignment on both threads, then p = 0.1 and 0.2 side by side on
#                one thread each, then p = 0 on both (~2 h: a Booster step takes 3.53 s on two
#                threads, 6.41 s on one; benchmarks/step_cost.py --threads, Zen 4, bf16)
#   ARM=both     (default) the two workers above
# Each sweep writes its own out_dir under $RUNS (two sweeps must not share one: each rewrites
# results.jsonl); a Booster attack's out_dir starts from copies of the finished Booster stages.
# Rerun the same command to resume: finished stages are kept, training resumes from its last
# checkpoint (every 100 steps). Publish each finished out_dir at once (a published directory
# merges with later ones: scripts/merge_runs.py):
#   python scripts/merge_runs.py OUT docs/results/paper-regime $RUNS/pr-sS-sft $RUNS/pr-sS-b-p0.1 ...
#   booster publish OUT docs/results/paper-regime
# Usage: BOOSTER_DATA_DIR=... [ARM=sft|booster|both] bash scripts/paper_regime_seed.sh SEED [RUNS]
# Dry run in seconds: CONFIG=tiny bash scripts/paper_regime_seed.sh 0 /tmp/prs
set -u
SEED=${1:?usage: paper_regime_seed.sh SEED [RUNS]}; RUNS=$(realpath -m "${2:-runs}")
cd "$(dirname "$0")/.."
BOOSTER=${BOOSTER:-.venv/bin/booster}; CONFIG=${CONFIG:-paper-regime}
export OMP_NUM_THREADS=1
mkdir -p "$RUNS"
P=$RUNS/pr-s$SEED

copy_done() {  # the finished stages of $1 into $2
  mkdir -p "$2/stages"
  for s in "$1"/stages/*; do
    [ -f "$s/DONE.json" ] && [ ! -e "$2/stages/$(basename "$s")" ] && cp -r "$s" "$2/stages/"
  done
}
sweep() {  # out_dir, defence, p list[, threads]
  $BOOSTER sweep "$CONFIG" run.out_dir="$1" "grid.align.defense=[$2]" "grid.attack.p=[$3]" \
    run.seed="$SEED" run.threads="${4:-1}" >> "$1.log" 2>&1 || { echo "$1 failed: see $1.log"; return 1; }
}
booster_aligned() { ls "$P"-b-p0.1/stages/align-*/DONE.json >/dev/null 2>&1; }

case "${ARM:-both}" in
  sft) sweep "$P-sft" sft 0.0,0.1,0.2; ls "$P"-sft/results.jsonl; exit ;;
  booster)
    OMP_NUM_THREADS=2 $BOOSTER align "$CONFIG" run.out_dir="$P-b-p0.1" "grid.align.defense=[booster]" \
      "grid.attack.p=[0.1]" run.seed="$SEED" run.threads=2 >> "$P-b-p0.1.log" 2>&1 \
      || { echo "the Booster alignment failed: see $P-b-p0.1.log"; exit 1; }
    copy_done "$P-b-p0.1" "$P-b-p0.2" && copy_done "$P-b-p0.1" "$P-b-p0.0"
    sweep "$P-b-p0.1" booster 0.1 & sweep "$P-b-p0.2" booster 0.2 & wait
    OMP_NUM_THREADS=2 sweep "$P-b-p0.0" booster 0.0 2
    ls "$P"-b-*/results.jsonl; exit ;;
  both) ;;
  *) echo "ARM must be sft, booster or both, not ${ARM}"; exit 2 ;;
esac

( sweep "$P-sft" sft 0.0,0.1,0.2 || exit 1
  while ! booster_aligned; do
    pgrep -f "out_dir=$P-b-p0.1 " >/dev/null || { echo "worker A: no Booster alignment running or done"; exit 1; }
    sleep 30
  done
  copy_done "$P-b-p0.1" "$P-b-p0.0" && sweep "$P-b-p0.0" booster 0.0 ) &
( sweep "$P-b-p0.1" booster 0.1 && copy_done "$P-b-p0.1" "$P-b-p0.2" && sweep "$P-b-p0.2" booster 0.2 ) &
wait
ls "$P"-*/results.jsonl
