"""``TransportModule``: the transport family (UCGM, flow matching, Shortcut) — a denoiser over the whole latent image,
an objective and a solver (DESIGN.md "transport family").

Tokens from the tokenizer (B, L, D) on its (h, w) grid are the latent image (B, D, h, w): the SD-VAE's 4-channel
latents, or pixels with ``tokenizer=patch tokenizer.patch_size=1``. A training step draws its randomness from the
per-step generators of the base module and hands (denoiser, x, labels, teacher) to the objective; sampling draws the
initial noise from the caller's generator and runs the solver on the EMA denoiser.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from contgen.modules.base import GenerativeModule
from contgen.tokenizers.base import patchify, unpatchify
from contgen.utils import cuda_graphs


class TransportModule(GenerativeModule):
    def __init__(self, tokenizer: nn.Module, denoiser: Callable[..., nn.Module], objective, sampler, num_classes: int,
                 optim: dict, seed: int = 0, compile: bool = False, sample_precision: str = "auto",
                 init_ckpt: str | None = None, config: dict | None = None, cuda_graphs: bool = True):
        super().__init__(tokenizer, num_classes, optim, seed, sample_precision, config, cuda_graphs)
        h, w = tokenizer.grid
        if h != w:
            raise ValueError(f"the transport family needs a square token grid, the tokenizer gives {tokenizer.grid}")
        self.net = nn.ModuleDict({"denoiser": denoiser(input_size=h, in_channels=tokenizer.token_dim,
                                                       num_classes=num_classes)})
        self.setup_training()
        self.init_ckpt = init_ckpt
        transports = {"objective": objective.transport.name, "sampler": sampler.transport.name}
        if len(set(transports.values())) > 1:
            raise ValueError(f"objective.transport and sampler.transport differ ({transports}): a denoiser is sampled "
                             "with the transport it was trained with")
        self.objective, self.sampler = objective, sampler
        # the objective's stop-gradient model (ucgm.md §1.5), None unless the enhanced target reads one; in the
        # state dict, so an exact resume continues its EMA
        self.teacher = objective.build_teacher(self.net.denoiser, ema=self.ema.shadow.denoiser)
        if compile:  # each copy on its own: a deep copy of a compiled module would run the original's weights
            teacher = [self.teacher.net] if self.teacher is not None and self.teacher.net is not None else []
            for net in (self.net.denoiser, self.ema.shadow.denoiser, *teacher):
                net.compile()

    @classmethod
    def from_config(cls, cfg, tokenizer: nn.Module, num_classes: int) -> "TransportModule":
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        if cfg.get("objective") is None:
            raise ValueError("module=transport needs a training objective: set objective= (ucgm, flow)")
        if cfg.get("loss") is not None:
            raise ValueError("loss= picks a per-token head of the token-AR family; the transport family trains with "
                             "objective= (drop loss=..., or pick module=token_ar)")
        knobs = OmegaConf.to_container(cfg.module, resolve=True)
        knobs.pop("_target_")
        return cls(tokenizer=tokenizer, denoiser=instantiate(cfg.model), objective=instantiate(cfg.objective),
                   sampler=instantiate(cfg.sampler), num_classes=num_classes,
                   optim=OmegaConf.to_container(cfg.optim, resolve=True), seed=cfg.seed,
                   config=OmegaConf.to_container(cfg, resolve=True), **knobs)

    def decay_and_head(self) -> tuple[nn.Module, None]:
        return self.net.denoiser, None

    def sharded_units(self) -> list[nn.Module]:  # the teacher's own copy too: its EMA update is shard-local as well
        teacher = [self.teacher.net] if self.teacher is not None and self.teacher.net is not None else []
        return [self.net.denoiser, self.ema.shadow.denoiser, *teacher]

    def setup(self, stage: str) -> None:
        """The objective binds the batch layout (Shortcut's levels over the global batch). ``module.init_ckpt`` is read
        when fitting starts, not when the module is built, so that sample.py and
        evaluate.py (which rebuild the module from its own checkpoint) never need the file; Lightning restores a
        resumed run's own weights after this hook, over the init."""
        trainer = self._trainer  # None when a test calls setup() on a module without a Trainer
        if stage == "fit" and trainer is not None and trainer.datamodule is not None:
            # the batch layout over the devices, refused here (before any compute) if it cannot work
            self.objective.setup(trainer.datamodule.batch_size, trainer.world_size, trainer.global_rank)
        if stage == "fit" and self.init_ckpt is not None:
            self.load_init(self.init_ckpt)
            if self.teacher is not None and self.objective.teacher_checkpoint is None:
                self.teacher.copy_from(self.net.denoiser)  # a frozen teacher is a copy of these initial weights

    @staticmethod
    def released_num_classes(path: str, allow_pickle: bool = False) -> int:
        """Rows of the label table minus the null class (DiT/SiT/TiT ``LabelEmbedder``, as contgen's denoisers)."""
        from contgen.utils.denoiser_ckpt import read_denoiser_state

        state, _ = read_denoiser_state(path, use_ema=False, allow_pickle=allow_pickle)
        table = state.get("y_embedder.embedding_table.weight")
        if table is None:
            raise ValueError(f"ckpt: {path} has no 'y_embedder.embedding_table.weight' (the label table of a DiT / SiT / "
                             "TiT), so its class count cannot be read; reference=<experiment> of the transport family "
                             "expects a released denoiser .pt")
        return int(table.shape[0]) - 1

    def load_released(self, path: str, allow_pickle: bool = False) -> None:
        self.load_init(path, allow_pickle)
        if self.teacher is not None and self.objective.teacher_checkpoint is None:
            self.teacher.copy_from(self.net.denoiser)

    def load_init(self, path: str, allow_pickle: bool = False) -> None:
        """``module.init_ckpt``: the weights and EMA of a previous stage, with a fresh optimizer and counters — the
        reference's ``train.ckpt`` with ``no_reopt``/``no_reuni`` (main.py:140-152). A contgen ``.ckpt`` gives its
        ``net`` and ``ema`` denoisers; a released file its ``model`` and ``ema`` entries, or one bare state dict for both
        (REPA's SiT, facebookresearch DiT), or a Shortcut Flax checkpoint's ``params`` / ``params_ema``, strictly checked
        by ``load_denoiser``."""
        from contgen.utils.denoiser_ckpt import check_denoiser_state, load_denoiser
        from contgen.utils.flax_ckpt import is_shortcut_checkpoint

        if not os.path.exists(path):  # a directory is a Shortcut (Flax) checkpoint saved on a local path
            raise FileNotFoundError(f"module.init_ckpt: no file at {path}")
        ckpt = None  # a Shortcut (Flax) pickle is not a torch file: load_denoiser converts it
        if not is_shortcut_checkpoint(path):
            try:  # memory-mapped: only the entries used are read
                ckpt = torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=True)
            except RuntimeError:  # a legacy (non-zip) file cannot be mapped
                ckpt = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
        if isinstance(ckpt, dict) and "contgen" in ckpt:
            for prefix, net in (("net.denoiser.", self.net.denoiser), ("ema.shadow.denoiser.", self.ema.shadow.denoiser)):
                state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
                check_denoiser_state(path, net, state)
                net.load_state_dict(state)
        else:
            load_denoiser(path, self.net.denoiser, use_ema=False, allow_pickle=allow_pickle)
            load_denoiser(path, self.ema.shadow.denoiser, use_ema=True, allow_pickle=allow_pickle)

    def latents(self, tokens: torch.Tensor) -> torch.Tensor:
        return unpatchify(tokens, 1, self.tokenizer.grid)

    # --- training ---------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        g, _ = self.step_generators(batch_idx)
        x = self.latents(self.tokens_from_batch(batch, g))
        if self.teacher is not None:  # the reference updates its teacher at the start of a step (unigen.py:241-244)
            self.teacher.update(self.net.denoiser)
        # an objective's no-grad passes of fixed shape (Shortcut's half steps) may replay as CUDA graphs; not under
        # FSDP, whose sharded forward gathers weights with collectives a graph cannot hold
        trainer = self._trainer
        graphs = self.cuda_graphs and not (trainer is not None and isinstance(trainer.strategy, FSDPStrategy))
        with cuda_graphs.enabled(graphs):
            loss, logs = self.objective.loss(self.net.denoiser, x, batch["label"], generator=g, teacher=self.teacher)
        logs.pop("loss", None)
        self.log_loss(loss, logs)
        return loss

    # --- sampling ---------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_tokens(self, labels: torch.Tensor, generator: torch.Generator | None = None, use_ema: bool = True,
                        sampler=None) -> torch.Tensor:
        h, w = self.tokenizer.grid
        noise = torch.randn((len(labels), self.tokenizer.token_dim, h, w), generator=generator, device=self.device)
        x = (sampler or self.sampler)(self.sampling_net(use_ema).denoiser, noise, labels, generator)
        return patchify(x.to(noise.dtype), 1)
