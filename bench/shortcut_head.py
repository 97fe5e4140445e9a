"""MAR-B sampling with the few-step Shortcut head (``loss=shortcut``) against MAR's 100-step diffusion head, in one
process on one device (issue 9, bench bullet): batch 256, 64 iterations, CFG 2.9 linear, temperature 1, bf16,
including the KL-16 decode; random weights (speed only — quality is compared on the CPU, README "Few-step tokens").
The MAR-B backbone and the 1024 × 6 head width are ``bench/mar_ear.py``'s; its ``contgen_sample`` times the runs.

    python bench/shortcut_head.py --out bench/results/<gpu>_<date>_shortcut_head.jsonl   (--tiny: a CPU smoke run)
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mar_ear import build_contgen, contgen_sample, environment  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", default="1,2,4", help="Shortcut head steps")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--num-iter", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    from contgen.heads.shortcut import ShortcutHead

    env = environment(device)
    print(f"# {json.dumps(env)}", flush=True)
    out = open(args.out, "a") if args.out else None
    module = build_contgen("mar", compile=False, tiny=args.tiny, device=device).eval()
    w, d = (32, 1) if args.tiny else (1024, 6)
    heads = [("diffusion_100", module.net.head)]
    for n in map(int, args.steps.split(",")):
        head = functools.partial(ShortcutHead, width=w, depth=d, steps=n)
        heads.append((f"shortcut_{n}", head(token_dim=module.tokenizer.token_dim, cond_dim=module.net.backbone.cond_dim)))
    base = None
    for name, head in heads:
        module.net.head = head.to(device).eval()
        res = contgen_sample(module, args.batch, args.num_iter, cfg=2.9, temperature=1.0, precision="bf16",
                             repeats=args.repeats, warmup_iter=2, seed=0, device=device)
        base = base or res["s_per_img"]
        row = {"case": f"mar_b_sample_{name}", "batch": args.batch, "num_iter": args.num_iter, **res,
               "speedup_vs_diffusion_100": round(base / res["s_per_img"], 3), "gpu": env.get("gpu"),
               "torch": env.get("torch")}
        print(json.dumps(row), flush=True)
        if out:
            out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
