"""The Stable Diffusion VAE (f8c4, latents x 0.18215) as a frozen tokenizer, read from a local diffusers folder.

The SD-VAE is the LDM ``AutoencoderKL`` of ``kl16.py`` with another configuration: ch 128, ch_mult (1, 2, 4, 4),
2 res-blocks per level (3 in the decoder), z 4, attention only in the mid blocks of encoder and decoder,
GroupNorm(32, eps 1e-6), 1x1 ``quant_conv``/``post_quant_conv`` -- so the Encoder/Decoder of ``kl16.py`` are
reused and the diffusers weights are renamed to their LDM names on load (:func:`diffusers_names`). The
differences of the diffusers layout that matter for loading:

* ``down_blocks.i.resnets.j`` / ``downsamplers.0`` = LDM ``down.i.block.j`` / ``downsample``; ``up_blocks`` run
  from the coarsest level, so ``up_blocks.j`` = LDM ``up.(L-1-j)``; ``mid_block.resnets.0/1`` = ``mid.block_1/2``;
  ``conv_shortcut`` (1x1) = ``nin_shortcut``; ``conv_norm_out`` = ``norm_out``.
* The mid attention uses ``nn.Linear`` q/k/v/out (weights (C, C)) where LDM uses 1x1 convs (C, C, 1, 1): same
  numbers, reshaped. One head (diffusers passes ``attention_head_dim=block_out_channels[-1]``), softmax scale
  C**-0.5, residual -- as LDM. Older exports (diffusers < 0.14, e.g. the SD 2.x ``vae/`` folders) name these
  ``query``/``key``/``value``/``proj_attn``; both spellings load.
* Posterior: ``DiagonalGaussianDistribution`` clamps the log-variance to [-30, 20], as LDM.

UCGM (reference) encodes with diffusers' ``AutoencoderKL`` and keeps the posterior **mean**, unscaled
(UCGM autoencs/sdvae.py:81-95 ``latent_dist.mean``); its data set then applies
``((z - latent_mean) / latent_std) * latent_multiplier`` (utilities/dataset.py:94-96) with ``latent_norm: False``
and ``latent_multiplier: 0.18215`` for every SD-VAE config (configs/*/in1k256_tit_xl_sdvae.yaml:9-10), and sampling
inverts it as ``(x * latent_std) / latent_multiplier + latent_mean`` (eval.py:231) before ``vae.decode``. This
tokenizer does the same: ``posterior="mean"``, ``scale_factor`` = latent_multiplier, ``latent_stats`` = the
optional latent_norm statistics (off by default for the SD-VAE, as the reference).

Tokens are ``patch_size`` x ``patch_size`` patches of the latent (patch 1: one token per latent pixel, D = 4);
a transport module unpatchifies them back to (B, 4, H/8, W/8).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import sys
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from contgen.tokenizers.base import Tokenizer, patchify, unpatchify
from contgen.tokenizers.kl16 import Decoder, Encoder

VARIANTS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
POSTERIORS = ("mean", "sample")
SD_SCALING_FACTOR = 0.18215  # diffusers' AutoencoderKL default; the 2022 SD-VAE config.json files omit the key

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _hint(variant: str) -> str:
    repo = VARIANTS[variant]
    return (f"a local diffusers-format folder of the SD-VAE (config.json + diffusion_pytorch_model.safetensors), "
            f"e.g. https://huggingface.co/{repo} fetched with `hf download {repo} --local-dir DIR`")


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Minimal reader of the safetensors format (8-byte little-endian header length, JSON header with dtype,
    shape and ``data_offsets`` relative to the end of the header, then the raw little-endian bytes), so loading
    needs no extra dependency."""
    if sys.byteorder != "little":
        raise RuntimeError("read_safetensors: big-endian hosts are not supported")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
        except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ValueError(f"{path}: not a safetensors file ({e})") from e
        data = bytearray(size - 8 - n)
        f.readinto(data)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        if end > len(data):
            raise ValueError(f"{path}: tensor {name} ends at byte {end}, past the end of the file (truncated?)")
        out[name] = (torch.frombuffer(data[begin:end], dtype=dtype) if end > begin
                     else torch.empty(0, dtype=dtype)).reshape(info["shape"])
    return out


