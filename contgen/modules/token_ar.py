"""``TokenARModule``: masked random-order autoregression over continuous tokens (MAR, EAR, and any
per-token head on any token backbone).

A training step (MAR Sec. 3.4, Alg. 1): tokens ← tokenizer; one mask ratio for the batch; a random order
per image; the backbone sees the visible tokens and the class (dropped to the null class with
``label_drop_prob``); the head's loss is taken on the masked rows only — they are gathered before the
head runs, so no head compute is spent on rows that do not count.

Every random draw of a step comes from two generators seeded by (seed, epoch, batch index, rank) and a stream
tag, so a run resumed from a checkpoint replays exactly the draws of the uninterrupted run.
"""

from __future__ import annotations

from typing import Any, Callable

import lightning as L
import torch
from torch import nn

from contgen.modules.optim import param_groups, warmup_then
from contgen.samplers.masked import MaskedARSampler, gather_rows
from contgen.samplers.schedules import MaskRatio, cosine_mask_schedule, random_orders
from contgen.utils.ema import EMA
from contgen.utils.precision import check_sample_precision, sampling_autocast

# The keys of ``optim``; their values (defaults included) come from the config (conf/train.yaml ``optim``).
OPTIM_KEYS = frozenset({"lr", "blr", "betas", "weight_decay", "warmup_epochs", "warmup_steps", "schedule",
                        "min_lr_ratio", "head_lr_scale", "ema_decay", "ema_warmup"})
# Stream tags of the per-step generators: the host draw (mask count) must not repeat the device's first draws,
# which it would on a CPU if both were seeded alike (then the mask ratio and image 0's order key coincide).
_DEVICE_STREAM, _HOST_STREAM = 0, 1


