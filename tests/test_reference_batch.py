"""The ADM evaluator's protocol: reference-batch statistics read strictly (never arr_0 with them),
arr_0 streamed exactly, FID and sFID against them equal a direct scipy computation, the Inception
Score meets its closed forms and scipy's KL, precision / recall equal a brute-force evaluation of
the evaluator's definition, and the logits and spatial features are the FID Inception's own
classifier and mixed_6/conv on the same pass."""

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import scipy.stats
import torch

from diffrepro import reference_batch as rb
from diffrepro.device_standin import random_fid_inception_state
from diffrepro.errors import UserError

URL_256 = ("https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
           "VIRTUAL_imagenet256_labeled.npz")


def _write_reference(path, features, **overrides):
    """A reference batch in the official layout: tiny images in arr_0, statistics of `features`."""
    arrays = {"arr_0": np.zeros((2, 4, 4, 3), np.uint8), "mu": features.mean(0),
              "sigma": np.cov(features, rowvar=False), "mu_s": np.zeros(7), "sigma_s": np.eye(7)}
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


@pytest.fixture
def dim8(monkeypatch):
    """8-d 'pool features', so sqrtm stays instant; the 2048-d layout is read in its own test."""
    monkeypatch.setattr(rb, "POOL_DIM", 8)


def _direct_fid(features, mu, sigma) -> float:
    mu_f, sigma_f = features.mean(0), np.cov(features, rowvar=False)
    covmean = scipy.linalg.sqrtm(sigma_f @ sigma).real
    return float(((mu_f - mu) ** 2).sum() + np.trace(sigma_f + sigma - 2 * covmean))


def test_the_official_layout_is_read_without_touching_arr_0(tmp_path):
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=2048).astype(np.float32), np.eye(2048, dtype=np.float32)
    # a pickled arr_0: reading it (allow_pickle=False) would fail, so success shows it is skipped
    path = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    np.savez(path, arr_0=np.array([object()]), mu=mu, sigma=sigma, mu_s=np.ones(7), sigma_s=np.eye(7))
    ref = rb.read_reference_batch(path)
    assert ref.mu.dtype == ref.sigma.dtype == np.float64
    assert np.array_equal(ref.mu, mu) and np.array_equal(ref.sigma, sigma)
    assert np.array_equal(ref.mu_s, np.ones(7)) and np.array_equal(ref.sigma_s, np.eye(7))


def test_fid_and_sfid_against_stored_statistics(tmp_path, dim8):
    rng = np.random.default_rng(1)
    features, spatial = rng.normal(size=(300, 8)), rng.normal(size=(300, 5))
    ref = rb.read_reference_batch(_write_reference(tmp_path / "ref.npz", features, mu_s=spatial.mean(0),
                                                   sigma_s=np.cov(spatial, rowvar=False)))
    assert abs(rb.reference_fid(features, ref)) < 1e-6
    assert abs(rb.reference_fid(spatial, ref, spatial=True)) < 1e-6
    other = rng.normal(size=(200, 8)) @ rng.normal(size=(8, 8)) * 0.5 + 1.0
    assert rb.reference_fid(other, ref) == pytest.approx(_direct_fid(other, ref.mu, ref.sigma), rel=1e-6)
    assert rb.reference_fid(other[:, :5], ref, spatial=True) == pytest.approx(
        _direct_fid(other[:, :5], ref.mu_s, ref.sigma_s), rel=1e-6)
    with pytest.raises(UserError, match=r"\(200, 7\)"):
        rb.reference_fid(other[:, :7], ref)
    with pytest.raises(UserError, match=r"\(200, 8\), not \(N, 5\).*mixed_6/conv"):
        rb.reference_fid(other, ref, spatial=True)


def _brute_force_precision_recall(samples, reference, k=3):
    """The evaluator's ManifoldEstimator written out: a ball per point reaching its k-th nearest
    neighbour (itself at index 0), squared distances, `distance <= radius`."""
    def radii(points):
        d2 = ((points[:, None] - points[None]) ** 2).sum(-1)
        return np.sort(d2, axis=1)[:, k]

    def inside(points, centres):
        d2 = ((points[:, None] - centres[None]) ** 2).sum(-1)
        return (d2 <= radii(centres)[None]).any(axis=1).mean()

    return inside(samples, reference), inside(reference, samples)


