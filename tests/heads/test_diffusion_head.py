"""MAR's per-token diffusion head: schedule, loss terms, sampler semantics and a learning check on a 2-D mixture."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from contgen.heads import DiffusionHead
from contgen.heads.gaussian_diffusion import (
    GaussianDiffusion,
    discretized_gaussian_log_likelihood,
    make_betas,
    normal_kl,
    respace_betas,
    space_timesteps,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _small_head(**kw) -> DiffusionHead:
    args = dict(token_dim=3, cond_dim=8, width=32, depth=2, num_sampling_steps=10, batch_mul=2) | kw
    return DiffusionHead(**args)


def _perturb(head: DiffusionHead, seed: int = 0) -> DiffusionHead:
    """Add noise to every weight so that the zero-initialised outputs become non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return head


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- (a) network and initialisation

def test_fresh_head_predicts_exactly_zero():
    head = _small_head()
    x, t, z = torch.randn(5, 3), torch.randint(0, 1000, (5,)), torch.randn(5, 8)
    out = head.net(x, t, z)
    assert out.shape == (5, 6)  # eps | v
    assert torch.equal(out, torch.zeros_like(out))


def test_state_dict_holds_only_the_net_and_mar_b_size():
    """Names and shapes against MAR's ``diffloss.net``: the reference-made checkpoint (tests/parity/)."""
    head = _small_head(depth=2)
    assert all(k.startswith("net.") for k in head.state_dict())  # schedule buffers are not persistent
    mar_b = DiffusionHead(16, 768)  # MAR-B head: 6 x 1024 on 16-dim tokens, z of width 768 -> 35.7M (mar.md Sec. 1)
    assert sum(p.numel() for p in mar_b.parameters()) == 35_749_920


def test_bad_config_raises_value_error():
    with pytest.raises(ValueError, match="head.noise_schedule"):
        _small_head(noise_schedule="sigmoid")
    with pytest.raises(ValueError, match="head.num_sampling_steps"):
        _small_head(num_train_steps=50, num_sampling_steps=100)
    with pytest.raises(ValueError, match="head.batch_mul"):
        _small_head(batch_mul=0)
    with pytest.raises(ValueError, match="even row count"):
        _small_head().sample(torch.randn(3, 8), cfg=2.0)


# ---------------------------------------------------------------- (b) schedules

def test_cosine_alpha_bar_matches_closed_form():
    T = 1000
    alpha_bar = torch.cumprod(1 - make_betas("cosine", T), 0)
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731  (IDDPM eq. 17)
    closed = torch.tensor([f((i + 1) / T) / f(0) for i in range(T)], dtype=torch.float64)
    # Every beta is below the 0.999 clip except the last one (1 - f(1)/f(.999) = 1).
    torch.testing.assert_close(alpha_bar[:-1], closed[:-1], rtol=1e-10, atol=0)
    torch.testing.assert_close(alpha_bar[-1], alpha_bar[-2] * 0.001, rtol=1e-10, atol=0)
    head = _small_head()
    torch.testing.assert_close(head.train_diffusion.sqrt_alpha_bar.double() ** 2, alpha_bar, rtol=1e-5, atol=0)


def test_linear_betas_are_ddpm_scaled():
    torch.testing.assert_close(make_betas("linear", 1000)[[0, -1]], torch.tensor([1e-4, 0.02], dtype=torch.float64))
    torch.testing.assert_close(make_betas("linear", 250)[[0, -1]], torch.tensor([4e-4, 0.08], dtype=torch.float64))


def test_respaced_betas_reproduce_alpha_bar_at_kept_steps():
    betas = make_betas("cosine", 1000)
    kept = space_timesteps(1000, 100)
    # IDDPM: stride 999/99 rounded, first and last step kept
    assert len(kept) == 100 and kept[:4] == [0, 10, 20, 30] and kept[50] == 505 and kept[-1] == 999
    alpha_bar = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(torch.cumprod(1 - respace_betas(betas, kept), 0), alpha_bar[kept], rtol=1e-10, atol=0)
    head = _small_head(num_sampling_steps=100)
    assert head.sample_diffusion.timesteps.tolist() == kept  # the net is fed original timesteps
    torch.testing.assert_close(head.sample_diffusion.sqrt_alpha_bar, head.train_diffusion.sqrt_alpha_bar[kept])


# ---------------------------------------------------------------- (c) loss terms

def test_normal_kl_matches_torch_distributions():
    g = _gen(0)
    m1, m2, lv1, lv2 = torch.randn(4, 100, generator=g, dtype=torch.float64)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref)
    torch.testing.assert_close(normal_kl(m1, lv1, m1, lv1), torch.zeros_like(m1), rtol=0, atol=1e-12)


