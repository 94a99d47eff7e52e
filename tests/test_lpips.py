"""LPIPS v0.1 (AlexNet): the published constants, a metric's basic laws, and equality with a
step-by-step recomputation from the same weight files; the diversity protocol's pairs."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffrepro.errors import UserError
from diffrepro.lpips import class_pairs, load_lpips, lpips_diversity

CHANNELS = (64, 192, 384, 256, 256)  # AlexNet's 5 ReLU taps


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """Random weights in the real layouts: torchvision's alexnet-owt-7be5be79.pth state dict and
    lpips v0.1 alex.pth (lin{k}.model.1.weight, non-negative, shape 1×C×1×1)."""
    import torchvision

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("lpips")
    alexnet = torchvision.models.alexnet(weights=None).state_dict()
    linear = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(CHANNELS)}
    torch.save(alexnet, folder / "alexnet-owt-7be5be79.pth")
    torch.save(linear, folder / "alex.pth")
    return folder / "alex.pth", folder / "alexnet-owt-7be5be79.pth", alexnet, linear


@pytest.fixture(scope="module")
def model(weight_files):
    return load_lpips(str(weight_files[0]), str(weight_files[1]))


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _by_hand(x0: torch.Tensor, x1: torch.Tensor, alexnet: dict, linear: dict) -> torch.Tensor:
    """LPIPS spelled out: ScalingLayer, AlexNet convs (11/4 pad 2, 5 pad 2, 3 pad 1 ×3) with ReLU
    and 3×3/2 max-pools after the first two, per-position unit norm, squared difference, 1×1
    non-negative linear, spatial mean, sum over the 5 taps."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(x):
        h = (x - shift) / scale
        out = []
        for k, (i, stride, pad) in enumerate([(0, 4, 2), (3, 1, 2), (6, 1, 1), (8, 1, 1), (10, 1, 1)]):
            if k in (1, 2):
                h = F.max_pool2d(h, kernel_size=3, stride=2)
            h = F.relu(F.conv2d(h, alexnet[f"features.{i}.weight"], alexnet[f"features.{i}.bias"], stride, pad))
            out.append(h / (torch.sqrt((h**2).sum(1, keepdim=True)) + 1e-10))
        return out

    total = 0
    for k, (a, b) in enumerate(zip(taps(x0), taps(x1))):
        total = total + F.conv2d((a - b) ** 2, linear[f"lin{k}.model.1.weight"]).mean((1, 2, 3))
    return total


def test_scaling_layer_constants_are_the_published_ones(model):
    # richzhang/PerceptualSimilarity lpips/lpips.py ScalingLayer
    assert model.shift.flatten().tolist() == pytest.approx([-0.030, -0.088, -0.188])
    assert model.scale.flatten().tolist() == pytest.approx([0.458, 0.448, 0.450])


@torch.no_grad()
def test_lpips_is_zero_on_identical_images_and_symmetric(model):
    x, y = _images(3, 1), _images(3, 2)
    assert torch.equal(model(x, x), torch.zeros(3))
    d = model(x, y)
    assert (d > 0).all()
    assert torch.equal(d, model(y, x))


@torch.no_grad()
def test_lpips_equals_a_step_by_step_recomputation(model, weight_files):
    _, _, alexnet, linear = weight_files
    x, y = _images(4, 3), _images(4, 4)
    assert torch.allclose(model(x, y), _by_hand(x, y, alexnet, linear), rtol=1e-5, atol=1e-7)


def test_diversity_pairs_are_all_distinct_within_class_pairs_up_to_the_cap():
    labels = np.array([0, 0, 0, 1, 1, 2, 0, 1, 3, 3, 3, 3, 3, 3])  # class 3: 6 samples = 15 pairs
    pairs = class_pairs(labels, max_pairs=10, seed=0)
    assert (labels[pairs[:, 0]] == labels[pairs[:, 1]]).all() and (pairs[:, 0] < pairs[:, 1]).all()
    per_class = {c: {tuple(p) for p in pairs if labels[p[0]] == c} for c in range(4)}
    assert per_class[0] == set(combinations([0, 1, 2, 6], 2))  # 6 pairs ≤ cap: all of them
    assert per_class[1] == set(combinations([3, 4, 7], 2))
    assert per_class[2] == set()  # a single sample has no pair
    assert len(per_class[3]) == 10 and per_class[3] <= set(combinations(range(8, 14), 2))
    assert len(pairs) == 6 + 3 + 10  # no pair twice


@pytest.mark.parametrize("n", [2, 3, 7, 40])
def test_pairs_are_indexed_in_combinations_order(n):
    pairs = class_pairs(np.zeros(n, np.int64), max_pairs=10**6, seed=0)
    assert [tuple(p) for p in pairs] == list(combinations(range(n), 2))


def test_a_paper_scale_class_draws_its_pairs_without_listing_them():
    pairs = class_pairs(np.zeros(50_000, np.int64), max_pairs=64, seed=0)  # 1.25e9 candidate pairs
    assert len({tuple(p) for p in pairs}) == 64
    assert ((0 <= pairs[:, 0]) & (pairs[:, 0] < pairs[:, 1]) & (pairs[:, 1] < 50_000)).all()


@torch.no_grad()
def test_lpips_diversity_is_the_mean_over_the_pairs(model):
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (7, 64, 64, 3), dtype=np.uint8)
    labels = np.array([0, 1, 0, 1, 0, 1, 1])
    pairs = class_pairs(labels, 64, seed=0)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    expected = model(x[pairs[:, 0]], x[pairs[:, 1]]).double().mean().item()
    assert lpips_diversity(model, images, labels, 64, seed=0, batch_size=4) == pytest.approx(expected, rel=1e-6)


def test_missing_weight_files_are_named(weight_files, tmp_path):
    lpips_file, alexnet_file, _, _ = weight_files
    with pytest.raises(UserError, match=r"missing-alex\.pth not found: take lpips/weights/v0\.1/alex\.pth"):
        load_lpips(str(tmp_path / "missing-alex.pth"), str(alexnet_file))
    with pytest.raises(UserError, match=r"alexnet-owt-7be5be79\.pth not found: download https://download\.pytorch"):
        load_lpips(str(lpips_file), str(tmp_path / "alexnet-owt-7be5be79.pth"))
