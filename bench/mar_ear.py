"""MAR-B / EAR-B throughput at the 256-px configuration on synthetic cached tokens, bf16.

One JSON line per case. Training runs contgen's real training step (``TokenARModule.masked_loss`` on
posterior samples of cached moments, fused AdamW, grad clip 3.0, foreach EMA) in a plain loop; sampling
runs ``TokenARModule.generate`` (EMA weights, masked sampler, KL-16 decode with random weights — control
flow does not depend on the weights). Reference numbers (mar.md §6, ear.md §6, one H100 80GB) are
printed beside ours.

    python bench/mar_ear.py                      # all cases
    python bench/mar_ear.py --cases mar_train --compile
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import torch

from contgen.backbones.ear import EARBackbone
from contgen.backbones.mar import MARBackbone
from contgen.heads.diffusion import DiffusionHead
from contgen.heads.energy import EnergyHead
from contgen.modules.token_ar import TokenARModule
from contgen.samplers.masked import MaskedARSampler
from contgen.tokenizers.kl16 import KLTokenizer

REFERENCE = {  # measured with the reference code on one H100 80GB
    ("mar", "train", 128): {"img_per_s": 365, "peak_gib": 49.7, "note": "fp16+GradScaler, python EMA loop"},
    ("mar", "train", 32): {"step_s": 0.244},
    ("ear", "train", 32): {"step_s": 0.096},
    ("mar", "sample", 256, 2.9, True): {"s_per_img": 0.169, "note": "incl. VAE decode"},
    ("mar", "sample", 128, 3.0, False): {"s_per_img": 0.229, "note": "no decode"},
    ("ear", "sample", 128, 3.0, False): {"s_per_img": 0.048, "note": "no decode"},
}


def build(method: str, compile: bool, device: torch.device) -> TokenARModule:
    tokenizer = KLTokenizer(ckpt_path=None, random_init=True, image_size=256)
    if method == "mar":
        backbone = functools.partial(MARBackbone, encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                                     decoder_embed_dim=768, decoder_depth=12, decoder_num_heads=12)
        head = functools.partial(DiffusionHead, width=1024, depth=6, num_sampling_steps=100, batch_mul=4)
        sampler = MaskedARSampler(num_iter=64, cfg=2.9, cfg_schedule="linear", temperature=1.0)
    else:
        backbone = functools.partial(EARBackbone, embed_dim=768, depth=24, num_heads=12)
        head = functools.partial(EnergyHead, width=1024, depth=6, noise_channels=64, score_batch_mul=2)
        sampler = MaskedARSampler(num_iter=64, cfg=3.0, cfg_schedule="linear", temperature=0.7)
    module = TokenARModule(tokenizer, backbone, head, sampler, num_classes=1000,
                           optim={"head_lr_scale": 0.25 if method == "ear" else 1.0}, compile=compile)
    return module.to(device)


def sync_time(fn, device) -> float:
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def bench_train(module: TokenARModule, batch: int, steps: int, warmup: int, device) -> dict:
    from contgen.modules.optim import param_groups

    groups = param_groups(module.net.backbone, module.net.head, 0.02, module.optim["head_lr_scale"])
    opt = torch.optim.AdamW(groups, lr=8e-4, betas=(0.9, 0.95), fused=True)
    params = [p for g in groups for p in g["params"]]
    data = {"moments": torch.randn(batch, 2, 256, 32, device=device), "label": torch.randint(0, 1000, (batch,), device=device)}
    module.train()

    def step(i):
        g, g_cpu = module.step_generators(i)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = module.masked_loss(module.tokens_from_batch(data, g), data["label"], g, g_cpu)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        module.ema.update(module.net)

    for i in range(warmup):
        step(i)
    torch.cuda.reset_peak_memory_stats(device)
    times = [sync_time(lambda: step(warmup + i), device) for i in range(steps)]
    mean = sum(times) / len(times)
    return {"step_s": round(mean, 4), "median_step_s": round(sorted(times)[len(times) // 2], 4),
            "img_per_s": round(batch / mean, 1), "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)}


def bench_sample(module: TokenARModule, batch: int, cfg: float, decode: bool, repeats: int, device) -> dict:
    module.sampler.cfg = cfg
    labels = torch.randint(0, 1000, (batch,), device=device)
    g = torch.Generator(device).manual_seed(0)
    run = module.generate if decode else module.generate_tokens
    with torch.autocast("cuda", dtype=torch.bfloat16):
        sync_time(lambda: run(labels, generator=g), device)  # warm-up (and compile)
        times = [sync_time(lambda: run(labels, generator=g), device) for _ in range(repeats)]
    mean = sum(times) / len(times)
    return {"batch_s": round(mean, 3), "s_per_img": round(mean / batch, 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="mar_train,mar_sample,ear_train,ear_sample")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/mar_ear.py needs a CUDA GPU")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    gpu = torch.cuda.get_device_name(device)
    for case in args.cases.split(","):
        method, kind = case.split("_")
        torch.manual_seed(0)
        module = build(method, args.compile, device)
        if kind == "train":
            for batch in (128, 32):
                try:
                    res = bench_train(module, batch, args.steps, 5 + 10 * args.compile, device)
                except torch.OutOfMemoryError:
                    res = {"error": "out of memory"}
                    torch.cuda.empty_cache()
                print(json.dumps({"case": case, "gpu": gpu, "compile": args.compile, "batch": batch, **res,
                                  "reference": REFERENCE.get((method, "train", batch))}), flush=True)
        else:
            cfg = 2.9 if method == "mar" else 3.0
            for batch, guidance, decode in [(256, cfg, True), (128, 3.0, False)]:
                res = bench_sample(module, batch, guidance, decode, args.repeats, device)
                print(json.dumps({"case": case, "gpu": gpu, "compile": args.compile, "batch": batch, "cfg": guidance,
                                  "num_iter": 64, "decode": decode, **res,
                                  "reference": REFERENCE.get((method, "sample", batch, guidance, decode))}), flush=True)
        del module
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