_ATTN = {"norm": ("group_norm",), "q": ("to_q", "query"), "k": ("to_k", "key"), "v": ("to_v", "value"),
         "proj_out": ("to_out.0", "proj_attn")}


def diffusers_names(key: str, levels: int) -> tuple[str, ...]:
    """A contgen (LDM) parameter name -> its name(s) in a diffusers ``AutoencoderKL`` state dict, current
    spelling first (then the pre-0.14 attention names). ``levels`` = len(block_out_channels)."""
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        return (key,)  # quant_conv.*, post_quant_conv.*
    rest = rest.replace(".nin_shortcut.", ".conv_shortcut.")
    if m := re.fullmatch(r"mid\.attn_1\.(\w+)\.(weight|bias)", rest):
        return tuple(f"{side}.mid_block.attentions.0.{n}.{m[2]}" for n in _ATTN[m[1]])
    rules = (
        (r"down\.(\d+)\.block\.(\d+)\.", lambda m: f"down_blocks.{m[1]}.resnets.{m[2]}."),
        (r"down\.(\d+)\.downsample\.", lambda m: f"down_blocks.{m[1]}.downsamplers.0."),
        (r"up\.(\d+)\.block\.(\d+)\.", lambda m: f"up_blocks.{levels - 1 - int(m[1])}.resnets.{m[2]}."),
        (r"up\.(\d+)\.upsample\.", lambda m: f"up_blocks.{levels - 1 - int(m[1])}.upsamplers.0."),
        (r"mid\.block_([12])\.", lambda m: f"mid_block.resnets.{int(m[1]) - 1}."),
        (r"norm_out\.", lambda m: "conv_norm_out."),
    )
    for pattern, repl in rules:
        rest, hit = re.subn("^" + pattern, repl, rest)
        if hit:
            break
    return (f"{side}.{rest}",)


