"""MAR-B / EAR-B speed at the 256-px configuration, contgen and (with ``--reference-root``) the reference code,
in one process on one device, so every ratio compares numbers taken in the same run.

Cases (random weights, fixed seeds; the KL-16 decoder has random weights too — control flow does not depend on
the values):

* ``mar_train``  MAR-B training step, batch 128, cached-latent input;
* ``ear_train``  EAR-B training step, batch 32 (the EAR README's per-GPU batch); ``ear_train128`` / ``ear_train256``:
  batch 128 / 256 (256 is the memory question: does it fit one 80 GB GPU without activation checkpointing);
* ``mar_sample`` MAR-B sampling, batch 256, 64 iterations, CFG 2.9 linear, temperature 1, 100 head steps,
  incl. the KL-16 decode; ``mar_sample256``: the same at 256 iterations (the README's FID setting);
* ``ear_sample`` EAR-B sampling, batch 128, 64 iterations, CFG 3.0 linear, infer temperature 0.7, incl. decode.

contgen's training step is the module's own ``training_step`` (posterior sample of cached (view, flip) moments,
one mask ratio per batch, head on the masked rows only) under autocast, then backward, clip 3.0, AdamW (fused
for bf16; foreach for fp16 with a GradScaler, as ``configure_optimizers`` picks under ``16-mixed``) and the
foreach EMA — Lightning's loop itself is not in the timed region. Sampling is ``TokenARModule.generate`` at
``sample_precision`` (EMA weights). The reference side is described in ``bench/reference.py``.

Protocol, both sides: ``--warmup`` training steps (more with ``--compile``) and one whole sampling batch (same
batch, same iterations, incl. decode: contgen captures its CUDA graphs there; its wall time is reported as
``first_batch_s``) first; then ``--steps`` training steps or ``--repeats`` sampling batches, each between two device
synchronisations; mean and median are reported. Seeds are fixed. contgen's sampling runs with ``module.cuda_graphs``
(``--graphs``: on, off or both) and, with ``--compile``, its compiled blocks; ``--compile-mode`` is
``module.compile_mode`` (``reduce-overhead``: the trained blocks' forward and backward replay as CUDA graphs).

MFU (training): model FLOPs per image — the matmul and attention FLOPs of contgen's eager step (forward + backward,
counted by ``torch.utils.flop_counter`` over the same 20 steps, so the same mask ratios; the head on the masked rows
only, the encoder on the visible ones, no padding) — times img/s over the GPU's dense bf16 peak
(``timing.BF16_PEAK_TFLOPS``). The same model FLOPs are used for the reference's row (it runs its head on every row
and masks the loss, so it executes more than that).
Each variant runs in a fresh process (``--isolate``, the default) so no variant inherits another's state.
Global flags, identical for both sides: TF32 matmuls on, ``cudnn.benchmark`` on (as ``main_mar.py`` sets).

    python bench/mar_ear.py --reference-root ~/src --out bench/results/h100.jsonl
    python bench/mar_ear.py --cases mar_train --sides contgen --compile both
    python bench/mar_ear.py --device cpu --tiny --reference-root ~/src   # smoke run of every code path
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing contgen

import timing  # noqa: E402
from timing import Timer, summarize  # noqa: E402  (bench/ is on sys.path as the script's folder)

CASES = {
    "mar_train": dict(method="mar", kind="train", batch=128),
    "ear_train": dict(method="ear", kind="train", batch=32),
    "ear_train128": dict(method="ear", kind="train", batch=128),
    "ear_train256": dict(method="ear", kind="train", batch=256),  # what fits on one 80 GB GPU
    "mar_sample": dict(method="mar", kind="sample", batch=256, num_iter=64, cfg=2.9, temperature=1.0),
    "mar_sample256": dict(method="mar", kind="sample", batch=256, num_iter=256, cfg=2.9, temperature=1.0),
    "ear_sample": dict(method="ear", kind="sample", batch=128, num_iter=64, cfg=3.0, temperature=0.7),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --- contgen side ----------------------------------------------------------------------------------------
def paper_optim(method: str) -> dict:
    """conf/train.yaml's ``optim`` block with the paper recipe's values (speed does not depend on them)."""
    import yaml

    optim = yaml.safe_load((ROOT / "conf" / "train.yaml").read_text())["optim"]
    optim.update(lr=None, blr=1e-4, schedule="constant", ema_decay=0.9999, ema_warmup=False,
                 head_lr_scale=0.25 if method == "ear" else 1.0)
    try:  # a contgen revision being compared may predate contgen/modules/base.py or OPTIM_KEYS
        from contgen.modules.base import OPTIM_KEYS as keys
    except ImportError:
        from contgen.modules import token_ar

        keys = getattr(token_ar, "OPTIM_KEYS", None)
    return {k: v for k, v in optim.items() if keys is None or k in keys}


def build_contgen(method: str, compile: bool, tiny: bool, device: torch.device, compile_mode: str = "default"):
    from contgen.backbones.ear import EARBackbone
    from contgen.backbones.mar import MARBackbone
    from contgen.heads.diffusion import DiffusionHead
    from contgen.heads.energy import EnergyHead
    from contgen.modules.token_ar import TokenARModule
    from contgen.samplers.masked import MaskedARSampler
    from contgen.tokenizers.kl16 import KLTokenizer

    tokenizer = KLTokenizer(ckpt_path=None, random_init=True, image_size=64 if tiny else 256)
    w, d = (32, 1) if tiny else (1024, 6)
    if method == "mar":
        size = dict(encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                    decoder_num_heads=2) if tiny else dict(encoder_embed_dim=768, encoder_depth=12,
                                                           encoder_num_heads=12, decoder_embed_dim=768,
                                                           decoder_depth=12, decoder_num_heads=12)
        backbone = functools.partial(MARBackbone, **size)
        head = functools.partial(DiffusionHead, width=w, depth=d, num_sampling_steps=5 if tiny else 100, batch_mul=4)
    else:
        size = dict(embed_dim=32, depth=1, num_heads=2) if tiny else dict(embed_dim=768, depth=24, num_heads=12)
        backbone = functools.partial(EARBackbone, **size)
        head = functools.partial(EnergyHead, width=w, depth=d, noise_channels=64, score_batch_mul=2)
    mode = {} if compile_mode == "default" else {"compile_mode": compile_mode}  # a contgen before 31a870c has none
    module = TokenARModule(tokenizer, backbone, head, MaskedARSampler(num_iter=4), num_classes=1000,
                           optim=paper_optim(method), compile=compile, **mode)
    return module.to(device)


def contgen_train(module, batch: int, precision: str, warmup: int, steps: int, seed: int, device,
                  count_flops: bool = False) -> dict:
    import warnings

    from contgen.modules.optim import param_groups

    o = module.optim
    groups = param_groups(module.net.backbone, module.net.head, o["weight_decay"], o["head_lr_scale"])
    for g in groups:
        g["lr"] = 8e-4 * g["lr_scale"]
    fused = device.type == "cuda" and precision != "fp16"  # TokenARModule.configure_optimizers' choice
    opt = torch.optim.AdamW(groups, lr=8e-4, betas=tuple(o["betas"]), fused=fused, foreach=None if fused else True)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    params = [p for g in groups for p in g["params"]]
    gen = torch.Generator(device).manual_seed(seed)
    seq_len, moment_dim = module.tokenizer.seq_len, 2 * module.tokenizer.token_dim
    data = {"moments": torch.randn(batch, 2, seq_len, moment_dim, generator=gen, device=device),
            "label": torch.randint(0, 1000, (batch,), generator=gen, device=device)}
    module.train()
    timer = Timer(device)

    def step(i):
        with torch.autocast(device.type, dtype=DTYPES[precision]):
            loss = module.training_step(data, i)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 3.0, foreach=True)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 3.0, foreach=True)
            opt.step()
        opt.zero_grad(set_to_none=True)
        module.ema.update(module.net)

    def timed(i):
        timer.sync()
        t0 = time.perf_counter()
        step(i)
        timer.sync()
        return time.perf_counter() - t0

    with warnings.catch_warnings():  # self.log() without a Trainer warns once per key; nothing is logged
        warnings.simplefilter("ignore")
        for i in range(warmup):
            step(i)
        timer.sync()
        timer.reset_peak()
        times = [timed(warmup + i) for i in range(steps)]
        out = {**summarize(times, batch, "step"), "peak_gib": timer.peak_gib()}
        if count_flops:  # model FLOPs, counted on the eager step (same steps, so the same mask ratios)
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                for i in range(steps):
                    step(warmup + i)
            out["model_gflop_per_img"] = round(counter.get_total_flops() / steps / batch / 1e9, 2)
    return out


@torch.no_grad()
def contgen_sample(module, batch: int, num_iter: int, cfg: float, temperature: float, precision: str, repeats: int,
                   warmup_iter: int, seed: int, device, graphs: bool = True) -> dict:
    """``module.generate`` (tokens + decode, under ``sample_precision``, with ``module.cuda_graphs`` = ``graphs``); the
    decoder is wrapped to record when the tokens are done, which adds one synchronisation."""
    if hasattr(module, "cuda_graphs"):
        module.cuda_graphs = graphs
    elif graphs:
        raise ValueError("this contgen predates module.cuda_graphs: use --graphs off")
    from contgen.samplers.masked import MaskedARSampler

    import contextlib

    if hasattr(module, "sample_precision"):  # generate() applies it
        module.sample_precision, own_autocast = precision, contextlib.nullcontext()
    else:  # a contgen from before module.sample_precision: generate() had no autocast of its own
        own_autocast = torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32")
    gen = torch.Generator(device).manual_seed(seed)
    labels = torch.randint(0, 1000, (batch,), generator=gen, device=device)
    timer, stamps = Timer(device), []
    decode = module.tokenizer.decode

    def stamped_decode(tokens):
        timer.sync()
        stamps.append(time.perf_counter())
        return decode(tokens)

    module.tokenizer.decode = stamped_decode
    try:
        def run(n_iter):
            sampler = MaskedARSampler(num_iter=n_iter, cfg=cfg, cfg_schedule="linear", temperature=temperature)
            timer.sync()
            t0 = time.perf_counter()
            with own_autocast:
                images = module.generate(labels, generator=gen, sampler=sampler)
            timer.sync()
            assert images.shape[0] == batch
            return time.perf_counter() - t0, stamps[-1] - t0

        first = run(warmup_iter)
        timer.reset_peak()
        res = [run(num_iter) for _ in range(repeats)]
    finally:
        del module.tokenizer.decode
    return {**summarize([r[0] for r in res], batch, "batch"), "first_batch_s": round(first[0], 3),
            "tokens_s_per_img": round(sum(r[1] for r in res) / len(res) / batch, 5), "peak_gib": timer.peak_gib()}


# --- driver ------------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict:
    import timm

    return {**timing.environment(device), "timm": timm.__version__}


def speed(r: dict) -> float | None:
    """Throughput: img/s for training, (s/img)⁻¹ for sampling."""
    return r.get("img_per_s") or (1.0 / r["s_per_img"] if r.get("s_per_img") else None)


def ratios(rows: list[dict]) -> list[dict]:
    """One line per contgen row with its number, the reference's at the same precision and at fp16 (the reference's
    own setting), and the ratios contgen ÷ reference of throughput; training lines carry the MFU of both sides (model
    FLOPs from the case's eager contgen row, the dense bf16 peak of the GPU)."""
    ref = {(r["case"], r["precision"]): r for r in rows if r["side"] == "reference" and "error" not in r}
    flops = {r["case"]: r["model_gflop_per_img"] for r in rows if r.get("model_gflop_per_img")}
    out = []
    for r in rows:
        if r["side"] != "contgen" or "error" in r or not speed(r):
            continue
        line = {k: r.get(k) for k in ("case", "gpu", "torch", "run_id", "precision", "compile", "compile_mode",
                                      "graphs")}
        unit = "img_per_s" if "img_per_s" in r else "s_per_img"
        line["unit"], line["contgen"] = unit, r[unit]
        for name, precision in (("same_precision", r["precision"]), ("vs_reference_fp16", "fp16")):
            other = ref.get((r["case"], precision))
            if other and speed(other):
                line[f"reference_{precision}"] = other[unit]
                line[f"speedup_{name}"] = round(speed(r) / speed(other), 3)
        peak = timing.bf16_peak(r["gpu"])
        if unit == "img_per_s" and r["case"] in flops and peak:
            line["model_gflop_per_img"] = flops[r["case"]]
            line["mfu"] = round(flops[r["case"]] * r["img_per_s"] / (peak * 1e3), 4)
            key = (r["case"], r["precision"])
            if key in ref:
                line["mfu_reference_same_precision"] = round(flops[r["case"]] * ref[key]["img_per_s"] / (peak * 1e3), 4)
        if any(k.startswith("speedup") or k == "mfu" for k in line):
            out.append({"side": "ratio", **line})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="mar_train,ear_train,mar_sample,ear_sample",
                   help=f"comma-separated, from {sorted(CASES)}")
    p.add_argument("--sides", default="contgen,reference", help="contgen,reference (reference needs --reference-root)")
    p.add_argument("--reference-root", type=Path, default=None,
                   help="folder holding the checkouts mar/ (LTH14/mar) and EAR/ (shaochenze/EAR)")
    p.add_argument("--precisions", default="bf16,fp16", help="autocast dtypes, each case and side")
    p.add_argument("--reference-precisions", default=None, help="for the reference side (default: --precisions)")
    p.add_argument("--compile", choices=("off", "on", "both"), default="off",
                   help="contgen with torch.compile (module compile=True), training and sampling")
    p.add_argument("--compile-mode", choices=("default", "reduce-overhead"), default="default",
                   help="module.compile_mode with --compile: reduce-overhead replays the trained blocks as CUDA graphs")
    p.add_argument("--graphs", choices=("off", "on", "both"), default="on",
                   help="contgen sampling with module.cuda_graphs (the head's loop replayed as CUDA graphs)")
    p.add_argument("--compile-precisions", default=None, help="precisions for the compiled runs (default: all)")
    p.add_argument("--steps", type=int, default=20, help="timed training steps")
    p.add_argument("--warmup", type=int, default=5, help="training warm-up steps (+10 when compiled)")
    p.add_argument("--repeats", type=int, default=1, help="timed sampling batches per case and side")
    p.add_argument("--repeats-256", type=int, default=1, help="timed batches for mar_sample256")
    p.add_argument("--warmup-iter", type=int, default=None,
                   help="iterations of the warm-up sampling batch (default: the case's, so graphs are captured there)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny models at 64 px, batch 2 (a smoke test of every code path)")
    p.add_argument("--out", type=Path, default=None, help="append the JSON lines to this file too")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                   help="run each variant in a fresh process (default): no compile caches, allocator state or "
                        "Python heap of an earlier variant affect a later one")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --device cpu --tiny for a smoke run)")
    sides = args.sides.split(",")
    if "reference" in sides and args.reference_root is None:
        raise SystemExit("--sides reference needs --reference-root DIR (DIR/mar = LTH14/mar, DIR/EAR = shaochenze/EAR)")
    if device.type != "cuda":  # the reference hard-codes .cuda() and torch.cuda.synchronize(): CPU smoke runs only
        torch.Tensor.cuda = lambda self, *a, **k: self
        torch.cuda.synchronize = lambda *a, **k: None
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    os.environ.setdefault("BENCH_RUN_ID", time.strftime("%Y%m%dT%H%M%S"))  # one id for a run and its children
    env = environment(device)
    precisions = args.precisions.split(",")
    ref_precisions = args.reference_precisions.split(",") if args.reference_precisions else precisions
    compiled = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    graph_opts = {"off": [False], "on": [True], "both": [True, False]}[args.graphs]
    compile_precisions = args.compile_precisions.split(",") if args.compile_precisions else precisions
    rows: list[dict] = []
    out = open(args.out, "a") if args.out else None
    if not args.child:
        print(f"# {json.dumps(env)}", flush=True)

    def run_isolated(case, side, precision, comp, graphs):
        """This script again, for one variant only; its JSON lines are returned (and not written to --out)."""
        argv, skip = [], False
        for a in sys.argv[1:]:  # drop the selection options and --out; the rest (steps, root, ...) passes through
            if skip:
                skip = False
                continue
            name = a.split("=")[0]
            if name in ("--cases", "--sides", "--precisions", "--reference-precisions", "--compile",
                        "--compile-precisions", "--graphs", "--out"):
                skip = "=" not in a
                continue
            argv.append(a)
        argv += ["--cases", case, "--sides", side, "--precisions", precision, "--reference-precisions", precision,
                 "--compile", "on" if comp else "off", "--graphs", "on" if graphs else "off", "--no-isolate", "--child"]
        proc = subprocess.run([sys.executable, __file__, *argv], stdout=subprocess.PIPE, text=True)
        rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        if not rows:
            rows = [{"case": case, "side": side, "precision": precision, "compile": comp, **env,
                     "error": f"child process exited with {proc.returncode} and no result"}]
        return rows

    def emit(row):
        rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    def free():
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for case in args.cases.split(","):
        spec = {**CASES[case], **({"batch": 2, "num_iter": 4} if args.tiny and "num_iter" in CASES[case] else
                                  {"batch": 2} if args.tiny else {})}
        method, kind = spec["method"], spec["kind"]
        for side in sides:
            if side == "reference":  # the reference's own precision first
                variants = sorted([(False, None, pr) for pr in ref_precisions], key=lambda v: v[2] != "fp16")
            else:
                variants = [(c, g, pr) for c in compiled for g in (graph_opts if kind == "sample" else [None])
                            for pr in (compile_precisions if c else precisions)]
            for comp, graphs, precision in variants:
                base = {"case": case, "side": side, "precision": precision, "compile": comp,
                        **({"compile_mode": args.compile_mode} if comp and side == "contgen" else {}),
                        **({"graphs": graphs} if graphs is not None else {}), **env,
                        **{k: v for k, v in spec.items() if k not in ("method", "kind")}}
                if args.isolate:
                    for row in run_isolated(case, side, precision, comp, graphs):
                        emit({**row, "isolated": True})
                    continue
                t_start = time.perf_counter()
                torch.manual_seed(args.seed)
                model = None
                try:
                    if side == "contgen":
                        model = build_contgen(method, comp, args.tiny, device, args.compile_mode)
                        if kind == "train":
                            res = contgen_train(model, spec["batch"], precision, args.warmup + 10 * comp, args.steps,
                                                args.seed, device, count_flops=not comp)
                        else:
                            res = contgen_sample(model, spec["batch"], spec["num_iter"], spec["cfg"],
                                                 spec["temperature"], precision,
                                                 args.repeats_256 if case == "mar_sample256" else args.repeats,
                                                 args.warmup_iter or spec["num_iter"], args.seed, device, graphs)
                    else:
                        from reference import RefModel

                        model = RefModel(args.reference_root, method, args.tiny, device)
                        base["reference_commit"] = model.commit
                        if kind == "train":
                            res = model.train(spec["batch"], precision, args.warmup, args.steps, args.seed)
                        else:
                            res = model.sample(spec["batch"], spec["num_iter"], spec["cfg"], spec["temperature"],
                                               precision, args.repeats_256 if case == "mar_sample256" else args.repeats,
                                               args.warmup_iter or spec["num_iter"], args.seed)
                except torch.OutOfMemoryError:
                    res = {"error": "out of memory"}
                except Exception as e:  # one failing variant must not cost the rest of the (scarce) device call
                    res = {"error": f"{type(e).__name__}: {e}"[:500]}
                res["wall_s"] = round(time.perf_counter() - t_start, 1)
                emit({**base, **res})
                del model
                free()
    for r in ([] if args.child else ratios(rows)):
        emit(r)
    if out:
        out.close()


if __name__ == "__main__":
    main()
