"""Gaussian diffusion and its samplers against closed forms computed independently here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from diffrepro.diffusion.dpm_solver import DiscreteVPSchedule, fast_orders, singlestep_update
from diffrepro.diffusion.gaussian import (
    GaussianDiffusion,
    discretized_gaussian_log_likelihood,
    guided_model_fn,
    make_betas,
    normal_kl,
    sample,
    space_timesteps,
)

T = 1000


def np_alphas_cumprod(betas: torch.Tensor) -> np.ndarray:
    return np.cumprod(1.0 - betas.numpy())


def delta_eps_fn(diffusion: GaussianDiffusion, x0: torch.Tensor, extra_channels: int = 0):
    """The exact ε of a data distribution that is a point mass at x0, at original (possibly
    fractional) timesteps: ε = (x_t − √ᾱ·x0)/√(1 − ᾱ), log √ᾱ interpolated linearly between steps."""
    log_sqrt_ab = 0.5 * np.log(np_alphas_cumprod(diffusion.betas))

    def model_fn(x, t):
        sqrt_ab = torch.tensor(np.exp(np.interp(t.double().numpy(), np.arange(T), log_sqrt_ab)))
        sqrt_ab = sqrt_ab.view(-1, 1, 1, 1).to(x.dtype)
        eps = (x - sqrt_ab * x0) / (1.0 - sqrt_ab**2).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)[:, :extra_channels]], dim=1)

    return model_fn


# ---- schedules ------------------------------------------------------------------------------


def test_linear_schedule_runs_from_1e_4_to_0_02_scaled_by_1000_over_T():
    betas = make_betas("linear", 1000)
    assert betas.dtype == torch.float64 and len(betas) == 1000
    assert betas[0].item() == 1e-4 and betas[-1].item() == 0.02
    assert torch.allclose(betas.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64), rtol=1e-9)
    short = make_betas("linear", 250)
    assert short[0].item() == pytest.approx(4e-4, rel=1e-15) and short[-1].item() == pytest.approx(0.08, rel=1e-15)


def test_scaled_linear_is_stable_diffusions_schedule_linear_in_sqrt_beta():
    betas = make_betas("scaled_linear", 1000)
    assert betas.dtype == torch.float64
    assert betas[0].item() == pytest.approx(0.00085, rel=1e-12) and betas[-1].item() == pytest.approx(0.012, rel=1e-12)
    roots = betas.sqrt().numpy()
    assert np.allclose(np.diff(roots), (0.012**0.5 - 0.00085**0.5) / 999, rtol=1e-9)


# ---- forward process and posterior ------------------------------------------------------------


def test_q_sample_has_mean_sqrt_alphabar_x0_and_variance_one_minus_alphabar():
    diffusion = GaussianDiffusion(make_betas("linear", T))
    t_value = 300
    alpha_bar = float(np.prod(1.0 - diffusion.betas.numpy()[: t_value + 1]))
    n = 200_000
    x0 = torch.tensor([-0.8, 0.1, 0.6], dtype=torch.float64).view(1, 3, 1, 1).expand(n, 3, 1, 1)
    torch.manual_seed(0)
    x_t = diffusion.q_sample(x0, torch.full((n,), t_value))
    mean, var = x_t.mean(0).flatten(), x_t.var(0).flatten()
    stderr = math.sqrt((1 - alpha_bar) / n)
    assert torch.allclose(mean, math.sqrt(alpha_bar) * x0[0].flatten(), atol=5 * stderr)
    assert torch.allclose(var, torch.full_like(var, 1 - alpha_bar), rtol=0.02)


def test_posterior_is_the_bayes_product_of_forward_step_and_marginal():
    betas = make_betas("scaled_linear", T)
    diffusion = GaussianDiffusion(betas)
    alpha_bar = np_alphas_cumprod(betas)
    g = torch.Generator().manual_seed(1)
    ts = torch.tensor([1, 17, 500, 999])
    x0 = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    x_t = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    mean, var, _ = diffusion.q_posterior_mean_variance(x0, x_t, ts)
    for k, t in enumerate(ts.tolist()):
        beta, prev = betas[t].item(), alpha_bar[t - 1]
        # q(x_t | x_{t-1}) = N(√(1−β) x_{t-1}, β) and q(x_{t-1} | x0) = N(√ᾱ_{t-1} x0, 1 − ᾱ_{t-1})
        precision = (1 - beta) / beta + 1 / (1 - prev)
        expected_mean = (math.sqrt(1 - beta) / beta * x_t[k] + math.sqrt(prev) / (1 - prev) * x0[k]) / precision
        assert torch.allclose(mean[k], expected_mean, rtol=1e-10, atol=1e-12)
        assert var[k].item() == pytest.approx(1 / precision, rel=1e-10)
    _, var0, _ = diffusion.q_posterior_mean_variance(x0, x_t, torch.zeros(4, dtype=torch.long))
    assert torch.all(var0 == 0)  # x_0 given x_1 and x_0 is x_0


def test_normal_kl_is_zero_for_identical_gaussians_and_matches_closed_form():
    g = torch.Generator().manual_seed(2)
    m1, m2, lv1, lv2 = (torch.randn(50, generator=g, dtype=torch.float64) for _ in range(4))
    assert torch.allclose(normal_kl(m1, lv1, m1, lv1), torch.zeros(50, dtype=torch.float64), atol=1e-15)
    p = torch.distributions.Normal(m1, (0.5 * lv1).exp())
    q = torch.distributions.Normal(m2, (0.5 * lv2).exp())
    assert torch.allclose(normal_kl(m1, lv1, m2, lv2), torch.distributions.kl_divergence(p, q), rtol=1e-10)
    # KL(N(0,1) ‖ N(1,4)) = log 2 + (1 + 1)/8 − 1/2
    one = torch.tensor(1.0, dtype=torch.float64)
    assert normal_kl(0 * one, 0 * one, one, math.log(4) * one).item() == pytest.approx(math.log(2) + 0.25 - 0.5)


def test_discretized_gaussian_likelihood_matches_exact_bin_masses_and_sums_to_one():
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    mean, log_scale = torch.tensor(0.13, dtype=torch.float64), torch.tensor(math.log(0.3), dtype=torch.float64)
    probs = discretized_gaussian_log_likelihood(levels, mean.expand(256), log_scale.expand(256)).exp()
    normal = torch.distributions.Normal(mean, log_scale.exp())
    upper = torch.cat([levels[:-1] + 1 / 255, torch.tensor([math.inf], dtype=torch.float64)])
    lower = torch.cat([torch.tensor([-math.inf], dtype=torch.float64), levels[1:] - 1 / 255])
    exact = normal.cdf(upper) - normal.cdf(lower)
    assert torch.allclose(probs, exact, atol=3e-4)  # ADM's tanh approximation of Φ
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-9)


# ---- reverse process --------------------------------------------------------------------------


def test_learned_range_variance_interpolates_log_beta_and_clipped_log_posterior_variance():
    betas = make_betas("linear", T)
    diffusion = GaussianDiffusion(betas, learn_sigma=True)
    alpha_bar = np_alphas_cumprod(betas)
    ts = torch.tensor([0, 1, 400, 999])
    x_t = torch.zeros(4, 1, 2, 2, dtype=torch.float64)
    posterior = lambda t: betas[t].item() * (1 - alpha_bar[t - 1]) / (1 - alpha_bar[t])  # noqa: E731
    for v, weight in ((1.0, 1.0), (-1.0, 0.0), (0.0, 0.5)):
        out = diffusion.p_mean_variance(torch.cat([x_t, torch.full_like(x_t, v)], dim=1), x_t, ts)
        for k, t in enumerate(ts.tolist()):
            expected = weight * math.log(betas[t].item()) + (1 - weight) * math.log(posterior(max(t, 1)))
            assert torch.allclose(out["log_variance"][k], torch.tensor(expected, dtype=torch.float64), rtol=1e-12)


def test_fixed_variances_are_adm_fixedlarge_and_fixedsmall():
    betas = make_betas("linear", T)
    alpha_bar = np_alphas_cumprod(betas)
    x_t = torch.zeros(3, 1, 1, 1, dtype=torch.float64)
    ts = torch.tensor([0, 5, 999])
    def variance(kind):
        return GaussianDiffusion(betas, False, kind).p_mean_variance(x_t, x_t, ts)["variance"]

    large, small = variance("large"), variance("small")
    posterior = lambda t: betas[t].item() * (1 - alpha_bar[t - 1]) / (1 - alpha_bar[t])  # noqa: E731
    assert large.flatten().tolist() == pytest.approx([posterior(1), betas[5].item(), betas[999].item()], rel=1e-12)
    assert small.flatten().tolist() == pytest.approx([posterior(1), posterior(5), posterior(999)], rel=1e-12)


# ---- hybrid loss ------------------------------------------------------------------------------


def test_hybrid_loss_vb_trains_only_the_variance_and_mse_only_epsilon():
    diffusion = GaussianDiffusion(make_betas("linear", T), learn_sigma=True)
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(3, 2, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    output = torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64).mul(0.5).requires_grad_(True)
    t = torch.tensor([0, 250, 999])
    terms = diffusion.training_losses(lambda x, t: output, x0, t, noise=noise)
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])
    assert torch.allclose(terms["mse"], ((noise - output[:, :2]) ** 2).mean((1, 2, 3)))
    (grad_vb,) = torch.autograd.grad(terms["vb"].sum(), output, retain_graph=True)
    assert torch.all(grad_vb[:, :2] == 0) and grad_vb[:, 2:].abs().sum() > 0
    (grad_mse,) = torch.autograd.grad(terms["mse"].sum(), output)
    assert torch.all(grad_mse[:, 2:] == 0)


def test_vb_term_is_the_kl_in_bits_between_true_and_model_posteriors():
    betas = make_betas("linear", T)
    diffusion = GaussianDiffusion(betas, learn_sigma=True)
    alpha_bar = np_alphas_cumprod(betas)
    g = torch.Generator().manual_seed(4)
    x0 = torch.rand(1, 2, 3, 3, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(1, 2, 3, 3, generator=g, dtype=torch.float64)
    output = torch.randn(1, 4, 3, 3, generator=g, dtype=torch.float64).clamp(-1, 1)
    t = 600
    terms = diffusion.training_losses(lambda x, t: output, x0, torch.tensor([t]), noise=noise)
    ab, prev, beta = alpha_bar[t], alpha_bar[t - 1], betas[t].item()
    x_t = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * noise
    def coef(x_start):
        return (math.sqrt(prev) * beta * x_start + math.sqrt(1 - beta) * (1 - prev) * x_t) / (1 - ab)

    true = torch.distributions.Normal(coef(x0), math.sqrt(beta * (1 - prev) / (1 - ab)))
    x0_hat = (x_t - math.sqrt(1 - ab) * output[:, :2]) / math.sqrt(ab)
    frac = (output[:, 2:] + 1) / 2
    log_var = frac * math.log(beta) + (1 - frac) * math.log(beta * (1 - prev) / (1 - ab))
    model = torch.distributions.Normal(coef(x0_hat), (0.5 * log_var).exp())
    expected_bits = torch.distributions.kl_divergence(true, model).mean() / math.log(2)
    assert terms["vb"].item() == pytest.approx(expected_bits.item(), rel=1e-9)


def test_eps_loss_override_replaces_mse_and_drops_vb():
    diffusion = GaussianDiffusion(make_betas("scaled_linear", T), learn_sigma=False)
    x0 = torch.zeros(2, 1, 2, 2)
    noise = torch.ones(2, 1, 2, 2)
    outputs = [torch.full((2, 1, 1, 1), 0.5), torch.full((2, 1, 2, 2), 3.0)]
    terms = diffusion.training_losses(
        lambda x, t: outputs, x0, torch.tensor([3, 7]), noise=noise,
        eps_loss=lambda out, eps: 0.25 * ((out[0] - 1.0) ** 2).mean((1, 2, 3)) + ((out[1] - eps) ** 2).mean((1, 2, 3)),
    )
    assert terms["loss"].tolist() == pytest.approx([0.25 * 0.25 + 4.0] * 2)
    assert terms["vb"].tolist() == [0.0, 0.0]


# ---- respacing --------------------------------------------------------------------------------


def test_space_timesteps_follows_adm_rule():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    kept = space_timesteps(1000, "250")
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    assert all(4 <= b - a <= 5 for a, b in zip(kept, kept[1:]))
    # two sections of 50: strides 49/9 and 49/4 from each section's start, Python rounding
    # (round(24.5) = 24, as in ADM)
    assert space_timesteps(100, "10,5") == [0, 5, 11, 16, 22, 27, 33, 38, 44, 49, 50, 62, 74, 87, 99]


def test_respaced_diffusion_keeps_original_alphabar_and_maps_timesteps_back():
    base = GaussianDiffusion(make_betas("linear", T))
    spaced = base.respaced("250")
    kept = space_timesteps(T, "250")
    assert torch.allclose(spaced.alphas_cumprod, torch.tensor(np_alphas_cumprod(base.betas)[kept]), rtol=1e-12)
    seen = []

    def recording_model(x, t):
        seen.append(t[0].item())
        assert t.dtype == torch.long
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    sample(base, recording_model, (1, 1, 2, 2), sampler="ddpm", steps=25, generator=torch.Generator().manual_seed(0))
    assert seen == space_timesteps(T, "25")[::-1]


# ---- samplers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler,learn_sigma", [("ddim", True), ("ddpm", True), ("ddpm", False)])
def test_samplers_recover_the_point_mass_they_are_given_the_exact_eps_of(sampler, learn_sigma):
    diffusion = GaussianDiffusion(make_betas("linear", T), learn_sigma=learn_sigma)
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(2, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    model_fn = delta_eps_fn(diffusion, x0, extra_channels=3 if learn_sigma else 0)
    x_T = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x = sample(diffusion, model_fn, x0.shape, sampler=sampler, steps=20, generator=g, noise=x_T)
    assert torch.allclose(x, x0, atol=1e-9)


def test_dpm_solver_follows_the_exact_ode_path_of_a_point_mass():
    diffusion = GaussianDiffusion(make_betas("scaled_linear", T), learn_sigma=False)
    alpha_bar = np_alphas_cumprod(diffusion.betas)
    g = torch.Generator().manual_seed(6)
    x0 = torch.rand(2, 4, 3, 3, generator=g, dtype=torch.float64) * 2 - 1
    x_T = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x = sample(diffusion, delta_eps_fn(diffusion, x0), x0.shape, sampler="dpm_solver", steps=10, noise=x_T)
    # the ODE keeps (x_t − √ᾱ_t x0)/√(1 − ᾱ_t) constant; the solver stops at t = 1/N (index 0)
    a0, aT = alpha_bar[0], alpha_bar[-1]
    expected = math.sqrt(a0) * x0 + math.sqrt((1 - a0) / (1 - aT)) * (x_T - math.sqrt(aT) * x0)
    assert torch.allclose(x, expected, atol=1e-10)


def gaussian_data_eps(mu: float, s: float, alpha_of_t):
    """Data N(μ, s²): the exact ε*(x_t) = σ_t (x_t − α_t μ)/(α_t² s² + σ_t²)."""

    def eps_fn(x, t):
        alpha = alpha_of_t(t).view(-1, 1, 1, 1).to(x.dtype)
        sigma = (1 - alpha**2).sqrt()
        return sigma * (x - alpha * mu) / (alpha**2 * s**2 + sigma**2)

    return eps_fn


def gaussian_data_flow(x, mu, s, alpha_from, alpha_to):
    """The probability-flow ODE keeps (x_t − α_t μ)/√(α_t² s² + σ_t²) constant."""
    scale = lambda a: math.sqrt(a**2 * s**2 + 1 - a**2)  # noqa: E731
    return alpha_to * mu + scale(alpha_to) / scale(alpha_from) * (x - alpha_from * mu)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_dpm_solver_step_of_order_k_has_local_error_h_to_the_k_plus_1(order):
    """On a smooth schedule, λ(t) = 4 − 8t, halving the step cuts one step's error by ~2^(k+1)."""
    n = 100_000  # knots dense enough that the piecewise-linear log α is smooth at these h
    alpha_of = lambda t: torch.sigmoid(2 * (4 - 8 * t)).sqrt()  # noqa: E731  α² = sigmoid(2λ)
    knots = torch.arange(1, n + 1, dtype=torch.float64) / n
    schedule = DiscreteVPSchedule(alpha_of(knots) ** 2)
    mu, s = 0.3, 0.5
    eps_fn = gaussian_data_eps(mu, s, lambda t: alpha_of((t.double() + 1) / n))
    x = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    for h in (0.02, 0.01, 0.005):
        times = [0.5 - h * k / order for k in range(order + 1)]
        start, end = (alpha_of(torch.tensor(t, dtype=torch.float64)).item() for t in (0.5, 0.5 - h))
        exact = gaussian_data_flow(x, mu, s, start, end)
        errors.append((singlestep_update(eps_fn, schedule, x, times) - exact).abs().max().item())
    rates = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert min(rates) > order + 0.6, (errors, rates)


