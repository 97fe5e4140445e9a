"""Where the time of a contgen case goes on the GPU (issue 12): a torch.profiler trace of MAR-B or EAR-B sampling or
a training step, summarised as the top kernels by GPU time, the top host ops, and the GPU-busy fraction of the wall
time (1 - idle: the launch-bound share is what CUDA graphs / compile can win).

    python bench/gpu_profile.py --case mar_sample --num-iter 16 --out bench/results/<gpu>_<date>_profile.json
    python bench/gpu_profile.py --case ear_train --compile --compile-mode reduce-overhead

Same models and settings as bench/mar_ear.py (random weights); one warm-up, then one profiled run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mar_ear import build_contgen, contgen_sample, contgen_train  # noqa: E402
from timing import environment  # noqa: E402


def busy_fraction(events, wall_us: float) -> float:
    """The union of the GPU kernel intervals over the wall time of the profiled region."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, end = 0.0, -1.0
    for s, e in spans:
        if s > end:
            busy, end = busy + (e - s), e
        elif e > end:
            busy, end = busy + (e - end), e
    return busy / wall_us if wall_us else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", default="mar_sample", choices=["mar_sample", "ear_sample", "mar_train", "ear_train"])
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--num-iter", type=int, default=16, help="sampling iterations (64 in the bench; fewer to keep the trace small)")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-mode", choices=("default", "reduce-overhead"), default="default",
                   help="module.compile_mode with --compile (reduce-overhead: the trained blocks as CUDA graphs)")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    method, kind = args.case.split("_")
    module = build_contgen(method, args.compile, False, device, args.compile_mode)
    batch = args.batch or {"mar_sample": 256, "ear_sample": 128, "mar_train": 128, "ear_train": 32}[args.case]

    def run():
        if kind == "sample":
            cfg, temp = (2.9, 1.0) if method == "mar" else (3.0, 0.7)
            return contgen_sample(module, batch, args.num_iter, cfg, temp, args.precision, 1, 4, 0, device)
        return contgen_train(module, batch, args.precision, 3, 5, 0, device)

    run()  # warm-up (and compilation)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        timing = run()
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) * 1e6
    events = prof.events()
    table = prof.key_averages()
    gpu = sorted((e for e in table if e.device_type == torch.autograd.DeviceType.CUDA or e.self_device_time_total > 0),
                 key=lambda e: e.self_device_time_total, reverse=True)
    total_gpu = sum(e.self_device_time_total for e in gpu)
    host = sorted(table, key=lambda e: e.self_cpu_time_total, reverse=True)
    row = {"case": args.case, "batch": batch, "num_iter": args.num_iter if kind == "sample" else None,
           "precision": args.precision, "compile": args.compile,
           **({"compile_mode": args.compile_mode} if args.compile else {}), "timing": timing, "wall_s": round(wall_us / 1e6, 3),
           "gpu_busy_fraction": round(busy_fraction(events, wall_us), 3),
           "kernel_launches": sum(e.count for e in gpu),
           "top_kernels": [{"name": e.key[:90], "gpu_ms": round(e.self_device_time_total / 1e3, 2),
                            "share": round(e.self_device_time_total / max(total_gpu, 1), 3), "count": e.count}
                           for e in gpu[:args.top]],
           "top_host_ops": [{"name": e.key[:60], "cpu_ms": round(e.self_cpu_time_total / 1e3, 1), "count": e.count}
                            for e in host[:args.top]],
           **environment(device)}
    line = json.dumps(row)
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
