#!/usr/bin/env bash
# The issue-10 scale-out runs on one 4-GPU host, in one go: `bash bench/scale_suite.sh train|sample OUT.jsonl`.
# train: MAR-B losses at global batch 128 on 1 GPU vs 2 GPUs (DDP, FSDP); MAR-B img/s on 1, 2, 4 GPUs at 128 per GPU
# (DDP); MAR-H peak memory per GPU, DDP vs FSDP, 4 GPUs. sample: 10,000 MAR-B images (64 iterations, CFG 2.9) on 4
# GPUs, and the first chunks of the same set on 1 GPU (same per-chunk md5 expected).
set -u
export PYTHONUNBUFFERED=1 SCALE_OUT="$2"
run() { echo "== $*"; timeout "${T:-240}" python bench/scale.py "$@" 2>&1 | grep -E '^\{|Error|error|Traceback' | tail -5; }
if [ "$1" = train ]; then
  run train --model mar_base --strategy ddp  --devices 1 --global-batch 128 --warmup 10 --steps 60
  run train --model mar_base --strategy ddp  --devices 2 --global-batch 128 --warmup 10 --steps 60
  run train --model mar_base --strategy fsdp --devices 2 --global-batch 128 --warmup 10 --steps 60
  run train --model mar_base --strategy ddp  --devices 2 --global-batch 256 --warmup 10 --steps 40
  run train --model mar_base --strategy ddp  --devices 4 --global-batch 512 --warmup 10 --steps 40
  run train --model mar_huge --strategy ddp  --devices 4 --global-batch 128 --warmup 3 --steps 10
  run train --model mar_huge --strategy fsdp --devices 4 --global-batch 128 --warmup 3 --steps 10
else
  T=420 run sample --devices 4 --num-images 10000
  T=300 run sample --devices 1 --num-images 10000 --max-chunks 8
fi
