"""The ADM evaluator's ImageNet protocol with pytorch-fid's Inception: FID and sFID against the
statistics stored in a reference batch (`VIRTUAL_imagenet256_labeled.npz`), the Inception Score,
and precision / recall against the batch's 10,000 images (torch-fidelity's k-NN manifolds).

openai/guided-diffusion `evaluations/evaluator.py` (the FID / IS behind the papers' ImageNet
tables) runs the TF graph `classify_image_graph_def.pb`. pytorch-fid's port of
the same 2015-12-05 weights resizes and normalises differently (torch bilinear and x/127.5 − 1, where
the graph does TF1 bilinear and (x − 128)/128) and its README says FIDs "differ slightly" from
TF's, so these numbers track the papers' closely but are not them: the paper number is the
evaluator itself on `python -m diffrepro adm-npz <run>`.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Iterator
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
SPATIAL_CHANNELS = 7  # the evaluator keeps mixed_6/conv[..., :7]: 17 × 17 × 7 = 2023 features
PR_NEIGHBOURS = 3  # the evaluator's ManifoldEstimator nhood_sizes=(3,)
BATCH_SIZE = 64  # the evaluator's Inception batch


@dataclass(frozen=True)
class ReferenceStats:
    """A reference batch's stored statistics (float64). `mu`/`sigma`: pool_3 features over the whole
    data set (not over the 10,000 images of `arr_0`, which are there for precision/recall).
    `mu_s`/`sigma_s`: the graph's mixed_6/conv spatial features (sFID), None where the file has none."""
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


def reference_fid(sample_pool_features: np.ndarray, ref: ReferenceStats, spatial: bool = False) -> float:
    """FID of samples' 2048-d pool features against the stored (mu, sigma) — or, `spatial`, sFID of
    their 2023-d mixed_6/conv features against (mu_s, sigma_s) — as the evaluator's
    `sample_stats.frechet_distance(ref_stats)` with the sample statistics from np.mean / np.cov."""
    mu, sigma = (ref.mu_s, ref.sigma_s) if spatial else (ref.mu, ref.sigma)
    features = np.asarray(sample_pool_features)
    if features.ndim != 2 or features.shape[1] != mu.shape[0]:
        raise UserError(f"sample features are {features.shape}, not (N, {mu.shape[0]}): the reference "
                        f"batch's statistics are Inception {'mixed_6/conv' if spatial else 'pool_3'} features "
                        "(features.kind: inception)")
    return frechet_distance(feature_statistics(features), (mu, sigma))


