"""The reference side of the bench: LTH14/mar and shaochenze/EAR run from a user's own checkouts.

Nothing of the reference is copied here. ``--reference-root DIR`` must hold the two checkouts, ``DIR/mar``
(LTH14/mar) and ``DIR/EAR`` (shaochenze/EAR); their modules are imported from there and run unchanged:

* model: ``models.mar.mar_base`` / ``models.ear.ear_base`` with the flags of the README's training commands
  (``main_mar.py:192-208``, ``main_ear.py:201-219``); KL-16 decode: ``models.vae.AutoencoderKL`` (random weights,
  ``ckpt_path=None``);
* training: the reference's own ``engine_{mar,ear}.train_one_epoch`` (autocast, ``loss.item()``,
  ``NativeScalerWithGradNormCount`` with clip 3.0, ``torch.cuda.synchronize()``, its Python-loop
  ``update_ema``), the optimizer of ``main_*.py`` (``util.misc.add_weight_decay`` / ``add_weight_decay_scorelr``,
  AdamW betas (0.9, 0.95)) and its cached-latent input (``DiagonalGaussianDistribution(moments).sample() *
  0.2325``) fed with random moments ``(B, 32, 16, 16)`` as ``main_cache.py`` stores them;
* sampling: the lines of ``engine_*.evaluate`` that generate one batch — ``sample_tokens`` then
  ``vae.decode(tokens / 0.2325)`` under autocast (``engine_mar.py:146-152``, ``engine_ear.py:165-171``).

Precision: fp16 is the reference's own setting. bf16 is our variant of it: the autocast dtype is switched and
the reference's scaler class is given a disabled ``GradScaler`` (bf16 has fp32's exponent range; the scaler's
``scale``/``unscale_``/``step`` then reduce to backward, clip, ``optimizer.step``), nothing else changes.

Both repositories name their packages ``models`` and ``util``: each checkout is imported with a clean
``sys.modules`` for those names (objects already imported keep working). ``engine_*`` import
``torch_fidelity`` and ``cv2`` at module top, for evaluation only: where they are not installed an empty
stand-in module is put in ``sys.modules`` while importing.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.util
import io
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

from timing import Timer, summarize

_CLASHING = ("models", "util", "diffusion", "engine_mar", "engine_ear")


def _drop_clashing() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in _CLASHING:
            del sys.modules[name]


@contextlib.contextmanager
def checkout(path: Path):
    """Import from the reference checkout at ``path`` (prepended to ``sys.path`` for the duration)."""
    path = Path(path).resolve()
    if not (path / "models").is_dir() or not (path / "util").is_dir():
        raise SystemExit(f"--reference-root: {path} is not a LTH14/mar or shaochenze/EAR checkout (no models/, util/)")
    _drop_clashing()
    stubs = [n for n in ("torch_fidelity", "cv2") if n not in sys.modules and importlib.util.find_spec(n) is None]
    for n in stubs:
        sys.modules[n] = types.ModuleType(n)
    sys.path.insert(0, str(path))
    try:
        yield
    finally:
        sys.path.remove(str(path))
        _drop_clashing()
        for n in stubs:
            sys.modules.pop(n, None)


def commit_of(path: Path) -> str | None:
    """The checkout's commit: ``git rev-parse HEAD`` there, else a ``REF_COMMIT`` file (copied checkouts)."""
    import subprocess

    if not (Path(path) / ".git").exists():  # not a checkout of its own (git would answer for an enclosing repo)
        f = Path(path) / "REF_COMMIT"
        return f.read_text().strip() if f.is_file() else None
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        f = Path(path) / "REF_COMMIT"
        return f.read_text().strip() if f.is_file() else None