class SDVAETokenizer(Tokenizer):
    """Frozen SD-VAE. ``ckpt_path``: a local diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``,
    or ``.bin``) -- its config.json must describe the architecture given here (defaults: the SD-VAE) and its
    weights must match it key for key.

    ``scale_factor``: the latent multiplier (reference ``latent_multiplier``, 0.18215); ``None`` takes the file's
    ``scaling_factor``. Without ``latent_stats`` it must equal the file's ``scaling_factor`` (the value that
    gives the SD latents about unit variance); with them it is applied after the normalisation and is free.
    ``posterior``: ``"mean"`` (reference: ``latent_dist.mean``) or ``"sample"`` (one draw per call).
    ``latent_stats``: a file with per-channel ``{"mean", "std"}`` tensors (the reference ``latent_norm`` cache
    ``buffers/vaes/stat/<vae>_<res>.pt`` loads as is; see :func:`compute_latent_stats`); ``None`` = off.
    ``random_init=True`` skips the weights (benchmarks and tests only: the tokens are meaningless); a given
    ``ckpt_path`` still has its config.json checked.
    """

    def __init__(self, ckpt_path: str | None, variant: str = "ema", image_size: int = 256,
                 block_out_channels: Sequence[int] = (128, 256, 512, 512), layers_per_block: int = 2,
                 latent_channels: int = 4, norm_num_groups: int = 32, scale_factor: float | None = SD_SCALING_FACTOR,
                 posterior: str = "mean", latent_stats: str | None = None, patch_size: int = 1,
                 random_init: bool = False):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"tokenizer.variant={variant!r}: expected one of {sorted(VARIANTS)}")
        if posterior not in POSTERIORS:
            raise ValueError(f"tokenizer.posterior={posterior!r}: expected one of {POSTERIORS}")
        chans = [int(c) for c in block_out_channels]
        if not chans or any(c % chans[0] for c in chans):
            raise ValueError(f"tokenizer.block_out_channels={chans}: every width must be a multiple of the first "
                             "(LDM builds them as ch * ch_mult)")
        self.variant, self.posterior, self.patch_size = variant, posterior, patch_size
        self.arch = {"block_out_channels": chans, "layers_per_block": int(layers_per_block),
                     "latent_channels": int(latent_channels), "norm_num_groups": int(norm_num_groups)}
        self.stride = 2 ** (len(chans) - 1)
        if patch_size < 1 or image_size % (self.stride * patch_size):
            raise ValueError(f"tokenizer.image_size={image_size} must be divisible by the VAE stride {self.stride} "
                             f"times tokenizer.patch_size={patch_size}")
        self.image_size, self.channels = image_size, 3
        self.grid = (image_size // self.stride // patch_size,) * 2
        self.token_dim = latent_channels * patch_size**2
        self.moment_dim = 2 * self.token_dim

        if ckpt_path is None and not random_init:
            raise ValueError(f"tokenizer.ckpt_path is required ({_hint(variant)}); random_init=True (random weights) is "
                             "only meant for benchmarks and tests")
        file_scale = SD_SCALING_FACTOR if ckpt_path is None else self._check_config(ckpt_path)
        self.scale_factor = float(file_scale if scale_factor is None else scale_factor)
        if latent_stats is None and not math.isclose(self.scale_factor, file_scale, rel_tol=1e-6):
            raise ValueError(
                f"tokenizer.scale_factor={self.scale_factor} differs from the VAE's scaling_factor={file_scale} "
                f"(config.json of tokenizer.ckpt_path={ckpt_path!r}); without tokenizer.latent_stats the latents would not "
                "have the scale the VAE was released with -- set tokenizer.scale_factor=null to use the file's")

        ch, mult = chans[0], [c // chans[0] for c in chans]
        groups = self.arch["norm_num_groups"]
        self.encoder = Encoder(ch, mult, layers_per_block, (), image_size, latent_channels, groups=groups)
        self.decoder = Decoder(ch, mult, layers_per_block, latent_channels, groups=groups)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)

        mean, std = torch.zeros(latent_channels), torch.ones(latent_channels)
        if latent_stats is not None:
            mean, std = load_latent_stats(latent_stats, latent_channels)
        # Per-token-feature layout (channel-major inside a token, as patchify); not in the state dict (the
        # weights are the VAE's only), rebuilt from tokenizer.latent_stats.
        self.register_buffer("latent_mean", mean.repeat_interleave(patch_size**2), persistent=False)
        self.register_buffer("latent_std", std.repeat_interleave(patch_size**2), persistent=False)
        self.latent_stats = latent_stats

        if ckpt_path is not None and not random_init:
            self.load_weights(ckpt_path)
        self.freeze()

    # ------------------------------------------------------------------ loading

    def _check_config(self, path: str) -> float:
        """Read ``path/config.json``, refuse any architecture mismatch, return its scaling_factor."""
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            sub = " (it has a vae/ subfolder: point tokenizer.ckpt_path at that)" if os.path.isfile(
                os.path.join(path, "vae", "config.json")) else ""
            raise FileNotFoundError(f"tokenizer.ckpt_path: no config.json in {path!r}{sub}; expected {_hint(self.variant)}")
        with open(cfg_path) as f:
            cfg = json.load(f)
        levels = len(self.arch["block_out_channels"])
        # diffusers AutoencoderKL.__init__ defaults for keys an older config.json leaves out
        want = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "act_fn": "silu",
                "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
                "mid_block_add_attention": True, "use_quant_conv": True, "use_post_quant_conv": True,
                "shift_factor": None, **self.arch}
        default = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "act_fn": "silu",
                   "mid_block_add_attention": True, "use_quant_conv": True, "use_post_quant_conv": True,
                   "shift_factor": None, "norm_num_groups": 32, "latent_channels": 4, "layers_per_block": 1,
                   "down_block_types": ["DownEncoderBlock2D"], "up_block_types": ["UpDecoderBlock2D"],
                   "block_out_channels": [64]}
        problems = []
        for key, value in want.items():
            got = cfg.get(key, default[key])
            got = list(got) if isinstance(got, (list, tuple)) else got
            if got != value:
                name = f"tokenizer.{key}" if key in self.arch else "expected"
                problems.append(f"{key}: config.json has {got!r}, {name} {value!r}")
        if problems:
            raise ValueError(f"tokenizer.ckpt_path={path!r}: config.json does not describe the SD-VAE architecture this "
                             "tokenizer is configured for (an LDM AutoencoderKL with the tokenizer.* widths): "
                             + "; ".join(problems))
        return float(cfg.get("scaling_factor", SD_SCALING_FACTOR))

    def load_weights(self, path: str) -> None:
        """Strict load of a diffusers AutoencoderKL state dict, renamed to the LDM names (:func:`diffusers_names`)."""
        files = [os.path.join(path, n) for n in WEIGHT_FILES if os.path.isfile(os.path.join(path, n))]
        if not files:
            raise FileNotFoundError(f"tokenizer.ckpt_path: no {' or '.join(WEIGHT_FILES)} in {path!r}; expected "
                                    f"{_hint(self.variant)}")
        if files[0].endswith(".safetensors"):
            sd = read_safetensors(files[0])
        else:
            try:
                sd = torch.load(files[0], map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                raise ValueError(f"tokenizer.ckpt_path: {files[0]} is not loadable with weights_only=True: {e}") from e
        levels = len(self.arch["block_out_channels"])
        own, new, used, problems = self.state_dict(), {}, set(), []
        for key, ref in own.items():
            names = diffusers_names(key, levels)
            found = [n for n in names if n in sd]
            if len(found) != 1:
                problems.append(f"missing {names[0]}" if not found else f"both {found} present")
                continue
            t = sd[found[0]]
            used.add(found[0])
            if t.ndim == 2 and ref.ndim == 4 and tuple(t.shape) + (1, 1) == tuple(ref.shape):
                t = t[:, :, None, None]  # diffusers Linear (C, C) -> LDM 1x1 conv (C, C, 1, 1)
            if tuple(t.shape) != tuple(ref.shape):
                problems.append(f"shape {found[0]}: file {tuple(t.shape)} vs model {tuple(ref.shape)}")
            new[key] = t
        problems += [f"unexpected {k}" for k in sorted(sd.keys() - used)]
        if problems:
            more = f" (+{len(problems) - 10} more)" if len(problems) > 10 else ""
            raise ValueError(f"tokenizer.ckpt_path: {files[0]} does not match the SD-VAE architecture ({len(problems)} "
                             f"problems{more}; expected {_hint(self.variant)}): " + "; ".join(problems[:10]))
        self.load_state_dict(new, strict=True)

    # ------------------------------------------------------------------ tokenizer interface

    def latent_moments(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) in [-1, 1] -> unscaled posterior (mean, logvar), each (B, z, H/8, W/8) fp32, logvar clamped
        to [-30, 20] (diffusers DiagonalGaussianDistribution, as LDM)."""
        self.check_images(img)
        h = self.encoder(img)
        with torch.autocast(device_type=h.device.type, enabled=False):  # posterior parameters in fp32
            mean, logvar = self.quant_conv(h.float()).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def moments(self, img: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, L, 2D) = [mean | logvar] tokens (unscaled, unnormalised), fp32."""
        mean, logvar = self.latent_moments(img)
        p = self.patch_size
        return torch.cat([patchify(mean, p), patchify(logvar, p)], dim=-1)

    def sample(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Tokens ``((z - latent_mean) / latent_std) * scale_factor`` (UCGM utilities/dataset.py:94-96), with z the
        posterior mean (``posterior="mean"``, the reference; ``generator`` unused) or one draw from it."""
        mean, logvar = moments.float().chunk(2, dim=-1)
        z = mean
        if self.posterior == "sample":
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
            z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps
        return ((z - self.latent_mean) / self.latent_std) * self.scale_factor

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens -> images in about [-1, 1] (unclipped): ``z = tokens * latent_std / scale_factor + latent_mean``
        (UCGM eval.py:231), then post_quant_conv and the decoder."""
        z = tokens * self.latent_std / self.scale_factor + self.latent_mean
        return self.decoder(self.post_quant_conv(unpatchify(z, self.patch_size, self.grid)))


def load_latent_stats(path: str, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std), each (channels,) fp32, from a ``{"mean", "std"}`` file (any shape with
    ``channels`` elements, e.g. the reference's (1, C, 1, 1))."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer.latent_stats: file not found: {path!r} (write one with "
                                "contgen.tokenizers.sdvae.compute_latent_stats, or set tokenizer.latent_stats=null)")
    try:
        stats = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"tokenizer.latent_stats={path!r}: not loadable with weights_only=True: {e}") from e
    if not isinstance(stats, Mapping) or not all(isinstance(stats.get(k), torch.Tensor) for k in ("mean", "std")):
        raise ValueError(f"tokenizer.latent_stats={path!r}: expected a dict with tensors 'mean' and 'std'")
    mean, std = (stats[k].detach().float().flatten() for k in ("mean", "std"))
    if mean.numel() != channels or std.numel() != channels:
        raise ValueError(f"tokenizer.latent_stats={path!r}: mean/std have {mean.numel()}/{std.numel()} elements, "
                         f"the VAE has {channels} latent channels")
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
        raise ValueError(f"tokenizer.latent_stats={path!r}: mean must be finite and std finite and > 0")
    return mean, std


@torch.no_grad()
def compute_latent_stats(tokenizer: SDVAETokenizer, batches: Iterable, num_images: int = 10_000
                         ) -> dict[str, torch.Tensor]:
    """Per-channel mean and (unbiased) std of the unscaled posterior means of the first ``num_images`` images of
    ``batches`` (tensors (B, 3, H, W) in [-1, 1], or dicts with an ``"image"`` entry; shuffle them yourself).

    As the reference's ``compute_latent_stats`` (UCGM utilities/dataset.py:61-79: 10K random cached latents,
    ``mean``/``std`` over dims [0, 2, 3]); returned in its format ({"mean", "std"} of shape (1, C, 1, 1)), so
    ``torch.save`` it and point ``tokenizer.latent_stats`` at the file. Sums are accumulated in float64.
    """
    n, s1, s2 = 0, 0.0, 0.0
    device = tokenizer.quant_conv.weight.device
    for batch in batches:
        img = batch["image"] if isinstance(batch, Mapping) else batch
        img = img[: num_images - n].to(device)
        if not len(img):
            break
        mean, _ = tokenizer.latent_moments(img.float())
        m = mean.double()
        s1, s2 = s1 + m.sum(dim=(0, 2, 3)), s2 + (m * m).sum(dim=(0, 2, 3))
        n += len(img)
        if n >= num_images:
            break
    if n == 0:
        raise ValueError("compute_latent_stats: no images")
    count = n * tokenizer.grid[0] * tokenizer.grid[1] * tokenizer.patch_size**2
    mu = s1 / count
    var = (s2 - count * mu * mu) / max(count - 1, 1)
    shape = (1, -1, 1, 1)
    return {"mean": mu.float().reshape(shape).cpu(), "std": var.clamp_min(0).sqrt().float().reshape(shape).cpu()}