def test_discretized_gaussian_likelihood_matches_exact_bins():
    g = _gen(1)
    x = torch.rand(200, generator=g, dtype=torch.float64) * 1.8 - 0.9  # interior: bins [x - 1/255, x + 1/255]
    means = x + 0.02 * torch.randn(200, generator=g, dtype=torch.float64)
    log_scales = torch.full_like(x, math.log(0.02))
    normal = torch.distributions.Normal(means, log_scales.exp())
    exact = normal.cdf(x + 1 / 255) - normal.cdf(x - 1 / 255)
    # IDDPM's tanh approximation of the normal CDF is accurate to ~2e-4 absolute, a bin mass to twice that.
    approx = discretized_gaussian_log_likelihood(x, means, log_scales).exp()
    torch.testing.assert_close(approx, exact, rtol=0, atol=5e-4)
    # Open-ended edge bins (the [-1, 1] image quirk): [1 - 1/255, inf) and (-inf, -1 + 1/255].
    edge, means = torch.tensor([1.0, -1.0], dtype=torch.float64), torch.tensor([0.99, -0.98], dtype=torch.float64)
    normal = torch.distributions.Normal(means, torch.full_like(means, 0.02))
    exact = torch.stack([1 - normal.cdf(edge - 1 / 255)[0], normal.cdf(edge + 1 / 255)[1]])
    approx = discretized_gaussian_log_likelihood(edge, means, torch.full_like(means, math.log(0.02))).exp()
    torch.testing.assert_close(approx, exact, rtol=0, atol=5e-4)


def test_oracle_eps_and_posterior_variance_give_zero_loss_except_at_t0():
    diffusion = GaussianDiffusion(make_betas("cosine", 1000))
    g = _gen(2)
    t = torch.arange(1000)
    x0 = torch.rand(1000, 4, generator=g) * 1.8 - 0.9
    noise = torch.randn(1000, 4, generator=g)
    x_t = diffusion.q_sample(x0, t, noise)
    oracle = torch.cat([noise, -torch.ones_like(noise)], dim=1)  # exact eps; v = -1 selects the posterior variance
    mse, vb = diffusion.loss_terms(oracle, x0, x_t, t, noise)
    assert torch.equal(mse, torch.zeros_like(mse))
    assert vb[1:].abs().max() < 1e-4  # KL(q || p) of identical Gaussians (fp32 rounding only)
    assert vb[0] > 0  # t = 0: discretized NLL of x0, a positive number of bits

    out = torch.randn(1000, 8, generator=g, requires_grad=True)
    _, vb = diffusion.loss_terms(out, x0, x_t, t, noise)
    vb.sum().backward()
    assert torch.equal(out.grad[:, :4], torch.zeros(1000, 4))  # vb sees a detached eps (IDDPM frozen_out)
    assert out.grad[:, 4:].abs().sum() > 0


def test_loss_masks_rows_and_tiles_batch_mul():
    head = _perturb(_small_head(batch_mul=3))
    g = _gen(3)
    target, z = torch.randn(6, 3, generator=g), torch.randn(6, 8, generator=g)
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    loss = head.loss(target, z, mask, generator=_gen(4))
    torch.testing.assert_close(loss, head.last_metrics["mse"] + head.last_metrics["vb"])
    other = target.clone()
    other[mask == 0] += 5.0  # rows of weight 0 (and all their batch_mul copies) do not count
    torch.testing.assert_close(head.loss(other, z, mask, generator=_gen(4)), loss)
    torch.testing.assert_close(head.loss(target, z, torch.ones(6), generator=_gen(4)),
                               head.loss(target, z, generator=_gen(4)))
    loss.backward()
    assert all(p.grad is not None for p in head.parameters())


# ---------------------------------------------------------------- (d) sampling semantics

def test_sampling_is_deterministic_given_a_generator():
    head = _perturb(_small_head())
    z = torch.randn(7, 8, generator=_gen(5))
    a, b, c = (head.sample(z, generator=_gen(s)) for s in (6, 6, 7))
    assert a.shape == (7, 3) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cfg_returns_n_rows_and_reduces_to_unguided_at_scale_one():
    head = _perturb(_small_head())
    z_c, z_u = torch.randn(2, 7, 8, generator=_gen(8))
    unguided = head.sample(z_c, generator=_gen(9))
    same = head.sample(torch.cat([z_c, z_c]), cfg=1.0, generator=_gen(9))
    assert same.shape == (7, 3)
    torch.testing.assert_close(same, unguided, rtol=1e-5, atol=1e-5)
    # Scale 1 with a different uncond half: eps_u + (eps_c - eps_u) = eps_c, the variance is the cond half's.
    torch.testing.assert_close(head.sample(torch.cat([z_c, z_u]), cfg=1.0, generator=_gen(9)), unguided,
                               rtol=1e-5, atol=1e-5)
    guided = head.sample(torch.cat([z_c, z_u]), cfg=4.0, generator=_gen(9))
    assert guided.shape == (7, 3) and not torch.allclose(guided, unguided, atol=1e-3)


