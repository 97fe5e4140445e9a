"""Fréchet distance, streaming feature statistics, reference-statistics files and the Inception Score.

Everything here is float64 host math on finished features (evaluation, not a training step), so numpy/scipy are fine.
The FID formula follows the ADM evaluator (guided-diffusion `evaluations/evaluator.py`, `frechet_distance`) and
pytorch-fid (`fid_score.calculate_frechet_distance`): ||mu1-mu2||² + Tr(S1) + Tr(S2) - 2 Tr(sqrt(S1 S2)).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy import linalg

REF_STATS_KEY = "metrics.ref_stats"


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    If sqrt(S1 S2) is not finite (singular product, e.g. fewer samples than feature dims), `eps` is added to both
    diagonals and the root recomputed (pytorch-fid's fallback; ADM uses eps=1e-8). A tiny imaginary part from
    round-off is dropped; a large one means the covariances are broken, so it raises instead of hiding it.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"frechet_distance: shape mismatch mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, "
            f"sigma2 {sigma2.shape} (reference statistics from a different feature extractor?)"
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"frechet_distance: singular product of covariances; adding {eps} to the diagonals")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: imaginary component {np.abs(covmean.imag).max():.3g} in sqrt(S1 S2)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


class FeatureStats:
    """Streaming mean/covariance of features: float64 running sum and sum of outer products.

    The sums live on the device of the first batch (so a DDP callback can all-reduce `sum`, `outer_sum` and `num`);
    `mu_sigma()` returns numpy float64 with the unbiased covariance, as `np.cov(rowvar=False)` in ADM/pytorch-fid.
    """

    def __init__(self):
        self.sum: torch.Tensor | None = None
        self.outer_sum: torch.Tensor | None = None
        self.num = 0

    def update(self, features) -> None:
        x = torch.as_tensor(features).detach().to(torch.float64)
        if x.ndim != 2:
            raise ValueError(f"FeatureStats.update: expected features (N, F), got shape {tuple(x.shape)}")
        if self.sum is None:
            self.sum = x.new_zeros(x.shape[1])
            self.outer_sum = x.new_zeros(x.shape[1], x.shape[1])
        elif x.shape[1] != self.sum.shape[0]:
            raise ValueError(f"FeatureStats.update: feature dim {x.shape[1]} != {self.sum.shape[0]} seen before")
        x = x.to(self.sum.device)
        self.sum += x.sum(0)
        self.outer_sum += x.T @ x
        self.num += x.shape[0]

    def mu_sigma(self) -> tuple[np.ndarray, np.ndarray]:
        if self.num < 2:
            raise ValueError(f"FeatureStats: need at least 2 samples for a covariance, got {self.num}")
        s, o = self.sum.cpu().numpy(), self.outer_sum.cpu().numpy()
        mu = s / self.num
        sigma = (o - self.num * np.outer(mu, mu)) / (self.num - 1)
        return mu, sigma


def load_stats(path, config_key: str = REF_STATS_KEY) -> tuple[np.ndarray, np.ndarray]:
    """Read `mu`, `sigma` from an `.npz` (ADM's VIRTUAL_imagenet256_labeled.npz, MAR's adm_in256_stats.npz)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{config_key}: reference statistics file not found: '{path}'. It must be an .npz with arrays 'mu' and "
            f"'sigma' (e.g. ADM's VIRTUAL_imagenet256_labeled.npz or MAR's fid_stats/adm_in256_stats.npz); "
            f"set {config_key}=/path/to/stats.npz"
        )
    with np.load(path, allow_pickle=False) as f:
        missing = [k for k in ("mu", "sigma") if k not in f.files]
        if missing:
            raise KeyError(
                f"{config_key}: '{path}' lacks array(s) {missing}; it has {f.files}, expected 'mu' and 'sigma'"
            )
        mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{config_key}: '{path}' has mu {mu.shape} and sigma {sigma.shape}; expected (F,) and (F, F)")
    return mu, sigma


def save_stats(path, mu, sigma) -> None:
    """Write `mu`, `sigma` to `path` (.npz) atomically: a killed write never leaves a truncated stats file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def inception_score(
    x, splits: int = 10, from_logits: bool = True, shuffle_seed: int | None = 2020
) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))), mean and std over `splits` chunks (Salimans et al. 2016).

    x: (N, K) logits (`from_logits=True`, softmax applied) or probabilities. Rows are permuted with
    `np.random.RandomState(shuffle_seed)` before splitting, as torch-fidelity does by default (seed 2020, which is
    what MAR/EAR report through `calculate_metrics`); `shuffle_seed=None` keeps the given order.
    """
    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if x.ndim != 2 or x.shape[0] < splits:
        raise ValueError(f"inception_score: expected (N, K) with N >= splits={splits}, got {tuple(x.shape)}")
    if shuffle_seed is not None:
        x = x[torch.from_numpy(np.random.RandomState(shuffle_seed).permutation(x.shape[0]))]
    p = x.softmax(dim=1) if from_logits else x
    n = x.shape[0]
    scores = []
    for i in range(splits):
        chunk = p[i * n // splits : (i + 1) * n // splits]
        marginal = chunk.mean(0, keepdim=True)
        # xlogy: 0 * log 0 = 0, so one-hot probabilities are fine.
        kl = (torch.xlogy(chunk, chunk) - torch.xlogy(chunk, marginal)).sum(1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores)), float(np.std(scores))
