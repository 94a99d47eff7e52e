"""LPIPS v0.1 (AlexNet) from the `lpips` package: its wheel's v0.1 linear weights, a trunk from
a local file with nothing downloaded, a metric's basic laws and equality with a step-by-step
recomputation; the diversity protocol's pairs."""

from __future__ import annotations

import hashlib
import socket
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffrepro.errors import UserError
from diffrepro.lpips import class_pairs, load_lpips, lpips_diversity

CHANNELS = (64, 192, 384, 256, 256)  # AlexNet's 5 ReLU taps
# sha256 of lpips/weights/v0.1/alex.pth (richzhang/PerceptualSimilarity; docs/data_and_weights.md)
V01_ALEX_SHA256 = "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random AlexNet saved as torchvision's alexnet-owt-7be5be79.pth state dict, and the v0.1
    linear weights of the installed lpips wheel."""
    import lpips
    import torchvision

    torch.manual_seed(0)
    alexnet_file = tmp_path_factory.mktemp("lpips") / "alexnet-owt-7be5be79.pth"
    alexnet = torchvision.models.alexnet(weights=None).state_dict()
    torch.save(alexnet, alexnet_file)
    linear_file = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
    return alexnet_file, alexnet, linear_file, torch.load(linear_file, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def model(weights):
    with pytest.MonkeyPatch.context() as patch:  # no network: a download attempt fails the build
        patch.setattr(socket.socket, "connect", lambda *args: pytest.fail("LPIPS tried to download"))
        return load_lpips(str(weights[0]))


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


def test_linear_layers_are_the_wheels_v01_weights_and_the_trunk_is_the_local_file(model, weights):
    alexnet_file, alexnet, linear_file, linear = weights
    assert hashlib.sha256(linear_file.read_bytes()).hexdigest() == V01_ALEX_SHA256
    state = model.state_dict()
    for k, c in enumerate(CHANNELS):  # the package loads its file with strict=False: check each layer
        weight = linear[f"lin{k}.model.1.weight"]
        assert weight.shape == (1, c, 1, 1) and (weight >= 0).all()
        assert torch.equal(state[f"lin{k}.model.1.weight"], weight)
    trunk = {name: value for name, value in state.items() if name.startswith("net.")}
    assert len(trunk) == 10  # 5 convs: weight and bias each
    for name, value in trunk.items():
        assert torch.equal(value, alexnet[f"features.{name.split('.', 2)[2]}"])
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_scaling_layer_constants_are_the_published_ones(model):
    # richzhang/PerceptualSimilarity lpips/lpips.py ScalingLayer
    assert model.scaling_layer.shift.flatten().tolist() == pytest.approx([-0.030, -0.088, -0.188])
    assert model.scaling_layer.scale.flatten().tolist() == pytest.approx([0.458, 0.448, 0.450])


@torch.no_grad()
def test_lpips_is_zero_on_identical_images_and_symmetric(model):
    x, y = _images(3, 1), _images(3, 2)
    assert torch.equal(model(x, x).flatten(), torch.zeros(3))
    d = model(x, y)
    assert (d > 0).all()
    assert torch.equal(d, model(y, x))


@torch.no_grad()
def test_lpips_equals_a_step_by_step_recomputation(model, weights):
    _, alexnet, _, linear = weights
    x, y = _images(4, 3), _images(4, 4)
    assert torch.allclose(model(x, y).flatten(), _by_hand(x, y, alexnet, linear), rtol=1e-5, atol=1e-7)


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
def test_lpips_diversity_is_the_mean_over_the_pairs(model, weights):
    _, alexnet, _, linear = weights
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (7, 64, 64, 3), dtype=np.uint8)
    labels = np.array([0, 1, 0, 1, 0, 1, 1])
    pairs = class_pairs(labels, 64, seed=0)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    expected = _by_hand(x[pairs[:, 0]], x[pairs[:, 1]], alexnet, linear).double().mean().item()
    assert len(pairs) == 3 + 6
    assert lpips_diversity(model, images, labels, 64, seed=0, batch_size=4) == pytest.approx(expected, rel=1e-5)
    assert lpips_diversity(model, images, np.arange(7), 64, seed=0) is None  # no class has two samples


def test_a_missing_or_wrong_alexnet_file_is_named(tmp_path):
    with pytest.raises(UserError, match=r"alexnet-owt-7be5be79\.pth not found: download https://download\.pytorch"):
        load_lpips(str(tmp_path / "alexnet-owt-7be5be79.pth"))
    wrong = tmp_path / "alex.pth"
    torch.save({"lin0.model.1.weight": torch.rand(1, 64, 1, 1)}, wrong)  # lpips's linear file, not AlexNet
    with pytest.raises(UserError, match=r"alex\.pth is not torchvision's AlexNet state dict"):
        load_lpips(str(wrong))
