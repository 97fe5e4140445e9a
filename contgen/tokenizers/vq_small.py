"""A small VQ tokenizer that contgen trains itself on the built-in data (``tokenizer=vq_small``; ``train_vq.py``).

A conv encoder (``levels`` stride-2 4x4 convs, f = 2**levels) to ``dim``-d latents, a codebook of ``vocab_size``
codes, and the mirrored transposed-conv decoder. Trained (``train_vq.py``) with the straight-through estimator and
VQ-VAE's loss, codebook term + β=0.25 commitment (van den Oord et al. 2017, eq. 3; ``vq.vq_loss``): the codebook is
learned by its loss term, not by EMA updates, and is initialised from encoder outputs of the first batch so that
no code starts out of reach of the data. The checkpoint stores its architecture; a mismatch is named per key.
"""

from __future__ import annotations

import pickle

import torch
import torch.nn.functional as F
from torch import nn

from contgen.tokenizers.kl16 import load_strict
from contgen.tokenizers.vq import VQTokenizer, nearest_code, vq_loss

CKPT_HINT = "a vq_small checkpoint written by `python train_vq.py data=... out=DIR` (DIR/vq_small.pt)"
ARCH_KEYS = ("ch", "levels", "dim", "vocab_size")


class VQSmallTokenizer(VQTokenizer):
    """``ckpt_path`` is required; ``ckpt_path=None`` only with ``random_init=True`` (what ``train_vq.py`` trains)."""

    def __init__(self, ckpt_path: str | None, image_size: int = 16, ch: int = 32, levels: int = 2, dim: int = 8,
                 vocab_size: int = 128, random_init: bool = False):
        super().__init__()
        if levels < 1 or image_size % 2**levels:
            raise ValueError(f"tokenizer.image_size={image_size} must be divisible by 2**tokenizer.levels "
                             f"(levels={levels} >= 1)")
        self.image_size, self.channels = image_size, 3
        self.grid = (image_size // 2**levels,) * 2
        self.arch = {"ch": ch, "levels": levels, "dim": dim, "vocab_size": vocab_size}
        down = [nn.Conv2d(3, ch, 3, padding=1)]
        up = [nn.Conv2d(dim, ch, 3, padding=1)]
        for _ in range(levels):
            down += [nn.SiLU(), nn.Conv2d(ch, ch, 4, stride=2, padding=1)]
            up += [nn.SiLU(), nn.ConvTranspose2d(ch, ch, 4, stride=2, padding=1)]
        self.encoder = nn.Sequential(*down, nn.SiLU(), nn.Conv2d(ch, dim, 1))
        self.decoder = nn.Sequential(*up, nn.SiLU(), nn.Conv2d(ch, 3, 3, padding=1))
        self.init_codebook(vocab_size, dim)
        if ckpt_path is not None:
            self.load_checkpoint(ckpt_path)
        elif not random_init:
            raise ValueError(f"tokenizer.ckpt_path is required ({CKPT_HINT}); random_init=True is for train_vq.py "
                             "and tests")
        self.freeze()

    def load_checkpoint(self, path: str) -> None:
        try:  # the architecture first: a wrong size is named by its config key
            saved = torch.load(path, map_location="cpu", weights_only=True)["arch"]
        except (OSError, pickle.UnpicklingError, RuntimeError, KeyError, TypeError):
            saved = {}  # load_strict names what is wrong with the file
        wrong = [f"tokenizer.{k}={self.arch[k]} but the file has {saved[k]}" for k in ARCH_KEYS
                 if k in saved and saved[k] != self.arch[k]]
        if wrong:
            raise ValueError(f"tokenizer.ckpt_path={path!r}: " + "; ".join(wrong))
        load_strict(self, path, CKPT_HINT, "the vq_small config")

    def checkpoint(self) -> dict:
        return {"state_dict": self.state_dict(), "arch": dict(self.arch, image_size=self.image_size)}

    def latents(self, img: torch.Tensor) -> torch.Tensor:
        return self.encoder(img)

    def pixels(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(z_q).clamp(-1, 1)

    # --- training (train_vq.py): the module is unfrozen there -----------------------------------------------
    @torch.no_grad()
    def init_codes_from(self, img: torch.Tensor, generator: torch.Generator) -> None:
        """Codebook rows := random encoder outputs of ``img`` (with replacement when there are fewer than codes)."""
        z = self.moments(img).reshape(-1, self.token_dim)
        pick = torch.randint(len(z), (self.vocab_size,), generator=generator, device=z.device)
        self.quantize.embedding.weight.copy_(z[pick])

    def training_loss(self, img: torch.Tensor, beta: float = 0.25) -> tuple[torch.Tensor, dict]:
        """MSE reconstruction + VQ loss, gradients to the encoder through the straight-through estimator."""
        self.check_images(img)
        z = self.latents(img)
        zt = z.permute(0, 2, 3, 1)
        ids = nearest_code(zt, self.quantize.embedding.weight)
        z_q = self.quantize.embedding(ids)
        vq = vq_loss(zt, z_q, beta)
        z_st = (zt + (z_q - zt).detach()).permute(0, 3, 1, 2)  # straight-through: d out / d z = d out / d z_q
        rec = F.mse_loss(self.decoder(z_st), img)
        return rec + vq, {"rec": rec.detach(), "vq": vq.detach(), "ids": ids.detach()}
