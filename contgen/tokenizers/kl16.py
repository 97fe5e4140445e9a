"""MAR's KL-16 VAE (the LDM ``AutoencoderKL``) as a frozen tokenizer.

Architecture: Rombach et al. 2022 (LDM) ``ldm/modules/diffusionmodules/model.py`` Encoder/Decoder, configured as
MAR's ``models/vae.py`` does (reference/mar.md §4): ch 128, ch_mult (1,1,2,2,4), 2 res-blocks per level,
attention in the encoder at feature resolution 16 plus the mid block, no attention in the decoder's up path
("decoder is without attention", LTH14/mar issue #3), double_z, 1x1 ``quant_conv``/``post_quant_conv``.
Parameter names follow that code so MAR's ``kl16.ckpt`` loads strictly. Latents are scaled by 0.2325
(``engine_mar.py:64-65``: unit std). The Encoder/Decoder also build the SD-VAE (``sdvae.py``; ``groups`` is
diffusers' ``norm_num_groups``, 32 in every released LDM VAE) and, with ``maskgit=True``, MAGE's port of
the MaskGIT VQGAN (``vqgan.py``).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from contgen.tokenizers.base import Tokenizer, patchify, unpatchify

CKPT_HINT = "MAR's KL-16 VAE, kl16.ckpt from the LTH14/mar README"


def _norm(c: int, groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(groups, c, eps=1e-6)


class ResnetBlock(nn.Module):
    """GN-swish-conv x2 with a 1x1 ``nin_shortcut`` when the width changes (no time embedding, dropout 0).

    ``maskgit``: the MaskGIT JAX ResBlock as MAGE's taming port has it (DiGIT
    ``image_generation_stage2/taming/modules/diffusionmodules/model.py:78-141``): bias-free convs, and the 1x1
    shortcut maps the block's output ``h`` (cout -> cout), not its input, so the block returns ``nin(h) + h``.
    """

    def __init__(self, cin: int, cout: int, groups: int = 32, maskgit: bool = False):
        super().__init__()
        self.maskgit = maskgit
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=not maskgit)
        self.norm2 = _norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=not maskgit)
        if cin == cout:
            self.nin_shortcut = nn.Identity()
        else:
            self.nin_shortcut = nn.Conv2d(cout, cout, 1, bias=False) if maskgit else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.maskgit and not isinstance(self.nin_shortcut, nn.Identity):
            return self.nin_shortcut(h) + h
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv q/k/v/proj_out (LDM ``AttnBlock``), via SDPA."""

    def __init__(self, c: int, groups: int = 32):
        super().__init__()
        self.norm = _norm(c, groups)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q, k, v = (m(h).reshape(b, 1, c, hh * ww).transpose(-1, -2) for m in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # scale c**-0.5, as LDM
        return x + self.proj_out(h.transpose(-1, -2).reshape(b, c, hh, ww))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after an asymmetric (0,1,0,1) zero pad, as LDM (keeps checkpoints bit-compatible)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(c: int, groups: int = 32, maskgit: bool = False) -> nn.Module:
    """Res-attn-res (LDM); MaskGIT's mid block has no attention (taming/modules/diffusionmodules/model.py:185-193)."""
    mid = nn.Module()
    mid.block_1 = ResnetBlock(c, c, groups, maskgit)
    if not maskgit:
        mid.attn_1 = AttnBlock(c, groups)
    mid.block_2 = ResnetBlock(c, c, groups, maskgit)
    return mid


def _run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    h = mid.block_1(h)
    if hasattr(mid, "attn_1"):
        h = mid.attn_1(h)
    return mid.block_2(h)


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


class Encoder(nn.Module):
    """Image -> 2*z_channels moments map at stride 2**(len(ch_mult)-1).

    ``groups``: GroupNorm groups (32 in LDM, MAR and the SD-VAE; ``norm_num_groups`` in diffusers).
    ``maskgit``: the MaskGIT VQGAN encoder as MAGE ported it (model.py:144-228): bias-free ``conv_in``, MaskGIT
    res-blocks, 2x2 average-pool downsampling (``resamp_with_conv=False``: no parameters), no attention anywhere
    (the code never reads ``attn_resolutions``), a 1x1 ``conv_out`` to ``z_channels`` (``double_z=False``).
    """

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, attn_resolutions: Sequence[int],
                 resolution: int, z_channels: int, in_channels: int = 3, groups: int = 32, maskgit: bool = False):
        super().__init__()
        if maskgit and attn_resolutions:
            raise ValueError("the MaskGIT encoder has no attention: attn_resolutions must be empty")
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1, bias=not maskgit)
        self.down = nn.ModuleList()
        cin, res = ch, resolution
        for i, mult in enumerate(ch_mult):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(cin, ch * mult, groups, maskgit))
                cin = ch * mult
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(cin, groups))
            if i != len(ch_mult) - 1:
                level.downsample = nn.AvgPool2d(2) if maskgit else Downsample(cin)
                res //= 2
            self.down.append(level)
        self.mid = _mid(cin, groups, maskgit)
        self.norm_out = _norm(cin, groups)
        self.conv_out = (nn.Conv2d(cin, z_channels, 1) if maskgit else nn.Conv2d(cin, 2 * z_channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z map -> image; ``num_res_blocks + 1`` blocks per level, no attention outside the mid block.

    ``up`` is indexed by level (``up.0`` = full resolution) and run from the coarsest level down, as LDM.
    ``maskgit``: MAGE's port of the MaskGIT decoder (model.py:231-324): ``num_res_blocks`` MaskGIT res-blocks per
    level, no attention in the mid block either.
    """

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, out_ch: int = 3,
                 groups: int = 32, maskgit: bool = False):
        super().__init__()
        cin = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, cin, 3, padding=1)
        self.mid = _mid(cin, groups, maskgit)
        up = []
        for i in reversed(range(len(ch_mult))):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks if maskgit else num_res_blocks + 1):
                level.block.append(ResnetBlock(cin, ch * ch_mult[i], groups, maskgit))
                cin = ch * ch_mult[i]
            if i != 0:
                level.upsample = Upsample(cin)
            up.insert(0, level)
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(cin, groups)
        self.conv_out = nn.Conv2d(cin, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def load_strict(module: nn.Module, path: str, hint: str, what: str, drop_prefix: str | None = None) -> None:
    """Strict load of a state dict file (optionally under ``model`` / ``state_dict``) into ``module``; every missing,
    unexpected or misshapen key is named with the file and ``tokenizer.ckpt_path`` (``hint``: what the file is)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer.ckpt_path: file not found: {path!r} (expected {hint})")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"tokenizer.ckpt_path={path!r}: not loadable with weights_only=True (expected {hint}): {e}"
        ) from e
    for key in ("model", "state_dict"):
        if isinstance(sd, Mapping) and isinstance(sd.get(key), Mapping):
            sd = sd[key]
            break
    if not isinstance(sd, Mapping):
        raise ValueError(f"tokenizer.ckpt_path={path!r}: expected a state dict, got {type(sd).__name__}")
    if drop_prefix:
        sd = {k: v for k, v in sd.items() if not k.startswith(drop_prefix)}
    own = module.state_dict()
    problems = [f"missing {k}" for k in sorted(own.keys() - sd.keys())]
    problems += [f"unexpected {k}" for k in sorted(sd.keys() - own.keys())]
    problems += [
        f"shape {k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in sd and tuple(getattr(sd[k], "shape", ())) != tuple(v.shape)
    ]
    if problems:
        more = f" (+{len(problems) - 10} more)" if len(problems) > 10 else ""
        raise ValueError(
            f"tokenizer.ckpt_path={path!r} does not match {what} ({len(problems)} problems{more}; "
            f"expected {hint}): " + "; ".join(problems[:10])
        )
    module.load_state_dict(sd, strict=True)


class KLTokenizer(Tokenizer):
    """LDM/MAR KL-VAE tokenizer. Tokens are ``patch_size`` x ``patch_size`` patches of the scaled latent.

    ``ckpt_path`` is required; ``ckpt_path=None`` is allowed only with ``random_init=True``, which keeps the
    random initialisation and is meant for benchmarks and tests only (the tokens are meaningless).
    """

    def __init__(self, ckpt_path: str | None, embed_dim: int = 16, ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 ch: int = 128, num_res_blocks: int = 2, attn_resolutions_enc: Sequence[int] = (16,),
                 image_size: int = 256, scale_factor: float = 0.2325, patch_size: int = 1,
                 random_init: bool = False):
        super().__init__()
        self.stride = 2 ** (len(ch_mult) - 1)
        if image_size % (self.stride * patch_size):
            raise ValueError(
                f"tokenizer.image_size={image_size} must be divisible by the VAE stride {self.stride} times "
                f"tokenizer.patch_size={patch_size}"
            )
        self.image_size = image_size
        self.channels = 3
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.scale_factor = float(scale_factor)
        self.grid = (image_size // self.stride // patch_size,) * 2
        self.token_dim = embed_dim * patch_size**2
        self.moment_dim = 2 * self.token_dim

        self.encoder = Encoder(ch, ch_mult, num_res_blocks, tuple(attn_resolutions_enc), image_size, embed_dim)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, embed_dim)
        self.quant_conv = nn.Conv2d(2 * embed_dim, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, embed_dim, 1)

        if ckpt_path is not None:
            self.load_checkpoint(ckpt_path)
        elif not random_init:
            raise ValueError(
                f"tokenizer.ckpt_path is required ({CKPT_HINT}); random_init=True (random weights) is only "
                "meant for benchmarks and tests"
            )
        self.freeze()

    def load_checkpoint(self, path: str) -> None:
        """Strict load of an LDM/MAR state dict; ``loss.*`` (LDM's discriminator/LPIPS) is ignored."""
        load_strict(self, path, CKPT_HINT, "the KL-VAE config", drop_prefix="loss.")

    def moments(self, img: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, L, 2D) = [mean | logvar] tokens, fp32; logvar clamped to [-30, 20] (LDM)."""
        self.check_images(img)
        h = self.encoder(img)
        with torch.autocast(device_type=h.device.type, enabled=False):  # posterior parameters in fp32
            mean, logvar = self.quant_conv(h.float()).chunk(2, dim=1)
        p = self.patch_size
        return torch.cat([patchify(mean, p), patchify(logvar.clamp(-30.0, 20.0), p)], dim=-1)

    def sample(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(mean + exp(logvar/2) * eps) * scale_factor in fp32; accepts raw (unclamped) cached moments."""
        mean, logvar = moments.float().chunk(2, dim=-1)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
        return (mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps) * self.scale_factor

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        z = unpatchify(tokens / self.scale_factor, self.patch_size, self.grid)
        return self.decoder(self.post_quant_conv(z))
