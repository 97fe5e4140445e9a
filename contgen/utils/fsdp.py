"""FSDP for contgen modules: transformer blocks are the shard units, the trained net and its EMA copy are sharded
alike, and the frozen tokenizer stays whole on every rank.

``ShardedStrategy`` is Lightning's ``FSDPStrategy`` (bf16 mixed precision from ``trainer.precision``, full state dict
checkpoints that load on any device count and in sample.py / evaluate.py on one device) with contgen's wrap policy:

* every transformer block (``BLOCKS``) is a unit, and so is every module the family calls through ``forward``
  (``GenerativeModule.sharded_units``: the backbone and the head's network, or the denoiser), in the trained net and
  its EMA copy alike; FSDP gathers a unit's parameters only around its forward. The EMA update is shard-local
  (``torch._foreach_lerp_`` over each rank's pieces): that needs each shadow parameter's local piece to match its
  trained twin's, which holds because the two are wrapped by the same rule into units of their own (had they shared
  one unit, one flat parameter would hold both and split them at different offsets). The full state dict gathers
  the EMA weights at save.
* the frozen modules (``GenerativeModule.frozen_modules``: the tokenizer; DiGIT's stage 2 also its semantic tokenizer
  and stage-1 model) are ignored modules: used outside the sharded forward, never gathered.
* ``activation_checkpointing: true`` recomputes each block in the backward pass.
"""

from __future__ import annotations

from functools import partial

from hydra.utils import get_class
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

BLOCKS = ("contgen.nn.transformer.Block", "contgen.backbones.dit.DiTBlock", "contgen.backbones.tit.TiTBlock")


def _unit(units: tuple[nn.Module, ...], blocks: tuple[type, ...], module: nn.Module) -> bool:
    return isinstance(module, blocks) or any(module is u for u in units)


def check_shardable(model: nn.Module) -> None:
    """A causal GPT samples through its KV-cache decode, which reads the backbone's embeddings outside any forward:
    FSDP would hand it unsharded-by-then parameters only inside a forward, so such a model is refused."""
    if getattr(model, "causal", False):
        raise ValueError(f"strategy=fsdp: {type(model).__name__} samples one token per step with a KV cache outside "
                         "the sharded forward, which FSDP does not gather; train it with strategy=ddp")


class ShardedStrategy(FSDPStrategy):
    def __init__(self, activation_checkpointing: bool = False, **kwargs):
        self.blocks = tuple(get_class(b) for b in BLOCKS)
        super().__init__(activation_checkpointing_policy=set(self.blocks) if activation_checkpointing else None,
                         **kwargs)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp.wrap import CustomPolicy

        check_shardable(model)

        self.kwargs["auto_wrap_policy"] = CustomPolicy(partial(_unit, tuple(model.sharded_units()), self.blocks))
        frozen = model.frozen_modules().values() if hasattr(model, "frozen_modules") else ()
        if frozen:
            self.kwargs["ignored_modules"] = [m.to(self.root_device) for m in frozen]
        return super()._setup_model(model)
