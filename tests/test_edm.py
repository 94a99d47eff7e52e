"""EDM (Karras et al. 2022): preconditioning, loss, Heun sampler, and the DDPM++ / ADM UNets."""

from __future__ import annotations

import math

import pytest
import torch

from diffrepro.diffusion.edm import (EDM, EDMDenoiser, edm_loss, edm_sample, edm_sigmas, heun_nfe, loss_weight,
                                     make_denoiser_fn, preconditioning)
from diffrepro.errors import UserError
from diffrepro.models.info import model_info
from diffrepro.models.registry import build_model

SD = 0.5


def random_net(name: str, seed: int = 0, **kwargs):
    """A registered UNet with every parameter redrawn, so no layer starts at zero."""
    torch.manual_seed(seed)
    net = build_model(name, **kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.15)
    return net.eval()


def gaussian_denoiser(x, sigma):
    """The exact D(x; σ) = E[y | x] for data y ~ N(0, σd² I)."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return x * SD**2 / (s**2 + SD**2)


@pytest.mark.parametrize("sigma_data", [0.5, 1.3])
def test_preconditioning_matches_edm_table_1(sigma_data):
    for s in (0.002, 0.1, 0.5, 1.0, 7.0, 80.0):
        c_skip, c_out, c_in, c_noise = preconditioning(torch.tensor(s, dtype=torch.float64), sigma_data)
        assert c_skip.item() == pytest.approx(sigma_data**2 / (s**2 + sigma_data**2), rel=1e-12)
        assert c_out.item() == pytest.approx(s * sigma_data / math.sqrt(s**2 + sigma_data**2), rel=1e-12)
        assert c_in.item() == pytest.approx(1 / math.sqrt(s**2 + sigma_data**2), rel=1e-12)
        assert c_noise.item() == pytest.approx(math.log(s) / 4, rel=1e-12)
        # EDM's design: unit-variance network input and training target at every σ
        assert (c_in.item() ** 2) * (sigma_data**2 + s**2) == pytest.approx(1.0)


def test_loss_weight_is_closed_form_and_unit_on_the_network_output():
    s = torch.tensor([0.002, 0.3, 1.0, 80.0], dtype=torch.float64)
    expected = (s**2 + SD**2) / (s * SD) ** 2
    assert torch.allclose(loss_weight(s, SD), expected, rtol=1e-12)
    c_out = preconditioning(s, SD)[1]
    assert torch.allclose(loss_weight(s, SD) * c_out**2, torch.ones_like(s), rtol=1e-12)


def test_denoiser_is_the_identity_as_sigma_goes_to_zero():
    denoiser = EDMDenoiser(random_net("ddpmpp-mini"), SD).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tiny = denoiser(x, torch.full((2,), 1e-8, dtype=torch.float64))
        unit = denoiser(x, torch.ones(2, dtype=torch.float64))
    assert (tiny - x).abs().max() < 1e-6
    c_skip = SD**2 / (1 + SD**2)
    assert (unit - c_skip * x).abs().mean() > 1e-2  # the network term is not zero: the limit is not vacuous


def test_coordinates_join_the_scaled_input_unscaled():
    net = random_net("ddpmpp-mini", extra_in_channels=2)
    seen = {}
    net.input_conv.register_forward_pre_hook(lambda mod, args: seen.setdefault("input", args[0].clone()))
    x = torch.randn(2, 3, 8, 8)
    coords = torch.rand(2, 2, 8, 8) * 2 - 1
    sigma = torch.tensor([0.3, 5.0])
    with torch.no_grad():
        out = EDMDenoiser(net, SD)(x, sigma, coords=coords)
    c_in = (1 / (sigma**2 + SD**2).sqrt()).view(-1, 1, 1, 1)
    assert out.shape == x.shape
    assert torch.allclose(seen["input"][:, :3], c_in * x)
    assert torch.equal(seen["input"][:, 3:], coords)


def test_loss_uses_given_noise_and_edm_weighting():
    x0 = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    seen = {}

    def zero_denoiser(x, sigma, y):
        seen["x"], seen["sigma"] = x, sigma
        return torch.zeros_like(x)

    loss = edm_loss(zero_denoiser, x0, None, generator=torch.Generator().manual_seed(4), noise=noise)
    s = seen["sigma"].view(-1, 1, 1, 1)
    assert torch.allclose(seen["x"], x0 + s * noise)
    expected = ((s**2 + SD**2) / (s * SD) ** 2).flatten() * x0.square().flatten(1).sum(1)
    assert loss.shape == (6,)
    assert torch.allclose(loss, expected, rtol=1e-5)


@pytest.mark.parametrize("drawn_by", ["edm_loss", "training loop"])
def test_training_noise_levels_are_lognormal_with_p_mean_and_p_std(drawn_by):
    seen = {}

    def record(x, sigma, y):
        seen["sigma"] = sigma
        return x

    if drawn_by == "edm_loss":
        edm_loss(record, torch.zeros(40_000, 1, 1, 1), generator=torch.Generator().manual_seed(5))
    else:  # the run's process draws σ for the global batch on the host
        seen["sigma"] = EDM().draw_levels(40_000, torch.Generator().manual_seed(5))
    log_sigma = seen["sigma"].double().log()
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.03)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=0.03)


def test_the_run_process_trains_edms_loss_at_the_drawn_sigma_with_the_given_noise_and_inputs():
    x0 = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(6))
    noise = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(7))
    process = EDM.for_run("linear", None)
    sigma = process.draw_levels(5, torch.Generator().manual_seed(8))
    labels, coords = torch.arange(5), torch.ones(5, 2, 4, 4)
    seen = {}

    def zero_denoiser(x, s, y, coords):
        seen.update(x=x, sigma=s, y=y, coords=coords)
        return torch.zeros_like(x)

    loss = process.loss(zero_denoiser, x0, sigma, noise, labels, {"coords": coords})
    s = sigma.view(-1, 1, 1, 1)
    assert torch.equal(seen["sigma"], sigma) and seen["y"] is labels and seen["coords"] is coords
    assert torch.allclose(seen["x"], x0 + s * noise)
    expected = ((s**2 + SD**2) / (s * SD) ** 2).flatten() * x0.square().flatten(1).sum(1)
    assert torch.allclose(loss, expected, rtol=1e-5)
    assert isinstance(process.network(build_model("ddpmpp-mini")), EDMDenoiser)


@pytest.mark.parametrize("steps", [2, 18, 50])
def test_sigma_schedule_endpoints_and_rho_spacing(steps):
    sig = edm_sigmas(steps)
    assert len(sig) == steps + 1
    assert sig[0].item() == pytest.approx(80.0, rel=1e-12)
    assert sig[steps - 1].item() == pytest.approx(0.002, rel=1e-12)
    assert sig[steps].item() == 0.0
    inv = sig[:steps] ** (1 / 7)
    assert torch.allclose(inv.diff(), torch.full((steps - 1,), (0.002 ** (1 / 7) - 80 ** (1 / 7)) / (steps - 1),
                                                 dtype=torch.float64), rtol=1e-9)
    i = steps // 2
    formula = (80 ** (1 / 7) + i / (steps - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert sig[i].item() == pytest.approx(formula, rel=1e-12)


@pytest.mark.parametrize("steps,churn", [(1, 0.0), (2, 0.0), (18, 0.0), (18, 40.0)])
def test_heun_uses_2n_minus_1_network_evaluations(steps, churn):
    calls = []

    def counting(x, sigma):
        calls.append(1)
        return gaussian_denoiser(x, sigma)

    _, nfe = edm_sample(counting, (4, 1, 2, 2), steps=steps, S_churn=churn, generator=torch.Generator().manual_seed(0),
                        return_nfe=True)
    assert nfe == len(calls) == heun_nfe(steps) == 2 * steps - 1


def test_heun_follows_the_exact_probability_flow_of_gaussian_data_to_second_order():
    noise = torch.randn(8192, 1, 2, 2, generator=torch.Generator().manual_seed(6))
    # dx/dσ = (x − D)/σ = xσ/(σ²+σd²) ⇒ x(σ) ∝ √(σ²+σd²): from x = 80·n at σ = 80 to σ = 0
    exact = noise.double() * 80 * SD / math.sqrt(80**2 + SD**2)
    errors = []
    for steps in (25, 50, 100):
        x = edm_sample(gaussian_denoiser, noise.shape, steps=steps, noise=noise).double()
        errors.append(((x - exact).abs().max() / exact.abs().max()).item())
    assert 3.5 < errors[0] / errors[1] < 4.5 and 3.5 < errors[1] / errors[2] < 4.5  # Heun: error ∝ N⁻²
    assert errors[2] < 2e-3
    assert x.var().item() == pytest.approx(SD**2, rel=0.03)


def test_stochastic_sampler_keeps_the_data_variance():
    # Patch Diffusion's latent setting: 256 steps, S_churn 40 between σ = 0.05 and 50
    noise = torch.randn(8192, 1, 2, 2, generator=torch.Generator().manual_seed(7))
    churned = edm_sample(gaussian_denoiser, noise.shape, steps=256, noise=noise, S_churn=40, S_min=0.05, S_max=50,
                         generator=torch.Generator().manual_seed(8)).double()
    deterministic = edm_sample(gaussian_denoiser, noise.shape, steps=256, noise=noise).double()
    assert (churned - deterministic).std().item() > 0.1  # the churn noise did enter
    assert churned.var().item() == pytest.approx(SD**2, rel=0.03)
    assert churned.mean().item() == pytest.approx(0.0, abs=0.01)


def test_per_sample_generators_make_a_sample_depend_only_on_its_seed():
    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    kw = dict(steps=6, S_churn=10)
    pair = edm_sample(gaussian_denoiser, (2, 1, 3, 3), generator=gens(11, 12), **kw)
    alone = edm_sample(gaussian_denoiser, (1, 1, 3, 3), generator=gens(12), **kw)
    assert torch.equal(pair[1:], alone)
    assert not torch.allclose(pair[0], pair[1])


def test_guidance_combines_conditional_and_null_branches():
    denoiser = EDMDenoiser(random_net("ddpmpp-mini", num_classes=5, extra_in_channels=2), SD)
    x = torch.randn(3, 3, 16, 16)
    sigma = torch.tensor([0.5, 2.0, 10.0])
    labels, null = torch.tensor([0, 3, 4]), torch.full((3,), 5)
    coords = torch.rand(3, 2, 16, 16)
    with torch.no_grad():
        cond = denoiser(x, sigma, labels, coords=coords)
        uncond = denoiser(x, sigma, null, coords=coords)
        guided = make_denoiser_fn(denoiser, labels, 1.3, null, coords=coords)(x, sigma)
        plain = make_denoiser_fn(denoiser, labels, coords=coords)(x, sigma)
    assert (cond - uncond).abs().mean() > 1e-3  # the label matters, so the test can fail
    assert torch.allclose(guided, uncond + 1.3 * (cond - uncond), atol=1e-4)
    assert torch.equal(plain, cond)


# EDM paper (arXiv 2206.00364), Table 7, "Model capacity (Mparams)": DDPM++ CIFAR-10 (VP) 55.73,
# DDPM++ FFHQ/AFHQv2 64×64 (VP) 61.80, ADM ImageNet-64 295.90.
@pytest.mark.parametrize("name,mparams", [("ddpmpp-cifar10", 55.73), ("ddpmpp", 61.80), ("adm", 295.90)])
def test_unet_parameters_match_edm_table_7(name, mparams):
    assert round(model_info(name)["params"] / 1e6, 2) == mparams


@pytest.mark.parametrize("name,channels", [("ddpmpp-mini", 3), ("adm-mini", 3), ("adm-mini", 4)])
def test_unets_take_coordinate_channels_on_any_patch_size(name, channels):
    net = build_model(name, in_channels=channels, extra_in_channels=2).eval()
    for side in (16, 8, 4):
        x = torch.randn(2, channels + 2, side, side)
        with torch.no_grad():
            assert net(x, torch.zeros(2)).shape == (2, channels, side, side)
    with pytest.raises(UserError):
        net(torch.randn(1, channels + 2, 6, 6)[..., :5, :5], torch.zeros(1))