def test_dpm_solver_at_dimrs_setting_solves_the_ode_of_gaussian_data():
    """SD schedule, 250 NFE (DiMR's eval): close to the exact endpoint, and far closer than at 25."""
    diffusion = GaussianDiffusion(make_betas("scaled_linear", T), learn_sigma=False)
    log_alpha = 0.5 * np.log(np_alphas_cumprod(diffusion.betas))
    alpha_of = lambda t: torch.tensor(np.exp(np.interp(t.double().numpy(), np.arange(T), log_alpha)))  # noqa: E731
    mu, s = 0.3, 0.5
    x_T = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    exact = gaussian_data_flow(x_T, mu, s, math.exp(log_alpha[-1]), math.exp(log_alpha[0]))
    eps_fn = gaussian_data_eps(mu, s, alpha_of)
    error = {}
    for n in (25, 250):
        x = sample(diffusion, eps_fn, x_T.shape, "dpm_solver", steps=n, noise=x_T)
        error[n] = (x - exact).abs().max().item()
    assert error[250] < 5e-3 and error[25] > 10 * error[250], error


@pytest.mark.parametrize(
    "sampler,steps",
    [("ddpm", 7), ("ddim", 13), ("dpm_solver", 9), ("dpm_solver", 10), ("dpm_solver", 11), ("dpm_solver", 2)],
)
def test_every_sampler_costs_exactly_steps_model_evaluations(sampler, steps):
    diffusion = GaussianDiffusion(make_betas("linear", T), learn_sigma=True)
    calls = []

    def model_fn(x, t):
        calls.append(t)
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    g = torch.Generator().manual_seed(0)
    _, nfe = sample(diffusion, model_fn, (2, 1, 2, 2), sampler=sampler, steps=steps, generator=g, return_nfe=True)
    assert nfe == len(calls) == steps
    assert sum(fast_orders(steps)) == steps


