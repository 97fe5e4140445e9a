"""DiGIT's stage 2, the pixel decoder (Zhu et al. 2024; reference/digit.md §3): generate the tokens of a pixel
tokenizer (``tokenizer=``: DiGIT's frozen VQGAN, ``vq_small``; or continuous ``patch`` / ``kl16`` with any contgen
head) conditioned on the discriminative tokens of the same image (``module.semantic``: ``tokenizer=digit_kmeans``'s
settings, the K-means ids of stage 1).

Two variants, as DiGIT's: ``module=pixel_decoder_ar`` (:class:`CausalPixelDecoder`, the prefix-LM ``st2vtlm``: the
GPT with a prefix, one token per step with a KV cache, DiGIT samples with top-p 0.8) and
``module=pixel_decoder_maskgit`` (:class:`MaskedPixelDecoder`, ``st2vtlm_nar``: a bidirectional stack over ``[prefix
| EOS | masked tokens]``, MaskGIT's cosine mask count in training and ``sampler=maskgit``, 8 steps, at sampling).
Each is its family's module (causal or masked token AR) with the semantic ids in place of the class: the training
step tokenizes every image twice, online, with both frozen tokenizers (the two 16×16 grids of the same crop are
aligned, as in DiGIT), and the backbone sees the semantic ids where a class-conditioned one sees the class. The
pixel decoder has no class, hence no CFG.

``module.stage1_ckpt`` (a ``module=causal_ar`` checkpoint over the same K-means ids) makes the pair a class-to-pixels
model: ``generate(labels)`` samples the semantic ids with stage 1 (its own sampler and head settings, from its
checkpoint), then the pixel tokens with stage 2, then decodes them — so sample grids, ``evaluate.py`` and
``sample.py`` work on a stage-2 checkpoint. Stage 1 is loaded from its file (checked to model the same ids: the
encoder settings and the centroids' digest), frozen, kept out of stage 2's checkpoints like the tokenizers, and
sampled under stage 2's ``sample_precision``. :meth:`render` decodes given semantic ids (stage 2 alone, e.g. of
real images).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from contgen.modules.causal_ar import CausalARModule
from contgen.modules.token_ar import TokenARModule, built_class
from contgen.samplers.maskgit import MaskGITSampler

# the settings that decide the ids (paths may differ: the centroids themselves are compared by digest)
ID_KEYS = ("encoder", "arch", "layer", "input_size", "image_size", "stage")
STAGE1_HINT = ("set module.stage1_ckpt to a stage-1 checkpoint (train.py module=causal_ar tokenizer=digit_kmeans with "
               "the same centroids)")


def load_stage1(path: str, semantic: nn.Module, semantic_cfg: dict, num_classes: int) -> nn.Module:
    """The stage-1 module of ``path`` on the shared ``semantic`` tokenizer (one copy of the encoder), frozen, after
    checking that it models the same ids and the same classes."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    from contgen.cli.checkpoint_io import load_checkpoint

    ckpt = load_checkpoint(path)
    if "contgen" not in ckpt:
        raise ValueError(f"module.stage1_ckpt={path!r} was not written by contgen's train.py")
    cfg = OmegaConf.create(ckpt["contgen"]["config"])
    cls = get_class(cfg.module._target_)
    if not issubclass(cls, CausalARModule) or issubclass(cls, PixelDecoder):
        raise ValueError(f"module.stage1_ckpt={path!r} holds a {cls.__name__}, not a stage-1 model "
                         "(module=causal_ar over tokenizer=digit_kmeans)")
    stored = OmegaConf.to_container(cfg.tokenizer, resolve=True)
    differ = [f"{k}: stage 1 {stored.get(k)!r} vs module.semantic {semantic_cfg.get(k)!r}"
              for k in ("_target_", *ID_KEYS) if stored.get(k) != semantic_cfg.get(k)]
    digest = ckpt["contgen"].get("tokenizer_digest")
    if digest is not None and digest != semantic.digest():
        differ.append(f"the centroids in {semantic_cfg.get('centroids_path')!r} are not those stage 1 was trained on")
    if differ:
        raise ValueError(f"module.stage1_ckpt={path!r} was trained on other semantic tokens than module.semantic "
                         f"configures ({'; '.join(differ)})")
    if ckpt["contgen"]["num_classes"] != num_classes:
        raise ValueError(f"module.stage1_ckpt={path!r} has {ckpt['contgen']['num_classes']} classes, the data "
                         f"{num_classes}")
    stage1 = cls.from_config(cfg, semantic, num_classes)
    stage1.on_load_checkpoint(ckpt)
    stage1.load_state_dict(ckpt["state_dict"], strict=True)
    return stage1.requires_grad_(False).eval()


