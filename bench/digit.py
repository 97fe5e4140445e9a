"""DiGIT benchmarks (issue 11): K-means throughput (K = 8192, D = 768), stage-1 training tokens/s for DiGIT-B, and
GPT sampling with and without the KV cache. One process, one device, random data and weights, fixed seeds.

    python bench/digit.py --out bench/results/<gpu>_<date>_digit.jsonl        # GPU, about 2-4 minutes on an H100
    python bench/digit.py --small --device cpu                                 # tiny sizes, every code path, seconds

Cases (one JSON line each, with the GPU name, torch version and commit):

- ``kmeans_fit``: ``KMeans.fit`` (contgen/tokenizers/kmeans.py) on ``--kmeans-points`` random fp32 (N, 768) rows
  already on the device (default 256·K = 2,097,152: faiss's subsample, so the fit clusters every row), K = 8192.
  Time per Lloyd iteration = (fit with ``--kmeans-iters`` iterations − fit with 0 iterations) / iterations: the row
  scan and the random init are excluded. ``points_iter_per_s`` = N / time per iteration.
- ``kmeans_assign``: ``assign`` (fp32 squared-L2 argmin, incl. its one finiteness sync) over the same rows: points/s.
- ``train``: DiGIT-B stage 1 (conf/model/gpt_digit_b.yaml: 16 × 1024, post-LN, dropout 0.1; vocab 8192, 1000
  classes, 256 tokens) + ``CategoricalHead`` (label smoothing 0.1), the step of ``CausalARModule.masked_loss``:
  forward under bf16 autocast, label-smoothed CE over all rows, backward, grad-norm clip 1.0 (DiGIT), fused AdamW
  (DiGIT's lr 3e-4, betas (0.9, 0.98), wd 0.01). tokens/s = batch · 256 / mean step time; MFU below.
- ``sample``: ``CausalARSampler`` (KV cache, one slot per step) against an uncached loop that reruns
  ``backbone.forward`` over the full sequence at every step and samples the head on that step's row (future slots
  hold id 0; causality makes them irrelevant). Top-k 200 (DiGIT-B), temperature 1, no CFG, bf16 autocast, same
  generator seed for both; ``match_fraction`` = share of equal tokens (bf16 rounding differs between the two paths,
  and one differing token changes the rest of that image; at fp32 on the CPU they are equal, tests/bench).

MFU (training): model FLOPs per token = 6 · N_matmul + 12 · n_layers · d · L (PaLM, appendix B: the 2 · 2 · L · d
FLOPs per layer and token of QKᵀ and AV, forward, ×3 for forward + backward; full, not halved for the causal mask),
N_matmul = the parameters of the blocks and the output projection (embedding and position tables are lookups, not
matmuls). MFU = FLOPs/token · tokens/s ÷ the dense bf16 peak of the detected GPU (H100/H200 SXM: 989 TFLOP/s).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from timing import Timer, bf16_peak, environment  # noqa: E402

# dense bf16 tensor-core peaks (no sparsity), TFLOP/s, by a substring of torch.cuda.get_device_name
def sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def sizes(small: bool) -> dict:
    """DiGIT-B (reference/digit.md §1-§2) or tiny CPU sizes."""
    if small:
        return {"k": 32, "dim": 16, "points": 32 * 64, "iters": 2, "seq_len": 16, "num_classes": 10, "vocab": 64,
                "model": {"embed_dim": 32, "depth": 2, "num_heads": 2}, "top_k": 20}
    return {"k": 8192, "dim": 768, "points": 256 * 8192, "iters": 5, "seq_len": 256, "num_classes": 1000,
            "vocab": 8192, "model": {}, "top_k": 200}


def build_gpt(sz: dict, device: torch.device, top_k: int, seed: int = 0):
    """GPTBackbone with conf/model/gpt_digit_b.yaml's settings (tiny widths with --small) + conf/loss/categorical."""
    from contgen.backbones.gpt import GPTBackbone
    from contgen.heads.categorical import CategoricalHead

    def conf(path):
        return {k: v for k, v in yaml.safe_load((ROOT / "conf" / path).read_text()).items() if not k.startswith("_")}

    torch.manual_seed(seed)
    model = GPTBackbone(seq_len=sz["seq_len"], num_classes=sz["num_classes"], vocab_size=sz["vocab"],
                        **{**conf("model/gpt_digit_b.yaml"), **sz["model"]}).to(device)
    head = CategoricalHead(cond_dim=model.cond_dim, vocab_size=sz["vocab"], **{**conf("loss/categorical.yaml"),
                                                                                  "top_k": top_k}).to(device)
    return model, head


