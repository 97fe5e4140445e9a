#!/usr/bin/env bash
# Issue 12's side-by-side speed table on one GPU: `bash bench/speed_suite.sh 1|2|3 OUT.jsonl` (reference checkouts in
# .refs/: mar, EAR, UCGM, shortcut-models; see bench/README.md). Each part fits one 10-minute device call; run all on
# the same kind of GPU. Every case runs contgen and the reference one after the other, each variant in a fresh process,
# and writes one JSON line per variant and one "ratio" line per case with both numbers.
# 1: MAR-B training and sampling at 64 iterations, EAR-B training at batch 32 and 128 and sampling: contgen compiled
#    (training with module.compile_mode=reduce-overhead, sampling with CUDA graphs), the reference fp16. (MAR-B's model
#    FLOPs for the MFU come from an eager contgen row: mar_ear.py --cases mar_train --compile off --sides contgen; they
#    do not depend on the GPU.)
# 2: MAR-B sampling at 256 iterations (warm-up batch of 64 iterations, both sides; the reference takes ~180 s).
# 3: UCGM TiT-XL/2 and Shortcut DiT-B/2.
set -u
export PYTHONUNBUFFERED=1
OUT="$2"
keep() { grep -E '^\{' | cut -c1-900; }
mar_ear() { timeout "$1" python bench/mar_ear.py --reference-root .refs --precisions bf16 --reference-precisions fp16 \
  --compile on --out "$OUT" "${@:2}" 2>&1 | grep '"ratio"\|"error"' | cut -c1-700; }
if [ "$1" = 1 ]; then
  mar_ear 150 --cases mar_train --compile-mode reduce-overhead
  mar_ear 160 --cases mar_sample
  mar_ear 160 --cases ear_train,ear_train128 --compile-mode reduce-overhead
  mar_ear 90 --cases ear_sample
elif [ "$1" = 2 ]; then
  mar_ear 400 --cases mar_sample256 --warmup-iter 64
else
  timeout 190 python bench/ucgm.py --reference-root .refs/UCGM --cases train_multi,sample_60,sample_2 --isolate side \
    --compile on --cuda-graphs on --train-precisions bf16 --sample-precisions bf16 --deadline-s 180 --out "$OUT" 2>&1 | keep
  timeout 150 python bench/shortcut.py --reference-root .refs/shortcut-models --compile on --batches 256 \
    --cases train_shortcut,sample_1,sample_4,sample_128 --cuda-graphs on --deadline-s 140 --out "$OUT" 2>&1 | keep
fi