def precision_recall(sample_pool_features: np.ndarray, reference_pool_features: np.ndarray) -> dict:
    """Improved precision / recall (Kynkäänniemi et al. 2019) as the evaluator's `compute_prec_recall`:
    each set's manifold is the union of balls reaching every feature's 3rd nearest neighbour;
    precision = the share of samples inside the reference's manifold, recall = the share of
    reference images inside the samples'. Computed by torch-fidelity (Euclidean distances in
    float32, where the evaluator compares squared distances in float16 with a float32 fallback)."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    smallest = min(len(sample_pool_features), len(reference_pool_features))
    if smallest <= PR_NEIGHBOURS:
        raise UserError(f"precision/recall need more than {PR_NEIGHBOURS} images in each set (each ball reaches "
                        f"the {PR_NEIGHBOURS}rd nearest neighbour): got {len(sample_pool_features)} samples and "
                        f"{len(reference_pool_features)} reference images; raise sample.per_class")
    scores = prc_features_to_metric(torch.as_tensor(sample_pool_features, dtype=torch.float32),
                                    torch.as_tensor(reference_pool_features, dtype=torch.float32),
                                    prc_neighborhood=PR_NEIGHBOURS, prc_batch_size=10_000, save_cpu_ram=True,
                                    verbose=False)
    return {"precision": scores["precision"], "recall": scores["recall"]}


def reference_images(path: str | Path, batch_size: int) -> Iterator[np.ndarray]:
    """The reference batch's `arr_0` (uint8 N×H×W×3) in batches, streamed from the .npz member as the
    evaluator's NpzArrayReader streams it: at 256 px the 10,000 images are 2 GB."""
    path = Path(path)
    with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as member:
        version = np.lib.format.read_magic(member)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(member)
        if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran_order:
            raise UserError(f"{path}: 'arr_0' is {dtype} {shape}, not uint8 (N, H, W, 3) images: "
                            f"not an ADM reference batch; {_download_hint(path)}")
        per_image = int(np.prod(shape[1:]))
        for start in range(0, shape[0], batch_size):
            count = min(batch_size, shape[0] - start)
            data = member.read(count * per_image)
            if len(data) != count * per_image:
                raise UserError(f"{path}: 'arr_0' ends after {start} images of {shape[0]}: the file is truncated; "
                                f"{_download_hint(path)}")
            yield np.frombuffer(bytearray(data), np.uint8).reshape(count, *shape[1:])  # writable, as torch wants


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
    """pytorch-fid's InceptionV3 and its 1008-way classifier weight, from one weights file, giving
    the evaluator's three feature sets in one pass.

    The logits are pool_3 @ W without the bias, as the evaluator builds them: it takes the weight
    input of the graph's `softmax/logits/MatMul` and multiplies the pool features by it (so did
    openai/improved-gan; torch-fidelity calls these `logits_unbiased`). All 1008 columns are kept,
    as the evaluator keeps them, including the graph's non-ImageNet ones.

    The spatial features are the graph's `mixed_6/conv:0` — the ReLU output of the 1×1 branch of
    its 7th mixed block, the one pytorch-fid (after torchvision) names Mixed_6d — first 7 channels,
    flattened in the graph's NHWC order so they line up with the stored mu_s / sigma_s.
    """

    def __init__(self, inception: torch.nn.Module, fc_weight: torch.Tensor):
        super().__init__()
        self.inception = inception
        self.register_buffer("fc_weight", fc_weight)
        self._spatial: torch.Tensor | None = None
        mixed_6d = inception.blocks[2][6]  # Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, 6e
        mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output) -> None:
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)

    @torch.no_grad()
    def forward(self, images_01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """NCHW images in [0, 1] → (pool features (N, 2048), logits (N, 1008), spatial (N, 2023))."""
        pool = self.inception(images_01)[0].flatten(1)
        spatial, self._spatial = self._spatial, None
        return pool, pool @ self.fc_weight.T, spatial


def load_inception_with_logits(weights_path: str) -> InceptionWithLogits:
    """pytorch-fid's wrapper drops the classifier, so `fc.weight` is read from the same local file
    (pytorch-fid loads it strictly into a 1008-class torchvision model: the key is always there)."""
    inception = load_inception(weights_path)
    fc_weight = torch.load(weights_path, map_location="cpu", weights_only=True)["fc.weight"]
    return InceptionWithLogits(inception, fc_weight).eval()


def adm_scores(inception_weights: str, reference_batch: str, images: np.ndarray, device) -> dict:
    """The evaluator's five numbers for uint8 samples taken in `evaluator_order` (the order
    `python -m diffrepro adm-npz` writes them in): FID and sFID against the stored statistics (sFID
    only where the file has mu_s), Inception Score, precision and recall against `arr_0`."""
    reference = read_reference_batch(reference_batch)
    net = load_inception_with_logits(inception_weights).to(device)
    features = inception_features(net, [images[evaluator_order(len(images))]])
    reference_pool = inception_features(net, reference_images(reference_batch, BATCH_SIZE))["pool"]
    score, spread = inception_score(features["logits"])
    scores = {"fid_reference_batch": reference_fid(features["pool"], reference), "inception_score": score,
              "inception_score_std": spread, **precision_recall(features["pool"], reference_pool)}
    if reference.mu_s is not None:
        scores["sfid_reference_batch"] = reference_fid(features["spatial"], reference, spatial=True)
    return scores


def inception_features(net: InceptionWithLogits, image_batches: Iterable[np.ndarray],
                       batch_size: int = BATCH_SIZE) -> dict[str, np.ndarray]:
    """uint8 NHWC images (the evaluator's `arr_0`), in one array or streamed → {"pool", "logits",
    "spatial"} as numpy, computed in batches on the net's device."""
    device = net.fc_weight.device
    out: dict[str, list[np.ndarray]] = {"pool": [], "logits": [], "spatial": []}
    for images in image_batches:
        for i in range(0, len(images), batch_size):
            x = torch.as_tensor(images[i:i + batch_size]).to(device).permute(0, 3, 1, 2).float() / 255
            for key, value in zip(out, net(x)):
                out[key].append(value.cpu().numpy())
    return {key: np.concatenate(values) for key, values in out.items()}