def test_zero_temperature_follows_the_posterior_mean_path():
    head = _perturb(_small_head())
    z = torch.randn(7, 8, generator=_gen(10))
    diffusion = head.sample_diffusion
    x = torch.randn(7, 3, generator=_gen(11))  # the initial noise is the first draw and is not scaled
    with torch.no_grad():
        for i in reversed(range(diffusion.num_steps)):
            eps, v = head.net(x, diffusion.timesteps[i].expand(7), z).chunk(2, dim=-1)
            x, _ = diffusion.p_mean_variance(eps, v, x, i)
    torch.testing.assert_close(head.sample(z, temperature=0.0, generator=_gen(11)), x)
    assert not torch.allclose(head.sample(z, temperature=1.0, generator=_gen(11)), x)


class _GaussianOracle(nn.Module):
    """The exact denoiser for x0 ~ N(mu, s^2 I) under ``head``'s schedules (stands in for ``head.net``).

    eps = E[eps | x_t]; v picks the learned-range variance equal to the true reverse variance
    beta~_k + coef1_k^2 Var(x0 | x_t), so ancestral sampling reproduces N(mu, s^2) exactly in distribution.
    """

    def __init__(self, head: DiffusionHead, mu: torch.Tensor, s: float):
        super().__init__()
        rev = head.sample_diffusion
        self.alpha_bar = head.train_diffusion.sqrt_alpha_bar.double() ** 2
        self.kept, self.coef1 = rev.timesteps, rev.posterior_mean_coef1.double()
        self.log_lo, self.log_hi = rev.posterior_log_var_clipped.double(), rev.log_betas.double()
        self.mu, self.s2 = mu.double(), s * s

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x, ab = x.double(), self.alpha_bar[t, None]
        denom = ab * self.s2 + 1 - ab
        x0_mean = self.mu + self.s2 * ab.sqrt() * (x - ab.sqrt() * self.mu) / denom
        eps = (x - ab.sqrt() * x0_mean) / (1 - ab).sqrt()
        k = torch.searchsorted(self.kept, t.contiguous())[:, None]
        lo, hi = self.log_lo[k], self.log_hi[k]
        var = lo.exp() + self.coef1[k] ** 2 * self.s2 * (1 - ab) / denom
        v = 2 * ((var.log() - lo) / (hi - lo)).clamp(0, 1) - 1
        return torch.cat([eps, v.expand_as(eps)], dim=-1).float()


def test_cosine_sampler_is_exact_with_an_oracle_denoiser():
    """End-to-end check of the respaced cosine sampler (learned range, temperature, fp32 math).

    With the cosine schedule alpha_bar at t = 999 is 2.4e-9, so the first of the 100 respaced steps
    multiplies eps errors by ~350: a briefly trained net cannot test this path, an exact oracle can.
    """
    head = DiffusionHead(2, 4, width=8, depth=1, num_sampling_steps=100)
    mu, s, n = torch.tensor([0.3, -0.2]), 0.5, 4000
    head.net = _GaussianOracle(head, mu, s)
    x = head.sample(torch.zeros(n, 4), generator=_gen(12))
    # n = 4000 per channel: sd of the mean 0.5/63 = 0.008, relative sd of the std 1/sqrt(2n) = 1.1%; 4 sigma bounds.
    assert (x.mean(0) - mu).abs().max() < 0.032
    assert ((x.std(0) / s) - 1).abs().max() < 0.045
    cold = head.sample(torch.zeros(n, 4), temperature=0.5, generator=_gen(12))
    assert (cold.std(0) < 0.9 * s).all()  # temperature scales the injected noise only


# ---------------------------------------------------------------- (e) learning a class-conditional 2-D mixture

MEANS = torch.tensor([[[-0.5, -0.5], [0.5, -0.5], [0.0, 0.5]], [[-0.5, 0.5], [0.5, 0.5], [0.0, -0.5]]])
WEIGHTS = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
STD = 0.1


