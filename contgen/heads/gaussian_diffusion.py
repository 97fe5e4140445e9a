"""Discrete-time Gaussian diffusion for MAR's per-token head.

DDPM (Ho et al. 2020) with IDDPM's cosine schedule, learned-range variance and hybrid loss (Nichol &
Dhariwal 2021, Sec. 3.1-3.2), as used by MAR through its copy of DiT's ``diffusion/`` package
(LTH14/mar ``diffusion/gaussian_diffusion.py``, ``respace.py``, ``diffusion_utils.py``).

Differences from the reference are about speed only: every schedule array is computed once in float64
on the host and kept as a float32 device buffer, indexed by a per-row timestep tensor (training) or a
python step index (sampling), so nothing is copied host → device per step (the reference's
``_extract_into_tensor`` copies a numpy array for every lookup, gaussian_diffusion.py:865-877).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def make_betas(schedule: str, num_steps: int) -> torch.Tensor:
    """float64 betas of a named schedule (gaussian_diffusion.py:116-141).

    cosine: ᾱ(s) = cos²((s + 0.008)/1.008 · π/2), β_i = min(1 − ᾱ((i+1)/T)/ᾱ(i/T), 0.999) (IDDPM eq. 17).
    linear: DDPM's 1e-4 … 0.02, scaled by 1000/T so that any T gives a similar process.
    """
    if num_steps < 1:
        raise ValueError(f"head.num_train_steps: must be >= 1, got {num_steps}")
    if schedule == "cosine":
        s = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        alpha_bar = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    if schedule == "linear":
        scale = 1000 / num_steps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)
    raise ValueError(f"head.noise_schedule: unknown schedule {schedule!r} (expected 'cosine' or 'linear')")


def space_timesteps(num_steps: int, count: int) -> list[int]:
    """``count`` evenly spaced steps of ``range(num_steps)``, first and last included.

    IDDPM/DiT ``space_timesteps`` with the single section ``str(count)`` (respace.py:12-62): the fractional
    position is *accumulated* (``cur += stride``), then python-``round``ed (banker's rounding). Accumulating
    differs from ``round(k * stride)`` in the last float bit, which moves one kept step for 278 of the 1000
    counts (e.g. 21, 23, 31), so the reference's order of operations is kept.
    """
    if not 1 <= count <= num_steps:
        raise ValueError(f"head.num_sampling_steps: must be in [1, num_train_steps={num_steps}], got {count}")
    stride = 1.0 if count == 1 else (num_steps - 1) / (count - 1)
    kept, cur = [], 0.0
    for _ in range(count):
        kept.append(round(cur))
        cur += stride
    return sorted(set(kept))


def respace_betas(betas: torch.Tensor, kept: Sequence[int]) -> torch.Tensor:
    """Betas of the process that visits only ``kept``: 1 − ᾱ_k/ᾱ_prev keeps ᾱ there (respace.py SpacedDiffusion)."""
    alpha_bar = torch.cumprod(1 - betas, dim=0)[list(kept)]
    prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    return 1 - alpha_bar / prev


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of Φ that IDDPM uses (diffusion_utils.py); kept for parity of the t=0 term."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Elementwise log-probability of the bin [x − 1/255, x + 1/255] under N(means, e^{2·log_scales}).

    Reference quirk, kept: the bins and the open-ended edge bins at |x| > 0.999 assume 8-bit images in
    [-1, 1] (IDDPM's decoder L_0); MAR and DiT apply it unchanged to latents (diffusion_utils.py:47-73).
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class GaussianDiffusion(nn.Module):
    """The schedule-dependent coefficients of one DDPM process, as non-persistent float32 buffers.

    ``timesteps[i]`` is the original (training) timestep that step ``i`` of this process stands for:
    the identity for the training process, the kept steps for a respaced sampling process (the network
    is always fed original timesteps, respace.py:124-127). ``t`` arguments are either a long tensor of
    per-row step indices or a python int (one step for all rows): ``buffer[t]`` never syncs.
    All arithmetic is fp32; callers pass fp32 tensors.
    """

    def __init__(self, betas: torch.Tensor, timesteps: Sequence[int] | None = None):
        super().__init__()
        betas = betas.double()
        self.num_steps = len(betas)
        alpha_bar = torch.cumprod(1 - betas, dim=0)
        alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
        posterior_var = betas * (1 - alpha_bar_prev) / (1 - alpha_bar)
        # log β̃ is -inf at step 0; IDDPM replaces it by the value at step 1 (GaussianDiffusion.__init__).
        clipped = torch.cat([posterior_var[1:2], posterior_var[1:]]) if self.num_steps > 1 else posterior_var
        arrays = {
            "sqrt_alpha_bar": alpha_bar.sqrt(),
            "sqrt_one_minus_alpha_bar": (1 - alpha_bar).sqrt(),
            "sqrt_recip_alpha_bar": (1 / alpha_bar).sqrt(),
            "sqrt_recipm1_alpha_bar": (1 / alpha_bar - 1).sqrt(),
            "posterior_mean_coef1": betas * alpha_bar_prev.sqrt() / (1 - alpha_bar),
            "posterior_mean_coef2": (1 - alpha_bar_prev) * (1 - betas).sqrt() / (1 - alpha_bar),
            "posterior_log_var_clipped": clipped.log(),
            "log_betas": betas.log(),
        }
        for name, value in arrays.items():
            self.register_buffer(name, value.float(), persistent=False)
        steps = range(self.num_steps) if timesteps is None else timesteps
        self.register_buffer("timesteps", torch.tensor(list(steps), dtype=torch.long), persistent=False)

    @staticmethod
    def _at(buffer: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """Coefficient(s) at ``t`` shaped to broadcast against (rows, channels)."""
        return buffer[t].unsqueeze(-1)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε."""
        return self._at(self.sqrt_alpha_bar, t) * x0 + self._at(self.sqrt_one_minus_alpha_bar, t) * noise

    def q_posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """Mean of q(x_{t-1} | x_t, x0) (DDPM eq. 7)."""
        return self._at(self.posterior_mean_coef1, t) * x0 + self._at(self.posterior_mean_coef2, t) * x_t

    def p_mean_variance(self, eps: torch.Tensor, v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int,
                        clip_x0: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of p(x_{t-1} | x_t) from ε̂ and the variance output v ∈ [-1, 1].

        Learned range (IDDPM eq. 15): log σ² = f·log β_t + (1−f)·log β̃_t, f = (v+1)/2. No x0 clipping
        (MAR samples with clip_denoised=False); ``clip_x0`` clamps the predicted x0 to [−clip_x0, clip_x0], ADM's
        clip_denoised, for tokens with a known range (pixels).
        """
        frac = (v + 1) / 2
        log_var = frac * self._at(self.log_betas, t) + (1 - frac) * self._at(self.posterior_log_var_clipped, t)
        x0 = self._at(self.sqrt_recip_alpha_bar, t) * x_t - self._at(self.sqrt_recipm1_alpha_bar, t) * eps
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        return self.q_posterior_mean(x0, x_t, t), log_var

    def loss_terms(self, out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                   noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row (mse, vb) of IDDPM's hybrid loss for net output ``out`` = [ε̂ | v] (fp32).

        mse = mean_c (ε − ε̂)². vb = KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) in bits, mean over channels,
        or the discretized NLL of x0 at t = 0; its mean uses a detached ε̂ so vb trains only the variance
        (IDDPM Sec. 3.1, ``frozen_out`` in gaussian_diffusion.py:760-767). Weight 1 on vb = LossType.MSE.
        """
        eps, v = out.chunk(2, dim=-1)
        mse = ((noise - eps) ** 2).mean(dim=-1)
        mean, log_var = self.p_mean_variance(eps.detach(), v, x_t, t)
        true_mean = self.q_posterior_mean(x0, x_t, t)
        kl = normal_kl(true_mean, self._at(self.posterior_log_var_clipped, t), mean, log_var).mean(dim=-1)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean(dim=-1)
        vb = torch.where(t == 0, nll, kl) / math.log(2.0)
        return mse, vb