def test_sampling_is_deterministic_given_the_generator():
    diffusion = GaussianDiffusion(make_betas("linear", T), learn_sigma=False)
    model_fn = lambda x, t: 0.1 * x  # noqa: E731
    def draw(seed):
        return sample(diffusion, model_fn, (2, 1, 3, 3), steps=10, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(11), draw(11))
    assert not torch.equal(draw(11), draw(12))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_per_sample_generators_make_each_sample_independent_of_its_batch(sampler):
    """One generator per sample (x_T and every step's noise): a sample drawn in a batch of three
    equals the same seed drawn alone, so a resumed or re-chunked sample stage reproduces it."""
    diffusion = GaussianDiffusion(make_betas("linear", T), learn_sigma=False)
    model_fn = lambda x, t: 0.1 * x  # noqa: E731

    def draw(seeds):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return sample(diffusion, model_fn, (len(seeds), 1, 3, 3), sampler=sampler, steps=10,
                      generator=generators, eta=1.0)

    batch = draw([3, 4, 5])
    assert all(torch.equal(batch[i:i + 1], draw([s])) for i, s in enumerate([3, 4, 5]))
    assert not torch.equal(batch[0], batch[1])


# ---- classifier-free guidance -----------------------------------------------------------------


class TinyConditionalNet(nn.Module):
    """A 1×1 conv plus a class- and time-dependent bias: outputs 4 ε and 4 variance channels."""

    def __init__(self, channels: int = 4, num_classes: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(channels, 2 * channels, 1)
        self.embed = nn.Embedding(num_classes + 1, 2 * channels)
        self.batch_sizes: list[int] = []

    def forward(self, x, t, y=None):
        self.batch_sizes.append(x.shape[0])
        return self.conv(x) + self.embed(y)[:, :, None, None] * (1 + t.float()[:, None, None, None] / 1000)


@torch.no_grad()
def test_guidance_follows_the_hand_formula_on_guided_channels_only():
    torch.manual_seed(8)
    net = TinyConditionalNet()
    x = torch.randn(3, 4, 2, 2)
    t = torch.tensor([10, 500, 900])
    labels, null = torch.tensor([0, 3, 4]), torch.full((3,), 5)
    cond, uncond = net(x, t, y=labels), net(x, t, y=null)
    net.batch_sizes.clear()
    guided = guided_model_fn(net, labels, null, scale=4.0, guided_channels=3)(x, t)
    assert net.batch_sizes == [6]  # one batched forward
    assert torch.allclose(guided[:, :3], uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]), atol=1e-5)
    assert torch.allclose(guided[:, 3:], cond[:, 3:], atol=1e-6)  # 4th ε channel and variance
    all_channels = guided_model_fn(net, labels, null, scale=4.0, guided_channels=None)(x, t)
    assert torch.allclose(all_channels[:, :4], uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4]), atol=1e-5)
    net.batch_sizes.clear()
    assert torch.allclose(guided_model_fn(net, labels, null, scale=1.0)(x, t), cond)
    assert net.batch_sizes == [3]  # scale 1: a single conditional forward