class RefModel:
    """One reference model with its VAE, optimizer, scaler and EMA, as ``main_*.py`` sets them up."""

    def __init__(self, root: Path, method: str, tiny: bool, device: torch.device):
        self.method, self.device = method, device
        repo = Path(root) / ("mar" if method == "mar" else "EAR")
        self.commit = commit_of(repo)
        with checkout(repo):
            models = importlib.import_module(f"models.{method}")
            vae_mod = importlib.import_module("models.vae")
            misc = importlib.import_module("util.misc")
            engine = importlib.import_module(f"engine_{method}")
        self.engine, self.misc, self.Posterior = engine, misc, vae_mod.DiagonalGaussianDistribution
        common = dict(img_size=64 if tiny else 256, vae_stride=16, patch_size=1, vae_embed_dim=16, mask_ratio_min=0.7,
                      label_drop_prob=0.1, class_num=1000, attn_dropout=0.1, proj_dropout=0.1, buffer_size=64,
                      grad_checkpointing=False)
        if method == "mar":  # README: --diffloss_d 6 --diffloss_w 1024 --diffusion_batch_mul 4, 100 sampling steps
            head = dict(diffloss_d=1 if tiny else 6, diffloss_w=32 if tiny else 1024,
                        num_sampling_steps="5" if tiny else "100", diffusion_batch_mul=4)
            size = dict(encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2, decoder_embed_dim=32,
                        decoder_depth=1, decoder_num_heads=2) if tiny else {}
            self.model = (models.MAR(**common, **head, **size) if tiny else models.mar_base(**common, **head))
        else:  # README: --scoreloss_d 6 --scoreloss_w 1024 --noise_channels 64 --score_batch_mul 2
            head = dict(scoreloss_d=1 if tiny else 6, scoreloss_w=32 if tiny else 1024, noise_channels=64,
                        score_batch_mul=2, alpha=1.0, train_temperature=1.0)
            size = dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2) if tiny else {}
            self.model = (models.EAR(**common, **head, **size) if tiny else models.ear_base(**common, **head))
        self.model.to(device)
        ch_mult = (1, 1, 2, 2, 4)
        self.vae = vae_mod.AutoencoderKL(embed_dim=16, ch_mult=ch_mult, ckpt_path=None).to(device).eval()
        for p in self.vae.parameters():
            p.requires_grad = False
        # main_*.py: lr = blr · batch / 256; the lr schedule is irrelevant to speed (warmup 0, constant)
        if method == "mar":
            groups = misc.add_weight_decay(self.model, 0.02)
        else:
            groups = misc.add_weight_decay_scorelr(self.model, 0.02, 0.25)
        self.optimizer = torch.optim.AdamW(groups, lr=8e-4, betas=(0.9, 0.95))
        self.model_params = list(self.model.parameters())
        self.ema_params = copy.deepcopy(self.model_params)  # main_mar.py:254-255

    # --- training ----------------------------------------------------------------------------------
    def train(self, batch: int, precision: str, warmup: int, steps: int, seed: int) -> dict:
        """``engine_*.train_one_epoch`` over a fixed cached-latent batch: ``warmup`` steps, then ``steps`` timed."""
        gen = torch.Generator(self.device).manual_seed(seed)
        h = w = self.model.seq_h
        moments = torch.randn(batch, 32, h, w, generator=gen, device=self.device)
        labels = torch.randint(0, 1000, (batch,), generator=gen, device=self.device)
        scaler = self.misc.NativeScalerWithGradNormCount()
        if precision == "bf16":  # same class, scaling disabled (see module docstring)
            scaler._scaler = torch.amp.GradScaler("cuda", enabled=False)
        elif precision != "fp16":
            raise ValueError(f"reference training precision must be fp16 or bf16, got {precision}")
        args = argparse.Namespace(use_cached=True, grad_clip=3.0, ema_rate=0.9999, accumulation_steps=1, lr=8e-4,
                                  min_lr=0.0, warmup_epochs=0, epochs=1, lr_schedule="constant")
        timer = Timer(self.device)

        def epoch(n: int, stamps: list | None):
            loader = _StampedBatches((moments, labels), n, stamps)
            with _autocast_dtype(precision), contextlib.redirect_stdout(io.StringIO()):
                self.engine.train_one_epoch(self.model, self.vae, self.model_params, self.ema_params, loader,
                                            self.optimizer, self.device, 0, scaler, log_writer=None, args=args)

        np.random.seed(seed)
        torch.manual_seed(seed)
        epoch(warmup, None)
        timer.sync()
        timer.reset_peak()
        stamps: list[float] = []
        epoch(steps, stamps)
        timer.sync()
        stamps.append(time.perf_counter())
        times = [b - a for a, b in zip(stamps[:-1], stamps[1:])]
        return {**summarize(times, batch, "step"), "peak_gib": timer.peak_gib()}

    # --- sampling ----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, batch: int, num_iter: int, cfg: float, temperature: float, precision: str, repeats: int,
               warmup_iter: int, seed: int) -> dict:
        self.model.eval()
        np.random.seed(seed)  # sample_orders draws from numpy, the head noise from torch's global generator
        torch.manual_seed(seed)
        labels = torch.randint(0, 1000, (batch,), device=self.device)
        temp_kw = {"temperature": temperature} if self.method == "mar" else {"infer_temperature": temperature}
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[precision]
        timer = Timer(self.device)

        def run(n_iter: int) -> tuple[float, float]:
            timer.sync()
            t0 = time.perf_counter()
            with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                tokens = self.model.sample_tokens(bsz=batch, num_iter=n_iter, cfg=cfg, cfg_schedule="linear",
                                                  labels=labels, **temp_kw)
                timer.sync()
                t1 = time.perf_counter()
                images = self.vae.decode(tokens / 0.2325)
            timer.sync()
            t2 = time.perf_counter()
            assert images.shape[0] == batch
            return t2 - t0, t1 - t0

        run(warmup_iter)  # kernels, handles, cuDNN autotuning of the decoder (cudnn.benchmark as in main_*.py)
        timer.reset_peak()
        res = [run(num_iter) for _ in range(repeats)]
        return {**summarize([r[0] for r in res], batch, "batch"),
                "tokens_s_per_img": round(sum(r[1] for r in res) / len(res) / batch, 5), "peak_gib": timer.peak_gib()}


class _StampedBatches:
    """A 'data loader' of ``n`` copies of one batch that records the wall time at which each is handed out; the
    reference loop synchronizes every step, so consecutive stamps bracket one step each."""

    def __init__(self, batch, n: int, stamps: list | None):
        self.batch, self.n, self.stamps = batch, n, stamps

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for _ in range(self.n):
            if self.stamps is not None:
                self.stamps.append(time.perf_counter())
            yield self.batch


@contextlib.contextmanager
def _autocast_dtype(precision: str):
    """The engines call ``torch.cuda.amp.autocast()`` (fp16); for bf16 that call is pointed at bf16 autocast."""
    if precision == "fp16":
        yield
        return
    original = torch.cuda.amp.autocast
    torch.cuda.amp.autocast = lambda *a, **k: torch.autocast("cuda", dtype=torch.bfloat16)
    try:
        yield
    finally:
        torch.cuda.amp.autocast = original
