#!/bin/bash
# One seed of the paper regime (config paper-regime, issue 39) on a 2-core CPU: both arms, the
# attack at p = 0, 0.1 and 0.2, as two one-thread workers side by side (a sweep's own order
# would leave one core idle for the Booster alignment's ~2 h):
#   worker A: the SFT sweep (alignment, then p = 0, 0.1, 0.2), then Booster at p = 0
#   worker B: the Booster alignment and p = 0.1, then Booster at p = 0.2
# Each sweep writes its own out_dir under $RUNS (two sweeps must not share one: each rewrites
# results.jsonl); a Booster attack's out_dir starts from copies of the finished Booster stages.
# Rerun the same command to resume: finished stages are kept, training resumes from its last
# checkpoint (every 100 steps). When both workers are done:
#   python scripts/merge_runs.py OUT $RUNS/pr-sS-sft $RUNS/pr-sS-b-p0.1 $RUNS/pr-sS-b-p0.0 $RUNS/pr-sS-b-p0.2 [other seeds]
#   booster publish OUT docs/results/paper-regime
# Usage: BOOSTER_DATA_DIR=... bash scripts/paper_regime_seed.sh SEED [RUNS]   (RUNS default runs/)
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
sweep() {  # out_dir, defence, p list
  $BOOSTER sweep "$CONFIG" run.out_dir="$1" "grid.align.defense=[$2]" "grid.attack.p=[$3]" \
    run.seed="$SEED" run.threads=1 >> "$1.log" 2>&1 || { echo "$1 failed: see $1.log"; return 1; }
}
booster_aligned() { ls "$P"-b-p0.1/stages/align-*/DONE.json >/dev/null 2>&1; }

( sweep "$P-sft" sft 0.0,0.1,0.2 || exit 1
  while ! booster_aligned; do
    pgrep -f "out_dir=$P-b-p0.1 " >/dev/null || { echo "worker A: no Booster alignment running or done"; exit 1; }
    sleep 30
  done
  copy_done "$P-b-p0.1" "$P-b-p0.0" && sweep "$P-b-p0.0" booster 0.0 ) &
( sweep "$P-b-p0.1" booster 0.1 && copy_done "$P-b-p0.1" "$P-b-p0.2" && sweep "$P-b-p0.2" booster 0.2 ) &
wait
ls "$P"-*/results.jsonl
