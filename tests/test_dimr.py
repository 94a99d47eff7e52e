"""DiMR: TD-LN algebra, the multi-resolution cascade, the multi-scale loss, the published sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffrepro.diffusion.dpm_solver import DiscreteVPSchedule
from diffrepro.methods import get_method
from diffrepro.methods.dimr import multiscale_eps_loss
from diffrepro.models.dimr import (DiMR, ConvNeXtStage, TimeDependentLayerNorm, TimeDependentParameter,
                                   TimeDependentRMSNorm, TransformerStage, pixel_shuffle_channels_last,
                                   time_condition)
from diffrepro.models.info import model_info


def tiny_dimr(**kwargs) -> DiMR:
    torch.manual_seed(0)
    return DiMR(8, 4, 10, TransformerStage(dim=16, depth=3, num_heads=2), (ConvNeXtStage(dim=8, depth=3),), **kwargs)


def randomize_gates(module: torch.nn.Module, generator: torch.Generator) -> None:
    for tdp in module.modules():
        if isinstance(tdp, TimeDependentParameter):
            for p in tdp.gate_parameters():
                p.data.copy_(torch.randn(p.shape, generator=generator))


def test_td_layernorm_with_p0_equal_p1_is_torch_layer_norm():
    g = torch.Generator().manual_seed(1)
    norm = TimeDependentLayerNorm(12)
    randomize_gates(norm, g)
    weight, bias = torch.randn(12, generator=g), torch.randn(12, generator=g)
    norm.scale.p0.data.copy_(weight), norm.scale.p1.data.copy_(weight)
    norm.shift.p0.data.copy_(bias), norm.shift.p1.data.copy_(bias)
    x = 3 * torch.randn(5, 7, 12, generator=g) + 1
    tau = torch.rand(5, generator=g) * 2 - 1
    expected = F.layer_norm(x, (12,), weight, bias, eps=1e-5)
    torch.testing.assert_close(norm(x, tau), expected, rtol=1e-5, atol=1e-5)


def test_td_rmsnorm_with_p0_equal_p1_is_rmsnorm_by_hand():
    g = torch.Generator().manual_seed(2)
    norm = TimeDependentRMSNorm(6)
    randomize_gates(norm, g)
    scale = torch.randn(6, generator=g)
    norm.scale.p0.data.copy_(scale), norm.scale.p1.data.copy_(scale)
    x = torch.randn(3, 4, 4, 6, generator=g)  # channel-last feature map
    tau = torch.rand(3, generator=g) * 2 - 1
    expected = torch.empty_like(x)
    for idx in torch.cartesian_prod(torch.arange(3), torch.arange(4), torch.arange(4)).tolist():
        v = x[tuple(idx)]
        rms = (sum(float(a) ** 2 for a in v) / 6) ** 0.5
        expected[tuple(idx)] = v / (rms + 1e-8) * scale
    torch.testing.assert_close(norm(x, tau), expected, rtol=1e-5, atol=1e-6)


def test_td_parameter_is_p1_plus_sigmoid_gate_times_p0_minus_p1():
    g = torch.Generator().manual_seed(3)
    tdp = TimeDependentParameter(8, 1.0)
    p0, p1 = torch.randn(8, generator=g), torch.randn(8, generator=g)
    tdp.p0.data.copy_(p0), tdp.p1.data.copy_(p1)
    # A steep gate (w = 1 + 49): τ = +1 gives p0, τ = −1 gives p1, τ = 0 the midpoint exactly.
    tdp.slope.data.fill_(49.0)
    theta = tdp(torch.tensor([1.0, -1.0, 0.0]))
    torch.testing.assert_close(theta[0], p0)
    torch.testing.assert_close(theta[1], p1)
    torch.testing.assert_close(theta[2], (p0 + p1) / 2)
    # Arbitrary gate: the formula element by element, in float64.
    slope, offset = torch.randn(8, generator=g), torch.randn(8, generator=g)
    tdp.slope.data.copy_(slope), tdp.offset.data.copy_(offset)
    tau = 0.37
    sig = torch.sigmoid(((1 + slope) * tau + offset).double())
    expected = p1.double() + sig * (p0.double() - p1.double())
    torch.testing.assert_close(tdp(torch.tensor([tau]))[0].double(), expected, rtol=1e-6, atol=1e-6)


def test_tau_is_the_official_log_snr_over_4_on_the_dpm_solver_time_axis():
    t = torch.arange(1000)
    n = t + 1  # the official code's 1-based step
    official = (n.double() / 1000 * 8 - 4) / 4
    torch.testing.assert_close(time_condition(t).double(), official, rtol=0, atol=1e-6)
    # The sampler calls the model at t·N − 1; its first point (t = 1, pure noise) must be τ = 1.
    schedule = DiscreteVPSchedule(torch.linspace(0.99, 0.01, 1000))
    assert time_condition(torch.tensor(schedule.model_timestep(1.0))).item() == pytest.approx(1.0)


def test_pixel_shuffle_uses_the_official_channel_order():
    r, c = 2, 3
    x = torch.arange(1 * 2 * 2 * r * r * c).reshape(1, 2, 2, r * r * c)
    y = pixel_shuffle_channels_last(x, r)
    assert y.shape == (1, 4, 4, c)
    for h in range(2):
        for w in range(2):
            for i in range(r):
                for j in range(r):
                    assert y[0, r * h + i, r * w + j].tolist() == x[0, h, w, (i * r + j) * c:(i * r + j + 1) * c].tolist()


def test_training_mode_returns_every_resolution_eval_mode_only_the_full_one():
    model = tiny_dimr()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 10])  # 10 = the null row
    outputs = model(x, t, y)
    assert [tuple(o.shape) for o in outputs] == [(2, 4, 4, 4), (2, 4, 8, 8)]
    model.eval()
    full = model(x, t, y)
    assert isinstance(full, torch.Tensor)
    torch.testing.assert_close(full, outputs[-1])
    torch.testing.assert_close(model(x, t, y, all_resolutions=True)[0], outputs[0])


def test_three_resolution_cascade_shapes():
    model = DiMR(8, 4, None, TransformerStage(dim=16, depth=1, num_heads=2, patch_size=4),
                 (ConvNeXtStage(dim=8, depth=1, patch_size=2), ConvNeXtStage(dim=8, depth=1)))
    outputs = model(torch.randn(2, 4, 8, 8), torch.tensor([0, 999]))
    assert [tuple(o.shape) for o in outputs] == [(2, 4, 2, 2), (2, 4, 4, 4), (2, 4, 8, 8)]


def test_the_class_reaches_the_convnext_branch_only_through_the_upsampled_maps():
    model = tiny_dimr().eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 100])
    y_a, y_b = torch.tensor([0, 1]), torch.tensor([5, 6])
    with torch.no_grad():
        assert not torch.allclose(model(x, t, y_a), model(x, t, y_b))
        model.convnexts[0].upsample.proj.weight.zero_()
        model.convnexts[0].upsample.proj.bias.zero_()
        torch.testing.assert_close(model(x, t, y_a), model(x, t, y_b))


def test_time_enters_only_through_td_ln():
    model = tiny_dimr().eval()
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([2, 3])
    early, late = torch.tensor([0, 0]), torch.tensor([999, 999])
    with torch.no_grad():
        torch.testing.assert_close(model(x, early, y), model(x, late, y))  # p0 = p1 at init
        model.convnexts[0].head.norm.scale.p0.add_(0.5)
        assert not torch.allclose(model(x, early, y), model(x, late, y))
        ablation = tiny_dimr(td_ln=False).eval()
        ablation.convnexts[0].head.norm.scale.value.add_(0.5)
        torch.testing.assert_close(ablation(x, early, y), ablation(x, late, y))


def test_gradient_checkpointing_gives_the_same_gradients():
    plain = tiny_dimr()
    checkpointed = tiny_dimr(grad_checkpointing=True)
    g = torch.Generator().manual_seed(4)
    randomize_gates(plain, g)
    for tdp in plain.time_dependent_parameters():  # p0 ≠ p1: τ matters and the gates get gradients
        tdp.p0.data.add_(0.1 * torch.randn(tdp.p0.shape, generator=g))
    checkpointed.load_state_dict(plain.state_dict())
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 2])
    for model in (plain, checkpointed):
        sum(o.square().sum() for o in model(x, t, y)).backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_multiscale_loss_by_hand():
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(2, 3, 4, 4, generator=g)
    low, full = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    expected = []
    for b in range(2):
        low_err = full_err = 0.0
        for c in range(3):
            for i in range(2):
                for j in range(2):
                    block_sum = sum(float(noise[b, c, 2 * i + di, 2 * j + dj]) for di in (0, 1) for dj in (0, 1))
                    low_err += (float(low[b, c, i, j]) - block_sum / 2) ** 2
            for i in range(4):
                for j in range(4):
                    full_err += (float(full[b, c, i, j]) - float(noise[b, c, i, j])) ** 2
        expected.append(0.25 * low_err / 12 + 1.0 * full_err / 48)
    loss = get_method("dimr").eps_loss([low, full], noise)
    torch.testing.assert_close(loss, torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_downsampled_noise_target_has_unit_variance():
    noise = torch.randn(64, 4, 32, 32, generator=torch.Generator().manual_seed(6))
    zero = [torch.zeros(64, 4, 16, 16), torch.zeros(64, 4, 32, 32)]
    low_only = multiscale_eps_loss(zero, noise, weights=(1.0, 0.0))  # = per-sample mean of target²
    assert low_only.mean().item() == pytest.approx(1.0, abs=0.02)


def test_dimr_xl_2r_has_505m_params_and_160_gmacs():
    info = model_info("DiMR-XL/2R", num_classes=1000, image_size=256)
    assert info["params"] == 505_046_408
    assert info["gmacs"] == pytest.approx(160.2, rel=0.01)


def test_dimr_g_2r_has_1_06b_params_and_331_gmacs():
    info = model_info("DiMR-G/2R", num_classes=1000, image_size=256)
    assert info["params"] == 1_056_352_904
    assert info["gmacs"] == pytest.approx(331.1, rel=0.01)


def test_td_ln_costs_662_400_params_in_dimr_xl():
    from diffrepro.models.registry import build_model

    with torch.device("meta"):
        model = build_model("DiMR-XL/2R", num_classes=1000, image_size=256)
    td = sum(p.numel() for m in model.time_dependent_parameters() for p in m.parameters())
    assert td == 662_400  # 0.13 % of 505,046,408


def test_dimr_mini_matches_dit_mini_compute():
    dimr = model_info("DiMR-mini/2R", input_size=8, in_channels=4, num_classes=64)
    dit = model_info("DiT-mini/2", input_size=8, in_channels=4, num_classes=64)
    assert dimr["gmacs"] == pytest.approx(dit["gmacs"], rel=0.1)


def test_weight_decay_exempts_exactly_the_td_ln_gates():
    model = tiny_dimr()
    method = get_method("dimr")
    method.configure_model(model)
    groups = method.param_groups(model, weight_decay=0.03)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.03 and groups[1]["weight_decay"] == 0.0
    assert no_decay == {n for n in names.values() if n.endswith((".slope", ".offset"))}
    assert decay | no_decay == set(names.values()) and not decay & no_decay
    assert len(no_decay) == 2 * len(model.time_dependent_parameters())
    assert any(n.endswith(".p0") for n in decay)  # the official optimizer decays p0 and p1
    ablation = tiny_dimr(td_ln=False)
    assert [g["weight_decay"] for g in method.param_groups(ablation, 0.03)] == [0.03]


def test_null_label_is_the_extra_class_row():
    model = tiny_dimr()
    method = get_method("dimr")
    assert method.null_label(model) == model.num_classes == 10
    assert model.transformer.class_embedding.num_embeddings == 11
