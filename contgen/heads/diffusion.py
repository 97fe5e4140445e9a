"""MAR's per-token diffusion head, "Diffusion Loss" (Li et al. 2024, Sec. 3.3; LTH14/mar models/diffloss.py).

Each row (one token) gets an independent DDPM over its ``token_dim`` channels, conditioned on the
backbone output ``z``. Training: IDDPM's hybrid loss (ε-MSE + learned-range VLB) on a random step.
Sampling: ancestral DDPM over evenly respaced steps with temperature on the injected noise and
classifier-free guidance on ε. All diffusion math is fp32; the network may run under bf16 autocast.
"""

from __future__ import annotations

import torch
from torch import nn

from contgen.heads.gaussian_diffusion import GaussianDiffusion, make_betas, respace_betas, space_timesteps
from contgen.nn import AdaLNMLP, timestep_embedding
from contgen.utils import cuda_graphs


def _mean(x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Plain or weighted mean over rows (MAR's masked mean, diffloss.py:31-32)."""
    return x.mean() if weights is None else (x * weights).sum() / weights.sum()


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the (original) timestep → 2-layer MLP (DiT/MAR ``TimestepEmbedder``)."""

    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim))


class DenoiserMLP(AdaLNMLP):
    """MAR's ``SimpleMLPAdaLN``: x_t drives the residual stream, time_embed(time_scale·t) + cond_embed(z) the adaLN.

    The diffusion head outputs 2·token_dim channels (ε̂ and the variance interpolation v) on integer DDPM steps; the
    transport heads ``out_dim`` = token_dim (one F) on t ∈ [0, 1] scaled by ``time_scale``. Parameter names match
    ``diffloss.net.*`` of MAR checkpoints; a fresh net outputs exactly 0 (zero adaLN and output layers).

    ``level_embed`` (off by default; the shortcut head): a second, separate timestep embedder of the integer step
    level log2(1/d), added to the adaLN condition — Shortcut's DiT has two such embedders, t and ``dt_base`` fed as
    the integer level, unscaled (model.py:261-264, shortcut.md §1 "DiT conditioning"). ``forward`` then takes
    ``level`` (N,). Off, the module, its parameters and its random init are exactly MAR's.
    """

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int, grad_checkpointing: bool = False,
                 out_dim: int | None = None, time_scale: float = 1.0, level_embed: bool = False):
        super().__init__(token_dim, width, depth, out_dim or 2 * token_dim, grad_checkpointing)
        self.time_scale = float(time_scale)
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.level_embed = TimestepEmbedder(width) if level_embed else None
        self.init_weights()

    def init_weights(self) -> None:
        """AdaLNMLP init plus N(0, 0.02) time-MLP weights (diffloss.py:194-215); the level MLP likewise (the
        reference's TimestepEmbedder init N(0, 0.02), model.py:64-67)."""
        super().init_weights()
        for embed in (self.time_embed, self.level_embed):
            if embed is not None:
                nn.init.normal_(embed.mlp[0].weight, std=0.02)
                nn.init.normal_(embed.mlp[2].weight, std=0.02)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor, level: torch.Tensor | None = None
                ) -> torch.Tensor:
        y = self.time_embed(t * self.time_scale) + self.cond_embed(z)
        if (level is None) != (self.level_embed is None):
            raise ValueError("DenoiserMLP: a step level is passed iff the net has level_embed (the shortcut head)")
        if level is not None:
            y = y + self.level_embed(level)
        return self.trunk(self.input_proj(x), y)


class DiffusionHead(nn.Module):
    """Per-token diffusion head following the contgen head contract (``loss`` / ``sample``).

    Defaults are MAR-B's head (6 × 1024, 1000 cosine training steps, 100 sampling steps,
    ``diffusion_batch_mul`` 4). The schedules live in two parameter-free submodules with
    non-persistent buffers, so ``state_dict`` holds only ``net.*``.
    """

    def __init__(self, token_dim: int, cond_dim: int, width: int = 1024, depth: int = 6,
                 num_train_steps: int = 1000, num_sampling_steps: int | str = 100, noise_schedule: str = "cosine",
                 batch_mul: int = 4, grad_checkpointing: bool = False, clip_denoised: float | None = None):
        super().__init__()
        if batch_mul < 1:
            raise ValueError(f"head.batch_mul: must be >= 1, got {batch_mul}")
        self.token_dim = token_dim
        self.batch_mul = batch_mul
        # MAR samples latents unclipped (None). For tokens with a known range — pixel patches in [-1, 1] — clipping
        # the predicted x0 keeps the first steps of the cosine schedule (ᾱ_T ≈ 2e-9, where ε-errors are amplified
        # ~1/√ᾱ) from blowing up before the head has learned ε at t ≈ T precisely.
        self.clip_denoised = clip_denoised
        self.net = DenoiserMLP(token_dim, cond_dim, width, depth, grad_checkpointing)
        betas = make_betas(noise_schedule, num_train_steps)
        self.train_diffusion = GaussianDiffusion(betas)
        kept = space_timesteps(num_train_steps, int(num_sampling_steps))  # MAR passes the string "100"
        self.sample_diffusion = GaussianDiffusion(respace_betas(betas, kept), kept)
        self.last_metrics: dict[str, torch.Tensor] = {}
        self._graphs = cuda_graphs.GraphCache()

    def loss(self, target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Hybrid loss of rows ``target`` (N, D) given ``z`` (N, C); masked mean with row weights ``mask`` (N,).

        Rows are tiled ``batch_mul`` times, each copy with its own t and ε (mar.py:232-238); t is drawn
        before ε as in diffloss.py:27.
        """
        if target.ndim != 2 or target.shape[1] != self.token_dim or z.shape[0] != target.shape[0]:
            raise ValueError(f"head.loss: expected target (N, {self.token_dim}) and z (N, C), "
                             f"got {tuple(target.shape)} and {tuple(z.shape)}")
        x0 = target.float().repeat(self.batch_mul, 1)
        z = z.repeat(self.batch_mul, 1)
        t = torch.randint(0, self.train_diffusion.num_steps, (x0.shape[0],), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
        x_t = self.train_diffusion.q_sample(x0, t, noise)
        out = self.net(x_t, t, z).float()
        mse, vb = self.train_diffusion.loss_terms(out, x0, x_t, t, noise)

        weights = None if mask is None else mask.float().repeat(self.batch_mul)
        self.last_metrics = {"mse": _mean(mse.detach(), weights), "vb": _mean(vb.detach(), weights)}
        return _mean(mse + vb, weights)

    @torch.no_grad()
    def sample(self, z: torch.Tensor, temperature: float = 1.0, cfg: float | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Ancestral DDPM sampling of one token per condition row (p_sample_loop, gaussian_diffusion.py:376-517).

        ``temperature`` scales only the injected noise, x ← μ + τ·σ·ε, none at the last step; the initial
        noise is unscaled. With ``cfg``, ``z`` = [z_cond; z_uncond] (2N rows): every step runs the net on
        [x; x], guides ε = ε_u + cfg·(ε_c − ε_u) and keeps the cond half's variance. MAR carries both halves
        but its ``forward_with_cfg`` reads only the first half of x and ``sample_tokens`` returns only that
        half (diffloss.py:240-248, mar.py:320-322), so tracking the N cond rows alone gives the same samples.

        All the noise (x_T, then one draw per step but the last) is drawn first, in that order, so the loop is a
        pure function of it: on a GPU under ``module.cuda_graphs`` it replays as one CUDA graph per row count
        (``contgen/utils/cuda_graphs.py``), with the same draws as the eager loop.
        """
        rows = z.shape[0]
        n = rows if cfg is None else rows // 2
        if cfg is not None and rows % 2:
            raise ValueError(f"head.sample: with cfg, z must be [z_cond; z_uncond] with an even row count, got {rows}")
        steps = self.sample_diffusion.num_steps
        noise = torch.stack([torch.randn((n, self.token_dim), generator=generator, device=z.device,
                                         dtype=torch.float32) for _ in range(steps)])
        if not cuda_graphs.active(z):
            return self._denoise(noise, z, temperature, cfg)
        if cfg is None:
            return self._graphs.run(self._denoise, (noise, z, temperature), ("unguided",), self)
        return self._graphs.run(self._denoise, (noise, z, temperature, cfg), ("guided",), self)

    def _denoise(self, noise: torch.Tensor, z: torch.Tensor, temperature: float | torch.Tensor,
                 cfg: float | torch.Tensor | None = None) -> torch.Tensor:
        """The loop from x_T = noise[0], injecting noise[k] after step k (numbers, or 0-d tensors in a graph)."""
        diffusion, rows, n = self.sample_diffusion, z.shape[0], noise.shape[1]
        x = noise[0]
        for k, i in enumerate(reversed(range(diffusion.num_steps))):
            t = diffusion.timesteps[i].expand(rows)
            out = self.net(x if cfg is None else torch.cat([x, x]), t, z).float()
            eps, v = out.chunk(2, dim=-1)
            if cfg is not None:
                eps_c, eps_u = eps.chunk(2)
                eps, v = eps_u + cfg * (eps_c - eps_u), v[:n]
            x, log_var = diffusion.p_mean_variance(eps, v, x, i, self.clip_denoised)
            if i > 0:
                x = x + temperature * torch.exp(0.5 * log_var) * noise[k + 1]
        return x
