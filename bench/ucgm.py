"""TiT-XL/2 UCGM speed, contgen and (with ``--reference-root``) the UCGM reference code, in one device call, so
every ratio compares numbers taken in the same run (issue 8, "What must be shown", last bullet).

Cases: TiT-XL/2 (hidden 1152, depth 28, 16 heads, patch 2; 675M parameters) on 32×32×4 latents (SD-VAE 256),
1000 classes, batch 128, random weights shared by both sides (see "Weights"), Linear transport:

* ``train_multi``  UCGM-T multi-step (configs/training_multi_steps/in1k256_tit_xl_sdvae.yaml): λ 0, ζ 0.44
  ``ft-vs-fe`` with the ramped-EMA teacher (ema_decay_rate 0.999), RMSE (c 0) + channel cosine loss,
  t ~ Beta(2.4, 2.4), cosine time weight, label drop 0.1; AdamW lr 2e-4, β (0.9, 0.95), wd 0, no clipping;
* ``train_few``    UCGM-T few-step (configs/training_few_steps/in1k256_tit_xl_sdvae.yaml): λ 1 (central
  difference, ε 0.005), ζ 2.0 ``fc-vs-xz`` with the frozen teacher (ema_decay_rate 1.0), c 5, no cosine loss,
  t ~ Beta(0.8, 1); RAdam lr 1e-4, β (0.9, 0.999), wd 0, gradient-norm clip 0.1;
* ``sample_60``    UCGM-S multi-step, 60 NFE: ρ 0, κ 0.21, order 1, Kumaraswamy (1.17, 0.8, 1.1), gaps
  (0.001, 0.001), no CFG (the multi-step config's ``sample:`` block);
* ``sample_2``     UCGM-S few-step, 2 NFE: ρ 1, κ 0, (1, 1, 1), gaps (0.001, 0.3) (the few-step config's);
* ``equal``        (reference side only) the same-results sanity checks below.

A training step is the full step, both sides: forward passes and targets, loss, backward, clipping where the
recipe clips, optimizer step, eval-EMA update (decay 0.9999). Training runs under bf16 autocast (the reference's
``PRECISION=bf16`` launch, scripts/run_train.sh); sampling under fp32 with TF32 matmuls (eval.py:59, the
reference's FID setting) and bf16 autocast.

Reference side (``--reference-root DIR``, a UCGM checkout at ae74912, cccvs/UCGM; nothing copied): its
``networks/tit.py`` ``TiT_XL_2`` (= ``NETWORKS["TiT-XL/2"]`` of main.py; its ``@torch.compile`` decorators kept:
that is how it runs), ``methodes/unigen.py`` ``UCGMTS`` (``training_step`` and ``sampling_loop``),
``optimers/adamw.py`` ``AdamW`` (its own per-parameter Python AdamW, ``OPTIMERS["AdamW"]``), torch's ``RAdam``
(``OPTIMERS["RAdam"]``) and ``utilities/utils.py`` ``update_ema``. The step is main.py's loop body (L176-197):
``unigen.training_step(model, x, y)``, ``opt.zero_grad()``, backward, clip (few-step), ``nan_to_num_`` of every
gradient, ``opt.step()``, ``update_ema(ema, model, 0.9999)``, ``loss.item()``. Stand-ins, each for something the
reference gets from its launcher: ``model`` is a trivial wrapper with ``.module`` (main.py trains a DDP model and
``training_step`` reads ``model.module``); bf16 is what ``accelerate launch --mixed_precision bf16`` does to every
prepared module, here TiT and UCGMTS: ``forward`` runs under autocast and its outputs are cast to fp32 (accelerate
``Accelerator.prepare_model``, accelerator.py:1750-1761 in 1.11); ``accelerator.backward`` / ``clip_grad_norm_``
are ``loss.backward()`` / ``torch.nn.utils.clip_grad_norm_`` (what they reduce to on one bf16 process). Sampling
is eval.py's ``UCGMTS(transport_type).sampling_loop(z, model.forward, ..., y=y)[-1]`` (L81-95, L227) on the
model in eval mode; its bf16 variant is ours: ``UCGMTS.forward`` wrapped as accelerate wraps it in main.py's
demo sampling (L262). The data loader is one fixed batch (random latents, random labels; a fresh copy of the
labels each step, since ``training_step`` writes the dropped labels into them). Imports: the packages
``networks``, ``optimers`` and ``utilities`` are entered without running their ``__init__`` (which import every
network / optimizer into registries and need fairscale, for lightningdit's rmsnorm, transformers, for cadamw,
safetensors and tqdm, none used here); the modules above are imported as they are. ``methodes`` is imported as is.

contgen side: ``contgen.backbones.tit.TiT``, ``contgen.transport.ucgm.UCGMObjective`` (lab_drop ``last`` as the
reference), its teacher (``build_teacher``: ramped EMA / frozen copy), ``contgen.utils.ema.EMA`` (foreach),
fused AdamW / foreach RAdam (what ``GenerativeModule.configure_optimizers`` picks under bf16), foreach clipping,
the module's non-finite-loss flag, and ``contgen.transport.solvers.UCGMSampler``, each step as
``TransportModule.training_step`` orders it (teacher update, then the loss). Compiled variants (``--compile on``
or ``both``, ``--compile-scope``): ``tit`` is contgen's TiT as built by default (``compile_blocks``: on CUDA each
block runs one ``torch.compile``d function shared by all blocks and by every copy: online net, teacher, sampling
net, as the reference compiles its block ``forward``); ``blocks`` is ``Module.compile`` of each block of the online
net, the teacher and the sampling net; ``full`` compiles each whole denoiser. The eager variant builds the TiT with
``compile_blocks=False``. Equal work: both sides run the same number of network passes per step (multi-step: online
with grad + teacher on the null label; few-step: online with grad + teacher + 2 online no-grad passes at t ± ε)
and the same teacher policy (the reference builds its teacher lazily at the first step, a warm-up step here;
contgen builds it up front). Differences kept because they are the two codes' own: the reference's ``nan_to_num_``
over every gradient (contgen flags a non-finite loss instead), its host syncs (CPU Beta draw copied to the GPU,
``loss.item()``), its Python-loop AdamW and EMAs.

Weights: contgen's TiT is built with a fixed seed, then every all-zero parameter (adaLN-Zero modulations, the
final linear, zero biases) gets N(0, 0.02) so no matrix product runs on zeros and outputs are not 0; the
reference TiT loads that state dict (same parameter names, strict). Each case starts from these weights.

``equal`` (in the reference process, at the bench batch so no extra shapes are compiled; contgen's TiT as built by
default, so compiled on CUDA): TiT outputs of the two networks on one input (fp32/TF32 and bf16), one UCGM-T loss of each objective on the same draws under bf16 (the
reference's global-RNG draws replayed into ``draws``), and UCGM-S outputs on the same noise (6-step κ 0.21
Kumaraswamy grid; 2-step ρ 1 with the reference's CPU re-noise draws replayed through ``noise_fn``; fp32/TF32 and
bf16): max |diff|, relative L2, and the reference's max |value| for scale.

Protocol, both sides: ``--warmup`` training steps (the first compiles; the reference also builds its teacher),
then ``--steps`` steps, each between two device synchronisations (mean → img/s, median), peak memory over the
timed steps, and per-phase device times from CUDA events (no extra syncs). Sampling: one warm-up run of
``--warmup-nfe`` steps with the same settings, then ``--repeats`` (60 NFE) / ``--repeats-few`` (2 NFE) timed
batches. Global flags, identical for both
sides: TF32 matmuls on (eval.py:59; training is under bf16 autocast, where it does not apply),
``cudnn.deterministic`` on / ``benchmark`` off (utilities ``set_seed``, main.py:35).

contgen sampling runs with ``--cuda-graphs on`` (default; ``module.cuda_graphs``, on in conf/module/transport.yaml):
the solver's loop is captured as one CUDA graph per shape on an untimed run of the timed sampler, then replayed
(``contgen/transport/solvers.py`` ``replay_or_call``; same draws, same samples as eager); ``off`` runs it eagerly.
Each contgen sampling row records ``cuda_graphs``.

Model FLOPs: every timing row carries ``model_gflop_per_img`` (one TiT forward counted by ``torch.utils.flop_counter`` on
the meta device, 237.2 GFLOP at XL/2, times the passes of the case: ``TRAIN_PASSES`` for training, the NFE for
sampling; the same work on both sides), ``model_tflop_s`` and ``mfu_bf16_peak`` (÷ 989 TFLOP/s, H100/H200 SXM dense
bf16; fp32 rows use the same denominator so they compare).

Processes (``--isolate``): ``case`` (default) runs each (case, side, precision, compile) in a fresh process;
``side`` runs all cases of one (side, compile) in one process (each case rebuilds its nets; compiled graphs are
reused, which saves the device time of compiling each mode again); ``none`` runs everything here.

    python bench/ucgm.py --reference-root ~/src/UCGM --compile both --out bench/results/h100_<date>_ucgm.jsonl
    python bench/ucgm.py --reference-root ~/src/UCGM --isolate side --compile on --compile-scope tit,blocks
    python bench/ucgm.py --device cpu --tiny --reference-root ~/src/UCGM --compile both   # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib
import json
import os
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing contgen

from mar_ear import environment, ratios  # noqa: E402  (bench/ is on sys.path as the script's folder)
from reference import commit_of  # noqa: E402
from timing import Timer, summarize  # noqa: E402

NUM_CLASSES, IN_CHANNELS = 1000, 4
XL = dict(input_size=32, hidden_size=1152, depth=28, num_heads=16, patch_size=2)  # tit.py:597-598 TiT_XL_2
TINY = dict(input_size=8, hidden_size=64, depth=2, num_heads=2, patch_size=2)
EVAL_EMA_DECAY = 0.9999  # train.ema_decay of both configs

CASES = {
    "equal": dict(kind="check"),
    "train_multi": dict(kind="train", objective=dict(
        consistc_ratio=0.0, enhanced_ratio=0.44, enhanced_style="ft-vs-fe", ema_decay_rate=0.999,
        scaled_cbl_eps=0.0, wt_cosine_loss=True, time_dist_ctrl=(2.4, 2.4, 1.0)),
        optim=dict(name="adamw", lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0, max_grad_norm=None)),
    "train_few": dict(kind="train", objective=dict(
        consistc_ratio=1.0, enhanced_ratio=2.0, enhanced_style="fc-vs-xz", ema_decay_rate=1.0,
        scaled_cbl_eps=5.0, wt_cosine_loss=False, time_dist_ctrl=(0.8, 1.0, 1.0)),
        optim=dict(name="radam", lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, max_grad_norm=0.1)),
    "sample_60": dict(kind="sample", sampler=dict(steps=60, stochast_ratio=0.0, extrapol_ratio=0.21, order=1,
                                                  time_dist_ctrl=(1.17, 0.8, 1.1), rfba_gap_steps=(0.001, 0.001))),
    "sample_2": dict(kind="sample", sampler=dict(steps=2, stochast_ratio=1.0, extrapol_ratio=0.0, order=1,
                                                 time_dist_ctrl=(1.0, 1.0, 1.0), rfba_gap_steps=(0.001, 0.3))),
}
COMMON_OBJECTIVE = dict(lab_drop_ratio=0.1, enhanced_range=(0.0, 0.75))  # both configs; weight Cosine
DTYPES = {"bf16": torch.bfloat16, "fp32": None}
# network passes per image of a training step in forward units (a backward costs 2), the same on both sides:
# online fwd + bwd, the teacher, and (few-step) the two no-grad passes at t ± ε
TRAIN_PASSES = {"train_multi": 3 + 1, "train_few": 3 + 1 + 2}
PEAK_BF16_TFLOPS = 989.0  # H100 / H200 SXM dense bf16: the MFU denominator (fp32/TF32 rows too, to compare)


# --- shared -------------------------------------------------------------------------------------------------
def size(tiny: bool) -> dict:
    return TINY if tiny else XL


def build_contgen_tit(tiny: bool, device: torch.device, seed: int, state: dict | None = None,
                      compile_blocks: bool = False):
    """contgen's TiT: from ``state`` if given, else the seeded init with every all-zero parameter drawn from
    N(0, 0.02) (the weights both sides share; see the module docstring)."""
    from contgen.backbones.tit import TiT

    s = size(tiny)
    torch.manual_seed(seed)
    with torch.device(device):
        net = TiT(s["input_size"], IN_CHANNELS, NUM_CLASSES, patch_size=s["patch_size"], hidden_size=s["hidden_size"],
                  depth=s["depth"], num_heads=s["num_heads"], compile_blocks=compile_blocks)
    if state is not None:
        net.load_state_dict(state, strict=True)
        return net
    if device.type == "meta":  # shapes only (forward_gflop)
        return net
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad and not p.any():
                p.normal_(0.0, 0.02)
    return net


def batch_data(tiny: bool, batch: int, device: torch.device, seed: int):
    """One fixed training batch: latents ~ N(0, 1) (scale does not change the work) and labels in [0, 1000)."""
    s = size(tiny)
    g = torch.Generator(device).manual_seed(seed + 1)
    x = torch.randn(batch, IN_CHANNELS, s["input_size"], s["input_size"], generator=g, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g, device=device)
    return x, y


def forward_gflop(build, level: bool = False) -> float:
    """GFLOP per image of one forward of ``build()`` (a net made on the meta device, so nothing is computed):
    ``torch.utils.flop_counter`` (matmuls and attention; 2 FLOPs per multiply-add) at batch 2; ``level``: a
    Shortcut net's step-level input."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        net = build()
        s = net.x_embedder.input_size
        x, t, y = torch.empty(2, IN_CHANNELS, s, s), torch.empty(2), torch.zeros(2, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            net(x, t, y, **({"level": torch.zeros(2, dtype=torch.long)} if level else {}))
    return counter.get_total_flops() / 2 / 1e9


def with_mfu(res: dict, gflop_per_img: float, batch: int) -> dict:
    """Add the achieved model TFLOP/s and its fraction of the bf16 peak to a timing row (from the unrounded
    batch / step time)."""
    sec = res.get("step_s") or res.get("batch_s")
    if sec:
        tflops = gflop_per_img * batch / sec / 1e3
        res.update(model_gflop_per_img=float(f"{gflop_per_img:.4g}"), model_tflop_s=float(f"{tflops:.4g}"),
                   mfu_bf16_peak=float(f"{tflops / PEAK_BF16_TFLOPS:.3g}"))
    return res


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def dynamo_graphs() -> int:
    try:
        from torch._dynamo.utils import counters
        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001  (a diagnostic only)
        return -1


class PhaseClock:
    """CUDA events between the phases of a step (no synchronisation); mean milliseconds per phase at the end."""

    def __init__(self, device: torch.device, names: list[str]):
        self.cuda, self.names, self.marks = device.type == "cuda", names, []

    def step(self):
        self.marks.append([])

    def mark(self):
        if self.cuda and self.marks:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks[-1].append(e)

    def summary(self) -> dict | None:
        if not self.cuda or not self.marks:
            return None
        torch.cuda.synchronize()
        out = {}
        for i, name in enumerate(self.names):
            vals = [m[i].elapsed_time(m[i + 1]) for m in self.marks if len(m) > i + 1]
            out[name] = round(sum(vals) / len(vals), 2) if vals else None
        return out


def timed_training(step, timer: Timer, warmup: int, steps: int, batch: int, clock: PhaseClock) -> dict:
    for i in range(warmup):
        step(i, None)
    timer.sync()
    timer.reset_peak()
    times = []
    for i in range(steps):
        timer.sync()
        t0 = time.perf_counter()
        clock.step()
        step(warmup + i, clock)
        timer.sync()
        times.append(time.perf_counter() - t0)
    res = {**summarize(times, batch, "step"), "peak_gib": timer.peak_gib(), "phases_ms": clock.summary()}
    if timer.cuda:
        res["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(timer.device) / 2**30, 2)
    return res


def repeats(sampler: dict, args) -> int:
    return args.repeats if sampler["steps"] > 2 else args.repeats_few


def timed_sampling(run, timer: Timer, repeats: int, batch: int) -> dict:
    timer.reset_peak()
    times = [run() for _ in range(repeats)]
    return {**summarize(times, batch, "batch"), "peak_gib": timer.peak_gib()}


def profile_steps(step, device: torch.device, n: int, title: str, path: Path | None) -> None:
    """``n`` more steps under torch.profiler; the top kernels by device time are appended to ``path``."""
    if path is None or device.type != "cuda":
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(n):
            step(10_000 + i, None)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
    with open(path, "a") as f:
        f.write(f"\n===== {title} ({n} steps) =====\n{table}\n")


# --- contgen side -------------------------------------------------------------------------------------------
def compile_denoiser(net, scope: str | None) -> None:
    """``tit``: nothing to do, the TiT's own ``compile_blocks`` (built with it on, deep copies inherit it);
    ``blocks``: ``Module.compile`` of each block; ``full``: of the whole denoiser. ``Module.compile`` works in
    place and a deep copy of such a module would call the original's compiled ``_call_impl``: copies (teacher,
    EMA) are made before this is called."""
    if scope == "full":
        net.compile()
    elif scope == "blocks":
        for block in net.blocks:
            block.compile()


def builds_compiled(scope: str | None) -> bool:
    """Whether the TiT is built with ``compile_blocks`` on (the contgen default; the ``tit`` scope)."""
    return scope == "tit"


def contgen_train(spec: dict, state: dict, precision: str, scope: str | None, args, device, prof_path) -> dict:
    from contgen.transport.ucgm import UCGMObjective
    from contgen.utils.ema import EMA

    batch = args.batch
    net = build_contgen_tit(args.tiny, device, args.seed, state, builds_compiled(scope)).train()
    o, op = spec["objective"], spec["optim"]
    obj = UCGMObjective("linear", consistc_ratio=o["consistc_ratio"], enhanced_ratio=o["enhanced_ratio"],
                        enhanced_style=o["enhanced_style"], enhanced_range=COMMON_OBJECTIVE["enhanced_range"],
                        scaled_cbl_eps=o["scaled_cbl_eps"], loss="rmse", wt_cosine_loss=o["wt_cosine_loss"],
                        weight_function="cosine", time_dist_ctrl=o["time_dist_ctrl"],
                        lab_drop_ratio=COMMON_OBJECTIVE["lab_drop_ratio"], lab_drop="last",
                        ema_decay_rate=o["ema_decay_rate"])
    teacher = obj.build_teacher(net)
    ema = EMA(net, EVAL_EMA_DECAY)
    for m in (net, teacher.net if teacher is not None else None):
        if m is not None:
            compile_denoiser(m, scope)
    params = [p for p in net.parameters() if p.requires_grad]
    if op["name"] == "adamw":  # GenerativeModule.configure_optimizers under bf16-mixed: fused AdamW
        opt = torch.optim.AdamW(params, lr=op["lr"], betas=op["betas"], weight_decay=op["weight_decay"],
                                fused=device.type == "cuda", foreach=None if device.type == "cuda" else True)
    else:
        opt = torch.optim.RAdam(params, lr=op["lr"], betas=op["betas"], weight_decay=op["weight_decay"],
                                decoupled_weight_decay=True, foreach=True)
    x, y = batch_data(args.tiny, batch, device, args.seed)
    gen = torch.Generator(device).manual_seed(args.seed)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    dtype = DTYPES[precision]
    clip = op["max_grad_norm"]

    def step(i, clock):
        nonlocal nonfinite
        mark = clock.mark if clock is not None else (lambda: None)
        mark()
        if teacher is not None:  # TransportModule.training_step: teacher update, then the loss
            teacher.update(net)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, _ = obj.loss(net, x, y, generator=gen, teacher=teacher)
        mark()
        loss.backward()
        mark()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
        mark()
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark()
        ema.update(net)
        nonfinite = nonfinite | ~torch.isfinite(loss.detach())  # GenerativeModule.log_loss's guard
        mark()

    clock = PhaseClock(device, ["fwd_targets_loss", "backward", "clip", "optimizer", "ema"])
    res = timed_training(step, Timer(device), args.warmup + (args.compile_warmup if scope else 0), args.steps,
                         batch, clock)
    res["nonfinite_loss"] = bool(nonfinite)
    res["dynamo_graphs"] = dynamo_graphs()
    profile_steps(step, device, args.profile_steps, f"contgen {spec['name']} compile={scope}", prof_path)
    return res


@torch.no_grad()
def contgen_sample(spec: dict, state: dict, precision: str, scope: str | None, args, device) -> dict:
    from contgen.transport.solvers import UCGMSampler
    from contgen.utils import cuda_graphs

    net = build_contgen_tit(args.tiny, device, args.seed, state, builds_compiled(scope)).eval()  # the EMA weights
    compile_denoiser(net, scope)
    s = spec["sampler"]
    kw = dict(stochast_ratio=s["stochast_ratio"], extrapol_ratio=s["extrapol_ratio"], order=s["order"],
              time_dist_ctrl=s["time_dist_ctrl"], rfba_gap_steps=s["rfba_gap_steps"], cfg_scale=0.0,
              return_x="last_xhat", transport="linear")
    sampler, warm = UCGMSampler(s["steps"], **kw), UCGMSampler(min(args.warmup_nfe, s["steps"]), **kw)
    dtype = DTYPES[precision]
    sz = size(args.tiny)
    gen = torch.Generator(device).manual_seed(args.seed)
    labels = torch.randint(0, NUM_CLASSES, (args.batch,), generator=gen, device=device)
    timer = Timer(device)

    def run(smp=sampler):
        noise = torch.randn(args.batch, IN_CHANNELS, sz["input_size"], sz["input_size"], generator=gen, device=device)
        timer.sync()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None), \
                cuda_graphs.enabled(graphs):
            out = smp(net, noise, labels, gen)
        timer.sync()
        assert out.shape == noise.shape
        return time.perf_counter() - t0

    graphs = args.cuda_graphs == "on"
    run(warm)
    if graphs:  # the capture (an eager warm-up run, then the recorded one) stays out of the timing
        run(sampler)
    return {**timed_sampling(run, timer, repeats(s, args), args.batch), "nfe": sampler.nfe,
            "dynamo_graphs": dynamo_graphs(), "cuda_graphs": graphs}


# --- reference side -----------------------------------------------------------------------------------------
_PACKAGES = ("networks", "optimers", "utilities", "methodes")


@contextlib.contextmanager
def ucgm_checkout(path: Path):
    """Import from the UCGM checkout at ``path``: ``networks``, ``optimers``, ``utilities`` as packages whose
    ``__init__`` is not run (module docstring); ``methodes`` as is."""
    path = Path(path).resolve()
    if not (path / "methodes" / "unigen.py").is_file() or not (path / "networks" / "tit.py").is_file():
        raise SystemExit(f"--reference-root: {path} is not a UCGM checkout (no methodes/unigen.py, networks/tit.py)")
    for name in list(sys.modules):
        if name.split(".")[0] in _PACKAGES:
            del sys.modules[name]
    for name in _PACKAGES[:3]:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(path / name)]
        sys.modules[name] = pkg
    sys.path.insert(0, str(path))
    try:
        yield
    finally:
        sys.path.remove(str(path))