def matmul_params(model, head) -> int:
    blocks = sum(p.numel() for p in model.decoder_blocks.parameters() if p.ndim == 2)
    return blocks + sum(p.numel() for p in head.parameters() if p.ndim == 2)


def flops_per_token(model, head) -> float:
    depth, d, seq = len(model.decoder_blocks), model.cond_dim, model.seq_len
    return 6 * matmul_params(model, head) + 12 * depth * d * seq


# --- K-means -----------------------------------------------------------------------------------------
def bench_kmeans(sz: dict, args, device: torch.device, timer: Timer) -> list[dict]:
    from contgen.tokenizers.kmeans import KMeans, assign

    n, k, dim, iters = args.kmeans_points or sz["points"], sz["k"], sz["dim"], args.kmeans_iters or sz["iters"]
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(n, dim, device=device, generator=g)

    def fit(it: int) -> tuple[float, KMeans]:
        timer.sync()
        t0 = time.perf_counter()
        km = KMeans(k, iters=it, max_points_per_centroid=256, device=device).fit(x)
        timer.sync()
        return time.perf_counter() - t0, km

    timer.reset_peak()
    fit(1)  # warm-up: cuBLAS handles, allocator
    t0, _ = fit(0)
    tn, km = fit(iters)
    per_iter = (tn - t0) / iters
    row = {"case": "kmeans_fit", "points": n, "k": k, "dim": dim, "iters": iters, "fit_s": round(tn, 3),
           "init_s": round(t0, 3), "iter_s": round(per_iter, 4), "points_iter_per_s": round(n / per_iter),
           # distances (2·N·K·D) + one-hot centroid sums (2·N·K·D) per iteration, exact fp32 (no TF32)
           "fp32_tflops": sig(4 * n * k * dim / per_iter / 1e12), "peak_gib": timer.peak_gib()}
    assign(x[: 4 * k], km.centroids)  # warm-up
    times = []
    for _ in range(args.repeats):
        timer.sync()
        t = time.perf_counter()
        assign(x, km.centroids)
        timer.sync()
        times.append(time.perf_counter() - t)
    mean = sum(times) / len(times)
    arow = {"case": "kmeans_assign", "points": n, "k": k, "dim": dim, "assign_s": round(mean, 4),
            "points_per_s": round(n / mean), "fp32_tflops": sig(2 * n * k * dim / mean / 1e12), "n": len(times)}
    return [row, arow]