class TokenARModule(L.LightningModule):
    def __init__(self, tokenizer: nn.Module, backbone: Callable[..., nn.Module], head: Callable[..., nn.Module],
                 sampler: MaskedARSampler, num_classes: int, optim: dict, mask_ratio_min: float = 0.7,
                 seed: int = 0, compile: bool = False, sample_precision: str = "auto", config: dict | None = None):
        super().__init__()
        unknown, missing = set(optim) - OPTIM_KEYS, OPTIM_KEYS - set(optim)
        if unknown or missing:
            raise ValueError(f"optim: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}; "
                             f"expected exactly {sorted(OPTIM_KEYS)}")
        self.optim = dict(optim)
        warmup_then(1, 0, 2, self.optim["schedule"], self.optim["min_lr_ratio"])  # an unknown schedule fails now
        self.sample_precision = check_sample_precision(sample_precision)
        self.tokenizer = tokenizer
        bb = backbone(seq_len=tokenizer.seq_len, token_dim=tokenizer.token_dim, num_classes=num_classes)
        self.net = nn.ModuleDict({"backbone": bb, "head": head(token_dim=tokenizer.token_dim, cond_dim=bb.cond_dim)})
        self.ema = EMA(self.net, self.optim["ema_decay"], self.optim["ema_warmup"])
        self.sampler = sampler
        cosine_mask_schedule(tokenizer.seq_len, sampler.num_iter)  # num_iter within [1, seq_len], before training
        self.mask_ratio = MaskRatio(low=mask_ratio_min)
        self.seed, self.config = seed, config or {}
        # flags set on the device and read on the host only every log interval (no sync per step)
        self.register_buffer("_nonfinite", torch.zeros((), dtype=torch.bool), persistent=False)
        self.register_buffer("_bad_data", torch.zeros((), dtype=torch.bool), persistent=False)
        if compile:
            # Only what has static shapes: the blocks over the full sequence (MAR's decoder, EAR's stack; L + buffer
            # tokens) and the head MLP (rows vary with the mask ratio: dynamic). MAR's encoder sees L − num_masked
            # tokens; with a symbolic length Inductor (torch 2.11) fails on its LayerNorm backward, so it stays eager.
            for block in self.net.backbone.decoder_blocks:
                block.compile()
            self.net.head.net.compile(dynamic=True)

    # --- randomness -------------------------------------------------------------------------------
    def step_generators(self, batch_idx: int) -> tuple[torch.Generator, torch.Generator]:
        """(device generator, CPU generator) for one step, independent streams; CPU draws decide shapes (mask count)."""
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
        return self.tokenizer.sample(moments, generator)

    def masked_loss(self, tokens: torch.Tensor, labels: torch.Tensor, g: torch.Generator, g_cpu: torch.Generator):
        backbone, head = self.net.backbone, self.net.head
        b, seq_len, _ = tokens.shape
        num_masked = self.mask_ratio.num_masked(seq_len, g_cpu)
        order = random_orders(b, seq_len, g, tokens.device)
        drop = torch.rand(b, generator=g, device=tokens.device) < backbone.label_drop_prob
        z = backbone(tokens, labels, order, num_masked, drop)
        masked = order[:, :num_masked]
        return head.loss(gather_rows(tokens, masked), gather_rows(z, masked), generator=g)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        g, g_cpu = self.step_generators(batch_idx)
        tokens = self.tokens_from_batch(batch, g)
        self._bad_data |= ~torch.isfinite(tokens).all()  # a NaN in the data is not the learning rate's fault
        loss = self.masked_loss(tokens, batch["label"], g, g_cpu)
        self._nonfinite |= ~torch.isfinite(loss.detach())
        self.log("train/loss", loss, prog_bar=True)
        for k, v in getattr(self.net.head, "last_metrics", {}).items():
            self.log(f"train/{k}", v)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.ema.update(self.net)  # once per optimizer step, also under gradient accumulation

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            self.check_finite()

    def check_finite(self) -> None:
        if self._bad_data.item():
            raise FloatingPointError(
                f"non-finite values in the training data (tokens) at or before epoch {self.current_epoch}, global step "
                f"{self.global_step}: check the data (data.root, or the token cache: rebuild it with cache_tokens.py); "
                "stopped without saving, the last good checkpoint is kept")
        if self._nonfinite.item():
            raise FloatingPointError(
                f"non-finite training loss at or before epoch {self.current_epoch}, global step {self.global_step}; "
                "stopped without saving, the last good checkpoint is kept (resume with ckpt_path=last, e.g. with a "
                "lower optim.blr or trainer.gradient_clip_val)")

    def configure_optimizers(self):
        o, trainer = self.optim, self.trainer
        batch = getattr(trainer.datamodule, "batch_size", None) if trainer.datamodule is not None else None
        global_batch = (batch or 1) * trainer.accumulate_grad_batches * trainer.world_size
        lr = o["lr"] if o["lr"] is not None else o["blr"] * global_batch / 256  # MAR: lr = blr · batch / 256
        groups = param_groups(self.net.backbone, self.net.head, o["weight_decay"], o["head_lr_scale"])
        for g in groups:
            g["lr"] = lr * g["lr_scale"]
        # A fused AdamW unscales fp16 gradients itself, which Lightning's GradScaler path refuses to clip: fp16-mixed
        # (the references' setting) takes the foreach AdamW, the same update (see configure_gradient_clipping).
        fused = self.device.type == "cuda" and trainer.precision != "16-mixed"
        opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(o["betas"]), fused=fused, foreach=None if fused else True)
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
        """Global-norm clipping (the references' clip 3.0). Lightning's mixed-precision plugin refuses to clip for any
        optimizer that could unscale gradients itself (a fused AdamW), also under bf16, where no GradScaler exists
        and the gradients are already unscaled; so without a GradScaler the gradients are clipped here directly.
        fp16-mixed goes through Lightning (unscale, then clip) with the foreach AdamW."""
        if not gradient_clip_val:
            return
        if self.trainer.precision == "16-mixed" or gradient_clip_algorithm not in (None, "norm"):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, gradient_clip_val, foreach=True)

    # --- sampling ---------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_tokens(self, labels: torch.Tensor, generator: torch.Generator | None = None, use_ema: bool = True,
                        sampler: MaskedARSampler | None = None) -> torch.Tensor:
        net = self.ema.shadow if use_ema else self.net
        was_training = net.training
        net.eval()
        try:
            return (sampler or self.sampler)(net.backbone, net.head, labels, generator)
        finally:
            net.train(was_training)

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, generator: torch.Generator | None = None, use_ema: bool = True,
                 sampler: MaskedARSampler | None = None) -> torch.Tensor:
        """Images in [-1, 1] (fp32) for ``labels``, from the EMA weights by default, sampled and decoded under
        ``sample_precision`` (as the references decode inside their fp16 autocast, engine_mar.py:155-159)."""
        with sampling_autocast(self.sample_precision, self.device):
            images = self.tokenizer.decode(self.generate_tokens(labels, generator, use_ema, sampler))
        return images.float().clamp(-1, 1)

    # --- checkpoints ------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_finite()  # never write a checkpoint of a diverged run
        # the frozen tokenizer is rebuilt from its own weights file; keep it out of every checkpoint
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("tokenizer.")}
        checkpoint["contgen"] = {"config": self.config, "num_classes": self.net.backbone.num_classes}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"].update({f"tokenizer.{k}": v for k, v in self.tokenizer.state_dict().items()})