class DDPStandIn(torch.nn.Module):
    """What ``training_step`` needs of main.py's DDP model: ``forward`` and ``.module`` (unigen.py:226-281)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _to_fp32(out):
    if isinstance(out, torch.Tensor):
        return out.float() if out.dtype in (torch.float16, torch.bfloat16) else out
    if isinstance(out, (tuple, list)):
        return type(out)(_to_fp32(o) for o in out)
    return out


def like_accelerate(module: torch.nn.Module, dtype: torch.dtype | None, device_type: str) -> None:
    """What ``accelerate launch --mixed_precision bf16`` does to a prepared module (accelerate
    ``Accelerator.prepare_model``): ``forward`` runs under autocast and its half-precision outputs become fp32.
    Bound with ``MethodType`` like accelerate's, so a ``deepcopy`` (the reference's teacher) rebinds to the copy."""
    if dtype is None:
        return
    orig = type(module).forward

    def forward(self, *args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            out = orig(self, *args, **kwargs)
        return _to_fp32(out)

    module.forward = types.MethodType(forward, module)


def unlike_accelerate(module: torch.nn.Module) -> None:
    module.__dict__.pop("forward", None)


class RefUCGM:
    """The reference modules, imported once per process (see the module docstring)."""

    def __init__(self, root: Path, tiny: bool, device: torch.device):
        with ucgm_checkout(root):
            self.tit = importlib.import_module("networks.tit")
            self.unigen = importlib.import_module("methodes.unigen")
            self.adamw = importlib.import_module("optimers.adamw")
            self.utils = importlib.import_module("utilities.utils")
        self.commit = commit_of(root)
        self.tiny, self.device = tiny, device

    def build(self, state: dict):
        """``TiT_XL_2(input_size=32, num_classes=1000, in_channels=4)`` as main.py:51-55, with ``state``."""
        kw = dict(input_size=size(self.tiny)["input_size"], num_classes=NUM_CLASSES, in_channels=IN_CHANNELS)
        with torch.device(self.device):
            if self.tiny:
                s = TINY
                net = self.tit.TiT(depth=s["depth"], hidden_size=s["hidden_size"], patch_size=s["patch_size"],
                                   num_heads=s["num_heads"], **kw)
            else:
                net = self.tit.TiT_XL_2(**kw)
        net.load_state_dict(state, strict=True)
        return net

    def ucgmts(self, o: dict | None):
        """``METHODES["unigen"](...)`` with main.py:81-93's arguments (eval.py:85 passes only the transport)."""
        if o is None:
            return self.unigen.UCGMTS(transport_type="Linear")
        return self.unigen.UCGMTS(
            transport_type="Linear", lab_drop_ratio=COMMON_OBJECTIVE["lab_drop_ratio"],
            consistc_ratio=o["consistc_ratio"], enhanced_ratio=o["enhanced_ratio"],
            enhanced_style=o["enhanced_style"], scaled_cbl_eps=o["scaled_cbl_eps"],
            ema_decay_rate=o["ema_decay_rate"], enhanced_range=list(COMMON_OBJECTIVE["enhanced_range"]),
            time_dist_ctrl=list(o["time_dist_ctrl"]), wt_cosine_loss=o["wt_cosine_loss"], weight_funcion="Cosine")

    # --- training ----------------------------------------------------------------------------------------
    def train(self, spec: dict, state: dict, precision: str, args, prof_path) -> dict:
        device, batch = self.device, args.batch
        net = self.build(state)
        ema = copy.deepcopy(net).requires_grad_(False)  # main.py:58, before the model is prepared
        self.utils.update_ema(ema, net, decay=0)  # main.py:159
        unigen = self.ucgmts(spec["objective"])
        dtype = DTYPES[precision]
        like_accelerate(net, dtype, device.type)
        like_accelerate(unigen, dtype, device.type)
        model = DDPStandIn(net)
        model.train()
        ema.eval()
        op = spec["optim"]
        if op["name"] == "adamw":  # OPTIMERS["AdamW"]: optimers/adamw.py
            opt = self.adamw.AdamW(model.parameters(), lr=op["lr"], weight_decay=op["weight_decay"], betas=op["betas"])
        else:  # OPTIMERS["RAdam"] = torch.optim.RAdam
            opt = torch.optim.RAdam(model.parameters(), lr=op["lr"], weight_decay=op["weight_decay"],
                                    betas=op["betas"])
        x, y = batch_data(args.tiny, batch, device, args.seed)
        torch.manual_seed(args.seed)  # set_seed (main.py:35): the reference draws from the global RNGs
        running_loss = 0.0

        def step(i, clock):
            nonlocal running_loss
            mark = clock.mark if clock is not None else (lambda: None)
            mark()
            loss = unigen.training_step(model, x, y.clone())  # main.py:186
            mark()
            opt.zero_grad()
            loss.backward()  # accelerator.backward
            mark()
            if op["max_grad_norm"]:  # accelerator.clip_grad_norm_ (main.py:189-193)
                torch.nn.utils.clip_grad_norm_(model.parameters(), op["max_grad_norm"])
            for param in model.parameters():  # main.py:194-196
                if param.grad is not None:
                    torch.nan_to_num_(param.grad, nan=0.0, posinf=0.0, neginf=0.0)
            mark()
            opt.step()
            mark()
            self.utils.update_ema(ema, model, EVAL_EMA_DECAY)  # main.py:197
            mark()
            running_loss += loss.item()  # main.py:200

        clock = PhaseClock(device, ["fwd_targets_loss", "backward", "clip_nan_to_num", "optimizer", "ema"])
        try:
            res = timed_training(step, Timer(device), args.warmup + args.compile_warmup, args.steps, batch, clock)
            res["dynamo_graphs"] = dynamo_graphs()
            profile_steps(step, device, args.profile_steps, f"reference {spec['name']}", prof_path)
        finally:
            unlike_accelerate(net)
        return res

    # --- sampling ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, spec: dict, state: dict, precision: str, args) -> dict:
        device = self.device
        net = self.build(state).eval()  # eval.py:78-80
        unigen = self.ucgmts(None)  # eval.py:85-87
        like_accelerate(unigen, DTYPES[precision], device.type)  # bf16: main.py's demo-sampling path
        s = spec["sampler"]
        sz = size(self.tiny)
        torch.manual_seed(args.seed)
        labels = torch.randint(0, NUM_CLASSES, (args.batch,), device=device)
        timer = Timer(device)

        def run(steps=s["steps"]):
            z = torch.randn(args.batch, IN_CHANNELS, sz["input_size"], sz["input_size"], device=device)
            timer.sync()
            t0 = time.perf_counter()
            out = unigen.sampling_loop(inital_noise_z=z, sampling_model=net.forward, sampling_steps=steps,
                                       stochast_ratio=s["stochast_ratio"], extrapol_ratio=s["extrapol_ratio"],
                                       sampling_order=s["order"], time_dist_ctrl=list(s["time_dist_ctrl"]),
                                       rfba_gap_steps=list(s["rfba_gap_steps"]), y=labels)[-1]
            timer.sync()
            assert out.shape == z.shape
            return time.perf_counter() - t0

        run(min(args.warmup_nfe, s["steps"]))
        return {**timed_sampling(run, timer, repeats(s, args), args.batch), "nfe": s["steps"],
                "dynamo_graphs": dynamo_graphs()}

    # --- same results ------------------------------------------------------------------------------------
    @torch.no_grad()
    def equal(self, state: dict, args) -> dict:
        """Max |diff| and relative L2 of contgen vs the reference: TiT outputs, one UCGM-T loss per objective on
        the same draws, UCGM-S outputs on the same noise; fp32 (TF32 matmuls) and bf16 autocast."""
        from contgen.transport.solvers import UCGMSampler
        from contgen.transport.ucgm import UCGMObjective

        device, n = self.device, args.batch
        rnet = self.build(state).eval()
        cnet = build_contgen_tit(args.tiny, device, args.seed, state, compile_blocks=True).eval()  # the default
        sz = size(self.tiny)
        g = torch.Generator(device).manual_seed(args.seed + 7)
        x = torch.randn(n, IN_CHANNELS, sz["input_size"], sz["input_size"], generator=g, device=device)
        t = torch.rand(n, generator=g, device=device)
        y = torch.randint(0, NUM_CLASSES + 1, (n,), generator=g, device=device)  # null class included
        out = {}

        def cmp(name, a, b):
            a, b = a.double(), b.double()
            out[name] = {"max_abs": float((a - b).abs().max()), "rel_l2": float((a - b).norm() / a.norm()),
                         "ref_max_abs": float(a.abs().max())}

        for prec in ("fp32", "bf16"):
            dtype = DTYPES[prec]
            ac = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
            with ac():
                cmp(f"tit_output_{prec}", rnet(x, t, y), cnet(x, t, y))
            # one UCGM-T loss of each objective on the reference's own draws (unigen.py:226-231), replayed; at the
            # training precision only (its teacher copy runs in train mode: fp32 would compile one more graph; the
            # fp32 parity of the objective is the CPU fixtures' job, tests/transport/test_ucgm_objective.py)
            for case in (("train_multi", "train_few") if prec == "bf16" else ()):
                o = CASES[case]["objective"]
                unigen = self.ucgmts(o)
                like_accelerate(unigen, dtype, device.type)
                torch.manual_seed(args.seed)
                ref_loss = unigen.training_step(DDPStandIn(rnet), x.clone(), y.clone().clamp_(max=NUM_CLASSES - 1))
                torch.manual_seed(args.seed)
                a, b, c = o["time_dist_ctrl"]
                tt = torch.distributions.Beta(a, b).sample([n, 1, 1, 1]).to(x).flatten()
                draws = {"t": torch.clamp(tt * c, 0, 1), "z": torch.randn_like(x),
                         "drop": torch.arange(n, device=device) >= n - round(0.1 * n)}
                obj = UCGMObjective("linear", consistc_ratio=o["consistc_ratio"], enhanced_ratio=o["enhanced_ratio"],
                                    enhanced_style=o["enhanced_style"], scaled_cbl_eps=o["scaled_cbl_eps"],
                                    wt_cosine_loss=o["wt_cosine_loss"], time_dist_ctrl=o["time_dist_ctrl"],
                                    lab_drop="last", ema_decay_rate=o["ema_decay_rate"])
                teacher = obj.build_teacher(cnet)
                teacher.update(cnet)  # the reference's first update: decay 0, a copy of the online weights
                with ac():
                    c_loss, _ = obj.loss(cnet, x, y.clamp(max=NUM_CLASSES - 1), teacher=teacher, draws=draws)
                cmp(f"loss_{case}_{prec}", ref_loss.reshape(1), c_loss.reshape(1))
                del teacher, unigen
                free()
            # UCGM-S: the sample_60 settings on a 6-step grid (κ acts from the 3rd step), and sample_2 with the
            # reference's CPU re-noise draws (unigen.py:427) replayed through noise_fn
            for name, spec in (("sample_6step_k0.21", {**CASES["sample_60"]["sampler"], "steps": 6}),
                               ("sample_2", CASES["sample_2"]["sampler"])):
                unigen = self.ucgmts(None)
                like_accelerate(unigen, dtype, device.type)
                z = torch.randn(x.shape, generator=g, device=device)
                torch.manual_seed(args.seed)
                ref = unigen.sampling_loop(inital_noise_z=z, sampling_model=rnet.forward, sampling_steps=spec["steps"],
                                           stochast_ratio=spec["stochast_ratio"],
                                           extrapol_ratio=spec["extrapol_ratio"], sampling_order=spec["order"],
                                           time_dist_ctrl=list(spec["time_dist_ctrl"]),
                                           rfba_gap_steps=list(spec["rfba_gap_steps"]), y=y)[-1]
                torch.manual_seed(args.seed)
                smp = UCGMSampler(spec["steps"], stochast_ratio=spec["stochast_ratio"],
                                  extrapol_ratio=spec["extrapol_ratio"], order=spec["order"],
                                  time_dist_ctrl=spec["time_dist_ctrl"], rfba_gap_steps=spec["rfba_gap_steps"],
                                  cfg_scale=0.0, transport="linear")
                with ac():
                    mine = smp(cnet, z, y, noise_fn=lambda shape: torch.randn(shape).to(device))
                cmp(f"{name}_{prec}", ref, mine)
        return {"checks": out}


