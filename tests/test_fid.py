"""FID: pytorch-fid's distance equals a direct scipy computation; the Inception path loads locally."""

import numpy as np
import pytest
import scipy.linalg
import torch

from diffrepro.device_standin import random_fid_inception_state
from diffrepro.errors import UserError
from diffrepro.features import feature_statistics, frechet_distance, load_inception


def _direct_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(sa @ sb).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa + sb - 2 * covmean))


def test_fid_equals_a_direct_scipy_computation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 8))
    b = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8)) * 0.5 + 1.0
    ours = frechet_distance(feature_statistics(a), feature_statistics(b))
    assert ours == pytest.approx(_direct_fid(a, b), rel=1e-6)


def test_fid_of_a_set_against_itself_is_zero():
    a = np.random.default_rng(1).normal(size=(500, 16))
    assert abs(frechet_distance(feature_statistics(a), feature_statistics(a))) < 1e-6


def test_fid_of_two_gaussians_matches_the_closed_form():
    # N(0, I) vs N(m, 4 I) in d dims: ‖m‖² + d·(1 + 4 − 2·2) = ‖m‖² + d
    rng = np.random.default_rng(2)
    d, m = 4, np.array([1.0, 0, 0, 0])
    a = rng.normal(size=(200_000, d))
    b = rng.normal(size=(200_000, d)) * 2 + m
    assert frechet_distance(feature_statistics(a), feature_statistics(b)) == pytest.approx(1.0 + d, rel=0.02)


def test_inception_loads_from_a_local_file_through_pytorch_fid(tmp_path):
    state = random_fid_inception_state()
    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, weights)
    loaded = load_inception(str(weights))
    # Mixed_7c's pool-branch conv sits in the last block of pytorch-fid's wrapper
    assert torch.equal(loaded.blocks[3][2].branch_pool.conv.weight, state["Mixed_7c.branch_pool.conv.weight"])
    with torch.no_grad():
        feats = loaded(torch.rand(2, 3, 75, 75))[0]
    assert feats.shape == (2, 2048, 1, 1)


def test_fewer_inception_dims_give_what_pytorch_fid_computes_from_image_files(tmp_path):
    """`features.inception_dims` 64: FeatureNet's features of uint8 images equal pytorch-fid's own
    `get_activations` on the same images as PNG files (its loading, scaling and spatial pooling)."""
    from PIL import Image
    from pytorch_fid.fid_score import get_activations
    from diffrepro.features import FeatureNet

    weights = tmp_path / "inception.pth"
    torch.save(random_fid_inception_state(), weights)
    images = np.random.default_rng(4).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    files = []
    for i, image in enumerate(images):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(files[-1])
    net = load_inception(str(weights), 64)
    ours = FeatureNet("inception", inception=net)(images)["features"]
    theirs = get_activations([str(f) for f in files], net, batch_size=2, dims=64, device="cpu", num_workers=0)
    assert ours.shape == (2, 64) and np.allclose(ours, theirs, atol=1e-5)


def test_missing_inception_weights_name_the_file_and_the_url(tmp_path):
    with pytest.raises(UserError, match="pt_inception-2015-12-05-6726825d.pth"):
        load_inception(str(tmp_path / "missing.pth"))


def test_streamed_split_statistics_equal_the_in_memory_ones(tmp_path):
    from diffrepro.data import shards
    from diffrepro.features import FeatureNet, split_statistics
    from diffrepro.models.judge import Judge

    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
    shards.write_split(tmp_path / "train", images, np.zeros(50), np.zeros(50), shard_size=16)
    net = FeatureNet("judge", judge=Judge(4, 2, width=8).eval())
    mu, sigma = split_statistics(net, tmp_path / "train", chunk=7)
    ref_mu, ref_sigma = feature_statistics(net(images)["features"])
    assert np.allclose(mu, ref_mu, atol=1e-6) and np.allclose(sigma, ref_sigma, atol=1e-6)