@torch.no_grad()
def test_increasing_guidance_rises_from_one_at_pure_noise_by_dimrs_power_cosine():
    torch.manual_seed(9)
    net = TinyConditionalNet()
    x = torch.randn(2, 4, 2, 2)
    labels, null = torch.tensor([1, 2]), torch.full((2,), 5)
    scale = 3.0
    guide = guided_model_fn(
        net, labels, null, scale, guided_channels=None, scale_schedule="increasing", scale_power=1.0
    )
    # (t + 1)/T = 1, ½, 1/1000 → w = 1, 1 + (w − 1)·½, 1 + (w − 1)·½(1 − cos 0.999π)
    ramp_at_0 = 0.5 * (1 - math.cos(math.pi * 0.999))
    for t_value, w in ((999, 1.0), (499, 1 + (scale - 1) * 0.5), (0, 1 + (scale - 1) * ramp_at_0)):
        t = torch.full((2,), t_value)
        cond, uncond = net(x, t, y=labels), net(x, t, y=null)
        assert torch.allclose(guide(x, t)[:, :4], uncond[:, :4] + w * (cond[:, :4] - uncond[:, :4]), atol=1e-5)


def test_the_run_process_learns_sigma_with_2c_outputs_draws_uniform_t_and_trains_labels_as_y():
    from diffrepro.models.registry import build_model
    from diffrepro.runs import noise_process

    run = {"diffusion": "gaussian", "schedule": "linear"}
    dit = build_model("DiT-tiny/2", input_size=8, in_channels=4, num_classes=3)  # ε and Σ: 2C channels
    unet = build_model("ddpmpp-mini", input_size=8, in_channels=3, num_classes=3)  # ε only
    assert noise_process(run, dit).learn_sigma and not noise_process(run, unet).learn_sigma
    process = noise_process(run, unet)
    t = process.draw_levels(50_000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() == 0 and t.max() == T - 1
    assert (torch.bincount(t // 100, minlength=10).double() / 5_000 - 1).abs().max() < 0.06

    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t, labels, coords = torch.tensor([0, 10, 500, 999]), torch.tensor([2, 0, 1, 1]), torch.ones(4, 2, 8, 8)
    seen = {}

    def zero_eps(x_t, timesteps, y, coords):
        seen.update(x_t=x_t, t=timesteps, y=y, coords=coords)
        return torch.zeros_like(x_t)

    loss = process.loss(zero_eps, x0, t, noise, labels, {"coords": coords})
    ab = np_alphas_cumprod(make_betas("linear", T))[t.numpy()].reshape(-1, 1, 1, 1)
    expected = torch.tensor(np.sqrt(ab) * x0.double().numpy() + np.sqrt(1 - ab) * noise.double().numpy())
    assert torch.allclose(seen["x_t"].double(), expected, atol=1e-6)
    assert torch.equal(seen["t"], t) and seen["y"] is labels and seen["coords"] is coords
    assert torch.allclose(loss, noise.square().mean((1, 2, 3)))  # ε̂ = 0: the loss is ‖ε‖²/D, no vb term


def test_every_configurable_diffusion_is_a_process_and_an_unknown_one_is_one_line():
    from diffrepro.schema import CHOICES
    from diffrepro.diffusion import Diffusion
    from diffrepro.errors import UserError
    from diffrepro.models.registry import build_model
    from diffrepro.runs import noise_process

    unet = build_model("ddpmpp-mini", input_size=8, in_channels=3, num_classes=3)
    for name in CHOICES["diffusion"]:
        assert isinstance(noise_process({"diffusion": name, "schedule": "linear"}, unet), Diffusion)
    with pytest.raises(UserError, match="diffusion must be one of") as err:
        noise_process({"diffusion": "flow", "schedule": "linear"}, unet)
    assert "\n" not in str(err.value)