# --- driver ---------------------------------------------------------------------------------------------------
def run_variant(case: str, side: str, precision: str, scope, args, device, ref_cache: dict, state: dict,
                prof_path) -> dict:
    spec = {**CASES[case], "name": case}
    if side == "contgen":
        if spec["kind"] == "train":
            return contgen_train(spec, state, precision, scope, args, device, prof_path)
        return contgen_sample(spec, state, precision, scope, args, device)
    if "ref" not in ref_cache:
        ref_cache["ref"] = RefUCGM(args.reference_root, args.tiny, device)
    ref = ref_cache["ref"]
    res = (ref.train(spec, state, precision, args, prof_path) if spec["kind"] == "train" else
           ref.sample(spec, state, precision, args) if spec["kind"] == "sample" else ref.equal(state, args))
    return {"reference_commit": ref.commit, **res}


def variants(args) -> list[tuple[str, str, str, str | None]]:
    """(case, side, precision, compile scope) in run order: per side, the reference first."""
    chosen = args.compile_scope.split(",")
    scopes = {"off": [None], "on": chosen, "both": [None, *chosen]}[args.compile]
    out = []
    for side in args.sides.split(","):
        for scope in (scopes if side == "contgen" else [None]):
            for case in args.cases.split(","):
                kind = CASES[case]["kind"]
                if kind == "check":
                    if side == "reference":
                        out.append((case, side, "fp32+bf16", None))
                    continue
                precs = args.train_precisions if kind == "train" else args.sample_precisions
                for p in precs.split(","):
                    out.append((case, side, p, scope))
    return out