def test_precision_recall_is_the_evaluators_manifold_definition():
    rng = np.random.default_rng(4)
    reference = rng.normal(size=(60, 6))
    samples = np.concatenate([rng.normal(size=(30, 6)), rng.normal(size=(20, 6)) * 0.3 + 4.0])  # 30 on, 20 off
    expected = _brute_force_precision_recall(samples, reference)
    scores = rb.precision_recall(samples, reference)
    assert (scores["precision"], scores["recall"]) == pytest.approx(expected, abs=1e-6)
    assert 0.3 < expected[0] < 0.8 and 0.2 < expected[1] < 1  # neither closed-form end: the test can tell
    assert rb.precision_recall(reference, reference) == {"precision": 1.0, "recall": 1.0}
    assert rb.precision_recall(reference + 100.0, reference) == {"precision": 0.0, "recall": 0.0}
    with pytest.raises(UserError, match=r"more than 3 images in each set .*: got 3 samples"):
        rb.precision_recall(samples[:3], reference)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_arr_0_is_streamed_exactly_in_batches(tmp_path, save):
    images = np.random.default_rng(5).integers(0, 256, (10, 6, 5, 3), dtype=np.uint8)
    path = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    save(path, arr_0=images, mu=np.zeros(3), sigma=np.eye(3))
    batches = list(rb.reference_images(path, batch_size=4))
    assert [len(b) for b in batches] == [4, 4, 2] and np.array_equal(np.concatenate(batches), images)
    np.savez(path, arr_0=images.astype(np.float32), mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(UserError, match="'arr_0' is float32") as err:
        list(rb.reference_images(path, batch_size=4))
    assert "\n" not in str(err.value) and str(path) in str(err.value) and URL_256 in str(err.value)


@pytest.mark.parametrize("case, overrides, expect", [
    ("missing key", {"sigma": None}, "not mu/sigma"),
    ("only one spatial key", {"sigma_s": None}, "not mu/sigma"),
    ("wrong-shaped sigma", {"sigma": np.eye(8)[:, :7]}, r"'sigma' is float64 \(8, 7\)"),
    ("integer mu", {"mu": np.zeros(8, np.int64)}, "'mu' is int64"),
    ("wrong-shaped sigma_s", {"sigma_s": np.eye(6)}, "'sigma_s'"),
    ("non-finite mu", {"mu": np.full(8, np.nan)}, "NaN or inf"),
])
def test_a_bad_reference_batch_is_refused_in_one_line(tmp_path, dim8, case, overrides, expect):
    path = _write_reference(tmp_path / "VIRTUAL_imagenet256_labeled.npz", np.eye(8), **overrides)
    with pytest.raises(UserError, match=expect) as err:
        rb.read_reference_batch(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and URL_256 in message


@pytest.mark.parametrize("content, expect", [(None, "is missing"), (b"PK\x03\x04 cut short", "truncated or corrupt")])
def test_a_missing_or_corrupt_file_names_itself_and_where_to_get_it(tmp_path, content, expect):
    path = tmp_path / "VIRTUAL_imagenet512.npz"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=expect) as err:
        rb.read_reference_batch(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value) and "imagenet/512/" in str(err.value)


def _logits_of(probs):
    with np.errstate(divide="ignore"):
        return np.log(probs)  # softmax(log p) = p; one-hot rows become 0 / -inf logits


def test_inception_score_closed_forms():
    k = 10
    one_hot_even = np.tile(np.eye(k), (3, 1))  # every class 3 times: p(y) uniform, each KL = log k
    assert rb.inception_score(_logits_of(one_hot_even))[0] == pytest.approx(k)
    same = np.tile(scipy.special.softmax(np.arange(k, dtype=float)), (20, 1))  # p(y|x) = p(y)
    assert rb.inception_score(np.log(same)) == pytest.approx((1.0, 0.0))
    # consecutive splits, scored apart: 4 distinct classes (IS 4), then one class (IS 1)
    two_splits = np.concatenate([np.eye(k)[:4], np.tile(np.eye(k)[:1], (4, 1))])
    assert rb.inception_score(_logits_of(two_splits), split_size=4) == pytest.approx((2.5, 1.5))


def test_inception_score_equals_scipy_kl_per_split():
    logits = np.random.default_rng(2).normal(size=(30, 12)) * 3
    scores = []
    for start in range(0, 30, 7):  # a short last split of 2, kept as the evaluator keeps it
        p = scipy.special.softmax(logits[start:start + 7], axis=1)
        scores.append(np.exp(np.mean([scipy.stats.entropy(row, p.mean(0)) for row in p])))
    assert rb.inception_score(logits, split_size=7) == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-10)


def test_logits_and_spatial_features_are_the_fid_inceptions_own(tmp_path, monkeypatch, one_thread):
    """Against pytorch-fid's own full torchvision model (fc included) on the same random weights:
    its avgpool output is our pool features, its fc output (with bias) our bias-free logits + bias,
    and its Mixed_6d.branch1x1 (the graph's mixed_6/conv) our spatial features: first 7 channels,
    flattened height, width, channel as the TF graph's NHWC tensor is."""
    from pytorch_fid import inception as fid_inception

    state = random_fid_inception_state()
    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, weights)
    net = rb.load_inception_with_logits(str(weights))
    images = np.random.default_rng(3).integers(0, 256, (1, 299, 299, 3), dtype=np.uint8)
    features = rb.inception_features(net, [images])
    pool, logits, spatial = features["pool"], features["logits"], features["spatial"]
    assert pool.shape == (1, 2048) and logits.shape == (1, 1008) and logits.std() > 0
    assert spatial.shape == (1, 17 * 17 * 7) and spatial.std() > 0

    monkeypatch.setattr(fid_inception, "load_state_dict_from_url", lambda *a, **k: state)
    full = fid_inception.fid_inception_v3().eval()
    seen = {}
    full.avgpool.register_forward_hook(lambda module, inp, out: seen.update(pool=out.flatten(1)))
    full.Mixed_6d.branch1x1.register_forward_hook(lambda module, inp, out: seen.update(mixed_6_conv=out))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    with torch.no_grad():
        ref_logits = full(x)
    assert np.allclose(pool, seen["pool"].numpy(), rtol=1e-4, atol=1e-6 * np.abs(pool).max())
    scale = np.abs(ref_logits.numpy()).max()
    assert np.allclose(logits + state["fc.bias"].numpy(), ref_logits.numpy(), rtol=1e-4, atol=1e-5 * scale)
    mixed_6_conv = seen["mixed_6_conv"][0].numpy()  # (192, 17, 17), after its ReLU
    for h, w, c in [(0, 0, 0), (0, 1, 0), (0, 0, 6), (16, 3, 2), (5, 16, 6)]:
        assert spatial[0, (h * 17 + w) * 7 + c] == pytest.approx(mixed_6_conv[c, h, w], rel=1e-4, abs=1e-6)
