#!/usr/bin/env bash
# Scale-out runs on one host: `bash bench/scale_suite.sh PART OUT.jsonl`, each part one 10-minute device call.
# Issue 10 (a 4-GPU host): train: MAR-B losses at global batch 128 on 1 GPU vs 2 GPUs (DDP, FSDP); MAR-B img/s on 1,
# 2, 4 GPUs at 128 per GPU (DDP); MAR-H peak memory per GPU, DDP vs FSDP, 4 GPUs. sample: 10,000 MAR-B images
# (64 iterations, CFG 2.9) on 4 GPUs, and the first chunks of the same set on 1 GPU (same per-chunk md5 expected).
# Issue 13 (an 8-GPU host; the same configs and seeds): train8: MAR-B at 128 per GPU on 1 and 8 GPUs (DDP, FSDP),
# MAR-H peak memory per GPU under FSDP on 8; tit8: TiT-XL/2 (UCGM multi-step, SD-VAE latents) at 128 per GPU on 1 and
# 8 GPUs (DDP, FSDP); sample8: 50,000 MAR-B images (compiled) on 8 GPUs; sample1: its first 8 chunks on 1 GPU.
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
elif [ "$1" = sample ]; then
  T=420 run sample --devices 4 --num-images 10000
  T=300 run sample --devices 1 --num-images 10000 --max-chunks 8
elif [ "$1" = train8 ]; then
  run train --model mar_base --strategy ddp  --devices 1 --global-batch 128  --warmup 10 --steps 40
  run train --model mar_base --strategy ddp  --devices 8 --global-batch 1024 --warmup 10 --steps 40
  run train --model mar_base --strategy fsdp --devices 8 --global-batch 1024 --warmup 10 --steps 40
  run train --model mar_huge --strategy fsdp --devices 8 --global-batch 256  --warmup 3  --steps 10
elif [ "$1" = tit8 ]; then
  run train --model ucgm_multistep --strategy ddp  --devices 1 --global-batch 128  --warmup 5 --steps 20
  run train --model ucgm_multistep --strategy ddp  --devices 8 --global-batch 1024 --warmup 5 --steps 20
  run train --model ucgm_multistep --strategy fsdp --devices 8 --global-batch 1024 --warmup 5 --steps 20
elif [ "$1" = sample8 ]; then
  T=580 run sample --devices 8 --num-images 50000 --compile
elif [ "$1" = sample1 ]; then
  T=400 run sample --devices 1 --num-images 50000 --max-chunks 8 --compile
else
  echo "PART: train | sample (issue 10, 4 GPUs) or train8 | tit8 | sample8 | sample1 (issue 13, 8 GPUs)" >&2
  exit 2
fi