def with_memory_ratios(rows: list[dict]) -> list[dict]:
    """mar_ear.ratios (contgen ÷ reference throughput per case and precision) plus the peak-memory ratio."""
    out = ratios(rows)
    ok = [r for r in rows if "error" not in r]
    for line in out:
        key = (line["case"], line["precision"])
        c = next((r for r in ok if r["side"] == "contgen" and (r["case"], r["precision"]) == key
                  and r["compile"] == line["compile"]), None)
        ref = next((r for r in ok if r["side"] == "reference" and (r["case"], r["precision"]) == key), None)
        if c and ref and c.get("peak_gib") and ref.get("peak_gib"):
            line["peak_gib_ratio"] = round(c["peak_gib"] / ref["peak_gib"], 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="equal,train_multi,train_few,sample_60,sample_2", help=f"from {list(CASES)}")
    p.add_argument("--sides", default="reference,contgen", help="reference,contgen (reference needs --reference-root)")
    p.add_argument("--reference-root", type=Path, default=None, help="a UCGM checkout (cccvs/UCGM ae74912)")
    p.add_argument("--train-precisions", default="bf16")
    p.add_argument("--sample-precisions", default="fp32,bf16")
    p.add_argument("--compile", choices=("off", "on", "both"), default="both", help="contgen variants")
    p.add_argument("--compile-scope", default="tit",
                   help="contgen compiled variants, comma-separated from tit (the TiT's own compile_blocks, the "
                        "default), blocks (Module.compile per block), full (the whole denoiser)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--cuda-graphs", choices=("on", "off"), default="on",
                   help="contgen sampling: replay the solver loop as a CUDA graph (module.cuda_graphs)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps")
    p.add_argument("--warmup", type=int, default=3, help="training warm-up steps")
    p.add_argument("--compile-warmup", type=int, default=2, help="extra warm-up steps where anything is compiled")
    p.add_argument("--repeats", type=int, default=1, help="timed sampling batches of sample_60")
    p.add_argument("--repeats-few", type=int, default=5, help="timed sampling batches of sample_2")
    p.add_argument("--warmup-nfe", type=int, default=3, help="steps of the warm-up sampling run")
    p.add_argument("--profile", type=Path, default=None, help="append torch.profiler tables of training steps here")
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny TiT at 8x8, batch <= 16 (a smoke test of every code path)")
    p.add_argument("--out", type=Path, default=None, help="append the JSON lines to this file too")
    p.add_argument("--isolate", choices=("case", "side", "none"), default="case")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="kill a running process and start none after this many seconds (what finished is kept)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.tiny:
        args.batch = min(args.batch, 16)  # >= 10: round(0.1·B) >= 1 dropped label (B < 5 trips the reference)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --device cpu --tiny for a smoke run)")
    sides = args.sides.split(",")
    if "reference" in sides and args.reference_root is None:
        raise SystemExit("--sides reference needs --reference-root DIR (a UCGM checkout)")
    if device.type != "cuda":  # CPU smoke runs only: the reference's RNG juggling is CUDA-only; no compiling
        torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
        torch.cuda.set_rng_state = lambda s, *a, **k: torch.set_rng_state(s)
        torch._dynamo.config.disable = True
    torch.backends.cuda.matmul.allow_tf32 = True  # eval.py:59
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = False  # utilities set_seed, main.py:35
    torch.backends.cudnn.deterministic = True
    os.environ.setdefault("BENCH_RUN_ID", time.strftime("%Y%m%dT%H%M%S"))
    env = environment(device)
    t_start = time.perf_counter()
    rows: list[dict] = []
    out = open(args.out, "a") if args.out else None
    if not args.child:
        print(f"# {json.dumps(env)}", flush=True)

    def emit(row):
        rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    def child(selection: list[str], label: dict):
        """This script again for ``selection``; its JSON lines are emitted as they come."""
        argv, skip = [], False
        for a in sys.argv[1:]:  # drop the selection options and --out; the rest passes through
            if skip:
                skip = False
                continue
            name = a.split("=")[0]
            if name in ("--cases", "--sides", "--train-precisions", "--sample-precisions", "--compile", "--out",
                        "--isolate", "--deadline-s", "--compile-scope"):
                skip = "=" not in a
                continue
            argv.append(a)
        left = None if args.deadline_s is None else max(1.0, args.deadline_s - (time.perf_counter() - t_start))
        proc = subprocess.Popen([sys.executable, __file__, *argv, *selection, "--isolate", "none", "--child"],
                                stdout=subprocess.PIPE, text=True)
        killer = threading.Timer(left, proc.kill) if left is not None else None  # the deadline holds mid-process
        if killer is not None:
            killer.start()
        got = 0
        try:
            for line in proc.stdout:
                if line.startswith("{"):
                    emit({**json.loads(line), "isolated": args.isolate})
                    got += 1
                else:
                    print(line, end="", flush=True)
            proc.wait()
        finally:
            if killer is not None:
                killer.cancel()
        if not got:
            emit({**label, **env, "error": f"child process exited with {proc.returncode} and no result"})

    todo = variants(args)
    if args.isolate != "none" and not args.child:
        groups: dict = {}
        for case, side, prec, scope in todo:
            key = (case, side, prec, scope) if args.isolate == "case" else (side, scope)
            groups.setdefault(key, []).append((case, side, prec, scope))
        for key, items in groups.items():
            if args.deadline_s is not None and time.perf_counter() - t_start > args.deadline_s:
                emit({"case": ",".join(i[0] for i in items), "side": items[0][1], "compile": items[0][3],
                      **env, "error": "skipped: --deadline-s reached"})
                continue
            cases = ",".join(dict.fromkeys(i[0] for i in items))
            tp = ",".join(dict.fromkeys(i[2] for i in items if CASES[i[0]]["kind"] == "train")) or "bf16"
            sp = ",".join(dict.fromkeys(i[2] for i in items if CASES[i[0]]["kind"] == "sample")) or "fp32"
            scope = items[0][3]
            sel = ["--cases", cases, "--sides", items[0][1], "--train-precisions", tp, "--sample-precisions", sp,
                   "--compile", "on" if scope else "off", "--compile-scope", scope or "tit"]
            child(sel, {"case": cases, "side": items[0][1], "compile": scope})
    else:
        state = build_contgen_tit(args.tiny, device, args.seed).state_dict()
        state = {k: v.detach().cpu().clone() for k, v in state.items()}  # every case starts from these weights
        free()
        ref_cache: dict = {}
        fwd_gflop = forward_gflop(lambda: build_contgen_tit(args.tiny, torch.device("meta"), args.seed))
        for case, side, prec, scope in todo:
            spec = CASES[case]
            base = {"case": case, "side": side, "precision": prec, "compile": scope or False, **env,
                    "batch": args.batch, "model": "TiT-tiny" if args.tiny else "TiT-XL/2"}
            if spec["kind"] == "sample":
                base.update(spec["sampler"])
            t0 = time.perf_counter()
            torch.manual_seed(args.seed)
            try:
                res = run_variant(case, side, prec, scope, args, device, ref_cache, state, args.profile)
            except torch.OutOfMemoryError:
                res = {"error": "out of memory"}
            except Exception as e:  # noqa: BLE001  one failing variant must not cost the rest of the device call
                import traceback

                traceback.print_exc()
                res = {"error": f"{type(e).__name__}: {e}"[:500]}
            res["wall_s"] = round(time.perf_counter() - t0, 1)
            passes = TRAIN_PASSES.get(case) or res.get("nfe")  # sampling: one forward per NFE, no CFG
            if passes:
                with_mfu(res, fwd_gflop * passes, args.batch)
            emit({**base, **res})
            free()
    for r in ([] if args.child else with_memory_ratios(rows)):
        emit(r)
    if out:
        out.close()
    if not args.child:
        print_table(rows)


