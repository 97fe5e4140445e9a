"""``TokenARModule``: masked random-order autoregression over continuous tokens (MAR, EAR, and any
per-token head on any token backbone).

A training step (MAR Sec. 3.4, Alg. 1): tokens ← tokenizer; one mask ratio for the batch; a random order
per image; the backbone sees the visible tokens and the class (dropped to the null class with
``label_drop_prob``); the head's loss is taken on the masked rows only — they are gathered before the
head runs, so no head compute is spent on rows that do not count.

The optimizer, EMA, per-step generators, NaN guards and checkpoint hooks are shared with the transport family
(``contgen/modules/base.py``).
"""

from __future__ import annotations

from typing import Callable

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from contgen.modules.base import GenerativeModule
from contgen.samplers.masked import MaskedARSampler, gather_rows
from contgen.samplers.schedules import cosine_mask_schedule, make_mask_ratio, random_orders
from contgen.utils.reference_ckpt import load_reference_mar, reference_num_classes

COMPILE_MODES = ("default", "reduce-overhead")  # module.compile_mode: torch.compile modes for the trained net's blocks


def built_class(factory: Callable[..., nn.Module]) -> type:
    """The class a (possibly nested) partial builds: Hydra's ``_partial_`` factory, wrapped again by a module."""
    while hasattr(factory, "func"):
        factory = factory.func
    return factory


