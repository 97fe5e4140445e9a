"""``GenerativeModule``: what both families' LightningModules share — the common interface the CLI, callbacks and
checkpoints talk to, so that none of them branches on a method's name.

The interface: ``num_classes``, ``generate(labels, generator, use_ema)`` (images in [-1, 1]), ``sample_precision``,
``ema``, and ``from_config(cfg, tokenizer, num_classes)`` (how ``build_module`` makes the module that
``cfg.module._target_`` names). Shared machinery: the optimizer (AdamW or RAdam with MAR's parameter groups and
warm-up schedule), global-norm clipping, EMA per optimizer step, per-step generators, the NaN guards and the
checkpoint hooks. A family implements ``training_step`` and ``generate_tokens``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.strategies import FSDPStrategy
import torch
from torch import nn

from contgen.modules.optim import param_groups, warmup_then
from contgen.utils import cuda_graphs
from contgen.utils.ema import EMA
from contgen.utils.precision import check_sample_precision, sampling_autocast

# The keys of ``optim``; their values (defaults included) come from the config (conf/train.yaml ``optim``).
OPTIM_KEYS = frozenset({"name", "lr", "blr", "betas", "weight_decay", "warmup_epochs", "warmup_steps", "schedule",
                        "min_lr_ratio", "head_lr_scale", "ema_decay", "ema_warmup"})
OPTIMIZERS = ("adamw", "radam")  # MAR/EAR/UCGM multi-step: AdamW; UCGM few-step and tuning: RAdam (ucgm.md §1.7)
# Stream tags of the per-step generators: the host draw (e.g. the mask count) must not repeat the device's first
# draws, which it would on a CPU if both were seeded alike.
_DEVICE_STREAM, _HOST_STREAM = 0, 1


def check_optim(optim: dict) -> dict:
    unknown, missing = set(optim) - OPTIM_KEYS, OPTIM_KEYS - set(optim)
    if unknown or missing:
        raise ValueError(f"optim: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}; "
                         f"expected exactly {sorted(OPTIM_KEYS)}")
    if optim["name"] not in OPTIMIZERS:
        raise ValueError(f"optim.name must be one of {OPTIMIZERS}, got {optim['name']!r}")
    warmup_then(1, 0, 2, optim["schedule"], optim["min_lr_ratio"])  # an unknown schedule fails now, not after warm-up
    return dict(optim)


class GenerativeModule(L.LightningModule):
    """Subclasses build ``self.net`` (an ``nn.ModuleDict``: what trains and what the EMA copies) and then call
    :meth:`setup_training`."""

    def __init__(self, tokenizer: nn.Module, num_classes: int, optim: dict, seed: int = 0,
                 sample_precision: str = "auto", config: dict | None = None, cuda_graphs: bool = True):
        super().__init__()
        self.optim = check_optim(optim)
        self.sample_precision = check_sample_precision(sample_precision)
        if not isinstance(cuda_graphs, bool):
            raise ValueError(f"module.cuda_graphs must be true or false, got {cuda_graphs!r}")
        self.cuda_graphs = cuda_graphs
        self.tokenizer, self.num_classes = tokenizer, num_classes
        self.seed, self.config = seed, config or {}
        # flags set on the device and read on the host only every log interval (no sync per step)
        self.register_buffer("_nonfinite", torch.zeros((), dtype=torch.bool), persistent=False)
        self.register_buffer("_bad_data", torch.zeros((), dtype=torch.bool), persistent=False)

    def setup_training(self) -> None:
        self.ema = EMA(self.net, self.optim["ema_decay"], self.optim["ema_warmup"])
        # the dims as built: FSDP flattens parameters into 1-D shard pieces before the optimizer groups them
        self._param_ndims = {id(p): p.ndim for p in self.net.parameters()}

    @classmethod
    def from_config(cls, cfg, tokenizer: nn.Module, num_classes: int) -> "GenerativeModule":
        raise NotImplementedError

    # --- hooks of a family ------------------------------------------------------------------------
    def decay_and_head(self) -> tuple[nn.Module, nn.Module | None]:
        """(the module whose weight matrices decay, the head whose matrices take ``head_lr_scale``)."""
        raise NotImplementedError

    def sharded_units(self) -> list[nn.Module]:
        """The modules that FSDP shards as units besides the transformer blocks: those called through ``forward``
        (FSDP gathers a unit's parameters only around its forward), for the trained net and its EMA copy alike."""
        raise NotImplementedError

    @staticmethod
    def released_num_classes(path: str, allow_pickle: bool = False) -> int:
        """The class count of a released reference checkpoint of this family (read from its class embedding)."""
        raise NotImplementedError

    def load_released(self, path: str, allow_pickle: bool = False) -> None:
        """Load a released reference checkpoint: raw weights into ``net``, EMA weights into the EMA copy."""
        raise NotImplementedError

    def generate_tokens(self, labels: torch.Tensor, generator: torch.Generator | None = None, use_ema: bool = True,
                        sampler=None) -> torch.Tensor:
        raise NotImplementedError

    def check_sampler(self, sampler) -> None:
        """Refuse a sampler this module cannot run (settings the sampler cannot check alone), before any compute."""

    def require_pixels(self, fix: str) -> None:
        """Refuse, before any compute, to sample pixels through a tokenizer that has no ``decode`` (``decodes`` False):
        a discriminative tokenizer's ids (DiGIT, reference/digit.md §3) are rendered by a second model."""
        if not getattr(self.tokenizer, "decodes", True):
            raise ValueError(f"tokenizer {type(self.tokenizer).__name__} does not decode token ids to pixels (a "
                             "discriminative tokenizer: pixels come from a second model, DiGIT's stage 2 pixel "
                             f"decoder); {fix}")

    # --- randomness -------------------------------------------------------------------------------
    def step_generators(self, batch_idx: int) -> tuple[torch.Generator, torch.Generator]:
        """(device generator, CPU generator) for one step, independent streams seeded by (seed, epoch, batch, rank),
        so a resumed run replays exactly the draws of the uninterrupted one."""
        key = (self.seed, self.current_epoch, batch_idx, self.global_rank)
        device_seed, host_seed = (hash((*key, stream)) & (2**62 - 1) for stream in (_DEVICE_STREAM, _HOST_STREAM))
        return torch.Generator(self.device).manual_seed(device_seed), torch.Generator().manual_seed(host_seed)

    # --- training ---------------------------------------------------------------------------------
    @torch.no_grad()
    def tokens_from_batch(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        if "moments" in batch:  # cached (image, h-flip) posterior moments: pick one view per sample, then sample
            m = batch["moments"]
            flip = torch.rand(m.shape[0], generator=generator, device=m.device) < 0.5
            moments = torch.where(flip[:, None, None], m[:, 1], m[:, 0])
        else:  # the references encode in fp32, outside the training autocast (engine_mar.py:62-68)
            with torch.autocast(batch["image"].device.type, enabled=False):
                moments = self.tokenizer.moments(batch["image"].float())
        tokens = self.tokenizer.sample(moments, generator)
        self._bad_data |= ~torch.isfinite(tokens).all()  # a NaN in the data is not the learning rate's fault
        return tokens

    def log_loss(self, loss: torch.Tensor, metrics: dict | None = None) -> None:
        self._nonfinite |= ~torch.isfinite(loss.detach())
        self.log("train/loss", loss, prog_bar=True)
        for k, v in (metrics or {}).items():
            self.log(f"train/{k}", v)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.ema.update(self.net)  # once per optimizer step, also under gradient accumulation

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            self.check_finite()

    def check_finite(self) -> None:
        bad_data, nonfinite = torch.stack([self._bad_data, self._nonfinite]).float()
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:  # every rank stops together (one alone leaves the rest hanging)
            bad_data, nonfinite = trainer.strategy.reduce(torch.stack([bad_data, nonfinite]), reduce_op="max")
        if bad_data.item():
            raise FloatingPointError(
                f"non-finite values in the training data (tokens) at or before epoch {self.current_epoch}, global step "
                f"{self.global_step}: check the data (data.root, or the token cache: rebuild it with cache_tokens.py); "
                "stopped without saving, the last good checkpoint is kept")
        if nonfinite.item():
            raise FloatingPointError(
                f"non-finite training loss at or before epoch {self.current_epoch}, global step {self.global_step}; "
                "stopped without saving, the last good checkpoint is kept (resume with ckpt_path=last, e.g. with a "
                "lower optim.blr or trainer.gradient_clip_val)")

    def configure_optimizers(self):
        o, trainer = self.optim, self.trainer
        batch = getattr(trainer.datamodule, "batch_size", None) if trainer.datamodule is not None else None
        global_batch = (batch or 1) * trainer.accumulate_grad_batches * trainer.world_size
        lr = o["lr"] if o["lr"] is not None else o["blr"] * global_batch / 256  # MAR: lr = blr · batch / 256
        groups = param_groups(*self.decay_and_head(), o["weight_decay"], o["head_lr_scale"], self._param_ndims)
        for g in groups:
            g["lr"] = lr * g["lr_scale"]
        # A fused optimizer unscales fp16 gradients itself, which Lightning's GradScaler path refuses to clip: fp16-mixed
        # (the MAR/EAR references' setting) takes the foreach kernel, the same update (see configure_gradient_clipping).
        if o["name"] == "adamw":
            fused = self.device.type == "cuda" and trainer.precision != "16-mixed"
            opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(o["betas"]), fused=fused,
                                    foreach=None if fused else True)
        else:  # RAdam with decoupled decay, as the UCGM reference's few-step recipes (optimers/, torch's RAdam)
            opt = torch.optim.RAdam(groups, lr=lr, betas=tuple(o["betas"]), decoupled_weight_decay=True, foreach=True)
        total = int(trainer.estimated_stepping_batches)
        if o["warmup_steps"] is not None:
            warmup = int(o["warmup_steps"])
        else:
            epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
            warmup = int(o["warmup_epochs"] * total / epochs)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_then(s, warmup, total, o["schedule"], o["min_lr_ratio"]))
        self.lr_info = dict(lr=lr, global_batch=global_batch, warmup_steps=warmup, total_steps=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Global-norm clipping (MAR/EAR 3.0, UCGM few-step 0.1). Lightning's mixed-precision plugin refuses to clip
        for any optimizer that could unscale gradients itself (a fused AdamW), also under bf16, where no GradScaler
        exists and the gradients are already unscaled; so without a GradScaler the gradients are clipped here
        directly. fp16-mixed goes through Lightning (unscale, then clip) with the foreach kernel. Under FSDP each rank
        holds a shard of every gradient: the FSDP root computes the norm over all of them."""
        if not gradient_clip_val:
            return
        if self.trainer.precision == "16-mixed" or gradient_clip_algorithm not in (None, "norm"):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if isinstance(self.trainer.strategy, FSDPStrategy):
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, gradient_clip_val, foreach=True)

    # --- sampling ---------------------------------------------------------------------------------
    def sampling_net(self, use_ema: bool) -> nn.Module:
        return self.ema.shadow if use_ema else self.net

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, generator: torch.Generator | None = None, use_ema: bool = True,
                 sampler=None) -> torch.Tensor:
        """Images in [-1, 1] (fp32) for ``labels``, from the EMA weights by default."""
        self.require_pixels("this model samples token ids only")
        return self.decode_images(lambda: self.generate_tokens(labels, generator, use_ema, sampler), use_ema)

    def decode_images(self, sample_tokens, use_ema: bool) -> torch.Tensor:
        """``sample_tokens()`` decoded to images in [-1, 1] (fp32), sampled and decoded under ``sample_precision`` with
        the sampling net in eval mode (as the references decode inside their autocast, engine_mar.py:155-159)."""
        net = self.sampling_net(use_ema)
        was_training = net.training
        net.eval()
        try:
            with sampling_autocast(self.sample_precision, self.device), cuda_graphs.enabled(self.cuda_graphs):
                images = self.tokenizer.decode(sample_tokens())
        finally:
            net.train(was_training)
        return images.float().clamp(-1, 1)

    # --- checkpoints ------------------------------------------------------------------------------
    def frozen_modules(self) -> dict[str, nn.Module]:
        """The frozen submodules rebuilt from their own files (the tokenizer): kept out of every checkpoint, and whole
        on every rank under FSDP (ignored modules)."""
        return {"tokenizer": self.tokenizer}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_finite()  # never write a checkpoint of a diverged run
        frozen = tuple(f"{name}." for name in self.frozen_modules())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(frozen)}
        checkpoint["contgen"] = {"config": self.config, "num_classes": self.num_classes}
        if hasattr(self.tokenizer, "digest"):  # what the tokens are, beyond the config (DiGIT's centroids)
            checkpoint["contgen"]["tokenizer_digest"] = self.tokenizer.digest()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        for name, module in self.frozen_modules().items():
            checkpoint["state_dict"].update({f"{name}.{k}": v for k, v in module.state_dict().items()})