# --- stage-1 training ----------------------------------------------------------------------------------
def bench_train(sz: dict, args, device: torch.device, timer: Timer, batch: int, compile: bool) -> dict:
    model, head = build_gpt(sz, device, top_k=0)
    model.train(), head.train()
    if compile:
        for block in model.decoder_blocks:  # what CausalARModule(compile=True) compiles
            block.compile()
    params = [p for m in (model, head) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.98), weight_decay=0.01,
                            **({"fused": True} if device.type == "cuda" else {"foreach": True}))
    g = torch.Generator(device).manual_seed(0)
    tokens = torch.randint(sz["vocab"], (batch, sz["seq_len"]), device=device, generator=g)
    labels = torch.randint(sz["num_classes"], (batch,), device=device, generator=g)
    amp = device.type == "cuda"  # bf16 autocast; fp32 on the CPU (smoke runs)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            drop = torch.rand(batch, generator=g, device=device) < model.label_drop_prob
            z = model(tokens, labels, drop)
            loss = head.loss(tokens.flatten(0, 1), z.flatten(0, 1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    row = {"case": "train", "model": "digit_b" if not args.small else "tiny", "batch": batch,
           "seq_len": sz["seq_len"], "compile": compile, "precision": "bf16" if amp else "fp32",
           "params_m": round(sum(p.numel() for p in params) / 1e6, 2)}
    timer.reset_peak()
    try:
        for _ in range(args.warmup * (3 if compile else 1)):
            step()
        times = []
        for _ in range(args.steps):
            timer.sync()
            t = time.perf_counter()
            loss = step()
            timer.sync()
            times.append(time.perf_counter() - t)
    except torch.cuda.OutOfMemoryError as e:
        return {**row, "oom": True, "error": str(e).splitlines()[0]}
    mean = sum(times) / len(times)
    tok_s = batch * sz["seq_len"] / mean
    fpt = flops_per_token(model, head)
    peak = bf16_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    return {**row, "step_s": round(mean, 4), "median_step_s": round(sorted(times)[len(times) // 2], 4),
            "n": len(times), "tokens_per_s": round(tok_s), "img_per_s": round(batch / mean, 1),
            "loss": round(float(loss.detach()), 4), "matmul_params_m": round(matmul_params(model, head) / 1e6, 2),
            "flops_per_token_g": sig(fpt / 1e9), "model_tflops": sig(fpt * tok_s / 1e12),
            "bf16_peak_tflops": peak, "mfu": round(fpt * tok_s / (peak * 1e12), 4) if peak else None,
            "peak_gib": timer.peak_gib()}


# --- sampling -------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_uncached(backbone, head, labels: torch.Tensor, temperature: float = 1.0,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """The reference point for the KV cache: at step i, ``backbone.forward`` over the whole sequence (slots past i
    hold id 0 / zeros, which the causal mask keeps out of rows <= i), then the head on the row of position
    ``order[i]``. One head draw per step from ``generator``, as in :class:`CausalARSampler`, so the same seed gives
    the same tokens up to the rounding of the two computations. Tokens in image position order."""
    b, seq_len = labels.shape[0], backbone.seq_len
    drop = torch.zeros(b, dtype=torch.bool, device=labels.device)
    shape = (b, seq_len) if backbone.vocab_size else (b, seq_len, backbone.token_dim)
    steps = torch.zeros(shape, device=labels.device,
                        dtype=torch.long if backbone.vocab_size else backbone.pos_emb.dtype)  # step order
    for i in range(seq_len):
        z = backbone(backbone.to_positions(steps), labels, drop)
        steps[:, i] = head.sample(z[:, backbone.order[i]], temperature=temperature, generator=generator)
    return backbone.to_positions(steps)


def bench_sample(sz: dict, args, device: torch.device, timer: Timer, batch: int, top_k: int) -> list[dict]:
    from contgen.samplers.causal import CausalARSampler

    model, head = build_gpt(sz, device, top_k=top_k)
    model.eval(), head.eval()
    labels = torch.arange(batch, device=device) % sz["num_classes"]
    amp = device.type == "cuda"  # fp32 on the CPU: there cached and uncached tokens must be equal
    sampler = CausalARSampler(cfg=1.0, temperature=1.0)
    runs = {"cached": lambda g: sampler(model, head, labels, generator=g),
            "uncached": lambda g: sample_uncached(model, head, labels, 1.0, generator=g)}
    out, rows = {}, []
    for name, fn in runs.items():
        timer.reset_peak()
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                if name == "cached":  # warm-up (the uncached loop's first steps warm it up enough)
                    fn(torch.Generator(device).manual_seed(1))
                times = []
                for r in range(args.repeats):
                    timer.sync()
                    t = time.perf_counter()
                    tokens = fn(torch.Generator(device).manual_seed(args.seed + r))
                    timer.sync()
                    times.append(time.perf_counter() - t)
        except torch.cuda.OutOfMemoryError as e:
            rows.append({"case": "sample", "kv_cache": name == "cached", "batch": batch, "oom": True,
                         "error": str(e).splitlines()[0]})
            continue
        out[name] = tokens
        mean = sum(times) / len(times)
        rows.append({"case": "sample", "kv_cache": name == "cached", "model": "digit_b" if not args.small else "tiny",
                     "batch": batch, "seq_len": sz["seq_len"], "top_k": top_k, "precision": "bf16" if amp else "fp32",
                     "batch_s": round(mean, 4), "n": len(times), "s_per_img": round(mean / batch, 5),
                     "tokens_per_s": round(batch * sz["seq_len"] / mean), "peak_gib": timer.peak_gib()})
    if len(out) == 2:
        same = out["cached"] == out["uncached"]
        speed = {r["kv_cache"]: r["s_per_img"] for r in rows}
        rows.append({"case": "sample_match", "batch": batch, "seed": args.seed + args.repeats - 1,
                     "match_fraction": round(same.float().mean().item(), 5),
                     "images_equal": round(same.all(1).float().mean().item(), 5),
                     "kv_cache_speedup": round(speed[False] / speed[True], 2)})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="kmeans,train,sample", help="comma list of kmeans, train, sample")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="tiny sizes (CPU smoke run, seconds)")
    p.add_argument("--train-batches", default=None, help="per-GPU batches (default 64,256; --small 4,8)")
    p.add_argument("--sample-batches", default=None, help="(default 64,256; --small 4)")
    p.add_argument("--compile", action="store_true", help="also time training with the blocks compiled (CUDA)")
    p.add_argument("--kmeans-points", type=int, default=None, help="default 256·K")
    p.add_argument("--kmeans-iters", type=int, default=None, help="timed Lloyd iterations (default 5)")
    p.add_argument("--top-k", type=int, default=None, help="default 200 (DiGIT-B)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=1, help="timed sampling batches / assign passes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="append the JSON lines here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.small:
        args.warmup, args.steps = min(args.warmup, 1), min(args.steps, 2)
    sz = sizes(args.small)
    cases = set(args.cases.split(","))
    if cases - {"kmeans", "train", "sample"}:
        p.error(f"--cases: unknown {sorted(cases - {'kmeans', 'train', 'sample'})}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the training step's fp32 matmuls (K-means forces fp32 itself)
        torch.backends.cudnn.allow_tf32 = True
    timer, env = Timer(device), environment(device)
    print(f"# {json.dumps(env)}", flush=True)
    out = open(args.out, "a") if args.out else None

    def emit(row: dict) -> None:
        row = {**row, "gpu": env["gpu"], "torch": env["torch"], "date": env["date"],
               "contgen_commit": env["contgen_commit"], "small": args.small}
        print(json.dumps(row), flush=True)
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()

    def batches(value, default):
        return [int(b) for b in (value or default).split(",")]

    if "kmeans" in cases:
        for row in bench_kmeans(sz, args, device, timer):
            emit(row)
    if "train" in cases:
        for batch in batches(args.train_batches, "4,8" if args.small else "64,256"):
            for compile in [False] + ([True] if args.compile and device.type == "cuda" else []):
                emit(bench_train(sz, args, device, timer, batch, compile))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    if "sample" in cases:
        for batch in batches(args.sample_batches, "4" if args.small else "64,256"):
            for row in bench_sample(sz, args, device, timer, batch, args.top_k or sz["top_k"]):
                emit(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if out:
        out.close()


if __name__ == "__main__":
    main()
