"""The shared latent space: diffusers save/load round trip, flip moments, latent sampling."""

import numpy as np
import pytest
import torch

from diffrepro.data import shards
from diffrepro.errors import UserError
from diffrepro.latents import LatentSet, encode_moments
from diffrepro.models.autoencoder import load_autoencoder, tiny_autoencoder, to_uint8, to_unit_range


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    model = tiny_autoencoder(16, (8, 16), 4, 1).eval()
    model.register_to_config(scaling_factor=0.7)
    return model


def test_save_load_round_trip_through_diffusers(vae, tmp_path):
    vae.save_pretrained(tmp_path / "ae", safe_serialization=True)
    loaded = load_autoencoder(tmp_path / "ae")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        a, b = vae.encode(x).latent_dist, loaded.encode(x).latent_dist
        assert torch.equal(a.mean, b.mean) and torch.equal(a.logvar, b.logvar)
        assert torch.equal(vae.decode(a.mean).sample, loaded.decode(b.mean).sample)
    assert loaded.config.scaling_factor == 0.7


def test_missing_autoencoder_names_the_folder(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path / "nothing")):
        load_autoencoder(tmp_path / "nothing")


def test_flip_moments_equal_moments_of_the_flipped_input(vae):
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    moments = encode_moments(vae, images, batch_size=2)
    flipped = encode_moments(vae, images[:, :, ::-1].copy(), batch_size=3)
    assert moments.shape == (5, 2, 8, 8, 8)
    assert np.allclose(moments[:, 1], flipped[:, 0], atol=1e-5)
    assert np.allclose(moments[:, 0], flipped[:, 1], atol=1e-5)


def test_latent_set_draws_fresh_scaled_posterior_samples(tmp_path):
    n, c = 4, 2
    mean = np.random.default_rng(1).normal(size=(n, 2, c, 2, 2)).astype(np.float32)
    logvar = np.full_like(mean, np.log(0.25))
    with shards.ShardWriter(tmp_path / "train") as writer:
        writer.set_meta(scaling_factor=2.0)
        writer.add_batch(moments=np.concatenate([mean, logvar], axis=2), labels=np.arange(n),
                         super_labels=np.zeros(n, np.int64))
    latents = LatentSet(tmp_path / "train")
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([latents.sample_batch(torch.tensor([0]), gen)[0] for _ in range(4000)])
    views = torch.from_numpy(mean[0])  # (2 views, c, 2, 2)
    # mixture of the two views with std 0.5, times the scaling factor 2
    expected_mean = 2 * views.mean(0)
    assert torch.allclose(draws.mean(0), expected_mean, atol=0.06)
    expected_var = 4 * (0.25 + views.var(0, unbiased=False))
    assert torch.allclose(draws.var(0), expected_var, rtol=0.1)


def test_uint8_round_trip_of_the_pixel_range():
    images = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    assert np.array_equal(to_uint8(to_unit_range(images)), images)


def test_images_per_class_keeps_the_first_k_records_of_every_class(tmp_path):
    from diffrepro.runs import ImageSet, PerClassSubset

    labels = np.array([2, 0, 2, 1, 0, 2, 1, 0, 0, 2])  # classes interleaved, unequal counts (4, 2, 4)
    images = np.zeros((10, 4, 4, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(10) * 20  # each image shows its record index
    shards.write_split(tmp_path / "train", images, labels, labels // 2)
    full = ImageSet(tmp_path / "train")
    subset = PerClassSubset(full, 2, "train")
    assert subset.keep.tolist() == [0, 1, 2, 3, 4, 6]  # class 0: 1, 4; class 1: 3, 6; class 2: 0, 2
    assert subset.labels.tolist() == [2, 0, 2, 1, 0, 1] and subset.super_labels.tolist() == [1, 0, 1, 0, 0, 0]
    drawn = subset.sample_batch(torch.arange(6), torch.Generator().manual_seed(0))
    corner = torch.maximum(drawn[:, 0, 0, 0], drawn[:, 0, 0, -1])  # the flip may move the pixel
    assert torch.allclose((corner + 1) / 2 * 255 / 20, subset.keep.double().float(), atol=0.05)
    with pytest.raises(UserError, match="images_per_class 3 exceeds the 2 records"):
        PerClassSubset(full, 3, "train")