def print_table(rows: list[dict]) -> None:
    """A short table last (the device reply carries the end of the output)."""
    ok = [r for r in rows if r.get("side") in ("contgen", "reference")]
    print("\ncase         prec  side       compile  img/s | s/img   peak GiB  phases ms / error")
    for r in ok:
        if r.get("case") == "equal":
            continue
        speed = r.get("img_per_s") or r.get("s_per_img")
        print(f"{r['case']:<12} {str(r.get('precision')):<5} {r['side']:<10} {str(r.get('compile')):<8} "
              f"{str(speed):>13}  {str(r.get('peak_gib')):>8}  {r.get('phases_ms') or r.get('error', '')}")
    for r in rows:
        if r.get("side") == "ratio":
            print(f"ratio {r['case']:<12} {r['precision']:<5} compile={str(r['compile']):<7} "
                  f"speed {r.get('speedup_same_precision')}  memory {r.get('peak_gib_ratio')}")
    for r in ok:
        if r.get("case") == "equal":
            for k, v in (r.get("checks") or {}).items():
                print(f"equal {k:<28} max|d| {v['max_abs']:.3g}  rel {v['rel_l2']:.3g}  (ref max {v['ref_max_abs']:.3g})")
            if "error" in r:
                print("equal error:", r["error"])


if __name__ == "__main__":
    main()
