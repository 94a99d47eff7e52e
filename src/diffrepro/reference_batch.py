"""The ADM evaluator's ImageNet protocol with pytorch-fid's Inception: FID against the statistics
stored in a reference batch (`VIRTUAL_imagenet256_labeled.npz`), and the Inception Score.

openai/guided-diffusion `evaluations/evaluator.py` (the FID / IS behind the papers' ImageNet
tables) runs the TF graph `classify_image_graph_def.pb`. pytorch-fid's port of
the same 2015-12-05 weights resizes and normalises differently (torch bilinear and x/127.5 − 1, where
the graph does TF1 bilinear and (x − 128)/128) and its README says FIDs "differ slightly" from
TF's, so these numbers track the papers' closely but are not them: the paper number is the
evaluator itself on `python -m diffrepro adm-npz <run>`.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.special import log_softmax

from diffrepro.adm_npz import evaluator_order
from diffrepro.errors import UserError
from diffrepro.features import feature_statistics, frechet_distance, load_inception
from diffrepro.sources import REFERENCE_URLS

POOL_DIM = 2048


@dataclass(frozen=True)
class ReferenceStats:
    """A reference batch's stored statistics (float64). `mu`/`sigma`: pool_3 features over the whole
    data set (not over the 10,000 images of `arr_0`, which are there for precision/recall).
    `mu_s`/`sigma_s`: the graph's mixed_6/conv spatial features, for sFID, which pytorch-fid's port
    does not expose; kept so the file is read once, None where the file has none."""
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None


def _download_hint(path: Path) -> str:
    url = REFERENCE_URLS.get(path.name)
    if url:
        return f"download it: curl -L -o {path} {url}"
    return "download the reference batch listed in openai/guided-diffusion evaluations/README.md"


def _checked(path: Path, name: str, value: np.ndarray, shape: tuple[int, ...], hint: str) -> np.ndarray:
    if value.shape != shape or value.dtype.kind != "f":
        raise UserError(f"{path}: '{name}' is {value.dtype} {value.shape}, not float {shape}: "
                        f"not an ADM reference batch; {hint}")
    if not np.isfinite(value).all():
        raise UserError(f"{path}: '{name}' holds NaN or inf: the file is damaged; {hint}")
    return value.astype(np.float64)


def read_reference_batch(path: str | Path) -> ReferenceStats:
    """The stored statistics of an ADM reference batch, checked. Reads only those keys: np.load on
    an .npz decompresses one member at a time, so `arr_0` (~2 GB of images) is never touched."""
    path = Path(path)
    hint = _download_hint(path)
    try:
        with np.load(path) as npz:
            keys = set(npz.files)
            if not {"mu", "sigma"} <= keys or len({"mu_s", "sigma_s"} & keys) == 1:
                raise UserError(f"{path} has keys {sorted(keys)}, not mu/sigma (+ mu_s/sigma_s): it is not an "
                                f"ADM reference batch (a sample batch holds only arr_0); {hint}")
            mu = _checked(path, "mu", npz["mu"], (POOL_DIM,), hint)
            sigma = _checked(path, "sigma", npz["sigma"], (POOL_DIM, POOL_DIM), hint)
            if "mu_s" not in keys:
                return ReferenceStats(mu, sigma)
            mu_s = npz["mu_s"]
            n = mu_s.size
            return ReferenceStats(mu, sigma, _checked(path, "mu_s", mu_s, (n,), hint),
                                  _checked(path, "sigma_s", npz["sigma_s"], (n, n), hint))
    except FileNotFoundError:
        raise UserError(f"{path} is missing: {hint}") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise UserError(f"{path} is truncated or corrupt ({type(err).__name__}): {hint}") from None


def reference_fid(sample_pool_features: np.ndarray, ref: ReferenceStats) -> float:
    """FID of samples' 2048-d pool features against the stored (mu, sigma), as the evaluator's
    `sample_stats.frechet_distance(ref_stats)` with the sample statistics from np.mean / np.cov."""
    features = np.asarray(sample_pool_features)
    if features.ndim != 2 or features.shape[1] != ref.mu.shape[0]:
        raise UserError(f"sample features are {features.shape}, not (N, {ref.mu.shape[0]}): the reference "
                        "batch's statistics are Inception pool_3 features (features.kind: inception)")
    return frechet_distance(feature_statistics(features), (ref.mu, ref.sigma))


def inception_score(logits: np.ndarray, split_size: int = 5000) -> tuple[float, float]:
    """(mean, std) over splits of exp(mean_x KL(p(y|x) ‖ p(y))), p(y) the split's mean p(y|x).

    As the evaluator's `compute_inception_score`: consecutive splits of `split_size` in file order
    (the last one may be shorter; a class-sorted sample file scores low), softmax over all 1008
    logits, the mean of the split scores; the std (np.std, as openai/improved-gan) is extra. In
    float64 with 0·log 0 = 0, where the evaluator's float32 log(0) would give NaN.
    """
    logits = np.asarray(logits, np.float64)
    scores = []
    for start in range(0, len(logits), split_size):
        log_p = log_softmax(logits[start:start + split_size], axis=1)
        p = np.exp(log_p)
        with np.errstate(divide="ignore", invalid="ignore"):  # classes with p = 0 (and p(y) = 0) drop out
            kl = np.where(p > 0, p * (log_p - np.log(p.mean(axis=0))), 0.0).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


class InceptionWithLogits(torch.nn.Module):
    """pytorch-fid's InceptionV3 and its 1008-way classifier weight, from one weights file.

    The logits are pool_3 @ W without the bias, as the evaluator builds them: it takes the weight
    input of the graph's `softmax/logits/MatMul` and multiplies the pool features by it (so did
    openai/improved-gan; torch-fidelity calls these `logits_unbiased`). All 1008 columns are kept,
    as the evaluator keeps them, including the graph's non-ImageNet ones.
    """

    def __init__(self, inception: torch.nn.Module, fc_weight: torch.Tensor):
        super().__init__()
        self.inception = inception
        self.register_buffer("fc_weight", fc_weight)

    @torch.no_grad()
    def forward(self, images_01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """NCHW images in [0, 1] → (pool features (N, 2048), logits (N, 1008)), one pass."""
        pool = self.inception(images_01)[0].flatten(1)
        return pool, pool @ self.fc_weight.T


def load_inception_with_logits(weights_path: str) -> InceptionWithLogits:
    """pytorch-fid's wrapper drops the classifier, so `fc.weight` is read from the same local file
    (pytorch-fid loads it strictly into a 1008-class torchvision model: the key is always there)."""
    inception = load_inception(weights_path)
    fc_weight = torch.load(weights_path, map_location="cpu", weights_only=True)["fc.weight"]
    return InceptionWithLogits(inception, fc_weight).eval()


def adm_scores(inception_weights: str, reference_batch: str, images: np.ndarray, device) -> dict:
    """FID against the reference batch's stored statistics and the Inception Score of uint8 samples,
    taken in `evaluator_order` (the order `python -m diffrepro adm-npz` writes them in)."""
    reference = read_reference_batch(reference_batch)
    net = load_inception_with_logits(inception_weights).to(device)
    pool, logits = pool_features_and_logits(net, images[evaluator_order(len(images))])
    score, spread = inception_score(logits)
    return {"fid_reference_batch": reference_fid(pool, reference), "inception_score": score,
            "inception_score_std": spread}


def pool_features_and_logits(net: InceptionWithLogits, images: np.ndarray,
                             batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """uint8 NHWC images (the evaluator's `arr_0`) → (pool features, logits) as numpy, in batches
    on the net's device."""
    device = net.fc_weight.device
    pools, logits = [], []
    for i in range(0, len(images), batch_size):
        x = torch.as_tensor(images[i:i + batch_size]).to(device).permute(0, 3, 1, 2).float() / 255
        pool, logit = net(x)
        pools.append(pool.cpu().numpy())
        logits.append(logit.cpu().numpy())
    return np.concatenate(pools), np.concatenate(logits)
