"""Shortcut DiT-B/2 speed, contgen and (with ``--reference-root``) the JAX reference code, in one device call, so
every ratio compares numbers taken in the same run (issue 9, "What must be shown", the ``bench/`` bullet).

Cases: DiT-B/2 (hidden 768, depth 12, 12 heads, patch 2, mlp ratio 4) on synthetic SD-VAE-shaped latents 32×32×4
(N(0, 1)), 1000 classes, random weights (every all-zero parameter redrawn from N(0, 0.02), so no matrix product
runs on zeros and outputs are not 0), bf16, the ImageNet recipe of the reference README (``--model.bootstrap_cfg 1
--model.cfg_scale 1.5 --model.class_dropout_prob 0.1 --batch_size 256``; code defaults bootstrap_every 8,
denoise_timesteps 128, bootstrap_ema 1; AdamW lr 1e-4 β (0.9, 0.999) wd 0.1 constant, no clipping, EMA 0.999 after
every step). Training cases run at each of ``--batches`` (256, the reference's ImageNet batch, and 64); a row's
``case`` is ``<case>_b<batch>``:

* ``train_shortcut``  the full Shortcut training step: targets (two half steps of the EMA net under no-grad on the
  B/8 self-consistency rows, the level-6 rows guided with the null class in the same pass, i.e. 36 rows per half
  step at B = 256), forward + backward on the merged batch, optimizer step, EMA update;
* ``train_flow``      the same network class and code path with the flow level only: every row a flow-matching row
  at level 7 (label dropout 0.1), so the ratio train_shortcut / train_flow is the cost of the bootstrap alone.
  Reference side: its own flow-matching baseline, ``train_type naive`` (``baselines/targets_naive.py``, the same
  DiT with ``ignore_dt``: train.py:146);
* ``train_flow_sit``  (contgen only) ``contgen.transport.ucgm.flow_matching`` on a plain ``SiT`` of the same size
  (what a user trains as "a flow-matching DiT-B/2"; no step embedder, 1/sqrt(head_dim) attention);
* ``sample_1``, ``sample_4``, ``sample_128``  Euler sampling in N steps at level log2 N, batch ``--sample-batch``
  (256), conditional (CFG scale 1, the reference's FID runs at N < 128), no decode, online weights.

contgen side: ``contgen.backbones.dit.ShortcutDiT`` (``reference_faithful``), ``contgen.transport.shortcut.
ShortcutObjective`` / ``ShortcutSampler``, ``contgen.utils.ema.EMA`` (foreach lerp), fused AdamW over
``contgen.modules.optim.param_groups`` (what ``GenerativeModule.configure_optimizers`` builds under bf16-mixed),
each step in the order of ``TransportModule.training_step`` + ``GenerativeModule.optimizer_step``: teacher update
(a no-op: the half-step net is the EMA copy), loss under bf16 autocast, backward, optimizer step, EMA update, the
non-finite-loss flag. Lightning's loop is not timed. ``--compile on|both`` adds variants where the online and EMA
denoisers are ``Module.compile``d, as ``TransportModule(compile=True)`` does. After the timed steps one more step
(one more sampling run) runs under ``torch.cuda.set_sync_debug_mode("warn")``; ``host_syncs`` counts the
synchronising calls it reports (0 expected) and ``host_sync_sites`` the Python lines that made them.

Reference side (``--reference-root DIR``: a checkout of kvfrans/shortcut-models 6010043, or a copy with a
``REF_COMMIT`` file; nothing copied into contgen): ``model.DiT`` (its default bf16 ``dtype``), ``targets_shortcut.
get_targets``, ``baselines.targets_naive.get_targets`` and ``utils.train_state.TrainStateEma`` are imported as they
are. Transcribed, because they sit inside ``train.py``'s ``main`` (absl flags, wandb, TFDS, the VAE): the DiT
arguments and ``init`` (train.py:137-163), ``optax.adamw`` with the constant schedule (train.py:146-153), and the
jitted ``update`` (train.py:203-266) line for line except ``out_shardings`` / ``with_sharding_constraint`` (one
device: no sharding) and the ``train_type`` branches not benchmarked; the sampler is the Euler loop of
``do_fid_calc`` (helper_eval.py:196-209) with its jitted ``call_model`` (helper_eval.py:37-44, ``use_ema`` 0 as the
README). ``FLAGS`` is a namespace with ``batch_size``, ``dataset_name`` ("imagenet256": images, not latent pairs)
and ``model`` (train.py:39-66's ``model_config`` values plus the README flags, in a dict that also reads as
attributes, like its ``ml_collections.ConfigDict``). The loop is train.py's body, ``train_state, update_info =
update(train_state, train_state_teacher, batch_images, batch_labels)`` (L291) on one fixed batch, followed by
``jax.block_until_ready`` on the state (our synchronisation: the reference fetches ``update_info`` only every
``log_interval`` = 1000 steps). Patches for jax releases newer than the reference's (applied only where missing,
listed in ``ref_patches``): ``jax._src.core.as_named_shape`` (model.py:21 calls it and discards the result; removed
after jax 0.4.3x) becomes the identity, and ``jax.tree_map`` (utils/train_state.py:56; removed in jax 0.6) becomes
``jax.tree_util.tree_map``. model.py's shape ``print``s at trace time are swallowed.

Memory: torch's peak allocated bytes over the timed steps (reset before them); JAX's ``peak_bytes_in_use`` of the
device's allocator, which cannot be reset, so under ``--isolate side`` every reference training case runs in a
fresh process (its peak is that case's, init and compile included) and the reference sampling cases share one.
The reference runs with JAX's default allocator settings (preallocation of 75% of the card), as train.py does;
``--isolate none`` with both sides sets ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` so that torch and JAX share the card.

Protocol, both sides: ``--warmup`` training steps (the first compiles on the reference side; ``--compile-warmup``
more where contgen compiles), then ``--steps`` steps, each between two device synchronisations (mean → img/s,
median); sampling: one 1-step warm-up run at the same batch, then ``--repeats`` timed runs (``--repeats-long`` at
128 steps). TF32 matmuls on for torch (JAX uses TF32 for float32 products on the GPU by default).

``--cuda-graphs on`` (default; ``module.cuda_graphs``): contgen's Euler sampling loop and, in ``train_shortcut``, the two
no-grad half steps are captured as one CUDA graph per shape (sampling: on an untimed run of the timed sampler;
training: in the first warm-up step), then replayed, with the same numbers as eager; ``off`` runs them eagerly. The
contgen sampling and ``train_shortcut`` rows record ``cuda_graphs``.

Processes (``--isolate``): ``side`` (default) runs contgen's cases of one compile setting in one process and the
reference as said above; ``case`` runs each (case, side, batch, compile) in a fresh process; ``none`` runs all here.

Output: one JSON line per (case, side, compile) with the GPU, versions, commits, mean / median step or batch time,
img/s or s/img, peak GiB; then ``side: "ratio"`` lines: contgen ÷ reference throughput (``speedup_same_precision``,
with ``peak_gib_ratio``) per case, and ``case: "shortcut_over_flow_b<B>"`` lines with the step-time ratios
train_shortcut / train_flow (each side) and / train_flow_sit (contgen). Each timing row also carries
``model_gflop_per_img`` (one forward by ``torch.utils.flop_counter`` on the meta device, 46.0 GFLOP at DiT-B/2, times
3 for forward + backward plus 2 × (bootstrap + CFG rows) / B for the half steps; sampling: × steps), ``model_tflop_s``
and ``mfu_bf16_peak`` (÷ 989 TFLOP/s, H100/H200 SXM dense bf16).

Adding a case: an entry in ``CASES`` (``kind``, the ``sides`` that have it, its settings) and, for a new kind, a
runner in ``RUNNERS`` keyed by (side, kind) returning the result dict (e.g. the MAR-B shortcut-head sampling).

    python bench/shortcut.py --reference-root .refs/shortcut-models --out bench/results/h100_<date>_shortcut.jsonl
    python bench/shortcut.py --sides contgen --compile both --batches 256
    python bench/shortcut.py --device cpu --tiny --reference-root .refs/shortcut-models   # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import threading
import time
import types
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing contgen

from mar_ear import environment  # noqa: E402  (bench/ is on sys.path as the script's folder)
from reference import commit_of  # noqa: E402
from timing import Timer, summarize  # noqa: E402
from ucgm import (PhaseClock, dynamo_graphs, forward_gflop, free, timed_sampling, timed_training,  # noqa: E402
                  with_memory_ratios, with_mfu)

NUM_CLASSES, IN_CHANNELS = 1000, 4
DIT_B = dict(input_size=32, hidden_size=768, depth=12, num_heads=12, patch_size=2, mlp_ratio=4.0)  # README DiT-B
TINY = dict(input_size=8, hidden_size=32, depth=2, num_heads=2, patch_size=2, mlp_ratio=4.0)
# the README's ImageNet-256 command on train.py's model_config defaults (train.py:39-66)
RECIPE = dict(denoise_timesteps=128, bootstrap_every=8, bootstrap_ema=True, bootstrap_cfg=True, cfg_scale=1.5,
              class_dropout_prob=0.1)
OPTIM = dict(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1, ema_decay=0.999)
BOTH = ("reference", "contgen")
CASES = {
    "train_shortcut": dict(kind="train", sides=BOTH, net="shortcut"),
    "train_flow": dict(kind="train", sides=BOTH, net="shortcut"),
    "train_flow_sit": dict(kind="train", sides=("contgen",), net="sit"),
    "sample_1": dict(kind="sample", sides=BOTH, steps=1),
    "sample_4": dict(kind="sample", sides=BOTH, steps=4),
    "sample_128": dict(kind="sample", sides=BOTH, steps=128),
}
PRECISION = "bf16"  # both sides, training and sampling


def size(tiny: bool) -> dict:
    return TINY if tiny else DIT_B


def model_name(tiny: bool) -> str:
    return "DiT-tiny" if tiny else "DiT-B/2"


# --- contgen side -------------------------------------------------------------------------------------------
def build_contgen_net(kind: str, tiny: bool, device: torch.device, seed: int) -> torch.nn.Module:
    """``ShortcutDiT`` (the presets' ``reference_faithful``) or ``SiT`` of the bench size, seeded; every all-zero
    trainable parameter (final layer, biases) redrawn from N(0, 0.02). Same seed, same weights in every case."""
    from contgen.backbones.dit import ShortcutDiT, SiT

    s = size(tiny)
    cls = ShortcutDiT if kind == "shortcut" else SiT
    torch.manual_seed(seed)
    with torch.device(device):
        net = cls(s["input_size"], IN_CHANNELS, NUM_CLASSES, patch_size=s["patch_size"], hidden_size=s["hidden_size"],
                  depth=s["depth"], num_heads=s["num_heads"], mlp_ratio=s["mlp_ratio"])
    if device.type == "meta":  # shapes only (forward_gflop)
        return net
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad and not p.any():
                p.normal_(0.0, 0.02)
    return net


def batch_data(tiny: bool, batch: int, device: torch.device, seed: int):
    """One fixed training batch: latents ~ N(0, 1) (SD-VAE latents × 0.18215 are about unit variance) and labels."""
    s = size(tiny)
    g = torch.Generator(device).manual_seed(seed + 1)
    x = torch.randn(batch, IN_CHANNELS, s["input_size"], s["input_size"], generator=g, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g, device=device)
    return x, y


def flow_level_loss(obj, net, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``ShortcutObjective``'s flow rows for the whole batch (its ``draw`` / ``targets`` / ``loss`` for rows >= bsz,
    targets_shortcut.py:80-97): label dropout, s on the 1/M grid, x_t and F* through the Shortcut transport, the
    network at level L, plain MSE. The Shortcut step minus the bootstrap rows' half steps."""
    tr, dev, n = obj.transport, x.device, x.shape[0]
    drop = torch.rand(n, generator=gen, device=dev) < obj.class_dropout_prob
    s = torch.randint(0, obj.denoise_timesteps, (n,), generator=gen, device=dev).to(torch.float32) / obj.denoise_timesteps
    z = torch.randn(x.shape, generator=gen, device=dev, dtype=x.dtype)
    t = 1 - s
    yf = torch.where(drop, torch.full_like(y, NUM_CLASSES), y)
    level = torch.full((n,), obj.num_levels, dtype=torch.long, device=dev)
    F = tr.model_output(net, tr.interpolate(x, z, t), t, yf, level=level)
    return (F - tr.target(x, z, t)).square().mean()


def count_syncs(fn, sites: list | None = None) -> int | None:
    """Synchronising CUDA calls made by ``fn()``, as ``torch.cuda.set_sync_debug_mode("warn")`` reports them; the
    Python lines that made them are appended to ``sites``."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    hits = [w for w in caught if "synchroniz" in str(w.message)]
    if sites is not None:
        for w in hits:
            where = os.path.relpath(w.filename, ROOT) if w.filename.startswith(str(ROOT)) else w.filename
            sites.append(f"{where}:{w.lineno}")
    return len(hits)


def contgen_train(case: str, batch: int, scope: bool, args, device) -> dict:
    from contgen.modules.optim import param_groups
    from contgen.transport.shortcut import ShortcutObjective
    from contgen.transport.ucgm import flow_matching
    from contgen.utils import cuda_graphs
    from contgen.utils.ema import EMA

    spec = CASES[case]
    net = build_contgen_net(spec["net"], args.tiny, device, args.seed).train()
    ema = EMA(net, OPTIM["ema_decay"])
    if scope:  # TransportModule(compile=True): each copy compiled on its own
        net.compile()
        ema.shadow.compile()
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(param_groups(net, None, OPTIM["weight_decay"]), lr=OPTIM["lr"], betas=OPTIM["betas"],
                            fused=cuda, foreach=None if cuda else True)
    x, y = batch_data(args.tiny, batch, device, args.seed)
    gen = torch.Generator(device).manual_seed(args.seed)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    extra = {}
    if case == "train_flow_sit":
        obj = flow_matching("linear", lab_drop_ratio=RECIPE["class_dropout_prob"], lab_drop="random")

        def loss_fn():
            return obj.loss(net, x, y, generator=gen)[0]
    else:
        obj = ShortcutObjective(**RECIPE)
        obj.setup(batch)  # TransportModule.setup("fit"): the level layout of this batch (refused if impossible)
        if case == "train_shortcut":
            teacher = obj.build_teacher(net, ema=ema.shadow)
            rows, levels = obj.layout(batch)
            extra = {"bootstrap_rows": rows, "cfg_rows": levels.count(obj.num_levels - 1),
                     "cuda_graphs": args.cuda_graphs == "on"}

            def loss_fn():
                teacher.update(net)  # TransportModule.training_step (a no-op for the EMA half-step net)
                with cuda_graphs.enabled(args.cuda_graphs == "on"):  # the half steps as one graph, as the module
                    return obj.loss(net, x, y, generator=gen, teacher=teacher)[0]
        else:
            def loss_fn():
                return flow_level_loss(obj, net, x, y, gen)

    def step(i, clock):
        nonlocal nonfinite
        mark = clock.mark if clock is not None else (lambda: None)
        mark()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn()
        mark()
        loss.backward()
        mark()
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark()
        ema.update(net)  # GenerativeModule.optimizer_step
        nonfinite = nonfinite | ~torch.isfinite(loss.detach())  # GenerativeModule.log_loss's guard
        mark()

    clock = PhaseClock(device, ["fwd_targets_loss", "backward", "optimizer", "ema"])
    res = timed_training(step, Timer(device), args.warmup + (args.compile_warmup if scope else 0), args.steps,
                         batch, clock)
    sites: list = []
    res["host_syncs"] = count_syncs(lambda: step(-1, None), sites)
    res["host_sync_sites"] = sorted(set(sites))
    res["nonfinite_loss"] = bool(nonfinite)
    res["dynamo_graphs"] = dynamo_graphs()
    return {**res, **extra}


@torch.no_grad()
def contgen_sample(case: str, batch: int, scope: bool, args, device) -> dict:
    from contgen.transport.shortcut import ShortcutSampler
    from contgen.utils import cuda_graphs

    steps = CASES[case]["steps"]
    net = build_contgen_net("shortcut", args.tiny, device, args.seed).eval()
    if scope:
        net.compile()
    kw = dict(denoise_timesteps=RECIPE["denoise_timesteps"], cfg_scale=1.0)
    sampler, warm = ShortcutSampler(steps, **kw), ShortcutSampler(1, **kw)
    s = size(args.tiny)
    gen = torch.Generator(device).manual_seed(args.seed)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=gen, device=device)
    timer = Timer(device)

    def run(smp=sampler):
        noise = torch.randn(batch, IN_CHANNELS, s["input_size"], s["input_size"], generator=gen, device=device)
        timer.sync()
        t0 = time.perf_counter()
        # sample_precision auto = bf16 on the GPU
        with torch.autocast(device.type, dtype=torch.bfloat16), cuda_graphs.enabled(graphs):
            out = smp(net, noise, labels, gen)
        timer.sync()
        assert out.shape == noise.shape and out.dtype == torch.float32
        return time.perf_counter() - t0

    graphs = args.cuda_graphs == "on"
    run(warm)
    if graphs:  # the capture (an eager warm-up run, then the recorded one) stays out of the timing
        run(sampler)
    res = timed_sampling(run, timer, args.repeats if steps <= 4 else args.repeats_long, batch)
    res["host_syncs"] = count_syncs(run)
    return {**res, "nfe": sampler.nfe, "dynamo_graphs": dynamo_graphs(), "cuda_graphs": graphs}


# --- reference side -----------------------------------------------------------------------------------------
class _ConfigDict(dict):
    """train.py's ``FLAGS.model`` (an ``ml_collections.ConfigDict``): read as ``model['k']`` and ``model.k``."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e


class RefShortcut:
    """The reference modules, imported once per process (see the module docstring)."""

    def __init__(self, root: Path, tiny: bool, seed: int):
        import jax

        root = Path(root).resolve()
        if not (root / "targets_shortcut.py").is_file() or not (root / "model.py").is_file():
            raise SystemExit(f"--reference-root: {root} is not a shortcut-models checkout (no targets_shortcut.py)")
        self.patches = []
        from jax._src import core

        if not hasattr(core, "as_named_shape"):  # model.py:21; its result is unused
            core.as_named_shape = lambda shape: tuple(shape)
            self.patches.append("jax._src.core.as_named_shape")
        if not hasattr(jax, "tree_map"):  # utils/train_state.py:56
            jax.tree_map = jax.tree_util.tree_map
            self.patches.append("jax.tree_map")
        sys.path.insert(0, str(root))
        import importlib

        with contextlib.redirect_stdout(io.StringIO()):
            self.model = importlib.import_module("model")
            self.targets_shortcut = importlib.import_module("targets_shortcut")
            self.targets_naive = importlib.import_module("baselines.targets_naive")
            self.train_state = importlib.import_module("utils.train_state")
        import flax
        import jaxlib
        import optax

        self.jax, self.optax = jax, optax
        self.commit = commit_of(root)
        self.versions = {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
                         "optax": optax.__version__, "jax_backend": jax.default_backend()}
        self.tiny, self.seed = tiny, seed
        self.dev = jax.local_devices()[0]
        self._sampling_state = None

    def info(self) -> dict:
        return {"reference_commit": self.commit, **self.versions, "ref_patches": self.patches}

    def flags(self, batch: int, train_type: str):
        s = size(self.tiny)
        model = _ConfigDict(
            lr=OPTIM["lr"], beta1=OPTIM["betas"][0], beta2=OPTIM["betas"][1], weight_decay=OPTIM["weight_decay"],
            use_cosine=0, warmup=0, dropout=0.0, hidden_size=s["hidden_size"], patch_size=s["patch_size"],
            depth=s["depth"], num_heads=s["num_heads"], mlp_ratio=s["mlp_ratio"],
            class_dropout_prob=RECIPE["class_dropout_prob"], num_classes=NUM_CLASSES,
            denoise_timesteps=RECIPE["denoise_timesteps"], cfg_scale=RECIPE["cfg_scale"],
            target_update_rate=OPTIM["ema_decay"], use_ema=0, use_stable_vae=1, sharding="dp",
            t_sampling="discrete-dt", dt_sampling="uniform", bootstrap_cfg=int(RECIPE["bootstrap_cfg"]),
            bootstrap_every=RECIPE["bootstrap_every"], bootstrap_ema=int(RECIPE["bootstrap_ema"]), bootstrap_dt_bias=0,
            train_type=train_type, image_channels=IN_CHANNELS, image_size=s["input_size"])
        return types.SimpleNamespace(batch_size=batch, dataset_name="imagenet256", model=model)

    def init_state(self, FLAGS):
        """train.py:137-163 (model, optimizer, ``init``) on one device, then every all-zero leaf redrawn from
        N(0, 0.02) (seeded numpy) with ``params_ema = params`` and a fresh optimizer state, as ``create`` makes."""
        import numpy as np

        jax, jnp, optax = self.jax, self.jax.numpy, self.optax
        s = size(self.tiny)
        example_obs_shape = (1, s["input_size"], s["input_size"], IN_CHANNELS)
        dit_args = {
            'patch_size': FLAGS.model['patch_size'],
            'hidden_size': FLAGS.model['hidden_size'],
            'depth': FLAGS.model['depth'],
            'num_heads': FLAGS.model['num_heads'],
            'mlp_ratio': FLAGS.model['mlp_ratio'],
            'out_channels': example_obs_shape[-1],
            'class_dropout_prob': FLAGS.model['class_dropout_prob'],
            'num_classes': FLAGS.model['num_classes'],
            'dropout': FLAGS.model['dropout'],
            'ignore_dt': False if (FLAGS.model['train_type'] in ('shortcut', 'livereflow')) else True,
        }
        model_def = self.model.DiT(**dit_args)
        lr_schedule = lambda x: FLAGS.model['lr']  # noqa: E731  (use_cosine 0, warmup 0)
        adam = optax.adamw(learning_rate=lr_schedule, b1=FLAGS.model['beta1'], b2=FLAGS.model['beta2'],
                           weight_decay=FLAGS.model['weight_decay'])
        tx = optax.chain(adam)

        def init(rng):
            param_key, dropout_key, dropout2_key = jax.random.split(rng, 3)
            example_t = jnp.zeros((1,))
            example_dt = jnp.zeros((1,))
            example_label = jnp.zeros((1,), dtype=jnp.int32)
            example_obs = jnp.zeros(example_obs_shape)
            model_rngs = {'params': param_key, 'label_dropout': dropout_key, 'dropout': dropout2_key}
            params = model_def.init(model_rngs, example_obs, example_t, example_dt, example_label)['params']
            opt_state = tx.init(params)
            return self.train_state.TrainStateEma.create(model_def, params, rng=rng, tx=tx, opt_state=opt_state)

        with contextlib.redirect_stdout(io.StringIO()):
            train_state = jax.jit(init)(jax.random.PRNGKey(self.seed))
        npr = np.random.default_rng(self.seed)

        def nonzero(p):
            if np.any(np.asarray(p)):
                return p
            return jnp.asarray(npr.normal(0.0, 0.02, p.shape), dtype=p.dtype)

        params = jax.tree_util.tree_map(nonzero, train_state.params)
        train_state = train_state.replace(params=params, params_ema=params, opt_state=tx.init(params))
        return model_def, lr_schedule, train_state

    def make_update(self, FLAGS, lr_schedule):
        """train.py:203-266 (its ``update``) for one device: no ``out_shardings`` / ``with_sharding_constraint``; the
        ``train_type`` branches other than shortcut and naive left out."""
        jax, jnp, optax = self.jax, self.jax.numpy, self.optax
        get_targets_shortcut = self.targets_shortcut.get_targets
        get_targets_naive = self.targets_naive.get_targets

        @jax.jit
        def update(train_state, train_state_teacher, images, labels, force_t=-1, force_dt=-1):
            new_rng, targets_key, dropout_key, perm_key = jax.random.split(train_state.rng, 4)
            info = {}

            id_perm = jax.random.permutation(perm_key, images.shape[0])
            images = images[id_perm]
            labels = labels[id_perm]

            if FLAGS.model['cfg_scale'] == 0:  # For unconditional generation.
                labels = jnp.ones(labels.shape[0], dtype=jnp.int32) * FLAGS.model['num_classes']

            if FLAGS.model['train_type'] == 'naive':
                x_t, v_t, t, dt_base, labels, info = get_targets_naive(FLAGS, targets_key, train_state, images, labels, force_t, force_dt)
            elif FLAGS.model['train_type'] == 'shortcut':
                x_t, v_t, t, dt_base, labels, info = get_targets_shortcut(FLAGS, targets_key, train_state, images, labels, force_t, force_dt)

            def loss_fn(grad_params):
                v_prime, logvars, activations = train_state.call_model(x_t, t, dt_base, labels, train=True, rngs={'dropout': dropout_key}, params=grad_params, return_activations=True)
                mse_v = jnp.mean((v_prime - v_t) ** 2, axis=(1, 2, 3))
                loss = jnp.mean(mse_v)

                info = {
                    'loss': loss,
                    'v_magnitude_prime': jnp.sqrt(jnp.mean(jnp.square(v_prime))),
                    **{'activations/' + k: jnp.sqrt(jnp.mean(jnp.square(v))) for k, v in activations.items()},
                }

                if FLAGS.model['train_type'] == 'shortcut' or FLAGS.model['train_type'] == 'livereflow':
                    bootstrap_size = FLAGS.batch_size // FLAGS.model['bootstrap_every']
                    info['loss_flow'] = jnp.mean(mse_v[bootstrap_size:])
                    info['loss_bootstrap'] = jnp.mean(mse_v[:bootstrap_size])

                return loss, info

            grads, new_info = jax.grad(loss_fn, has_aux=True)(train_state.params)
            info = {**info, **new_info}
            updates, new_opt_state = train_state.tx.update(grads, train_state.opt_state, train_state.params)
            new_params = optax.apply_updates(train_state.params, updates)

            info['grad_norm'] = optax.global_norm(grads)
            info['update_norm'] = optax.global_norm(updates)
            info['param_norm'] = optax.global_norm(new_params)
            info['lr'] = lr_schedule(train_state.step)

            train_state = train_state.replace(rng=new_rng, step=train_state.step + 1, params=new_params, opt_state=new_opt_state)
            train_state = train_state.update_ema(FLAGS.model['target_update_rate'])
            return train_state, info

        return update

    def peak_gib(self) -> float | None:
        stats = self.dev.memory_stats() if hasattr(self.dev, "memory_stats") else None
        return round(stats["peak_bytes_in_use"] / 2**30, 2) if stats and "peak_bytes_in_use" in stats else None

    def batch(self, batch: int):
        """One fixed batch, NHWC as the reference's VAE latents: N(0, 1) latents and labels in [0, 1000)."""
        import numpy as np

        s = size(self.tiny)
        npr = np.random.default_rng(self.seed + 1)
        images = self.jax.numpy.asarray(npr.standard_normal((batch, s["input_size"], s["input_size"], IN_CHANNELS)),
                                        dtype=self.jax.numpy.float32)
        labels = self.jax.numpy.asarray(npr.integers(0, NUM_CLASSES, batch), dtype=self.jax.numpy.int32)
        return images, labels

    def train(self, case: str, batch: int, args) -> dict:
        jax = self.jax
        FLAGS = self.flags(batch, "shortcut" if case == "train_shortcut" else "naive")
        _, lr_schedule, train_state = self.init_state(FLAGS)
        update = self.make_update(FLAGS, lr_schedule)
        train_state_teacher = None  # train.py:194-197: None unless progressive / consistency-distillation
        batch_images, batch_labels = self.batch(batch)
        jax.block_until_ready((train_state, batch_images, batch_labels))
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # model.py prints shapes while tracing
            train_state, update_info = update(train_state, train_state_teacher, batch_images, batch_labels)
            jax.block_until_ready(train_state)
        compile_s = time.perf_counter() - t0
        for _ in range(args.warmup - 1):
            train_state, update_info = update(train_state, train_state_teacher, batch_images, batch_labels)
        jax.block_until_ready(train_state)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            train_state, update_info = update(train_state, train_state_teacher, batch_images, batch_labels)
            jax.block_until_ready(train_state)
            times.append(time.perf_counter() - t0)
        res = {**summarize(times, batch, "step"), "peak_gib": self.peak_gib(), "first_step_s": round(compile_s, 1)}
        import numpy as np

        info = jax.device_get(update_info)
        res["loss"] = float(info["loss"])
        res["nonfinite_loss"] = not all(np.isfinite(np.asarray(v)).all() for v in jax.tree_util.tree_leaves(info))
        if case == "train_shortcut":  # targets_shortcut.py:10, 15 (num_dt_cfg)
            bsz = batch // RECIPE["bootstrap_every"]
            res.update(bootstrap_rows=bsz, cfg_rows=bsz // int(np.log2(RECIPE["denoise_timesteps"])))
        return res

    def sample(self, case: str, batch: int, args) -> dict:
        """helper_eval.py:196-209 (``do_fid_calc``'s loop at cfg_scale 1) with its jitted ``call_model``."""
        import functools

        import numpy as np

        jax, jnp = self.jax, self.jax.numpy
        FLAGS = self.flags(batch, "shortcut")
        if self._sampling_state is None:
            self._sampling_state = self.init_state(FLAGS)[2]
        train_state = self._sampling_state

        @functools.partial(jax.jit, static_argnums=(5,))
        def call_model(train_state, images, t, dt, labels, use_ema=True):
            if use_ema and FLAGS.model.use_ema:
                call_fn = train_state.call_model_ema
            else:
                call_fn = train_state.call_model
            output = call_fn(images, t, dt, labels, train=False)
            return output

        s = size(self.tiny)
        images_shape = (batch, s["input_size"], s["input_size"], IN_CHANNELS)
        key = jax.random.PRNGKey(42)
        eps_key, label_key = jax.random.split(key)
        labels = jax.random.randint(label_key, (images_shape[0],), 0, FLAGS.model.num_classes)
        counter = [0]

        def run(denoise_timesteps=CASES[case]["steps"]):
            counter[0] += 1
            x = jax.random.normal(jax.random.fold_in(eps_key, counter[0]), images_shape)
            x.block_until_ready()
            t0 = time.perf_counter()
            delta_t = 1.0 / denoise_timesteps
            for ti in range(denoise_timesteps):
                t = ti / denoise_timesteps  # From x_0 (noise) to x_1 (data)
                t_vector = jnp.full((images_shape[0], ), t)
                dt_base = jnp.ones_like(t_vector) * np.log2(denoise_timesteps)
                v = call_model(train_state, x, t_vector, dt_base, labels)
                x = x + v * delta_t  # Euler sampling.
            x.block_until_ready()
            assert x.shape == images_shape
            return time.perf_counter() - t0

        with contextlib.redirect_stdout(io.StringIO()):
            run(1)  # warm-up: compiles call_model for this batch
        times = [run() for _ in range(args.repeats if CASES[case]["steps"] <= 4 else args.repeats_long)]
        return {**summarize(times, batch, "batch"), "peak_gib": self.peak_gib(), "nfe": CASES[case]["steps"]}


# --- driver ---------------------------------------------------------------------------------------------------
def _ref_run(kind):
    def run(case, batch, scope, args, device, cache):
        if "ref" not in cache:
            cache["ref"] = RefShortcut(args.reference_root, args.tiny, args.seed)
        ref = cache["ref"]
        res = ref.train(case, batch, args) if kind == "train" else ref.sample(case, batch, args)
        return {**ref.info(), **res}
    return run


RUNNERS = {
    ("contgen", "train"): lambda case, batch, scope, args, device, cache: contgen_train(case, batch, scope, args, device),
    ("contgen", "sample"): lambda case, batch, scope, args, device, cache: contgen_sample(case, batch, scope, args, device),
    ("reference", "train"): _ref_run("train"),
    ("reference", "sample"): _ref_run("sample"),
}


def variants(args) -> list[tuple[str, str, int, bool]]:
    """(case, side, batch, compile) in run order: sides in ``--sides`` order, contgen's eager variant first, then
    training by batch (the cases of the first batch first), then sampling."""
    scopes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    cases = args.cases.split(",")
    train = [(c, int(b)) for b in args.batches.split(",") for c in cases if CASES[c]["kind"] == "train"]
    other = [(c, args.sample_batch) for c in cases if CASES[c]["kind"] != "train"]
    out = []
    for side in args.sides.split(","):
        for scope in (scopes if side == "contgen" else [False]):
            out.extend((c, side, b, scope) for c, b in train + other if side in CASES[c]["sides"])
    return out


def group_key(v: tuple, isolate: str):
    case, side, batch, scope = v
    if isolate == "case":
        return v
    if side == "reference" and CASES[case]["kind"] == "train":  # JAX's peak counter cannot be reset
        return v
    return (side, scope)


def step_ratios(rows: list[dict]) -> list[dict]:
    """Per (side, compile, batch): step time of train_shortcut over train_flow (and over train_flow_sit), and the
    same for peak memory."""
    ok = {(r["base_case"], r["side"], r["compile"], r["batch"]): r for r in rows
          if r.get("side") in BOTH and "error" not in r and "step_s" in r}
    out = []
    for (case, side, comp, batch), r in ok.items():
        if case != "train_shortcut":
            continue
        line = {"side": "ratio", "case": f"shortcut_over_flow_b{batch}", "of": side, "compile": comp, "batch": batch,
                "precision": r["precision"], "gpu": r["gpu"], "run_id": r["run_id"]}
        for other in ("train_flow", "train_flow_sit"):
            o = ok.get((other, side, comp, batch))
            if o:
                key = other.replace("train_", "")
                line[f"step_ratio_vs_{key}"] = round(r["step_s"] / o["step_s"], 3)
                line[f"median_step_ratio_vs_{key}"] = round(r["median_step_s"] / o["median_step_s"], 3)
                if r.get("peak_gib") and o.get("peak_gib"):
                    line[f"peak_ratio_vs_{key}"] = round(r["peak_gib"] / o["peak_gib"], 3)
        if len(line) > 8:
            out.append(line)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {list(CASES)}")
    p.add_argument("--sides", default="contgen,reference", help="contgen,reference (reference needs --reference-root)")
    p.add_argument("--reference-root", type=Path, default=None, help="a kvfrans/shortcut-models checkout (6010043)")
    p.add_argument("--batches", default="256,64", help="training batch sizes")
    p.add_argument("--sample-batch", type=int, default=256)
    p.add_argument("--cuda-graphs", choices=("on", "off"), default="on",
                   help="contgen: replay the Euler loop and the training half steps as CUDA graphs (module.cuda_graphs)")
    p.add_argument("--compile", choices=("off", "on", "both"), default="off", help="contgen variants")
    p.add_argument("--steps", type=int, default=20, help="timed training steps")
    p.add_argument("--warmup", type=int, default=5, help="training warm-up steps (the reference's first compiles)")
    p.add_argument("--compile-warmup", type=int, default=5, help="extra warm-up steps where contgen compiles")
    p.add_argument("--repeats", type=int, default=5, help="timed sampling batches at 1 and 4 steps")
    p.add_argument("--repeats-long", type=int, default=2, help="timed sampling batches at 128 steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny DiT at 8x8, a smoke test of every code path")
    p.add_argument("--out", type=Path, default=None, help="append the JSON lines to this file too")
    p.add_argument("--isolate", choices=("side", "case", "none"), default="side")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="kill a running process and start none after this many seconds (what finished is kept)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --device cpu --tiny for a smoke run)")
    sides = args.sides.split(",")
    if "reference" in sides and args.reference_root is None:
        raise SystemExit("--sides reference needs --reference-root DIR (a kvfrans/shortcut-models checkout)")
    if device.type != "cuda":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        torch._dynamo.config.disable = True  # no compiling in CPU smoke runs
    if args.isolate == "none" and "reference" in sides and "contgen" in sides:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch and JAX in one process
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    os.environ.setdefault("BENCH_RUN_ID", time.strftime("%Y%m%dT%H%M%S"))
    if args.child and os.environ.get("BENCH_ENV"):  # the parent's: a JAX child then never initialises torch's CUDA
        env = json.loads(os.environ["BENCH_ENV"])
    else:
        env = environment(device)
        os.environ["BENCH_ENV"] = json.dumps(env)
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

    def child(items: list[tuple], label: dict):
        cases = ",".join(dict.fromkeys(i[0] for i in items))
        batches = ",".join(dict.fromkeys(str(i[2]) for i in items if CASES[i[0]]["kind"] == "train")) or args.batches
        argv = ["--cases", cases, "--sides", items[0][1], "--batches", batches,
                "--sample-batch", str(args.sample_batch), "--compile", "on" if items[0][3] else "off",
                "--steps", str(args.steps), "--warmup", str(args.warmup), "--compile-warmup", str(args.compile_warmup),
                "--repeats", str(args.repeats), "--repeats-long", str(args.repeats_long), "--seed", str(args.seed),
                "--device", args.device, "--isolate", "none", "--child"]
        if args.tiny:
            argv.append("--tiny")
        if args.reference_root is not None:
            argv += ["--reference-root", str(args.reference_root)]
        left = None if args.deadline_s is None else max(1.0, args.deadline_s - (time.perf_counter() - t_start))
        proc = subprocess.Popen([sys.executable, __file__, *argv], stdout=subprocess.PIPE, text=True)
        killer = threading.Timer(left, proc.kill) if left is not None else None
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
        if got < len(items):
            emit({**label, **env, "error": f"child process exited with {proc.returncode} after {got} of "
                                           f"{len(items)} results"})

    todo = variants(args)
    if args.isolate != "none" and not args.child:
        groups: dict = {}
        for v in todo:
            groups.setdefault(group_key(v, args.isolate), []).append(v)
        for items in groups.values():
            label = {"case": ",".join(f"{c}_b{b}" for c, _, b, _ in items), "side": items[0][1],
                     "compile": items[0][3]}
            if args.deadline_s is not None and time.perf_counter() - t_start > args.deadline_s:
                emit({**label, **env, "error": "skipped: --deadline-s reached"})
                continue
            child(items, label)
    else:
        cache: dict = {}
        meta = torch.device("meta")
        fwd_gflop = {kind: forward_gflop(lambda: build_contgen_net(kind, args.tiny, meta, args.seed), kind == "shortcut")
                     for kind in ("shortcut", "sit")}
        for case, side, batch, scope in todo:
            spec = CASES[case]
            base = {"case": f"{case}_b{batch}", "base_case": case, "side": side, "precision": PRECISION,
                    "compile": scope, **env, "batch": batch, "model": model_name(args.tiny)}
            if spec["kind"] == "train":
                keys = {"train_shortcut": RECIPE, "train_flow": ("denoise_timesteps", "class_dropout_prob")}.get(
                    case, ("class_dropout_prob",))
                base.update({k: RECIPE[k] for k in keys})
            else:
                base.update(steps=spec["steps"], cfg_scale=1.0)
            t0 = time.perf_counter()
            torch.manual_seed(args.seed)
            try:
                res = RUNNERS[(side, spec["kind"])](case, batch, scope, args, device, cache)
            except torch.OutOfMemoryError:
                res = {"error": "out of memory"}
            except Exception as e:  # noqa: BLE001  one failing variant must not cost the rest of the device call
                import traceback

                traceback.print_exc()
                res = {"error": f"{type(e).__name__}: {e}"[:500]}
            res["wall_s"] = round(time.perf_counter() - t0, 1)
            # forward units per image: fwd + bwd (3), plus the two half steps on the bootstrap and CFG rows; sampling
            # one per step (no CFG)
            passes = (3 + 2 * (res.get("bootstrap_rows", 0) + res.get("cfg_rows", 0)) / batch
                      if spec["kind"] == "train" else spec["steps"])
            with_mfu(res, fwd_gflop[spec.get("net", "shortcut")] * passes, batch)
            emit({**base, **res})
            free()
    if not args.child:
        for r in with_memory_ratios([r for r in rows if r.get("side") in BOTH and "precision" in r]):
            emit(r)
        for r in step_ratios(rows):
            emit(r)
        print_table(rows)
    if out:
        out.close()


def print_table(rows: list[dict]) -> None:
    """A short table last (the device reply carries the end of the output)."""
    print("\ncase                  side       compile  img/s | s/img   med step/batch s  peak GiB  phases ms / error")
    for r in rows:
        if r.get("side") not in BOTH:
            continue
        speed = r.get("img_per_s") or r.get("s_per_img")
        med = r.get("median_step_s") or r.get("median_batch_s")
        print(f"{r['case']:<21} {r['side']:<10} {str(r.get('compile')):<8} {str(speed):>13}  {str(med):>16}  "
              f"{str(r.get('peak_gib')):>8}  {r.get('phases_ms') or r.get('error', '')}")
    for r in rows:
        if r.get("side") == "ratio" and "of" not in r:
            print(f"contgen/reference {r['case']:<21} compile={str(r['compile']):<5} speed "
                  f"{r.get('speedup_same_precision')}  memory {r.get('peak_gib_ratio')}")
    for r in rows:
        if r.get("side") == "ratio" and "of" in r:
            print(f"{r['case']} {r['of']:<9} compile={str(r['compile']):<5} "
                  + "  ".join(f"{k} {v}" for k, v in r.items() if k.startswith(("step_ratio", "peak_ratio"))))


if __name__ == "__main__":
    main()
