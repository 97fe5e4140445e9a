"""Model FLOPs of one sampled image, and the time floor they set on a GPU (issue 12's bound on sampling speed).

MAR-B / EAR-B sampling exactly as ``bench/mar_ear.py`` runs it (same models, CFG, temperature, iterations, KL-16
decode), counted by ``torch.utils.flop_counter`` (matmuls, convolutions, attention: 4·s_q·s_k·d per head, the
formula torch uses on the GPU, registered by ``timing.py`` for the CPU's attention kernel) over ``module.generate`` of one
image on the CPU: every image of a batch does the same work, so the count per image does not depend on the batch.
``floor_s_per_img`` = FLOPs ÷ the dense bf16 peak (``--peak-tflops``, an H100 SXM's 989 by default): no
implementation of the same arithmetic samples faster on that GPU, and ``max_speedup_vs`` = a measured reference
s/img ÷ that floor is the largest ratio any such implementation can reach against it.

    python bench/sample_flops.py --cases ear_sample,mar_sample --reference-s-per-img ear_sample=0.0516,mar_sample=0.122
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mar_ear import CASES, build_contgen  # noqa: E402
from timing import environment  # noqa: E402  (importing timing also counts the CPU attention kernel's FLOPs)


@torch.no_grad()
def count(case: str, num_iter: int | None) -> dict:
    from contgen.samplers.masked import MaskedARSampler

    spec = CASES[case]
    n = num_iter or spec["num_iter"]
    torch.manual_seed(0)
    module = build_contgen(spec["method"], False, False, torch.device("cpu")).eval()
    module.sample_precision = "fp32"  # FLOPs do not depend on the dtype
    sampler = MaskedARSampler(num_iter=n, cfg=spec["cfg"], cfg_schedule="linear", temperature=spec["temperature"])
    labels, gen = torch.tensor([7]), torch.Generator().manual_seed(0)
    decode, parts = module.tokenizer.decode, {}

    def counted_decode(tokens):
        with FlopCounterMode(display=False) as c:
            out = decode(tokens)
        parts["decode"] = c.get_total_flops()
        return out

    module.tokenizer.decode = counted_decode
    t0 = time.perf_counter()
    with FlopCounterMode(display=False) as total:
        module.generate(labels, generator=gen, sampler=sampler)
    flops = total.get_total_flops()
    return {"case": case, "num_iter": n, "cfg": spec["cfg"], "model_tflop_per_img": round(flops / 1e12, 4),
            "decode_tflop_per_img": round(parts["decode"] / 1e12, 4), "count_wall_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="ear_sample,mar_sample")
    p.add_argument("--num-iter", type=int, default=None, help="override the case's iterations (a quick check)")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--reference-s-per-img", default="", help="case=s_per_img,... measured reference times")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    refs = {k: float(v) for k, v in (kv.split("=") for kv in args.reference_s_per_img.split(",") if kv)}
    for case in args.cases.split(","):
        row = count(case, args.num_iter)
        row.update(environment(torch.device("cpu")), peak_tflops=args.peak_tflops)
        row["floor_s_per_img"] = round(row["model_tflop_per_img"] / args.peak_tflops, 5)
        if case in refs:
            row["reference_s_per_img"] = refs[case]
            row["max_speedup_vs_reference"] = round(refs[case] / row["floor_s_per_img"], 2)
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