class TokenARModule(GenerativeModule):
    causal = False  # masked random order; CausalARModule (causal_ar.py): one token per step in a fixed order
    config_keys: tuple[str, ...] = ()  # module.* keys a subclass's from_config reads itself

    def __init__(self, tokenizer: nn.Module, backbone: Callable[..., nn.Module], head: Callable[..., nn.Module],
                 sampler: MaskedARSampler, num_classes: int, optim: dict, mask_ratio_min: float = 0.7,
                 mask_ratio: str = "truncnorm", seed: int = 0, compile: bool = False, sample_precision: str = "auto",
                 config: dict | None = None, cuda_graphs: bool = True, compile_mode: str = "default"):
        super().__init__(tokenizer, num_classes, optim, seed, sample_precision, config, cuda_graphs)
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"module.compile_mode={compile_mode!r}: use one of {', '.join(COMPILE_MODES)}")
        self.compile_mode = compile_mode if compile else "default"
        self.mask_ratio = make_mask_ratio(mask_ratio, low=mask_ratio_min)  # checked before anything is built
        self.net = self.build_net(tokenizer, backbone, head, num_classes)
        self.setup_training()
        self.sampler = sampler
        self.check_sampler(sampler)  # before training
        if self.compile_mode != "default" and getattr(self.net.backbone, "grad_checkpointing", False):
            raise ValueError(f"module.compile_mode={compile_mode} with model.grad_checkpointing=true: a CUDA-graphed "
                             "block cannot be recomputed in the backward; set one of them off")
        if compile:
            self.compile_nets(self.compile_mode)

    def build_net(self, tokenizer: nn.Module, backbone: Callable[..., nn.Module], head: Callable[..., nn.Module],
                  num_classes: int) -> nn.ModuleDict:
        """Backbone and head sized by the tokenizer. A discrete tokenizer (``vocab_size`` set; tokens are (B, L) int64
        ids) gives both ``vocab_size`` (and the backbone ``token_dim=None``): the backbone embeds ids, the head models
        ids (``loss=categorical``); a continuous one gives them ``token_dim``."""
        vocab = getattr(tokenizer, "vocab_size", None)
        spec = {"vocab_size": vocab} if vocab else {"token_dim": tokenizer.token_dim}
        bb_spec = {"token_dim": None, **spec} if vocab else spec
        kind = "discrete" if vocab else "continuous"
        if vocab and not getattr(built_class(backbone), "embeds_ids", False):
            raise ValueError(f"tokenizer {type(tokenizer).__name__} is discrete (vocab_size={vocab}): the backbone "
                             "must embed ids (model=gpt_*, mar_*, ear_*)")
        if bool(vocab) != getattr(built_class(head), "discrete", False):
            raise ValueError(f"tokenizer {type(tokenizer).__name__} gives {kind} tokens: use "
                             f"{'loss=categorical' if vocab else 'a continuous head (loss=diffusion, energy, ...)'}")
        bb = backbone(seq_len=tokenizer.seq_len, num_classes=num_classes, **bb_spec)
        causal = getattr(bb, "causal", False)
        if causal != self.causal:
            raise ValueError(f"model {type(bb).__name__} is {'causal' if causal else 'masked'}: use "
                             f"module={'causal_ar' if causal else 'token_ar'}")
        return nn.ModuleDict({"backbone": bb, "head": head(cond_dim=bb.cond_dim, **spec)})

    @classmethod
    def from_config(cls, cfg, tokenizer: nn.Module, num_classes: int,
                    backbone: Callable[..., nn.Module] | None = None) -> "TokenARModule":
        """``backbone``: the model factory when a subclass has wrapped ``cfg.model``'s (default: ``cfg.model``);
        the ``module.*`` keys in ``cls.config_keys`` are read by the subclass, not passed to ``__init__``."""
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        if cfg.get("loss") is None:
            raise ValueError(f"module={cfg.module._target_} needs a per-token head: set loss= (diffusion, energy, "
                             "categorical, ...)")
        knobs = {k: v for k, v in cfg.module.items() if k != "_target_" and k not in cls.config_keys}
        return cls(tokenizer=tokenizer, backbone=backbone or instantiate(cfg.model), head=instantiate(cfg.loss),
                   sampler=instantiate(cfg.sampler), num_classes=num_classes,
                   optim=OmegaConf.to_container(cfg.optim, resolve=True), seed=cfg.seed,
                   config=OmegaConf.to_container(cfg, resolve=True), **knobs)

    def compile_nets(self, mode: str = "default") -> None:
        """``module.compile``: torch.compile what has static shapes, in the trained net and in the EMA copy that samples.

        Training: the blocks over the full sequence (MAR's decoder, EAR's stack; L + buffer tokens), MAR's encoder padded
        to the most slots the mask ratio leaves visible (``encoder_len``: a symbolic length fails Inductor's LayerNorm
        backward in torch 2.11), the head MLP with a dynamic row count. ``mode`` (``module.compile_mode``) applies to
        the trained net's blocks: ``reduce-overhead`` replays their forward and backward as CUDA graphs (Inductor's
        CUDA graph trees; on a CPU it compiles as ``default``). Sampling (no gradients): the same blocks, the encoder
        with a dynamic length (it grows every step), the head MLP (captured inside the head's CUDA graphs); always
        ``default``: CUDA graph trees would record the encoder once per length, and the launch-bound loop (the head's)
        has its own graphs. A causal GPT samples eagerly: its compiled KV-cache decode has not been verified on a GPU.
        """
        bb = self.net.backbone
        if hasattr(bb, "encoder_len"):
            bb.encoder_len = bb.buffer_size + bb.seq_len - self.mask_ratio.min_masked(bb.seq_len)
        nets = [(self.net, False)] + ([] if self.causal else [(self.ema.shadow, True)])
        for net, sampling in nets:
            block_mode = "default" if sampling else mode
            for block in getattr(net.backbone, "encoder_blocks", []):
                block.compile(dynamic=sampling or None, mode=block_mode)
            for block in net.backbone.decoder_blocks:
                block.compile(mode=block_mode)
            net.head.net.compile(dynamic=True)

    def setup(self, stage: str) -> None:
        """CUDA-graphed training blocks (``module.compile_mode=reduce-overhead``) need static weights and gradients that
        are consumed within the step: refused, before any compute, under FSDP (it frees and re-gathers the blocks'
        weights every step) and with gradient accumulation (the first micro-batch's gradients alias the graphs'
        outputs, which the next micro-batch's replay overwrites; seen on an H100)."""
        trainer = self._trainer  # None when a test calls setup() without a Trainer
        if self.compile_mode == "default" or trainer is None:
            return
        fix = "; use module.compile_mode=default"
        if isinstance(trainer.strategy, FSDPStrategy):
            raise ValueError(f"module.compile_mode={self.compile_mode} under FSDP: the sharded blocks' weights are "
                             f"gathered anew every step, a CUDA graph needs them at fixed addresses{fix}")
        if trainer.accumulate_grad_batches > 1:
            raise ValueError(f"module.compile_mode={self.compile_mode} with trainer.accumulate_grad_batches="
                             f"{trainer.accumulate_grad_batches}: the accumulated gradients would alias CUDA-graph "
                             f"outputs that the next micro-batch overwrites{fix}")

    def check_sampler(self, sampler: MaskedARSampler) -> None:
        if not hasattr(sampler, "num_iter"):
            raise ValueError(f"a masked token-AR module samples in steps of masked tokens: use sampler=mar, ear or "
                             f"maskgit (discrete ids), got {type(sampler).__name__}")
        cosine_mask_schedule(self.tokenizer.seq_len, sampler.num_iter)  # num_iter within [1, seq_len]

    def decay_and_head(self) -> tuple[nn.Module, nn.Module]:
        return self.net.backbone, self.net.head

    def sharded_units(self) -> list[nn.Module]:  # a head's loss / sample call its network's forward
        return [m for net in (self.net, self.ema.shadow) for m in (net.backbone, getattr(net.head, "net", net.head))]

    @staticmethod
    def released_num_classes(path: str, allow_pickle: bool = False) -> int:
        return reference_num_classes(path, allow_pickle)

    def load_released(self, path: str, allow_pickle: bool = False) -> None:
        """A MAR/EAR ``.pth``: ``model`` into ``net``, ``model_ema`` into the EMA copy (MAR ``diffloss.*`` or EAR
        ``scoreloss.*`` head keys)."""
        load_reference_mar(path, self.net.backbone, self.net.head, use_ema=False, allow_pickle=allow_pickle)
        load_reference_mar(path, self.ema.shadow.backbone, self.ema.shadow.head, use_ema=True, allow_pickle=allow_pickle)

    # --- training ---------------------------------------------------------------------------------
    def masked_loss(self, tokens: torch.Tensor, labels: torch.Tensor, g: torch.Generator, g_cpu: torch.Generator):
        """The head's loss on the masked rows; ``tokens`` (B, L, D) or ids (B, L) (gathered to (N,) for the head)."""
        backbone, head = self.net.backbone, self.net.head
        b, seq_len = tokens.shape[:2]
        num_masked = self.mask_ratio.num_masked(seq_len, g_cpu)
        order = random_orders(b, seq_len, g, tokens.device)
        drop = torch.rand(b, generator=g, device=tokens.device) < backbone.label_drop_prob
        z = backbone(tokens, labels, order, num_masked, drop)
        masked = order[:, :num_masked]
        return head.loss(gather_rows(tokens, masked), gather_rows(z, masked), generator=g)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        g, g_cpu = self.step_generators(batch_idx)
        tokens = self.tokens_from_batch(batch, g)
        loss = self.masked_loss(tokens, batch["label"], g, g_cpu)
        self.log_loss(loss, getattr(self.net.head, "last_metrics", {}))
        return loss

    # --- sampling ---------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_tokens(self, labels: torch.Tensor, generator: torch.Generator | None = None, use_ema: bool = True,
                        sampler: MaskedARSampler | None = None) -> torch.Tensor:
        net = self.sampling_net(use_ema)
        return (sampler or self.sampler)(net.backbone, net.head, labels, generator)
