"""EAR's energy-score head: a one-pass noise-driven MLP generator trained with the energy score.

Shao, Meng, Zhou 2025, "Continuous Visual Autoregressive Generation via Score Maximization" (ICML),
reference ``shaochenze/EAR`` ``models/scoreloss.py``. For a predictive distribution P and a target y the
energy score ES(P, y) = E||X - y||^a - 1/2 E||X - X'||^a is strictly proper for a in (0, 2); at a = 2 it
only pins the mean of P. The head samples X = net(z, u) with u ~ U[-1/2, 1/2]^noise_channels and minimises
an unbiased estimate of 2 * ES, with the repulsive term weighted by ``train_temperature``.
"""

from __future__ import annotations

import torch
from torch import nn

from contgen.nn import AdaLNMLP

# Added to ||.||^2 before the sqrt. At a < 1 the gradient of d^a is infinite at d = 0, and times the zero
# gradient of the norm there it gives NaN when two samples coincide (they do: every sample is 0 at init).
# With 1e-20 it stays finite, and in fp32 it is below half an ulp of any squared distance above ~1e-12,
# so the value of every non-degenerate pair is bit-identical to the plain norm.
_SQ_EPS = 1e-20


def _dist_pow(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """||a - b||_2^alpha over the last (token-channel) axis."""
    return ((a - b).square().sum(-1) + _SQ_EPS).sqrt().pow(alpha)


def energy_score_terms(samples: torch.Tensor, target: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row attraction mean_i ||x_i - y||^a and repulsion mean_{i<j} ||x_i - x_j||^a, in fp32.

    ``samples`` is (m, N, D) with m >= 2 independent draws per row, ``target`` is (N, D).
    """
    samples, target = samples.float(), target.float()
    m = samples.shape[0]
    attraction = _dist_pow(samples, target, alpha).mean(0)
    i, j = torch.triu_indices(m, m, offset=1, device=samples.device)
    repulsion = _dist_pow(samples[i], samples[j], alpha).mean(0)
    return attraction, repulsion


def energy_score_loss(
    samples: torch.Tensor, target: torch.Tensor, alpha: float = 1.0, temperature: float = 1.0
) -> torch.Tensor:
    """Per-row m-sample all-pairs estimator ``2 mean_i ||x_i-y||^a - T mean_{i<j} ||x_i-x_j||^a``.

    Unbiased for 2 ES(P, y) at T = 1 (ear.md §5, rec. 1). At m = 2 it is exactly EAR's
    ``||s1-y||^a + ||s2-y||^a - T ||s1-s2||^a`` (scoreloss.py:35-43); larger m uses all m(m-1)/2 pair
    distances instead of the reference's m/2 independent pairs, so its variance is lower at equal cost.
    """
    attraction, repulsion = energy_score_terms(samples, target, alpha)
    return 2 * attraction - temperature * repulsion


class GeneratorMLP(AdaLNMLP):
    """EAR's ``SimpleMLPAdaLN`` (scoreloss.py:52-175): the condition is the residual stream, noise drives AdaLN.

    Parameter names match the reference's ``scoreloss.net.*``; a fresh network outputs exactly 0.
    """

    def __init__(
        self, cond_dim: int, width: int, depth: int, token_dim: int, noise_channels: int = 64,
        grad_checkpointing: bool = False,
    ):
        super().__init__(cond_dim, width, depth, token_dim, grad_checkpointing=grad_checkpointing)
        self.noise_embed = nn.Linear(noise_channels, width)
        self.init_weights()

    def forward(self, z: torch.Tensor, noise: torch.Tensor, infer_temperature: float = 1.0) -> torch.Tensor:
        """``infer_temperature`` scales each ResBlock's AdaLN shift in eval mode only (scoreloss.py:80-83)."""
        shift_scale = 1.0 if self.training else infer_temperature
        return self.trunk(self.input_proj(z), self.noise_embed(noise), shift_scale)


class EnergyHead(nn.Module):
    """Per-token energy-score head (the head contract of :mod:`contgen.heads`: ``loss`` / ``sample``).

    Each of the N rows is repeated ``score_batch_mul`` times (EAR ``score_batch_mul``) and gets
    ``num_samples`` generator draws; the defaults (2, 2) reproduce the reference's cost and noise layout.
    """

    def __init__(
        self,
        token_dim: int,
        cond_dim: int,
        width: int = 1024,
        depth: int = 6,
        noise_channels: int = 64,
        alpha: float = 1.0,
        train_temperature: float = 1.0,
        score_batch_mul: int = 2,
        num_samples: int = 2,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if not 0.0 < alpha <= 2.0:
            raise ValueError(f"head.alpha: must be in (0, 2] (proper on (0, 2); 2 learns only the mean), got {alpha}")
        if num_samples < 2:
            raise ValueError(f"head.num_samples: the repulsion term needs >= 2 samples per row, got {num_samples}")
        if score_batch_mul < 1:
            raise ValueError(f"head.score_batch_mul: must be >= 1, got {score_batch_mul}")
        self.token_dim = token_dim
        self.noise_channels = noise_channels
        self.alpha = float(alpha)
        self.train_temperature = float(train_temperature)
        self.score_batch_mul = score_batch_mul
        self.num_samples = num_samples
        self.net = GeneratorMLP(cond_dim, width, depth, token_dim, noise_channels, grad_checkpointing)
        self.last_metrics: dict[str, torch.Tensor] = {}

    def _noise(self, rows: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
        """U[-1/2, 1/2]^noise_channels per row (scoreloss.py:25), in the generator's parameter dtype."""
        dtype = self.net.noise_embed.weight.dtype
        return torch.rand((rows, self.noise_channels), generator=generator, device=device, dtype=dtype) - 0.5

    def loss(
        self,
        target: torch.Tensor,
        z: torch.Tensor,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Masked mean over rows of the ``num_samples``-sample energy-score estimator (one generator pass).

        Sets ``last_metrics`` (detached, no sync): ``attraction`` = E||X-y||^a, ``repulsion`` = E||X-X'||^a.
        """
        if target.shape[0] != z.shape[0] or target.shape[-1] != self.token_dim:
            raise ValueError(
                f"head.loss: target {tuple(target.shape)} and z {tuple(z.shape)} must be (N, {self.token_dim}), (N, C)"
            )
        target, z = target.repeat(self.score_batch_mul, 1), z.repeat(self.score_batch_mul, 1)
        n, m = z.shape[0], self.num_samples
        samples = self.net(z.repeat(m, 1), self._noise(m * n, z.device, generator)).view(m, n, -1)
        attraction, repulsion = energy_score_terms(samples, target, self.alpha)
        if mask is None:
            attraction, repulsion = attraction.mean(), repulsion.mean()
        else:
            w = mask.float().repeat(self.score_batch_mul)
            w = w / w.sum()
            attraction, repulsion = (attraction * w).sum(), (repulsion * w).sum()
        self.last_metrics = {"attraction": attraction.detach(), "repulsion": repulsion.detach()}
        return 2 * attraction - self.train_temperature * repulsion

    def sample(
        self,
        z: torch.Tensor,
        temperature: float = 1.0,
        cfg: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One generator pass per row; CFG mixes the features before it (scoreloss.py:45-48).

        ``temperature`` is EAR's infer_temperature (AdaLN-shift scale, eval mode only). With ``cfg`` set,
        ``z`` is ``cat([z_cond, z_uncond])`` and the generator sees ``cfg*z_cond + (1-cfg)*z_uncond``.
        """
        if cfg is not None:
            if z.shape[0] % 2:
                raise ValueError(f"head.sample: with cfg set z must be cat([z_cond, z_uncond]), got {z.shape[0]} rows")
            z_cond, z_uncond = z.chunk(2)
            z = cfg * z_cond + (1 - cfg) * z_uncond
        return self.net(z, self._noise(z.shape[0], z.device, generator), temperature).float()