def _mixture(labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    modes = torch.multinomial(WEIGHTS[labels], 1, generator=g).squeeze(1)
    return MEANS[labels, modes] + STD * torch.randn(len(labels), 2, generator=g)


def _swd(a: torch.Tensor, b: torch.Tensor, proj: torch.Tensor) -> float:
    """Sliced W1 of equal-size samples: mean over projections of the mean |sorted a - sorted b|."""
    return ((a @ proj).sort(0).values - (b @ proj).sort(0).values).abs().mean().item()


def test_head_learns_a_class_conditional_gaussian_mixture():
    """Train head + class embedding on two 3-mode mixtures, sample 1000 points per class, compare by SWD.

    Uses the 'linear' schedule: the default cosine one makes the first respaced step amplify eps errors
    ~350x (see the oracle test above), which a few hundred CPU steps cannot bring low enough.
    """
    torch.manual_seed(0)
    head = DiffusionHead(2, 32, width=128, depth=2, noise_schedule="linear", batch_mul=4)
    embed = nn.Embedding(2, 32)
    steps = 300
    opt = torch.optim.AdamW([*head.parameters(), *embed.parameters()], lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = _gen(13)
    for _ in range(steps):  # 256 data rows x batch_mul 4 = 1024 head rows per step
        labels = torch.randint(0, 2, (256,), generator=g)
        loss = head.loss(_mixture(labels, g), embed(labels), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()

    n = 1000
    labels = torch.arange(2).repeat_interleave(n)
    with torch.no_grad():
        samples = head.sample(embed(labels), generator=_gen(14)).view(2, n, 2)
    proj = torch.randn(2, 64, generator=_gen(15))
    proj = proj / proj.norm(dim=0)
    g = _gen(16)
    fresh = lambda c: _mixture(torch.full((n,), c), g)  # noqa: E731
    for c in (0, 1):
        # Floor: SWD between two independent data sets of size n, averaged over 8 pairs. Over 2000 seeds the
        # ratio SWD(perfect sampler, data) / floor has median 0.94, 99.9% quantile 2.7 and max 3.2 (same n,
        # mixtures, projections), so k = 4 passes any sampler close to the truth, while the wrong class (~13x) fails.
        floor = sum(_swd(fresh(c), fresh(c), proj) for _ in range(8)) / 8
        bound = 4.0 * floor
        model = _swd(samples[c], fresh(c), proj)
        print(f"class {c}: SWD {model:.4f}, floor {floor:.4f}, bound {bound:.4f}")
        assert model <= bound
        assert _swd(samples[c], fresh(1 - c), proj) > bound  # the metric discriminates
        nearest = ((samples[c, :, None] - MEANS[c][None]) ** 2).sum(-1).argmin(1)
        fractions = torch.bincount(nearest, minlength=3) / n
        assert (fractions - WEIGHTS[c]).abs().max() < 0.1, fractions


# ---------------------------------------------------------------- (f) bf16 autocast

def test_bf16_autocast_on_cpu_gives_finite_fp32():
    head = _perturb(_small_head())
    target, z = torch.randn(6, 3), torch.randn(6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head.loss(target, z, generator=_gen(17))
        samples = head.sample(torch.cat([z, z.flip(0)]), cfg=2.0, generator=_gen(18))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert samples.shape == (6, 3) and samples.dtype == torch.float32 and torch.isfinite(samples).all()


def test_the_graphed_loop_takes_tensor_scalars_and_equals_the_eager_numbers():
    """What a CUDA graph replays (``_denoise`` on pre-drawn noise, τ and cfg as 0-d tensors) gives bit for bit what the
    eager call with numbers gives; ``sample`` draws x_T and then each step's noise in the eager loop's order (the
    reference's order too: tests/parity replay the reference's draws through it)."""
    head = _perturb(_small_head())
    z = torch.randn(2, 7, 8, generator=_gen(8)).flatten(0, 1)
    noise = torch.randn(head.sample_diffusion.num_steps, 7, 3, generator=_gen(9))
    for cfg in (None, 2.9):
        numbers = head._denoise(noise, z if cfg else z[:7], 0.8, cfg)
        tensors = head._denoise(noise, z if cfg else z[:7], torch.tensor(0.8), None if cfg is None else torch.tensor(cfg))
        assert torch.equal(numbers, tensors)
    g = _gen(3)
    drawn = torch.stack([torch.randn(7, 3, generator=g) for _ in range(head.sample_diffusion.num_steps)])
    torch.testing.assert_close(head.sample(z, 0.8, 2.9, generator=_gen(3)), head._denoise(drawn, z, 0.8, 2.9),
                               rtol=0, atol=0)
