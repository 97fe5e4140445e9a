"""DINOv2 ViT with 4 registers (B/14, L/14) as DiGIT's frozen feature encoder (reference/digit.md §1).

Architecture as DiGIT builds it: ``vit_base(14, 4, block_chunks=0, init_values=1)`` / ``vit_large(...)``
(``fairseq_user/pretrained_enc/models_pretrained_enc.py:82-90``) of its vendored DINOv2 ``vits.py``: patch
embedding 14, CLS token, 4 register tokens inserted after CLS *without* positional embedding, a learned position
table for a 37x37 grid (1 + 1369 rows, ``vits.py:580``) interpolated bicubically to the input grid, pre-norm blocks
with LayerScale (init 1), LayerNorm eps 1e-6 everywhere. Parameter names are DINOv2's own, so the released
``dinov2_vit{b,l}14_reg4_pretrain.pth`` loads strictly.

Features (``stage1/model.py:120-128``, ``vits.py:738-785``): images in [0, 1] are normalised with the ImageNet
mean/std and resized 256 -> 224 by ``F.interpolate(scale_factor=224/256, mode='bicubic')`` (align_corners False,
no antialias); the patched ``get_intermediate_layers(x, 3)`` stops at the first block of ``range(depth-3, depth)``,
i.e. it returns the output of block ``depth-3`` only (index 9 of 12 for B, 21 of 24 for L), which goes through
the final LayerNorm; CLS and register tokens are dropped. Later blocks are never run.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from contgen.encoders.base import FeatureEncoder
from contgen.nn.transformer import Attention, Mlp

# vits.py:826-851 (ViT-B/L at patch 14 as DiGIT calls them); the weights are Meta's LVD-142M release.
ARCHS = {
    "vitb14_reg4": dict(embed_dim=768, depth=12, num_heads=12),
    "vitl14_reg4": dict(embed_dim=1024, depth=24, num_heads=16),
}
FILES = {name: f"dinov2_{name}_pretrain.pth" for name in ARCHS}
URL = "https://dl.fbaipublicfiles.com/dinov2/{base}/{file}"  # dinov2 hub/backbones.py _make_dinov2_model
PATCH, REGISTERS, POS_GRID = 14, 4, 37  # POS_GRID: pretraining resolution 518 / 14 (1370 = 1 + 37^2 rows)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 1.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """x + ls1(attn(norm1(x))); x + ls2(mlp(norm2(x))) (``vits.py:322-347`` in eval; no drop path)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=True)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, PATCH, stride=PATCH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoViT(nn.Module):
    """The DINOv2-reg4 network; ``block_output(x, i)`` is the normalised patch tokens after block ``i``."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, interpolate_antialias: bool = False,
                 interpolate_offset: float = 0.1):
        super().__init__()
        self.interpolate_antialias, self.interpolate_offset = interpolate_antialias, interpolate_offset
        self.patch_embed = PatchEmbed(embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + POS_GRID**2, embed_dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, REGISTERS, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # iBOT masking in pretraining; part of the file
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def interpolate_pos_encoding(self, h: int, w: int) -> torch.Tensor:
        """Position table for an (h, w) patch grid (``vits.py:649-677``): bicubic from 37x37 in fp32 with DiGIT's
        scale factor (grid + 0.1) / 37. dinov2's hub reg4 models use antialias=True and offset 0 (an output size)."""
        pos = self.pos_embed.float()
        if (h, w) == (POS_GRID, POS_GRID):
            return pos
        grid = pos[:, 1:].reshape(1, POS_GRID, POS_GRID, -1).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            off = self.interpolate_offset
            size = {"scale_factor": ((h + off) / POS_GRID, (w + off) / POS_GRID)}
        else:
            size = {"size": (h, w)}
        grid = F.interpolate(grid, mode="bicubic", antialias=self.interpolate_antialias, **size)
        if tuple(grid.shape[-2:]) != (h, w):
            raise ValueError(f"DINOv2 position interpolation gave {tuple(grid.shape[-2:])}, wanted {(h, w)}")
        return torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)

    def block_output(self, x: torch.Tensor, block: int) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> final-LayerNorm'd patch tokens after block index ``block``."""
        b, _, h, w = x.shape
        if h % PATCH or w % PATCH:
            raise ValueError(f"DINOv2: input {h}x{w} is not a multiple of the patch size {PATCH}")
        x = torch.cat([self.cls_token.expand(b, -1, -1), self.patch_embed(x)], dim=1)
        x = x + self.interpolate_pos_encoding(h // PATCH, w // PATCH).to(x.dtype)
        x = torch.cat([x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]], dim=1)
        for blk in self.blocks[: block + 1]:
            x = blk(x)
        return self.norm(x)[:, 1 + REGISTERS:]


