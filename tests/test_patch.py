"""Patch Diffusion: patch-size schedule, crops and coordinate channels, batch rule."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from diffrepro.diffusion.edm import EDMDenoiser, edm_loss
from diffrepro.errors import UserError
from diffrepro.methods import get_method
from diffrepro.methods.base import StepPlan
from diffrepro.methods.patch import batch_multiplier, coordinate_grid, crop_patches
from diffrepro.models.registry import build_model


@pytest.mark.parametrize("real_p", [0.5, 0.25])
def test_patch_sizes_follow_real_p_and_the_three_to_two_split(real_p):
    method = get_method("patch", real_p=real_p)
    n = 20_000
    counts = Counter(method.plan_step(step, seed=3, batch_size=8, resolution=64).patch_size for step in range(n))
    expected = {64: real_p, 32: 0.6 * (1 - real_p), 16: 0.4 * (1 - real_p)}
    assert set(counts) == set(expected)
    for size, p in expected.items():
        assert counts[size] / n == pytest.approx(p, abs=0.015)


def test_latent_recipe_draws_half_and_full_size():
    method = get_method("patch", real_p=0.5, num_patch_sizes=2)
    counts = Counter(method.plan_step(step, seed=0, batch_size=8, resolution=32).patch_size for step in range(10_000))
    assert set(counts) == {32, 16}
    assert counts[16] / 10_000 == pytest.approx(0.5, abs=0.02)


def test_every_process_draws_the_same_patch_sizes():
    def sizes(seed):
        method = get_method("patch", real_p=0.5)
        return [method.plan_step(step, seed=seed, batch_size=4, resolution=64).patch_size for step in range(200)]

    torch.manual_seed(0)
    rank0 = sizes(seed=17)
    torch.manual_seed(1)  # a process whose own RNG state differs
    torch.rand(5)
    rank1 = sizes(seed=17)
    assert rank0 == rank1
    assert sizes(seed=18) != rank0


@pytest.mark.parametrize("resolution", [16, 32, 64, 128])
def test_batch_rule_multiplies_by_r_over_s_and_never_exceeds_a_full_step(resolution):
    method = get_method("patch", real_p=0.5)
    plans = {}
    for step in range(100):
        plan = method.plan_step(step, seed=0, batch_size=32, resolution=resolution)
        plans[plan.patch_size] = plan
    assert {s: p.images for s, p in plans.items()} == {resolution: 32, resolution // 2: 64, resolution // 4: 128}
    for s, p in plans.items():
        pixels = p.images * s * s
        assert pixels <= 32 * resolution**2
        assert p.pixel_fraction == pytest.approx(pixels / (32 * resolution**2))
    # expected images per slot: 0.5·1 + 0.3·2 + 0.2·4 = 1.9 (Patch Diffusion's "batch_mul_avg")
    assert method.mean_batch_multiplier(resolution) == pytest.approx(1.9)


def test_batch_rule_reproduces_the_official_values_at_64_px():
    # the official table gives batch_mul 1, 2, 4 for 64, 32, 16 px patches of 64 px images
    assert [batch_multiplier(s, 64) for s in (64, 32, 16)] == [1, 2, 4]


@pytest.mark.parametrize("channels", [3, 4])
def test_crop_corners_carry_their_full_image_coordinates(channels):
    resolution, size, batch = 16, 4, 64
    rows = torch.arange(resolution, dtype=torch.float32).view(1, 1, -1, 1).expand(batch, 1, -1, resolution)
    cols = torch.arange(resolution, dtype=torch.float32).view(1, 1, 1, -1).expand(batch, 1, resolution, -1)
    filler = torch.zeros(batch, channels - 2, resolution, resolution)
    images = torch.cat([rows, cols, filler], dim=1)  # channel 0 = row index, 1 = column index
    method = get_method("patch", real_p=0.5)
    plan = StepPlan(size, batch, size / resolution)
    patches, kwargs = method.transform_batch(images, torch.Generator().manual_seed(0), plan)
    coords = kwargs["coords"]
    assert patches.shape == (batch, channels, size, size) and coords.shape == (batch, 2, size, size)
    top, left = patches[:, 0, 0, 0], patches[:, 1, 0, 0]
    assert torch.equal(patches[:, 0, -1, -1], top + size - 1) and torch.equal(patches[:, 1, -1, -1], left + size - 1)

    def unit(idx):
        return 2 * idx / (resolution - 1) - 1

    assert torch.allclose(coords[:, 0, 0, 0], unit(left)) and torch.allclose(coords[:, 1, 0, 0], unit(top))
    assert torch.allclose(coords[:, 0, -1, -1], unit(left + size - 1))
    assert torch.allclose(coords[:, 1, -1, -1], unit(top + size - 1))
    assert coords.min() >= -1 and coords.max() <= 1
    # positions are drawn per image and cover every admissible corner
    assert len(set(top.tolist())) == resolution - size + 1 and len(set(left.tolist())) == resolution - size + 1


def test_full_grid_spans_exactly_minus_one_to_one():
    grid = coordinate_grid(8, batch_size=2)
    assert grid.shape == (2, 2, 8, 8)
    assert torch.equal(grid[:, 0, :, 0], torch.full((2, 8), -1.0)) and torch.equal(grid[:, 0, :, -1], torch.ones(2, 8))
    assert torch.equal(grid[:, 1, 0, :], torch.full((2, 8), -1.0)) and torch.equal(grid[:, 1, -1, :], torch.ones(2, 8))
    assert torch.allclose(grid[0, 0, 0].diff(), torch.full((7,), 2 / 7))
    # a full-size crop is the image itself with the full grid
    images = torch.randn(2, 3, 8, 8)
    patches, coords = crop_patches(images, 8, torch.Generator().manual_seed(0))
    assert torch.equal(patches, images) and torch.equal(coords, grid)
    sampling = get_method("patch").sampling_kwargs(2, 8)["coords"]
    assert torch.equal(sampling, grid)


def test_bad_params_fail_with_one_clear_line():
    with pytest.raises(UserError, match="real_p"):
        get_method("patch", real_p=1.5)
    with pytest.raises(UserError, match="resolution 30"):
        get_method("patch").plan_step(0, seed=0, batch_size=4, resolution=30)


def test_edm_baseline_trains_full_images_without_coordinates():
    method = get_method("edm")
    plan = method.plan_step(5, seed=0, batch_size=16, resolution=64)
    assert (plan.patch_size, plan.images, plan.pixel_fraction) == (64, 16, 1.0)
    images = torch.randn(2, 3, 8, 8)
    out, kwargs = method.transform_batch(images, None, plan)
    assert out is images and kwargs == {} and method.coordinate_channels == 0
    assert get_method("patch").coordinate_channels == 2


def test_a_patch_step_trains_the_coordinate_inputs():
    method = get_method("patch", real_p=0.5)
    net = build_model("ddpmpp-mini", extra_in_channels=method.coordinate_channels)
    plan = next(p for p in (method.plan_step(s, seed=1, batch_size=2, resolution=16) for s in range(50))
                if p.patch_size == 8)
    images = torch.randn(plan.images, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    patches, kwargs = method.transform_batch(images, torch.Generator().manual_seed(1), plan)
    loss = edm_loss(EDMDenoiser(net), patches, None, generator=torch.Generator().manual_seed(2), **kwargs)
    assert loss.shape == (4,)
    loss.mean().backward()
    assert net.input_conv.weight.grad[:, 3:].abs().sum() > 0  # the coordinate channels reach the loss