class PixelDecoder:
    """What both variants add to their family's module (a mixin, first in the bases)."""

    def setup_stage2(self, semantic: nn.Module, stage1: nn.Module | None) -> None:
        if getattr(semantic, "vocab_size", None) is None:
            raise ValueError(f"module.semantic must be a discrete tokenizer (tokenizer=digit_kmeans's settings), got "
                             f"{type(semantic).__name__}")
        self.semantic, self.stage1 = semantic, stage1

    config_keys = ("semantic", "stage1_ckpt")

    @classmethod
    def from_config(cls, cfg, tokenizer: nn.Module, num_classes: int):
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        given = [k for k in ("prefix_len", "prefix_vocab") if k in cfg.model]
        if given:
            raise ValueError(f"model.{given[0]}: the pixel decoder sets the prefix from module.semantic (its grid and "
                             "K); remove it from the model config")
        semantic_cfg = OmegaConf.to_container(cfg.module.semantic, resolve=True)
        semantic = instantiate(cfg.module.semantic)
        stage1 = None
        if cfg.module.stage1_ckpt:
            stage1 = load_stage1(cfg.module.stage1_ckpt, semantic, semantic_cfg, num_classes)
        backbone = instantiate(cfg.model)
        if not getattr(built_class(backbone), "takes_prefix", False):
            raise ValueError(f"model {cfg.model._target_} takes no prefix of condition ids: the pixel decoder needs "
                             "model=gpt_* (module=pixel_decoder_ar) or model=prefix_ear_* "
                             "(module=pixel_decoder_maskgit)")
        backbone = functools.partial(backbone, prefix_len=semantic.seq_len, prefix_vocab=semantic.vocab_size)
        module = super().from_config(cfg, tokenizer, num_classes, backbone=backbone)
        module.setup_stage2(semantic, stage1)
        return module

    def build_net(self, tokenizer, backbone, head, num_classes: int) -> nn.ModuleDict:
        return super().build_net(tokenizer, backbone, head, 1)  # no class: one start slot (DiGIT's EOS)

    def check_sampler(self, sampler) -> None:
        if getattr(sampler, "cfg", 1.0) != 1.0:
            raise ValueError(f"sampler.cfg={sampler.cfg}: the pixel decoder has no class and no null condition "
                             "(DiGIT samples it without guidance); set sampler.cfg=1")
        super().check_sampler(sampler)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.__dict__.get("_modules", {}).get("stage1") is not None:
            self.stage1.eval()  # frozen: its dropout stays off
        return self

    def require_pixels(self, fix: str) -> None:
        super().require_pixels(fix)
        if self.stage1 is None:
            raise ValueError(f"a pixel decoder alone renders given semantic ids (render); to sample from classes "
                             f"{STAGE1_HINT}, or {fix}")

    # --- training ---------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if "image" not in batch:
            raise ValueError("the pixel decoder tokenizes each image with both tokenizers online: use an image data "
                             "set (data=shapes|digits|imagefolder|webdataset of images), not a token cache")
        g, g_cpu = self.step_generators(batch_idx)
        tokens = self.tokens_from_batch(batch, g)
        with torch.no_grad(), torch.autocast(batch["image"].device.type, enabled=False):
            semantic = self.semantic.encode(batch["image"].float())
        loss = self.masked_loss(tokens, semantic, g, g_cpu)
        self.log_loss(loss, getattr(self.net.head, "last_metrics", {}))
        return loss

    # --- sampling ---------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_tokens(self, labels: torch.Tensor, generator: torch.Generator | None = None, use_ema: bool = True,
                        sampler=None) -> torch.Tensor:
        """Class labels -> semantic ids (stage 1) -> pixel tokens (stage 2)."""
        self.require_pixels("sample with a stage-1 model")
        semantic = self.stage1.generate_tokens(labels, generator)
        return self.render_tokens(semantic, generator, use_ema, sampler)

    @torch.no_grad()
    def render_tokens(self, semantic: torch.Tensor, generator: torch.Generator | None = None, use_ema: bool = True,
                      sampler=None) -> torch.Tensor:
        net = self.sampling_net(use_ema)
        return (sampler or self.sampler)(net.backbone, net.head, semantic, generator)

    @torch.no_grad()
    def render(self, semantic: torch.Tensor, generator: torch.Generator | None = None,
               use_ema: bool = True) -> torch.Tensor:
        """Images in [-1, 1] for given semantic ids (B, P) — e.g. of real images, to score stage 2 alone."""
        return self.decode_images(lambda: self.render_tokens(semantic, generator, use_ema), use_ema)

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {**super().frozen_modules(), "semantic": self.semantic,
                **({"stage1": self.stage1} if self.stage1 is not None else {})}


class CausalPixelDecoder(PixelDecoder, CausalARModule):
    """``module=pixel_decoder_ar``: DiGIT's AR prefix-LM pixel decoder."""


class MaskedPixelDecoder(PixelDecoder, TokenARModule):
    """``module=pixel_decoder_maskgit``: DiGIT's MaskGIT pixel decoder (``module.mask_ratio=cosine``,
    ``sampler=maskgit``; continuous tokens: ``sampler=mar``)."""

    def check_sampler(self, sampler) -> None:
        super().check_sampler(sampler)
        discrete = getattr(self.net.head, "discrete", False)
        if discrete != isinstance(sampler, MaskGITSampler):
            raise ValueError(f"module=pixel_decoder_maskgit over {'ids' if discrete else 'continuous tokens'} samples "
                             f"with sampler={'maskgit' if discrete else 'mar'}, got {type(sampler).__name__}")