class DINOv2Encoder(FeatureEncoder):
    """DiGIT's DINOv2-reg4 features: (B, 3, image_size, image_size) in [-1, 1] -> (B, 16*16, D) at 224 input.

    ``arch``: ``vitb14_reg4`` (D 768) or ``vitl14_reg4`` (D 1024), or a dict of ``embed_dim``, ``depth``,
    ``num_heads`` for other sizes. ``ckpt_path``: the state dict in DINOv2's layout (``FILES[arch]``), loaded
    with a strict key and shape check; ``None`` only with ``random_init=True`` (tests, benchmarks: the features
    are meaningless). ``layer``: DiGIT's ``layer`` (config/stage1/dino_base.yaml:60), counted from the end: the
    output of block ``depth - layer`` alone. ``input_size``: what the ViT sees after the bicubic resize.
    ``interpolate_antialias``/``interpolate_offset``: the position-table resize, DiGIT's (vits.py:536-537 defaults);
    ``True``/``0.0`` give dinov2's hub reg4 models. ``config_key`` names the option holding ``ckpt_path`` in errors.
    """

    def __init__(self, ckpt_path: str | None, arch: str | Mapping = "vitb14_reg4", layer: int = 3,
                 image_size: int = 256, input_size: int = 224, interpolate_antialias: bool = False,
                 interpolate_offset: float = 0.1, random_init: bool = False,
                 config_key: str = "tokenizer.encoder.ckpt_path"):
        super().__init__()
        if isinstance(arch, str):
            if arch not in ARCHS:
                raise ValueError(f"encoder.arch={arch!r}: unknown DINOv2 architecture; choose from {sorted(ARCHS)} "
                                 "or give a dict of embed_dim, depth, num_heads")
            self.arch, dims = arch, ARCHS[arch]
        else:
            self.arch, dims = None, dict(arch)
            if sorted(dims) != ["depth", "embed_dim", "num_heads"]:
                raise ValueError(f"encoder.arch: a dict needs exactly embed_dim, depth, num_heads; got {sorted(dims)}")
        if not 1 <= layer <= dims["depth"]:
            raise ValueError(f"encoder.layer={layer} must lie in 1..depth={dims['depth']} (counted from the end)")
        if input_size % PATCH or math.floor(image_size * (input_size / image_size)) != input_size:
            raise ValueError(f"encoder.input_size={input_size} must be a multiple of {PATCH} reachable from "
                             f"image_size={image_size} by scale_factor input_size/image_size")
        self.config_key = config_key
        if ckpt_path is None and not random_init:
            raise ValueError(f"{config_key} is required ({self._hint()}); random_init=True (random weights) is "
                             "only meant for tests and benchmarks")
        if ckpt_path is not None and not os.path.isfile(ckpt_path):
            raise FileNotFoundError(f"{config_key}: file not found: {ckpt_path!r} (expected {self._hint()})")
        self.image_size, self.input_size, self.layer = image_size, input_size, layer
        self.block = dims["depth"] - layer  # vits.py:742-747: the first (only) block of range(depth-layer, depth)
        self.feature_dim = dims["embed_dim"]
        self.grid = (input_size // PATCH,) * 2
        self.vit = DinoViT(**dims, interpolate_antialias=interpolate_antialias, interpolate_offset=interpolate_offset)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if ckpt_path is not None:
            self._load(ckpt_path)
        self.freeze()

    def _hint(self) -> str:
        if self.arch is None:
            return "a DINOv2-reg4 state dict of the configured size"
        base = self.arch.removesuffix("_reg4")
        return f"{FILES[self.arch]}, Meta's DINOv2 release: {URL.format(base=f'dinov2_{base}', file=FILES[self.arch])}"

    def _load(self, path: str) -> None:
        """Strict load of a DINOv2 state dict (names and shapes), listing every problem."""
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(f"{self.config_key}={path!r}: not loadable with weights_only=True "
                             f"(expected {self._hint()}): {e}") from e
        if not isinstance(sd, Mapping):
            raise ValueError(f"{self.config_key}={path!r}: expected a state dict, got {type(sd).__name__}")
        own = self.vit.state_dict()
        problems = [f"missing {k}" for k in sorted(own.keys() - sd.keys())]
        problems += [f"unexpected {k}" for k in sorted(sd.keys() - own.keys())]
        problems += [f"shape {k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
                     for k, v in own.items() if k in sd and tuple(getattr(sd[k], "shape", ())) != tuple(v.shape)]
        if problems:
            more = f" (+{len(problems) - 10} more)" if len(problems) > 10 else ""
            raise ValueError(f"{self.config_key}={path!r} does not match DINOv2 {self.arch or 'arch'} "
                             f"({len(problems)} problems{more}; expected {self._hint()}): " + "; ".join(problems[:10]))
        self.vit.load_state_dict(sd, strict=True)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        self.check_images(img)
        x = ((img + 1) / 2 - self.mean.to(img.dtype)) / self.std.to(img.dtype)  # [-1,1] -> [0,1] -> ImageNet norm
        if self.input_size != self.image_size:  # stage1/model.py:125-126 (scale factor, not size, as there)
            x = F.interpolate(x, scale_factor=self.input_size / self.image_size, mode="bicubic")
        return self.vit.block_output(x, self.block)
