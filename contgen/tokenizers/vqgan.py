"""The MAGE / MaskGIT VQGAN that DiGIT's stage 2 uses, as a frozen discrete tokenizer (``tokenizer=vqgan_maskgit``).

reference/digit.md §3: MAGE's ``vqgan_jax_strongaug.ckpt`` (a PyTorch port of the MaskGIT JAX VQGAN), the taming
``VQModel`` of DiGIT ``fairseq_user/image_generation_stage2/taming/models/vqgan.py`` configured by
``config/vqgan/vqgan.yaml``: ch 128, ch_mult (1,1,2,2,4), 2 res-blocks, z 256-d, codebook 1024, f=16 (16x16 ids at
256 px). The Encoder/Decoder are kl16.py's with ``maskgit=True`` (bias-free convs, average-pool downsampling, no
attention: the yaml's ``attn_resolutions: [16]`` is never read by that code). No ``quant_conv``/``post_quant_conv``:
the state dict is ``encoder.*``, ``decoder.*``, ``quantize.embedding.weight`` and is loaded strictly, as
``VQModel.init_from_ckpt`` does (vqgan.py:36-48; a ``state_dict`` wrapper is unwrapped). The model sees RGB in [0, 1]
with no normalisation (stage2/model.py encodes the ``ToTensor`` images); its output is clipped to [0, 1]
(stage2/generator.py:39-50) and mapped back to [-1, 1] here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from contgen.tokenizers.kl16 import Decoder, Encoder, load_strict
from contgen.tokenizers.vq import VQTokenizer

CKPT_HINT = "MAGE's VQGAN, vqgan_jax_strongaug.ckpt from the MAGE / DiGIT README (DiGIT models/)"


class VQGANTokenizer(VQTokenizer):
    """``ckpt_path`` is required; ``ckpt_path=None`` only with ``random_init=True`` (tests and benchmarks)."""

    def __init__(self, ckpt_path: str | None, image_size: int = 256, ch: int = 128,
                 ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2, z_channels: int = 256,
                 n_embed: int = 1024, random_init: bool = False):
        super().__init__()
        stride = 2 ** (len(ch_mult) - 1)
        if image_size % stride:
            raise ValueError(f"tokenizer.image_size={image_size} must be divisible by the VQGAN stride {stride} "
                             f"(2 ** (len(tokenizer.ch_mult) - 1))")
        self.image_size, self.channels = image_size, 3
        self.grid = (image_size // stride,) * 2
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, (), image_size, z_channels, maskgit=True)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, z_channels, maskgit=True)
        self.init_codebook(n_embed, z_channels)  # VQModel: embed_dim == z_channels (256), no quant_conv
        if ckpt_path is not None:
            load_strict(self, ckpt_path, CKPT_HINT, "the MaskGIT VQGAN config")
        elif not random_init:
            raise ValueError(f"tokenizer.ckpt_path is required ({CKPT_HINT}); random_init=True (random weights) is "
                             "only meant for benchmarks and tests")
        self.freeze()

    def latents(self, img: torch.Tensor) -> torch.Tensor:
        return self.encoder((img + 1) / 2)  # [-1, 1] -> the [0, 1] RGB the VQGAN was trained on

    def pixels(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(z_q).clamp(0, 1) * 2 - 1
