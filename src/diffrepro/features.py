"""The FID networks (judge CNN, Inception) and their statistics, for the `features` stage.

Default scale: train the judge CNN on the real training images, report its held-out accuracy
(must be ≥ 95 % fine-class to be a trustworthy judge) and its accuracy on the autoencoder's
reconstructions (the ceiling any latent model can reach). Paper scale: pytorch-fid's InceptionV3
loaded from a local weights file. Both write the reference statistics (μ, Σ) of the training
split once, so every run's FID reuses them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_fid.fid_score import calculate_frechet_distance
from tqdm import tqdm

from diffrepro.data import shards
from diffrepro.errors import UserError
from diffrepro.inputs import read_json, read_safetensors
from diffrepro.models.autoencoder import to_uint8, to_unit_range
from diffrepro.models.judge import Judge
from diffrepro.paths import FEATURES
from diffrepro.sources import INCEPTION_HELP



def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(μ, Σ) of a feature matrix, float64, as pytorch-fid computes them."""
    features = np.asarray(features, np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def split_statistics(net: "FeatureNet", split_dir: Path, chunk: int = 4096,
                     accelerator=None) -> tuple[np.ndarray, np.ndarray]:
    """(μ, Σ) of a whole split's features, streamed chunk by chunk (float64 running sums), so a
    paper-scale reference set never has to fit in memory. With an accelerator, process k takes
    chunks k, k + N, ... and the sums are added across processes."""
    split = shards.ShardedSplit(split_dir)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    dim = net(split.take(np.arange(1))["images"])["features"].shape[1]  # a process may get no chunk
    n, total, outer = 0, np.zeros(dim), np.zeros((dim, dim))
    for start in range(0, len(split), chunk)[rank::world]:
        f = net(split.take(np.arange(start, min(start + chunk, len(split))))["images"])["features"]
        f = f.astype(np.float64)
        total = total + f.sum(0)
        outer = outer + f.T @ f
        n += len(f)
    if world > 1:
        sums = [torch.as_tensor(np.asarray(v, np.float64), device=accelerator.device) for v in (n, total, outer)]
        n, total, outer = (accelerator.reduce(v, "sum").cpu().numpy() for v in sums)
    mu = total / n
    return mu, (outer - n * np.outer(mu, mu)) / (n - 1)


def frechet_distance(stats_a, stats_b) -> float:
    """FID between two (μ, Σ) pairs, by pytorch-fid's `calculate_frechet_distance`."""
    return float(calculate_frechet_distance(stats_a[0], stats_a[1], stats_b[0], stats_b[1]))


class FeatureNet:
    """Features and class predictions of uint8 NHWC images, whichever network the profile uses."""

    def __init__(self, kind: str, judge: Judge | None = None, inception=None, device="cpu"):
        self.kind, self.device = kind, torch.device(device)
        self.judge = judge.to(self.device) if judge is not None else None
        self.inception = inception.to(self.device) if inception is not None else None

    @classmethod
    def load(cls, params: dict, device="cpu") -> "FeatureNet":
        cfg = params["features"]
        if cfg["kind"] == "inception":
            return cls("inception", inception=load_inception(cfg["inception_weights"], cfg["inception_dims"]),
                       device=device)
        judge = Judge(**read_json(FEATURES / "judge_config.json", "dvc repro features"))
        judge.load_state_dict(read_safetensors(FEATURES / "judge.safetensors", "dvc repro features"))
        return cls("judge", judge=judge.eval(), device=device)

    @torch.no_grad()
    def on_device(self, images_uint8) -> dict[str, torch.Tensor]:
        """One batch's {"features"} (+ the judge's {"fine_pred", "super_pred"}) on the net's device."""
        x = to_unit_range(images_uint8).to(self.device)
        if self.kind == "inception":  # blocks below the pool are averaged over space, as pytorch-fid does
            return {"features": F.adaptive_avg_pool2d(self.inception((x + 1) / 2)[0], 1).flatten(1)}
        h = self.judge.features(x)
        return {"features": h, "fine_pred": self.judge.fine_head(h).argmax(1),
                "super_pred": self.judge.super_head(h).argmax(1)}

    def __call__(self, images: np.ndarray, batch_size: int = 512) -> dict[str, np.ndarray]:
        """`on_device` over all images in batches, as numpy arrays."""
        out: dict[str, list] = {}
        for i in range(0, len(images), batch_size):
            for key, value in self.on_device(images[i:i + batch_size]).items():
                out.setdefault(key, []).append(value.cpu().numpy())
        return {k: np.concatenate(v) for k, v in out.items()}


def load_inception(weights_path: str, dims: int = 2048):
    """pytorch-fid's InceptionV3 with weights from a LOCAL file, its output the block of `dims`
    features (pytorch-fid's `--dims`: 2048 = the pool features every paper's FID uses)."""
    from pytorch_fid import inception as fid_inception

    path = Path(weights_path)
    if not path.exists():
        raise UserError(f"Inception weights {path} not found: {INCEPTION_HELP}")
    original = fid_inception.load_state_dict_from_url
    fid_inception.load_state_dict_from_url = lambda *a, **k: torch.load(path, map_location="cpu", weights_only=True)
    try:
        net = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[dims]],
                                        use_fid_inception=True)
    finally:
        fid_inception.load_state_dict_from_url = original
    return net.eval()


def train_judge(images: np.ndarray, labels: np.ndarray, super_labels: np.ndarray, num_classes: int,
                num_super: int, cfg: dict, seed: int) -> Judge:
    """Cross-entropy on both heads, random flips and 1-px shifts, cosine learning rate."""
    torch.manual_seed(seed)
    judge = Judge(num_classes, num_super, cfg["width"])
    opt = torch.optim.AdamW(judge.parameters(), lr=cfg["lr"], weight_decay=1e-4)
    x_all, y_all, s_all = to_unit_range(images), torch.from_numpy(labels), torch.from_numpy(super_labels)
    generator = torch.Generator().manual_seed(seed)
    judge.train()
    for step in tqdm(range(cfg["steps"]), desc="judge", mininterval=5):
        idx = torch.randint(len(x_all), (cfg["batch_size"],), generator=generator)
        x = x_all[idx]
        flip = torch.rand(len(x), generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        dx, dy = torch.randint(-1, 2, (2,), generator=generator).tolist()
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        for group in opt.param_groups:
            group["lr"] = cfg["lr"] * 0.5 * (1 + math.cos(math.pi * step / cfg["steps"]))
        fine, sup = judge(x)
        loss = F.cross_entropy(fine, y_all[idx]) + F.cross_entropy(sup, s_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return judge.eval()


def heldout_sample(split_dir: Path, seed: int, limit: int = 10_000) -> dict[str, np.ndarray]:
    """The held-out split, or a seeded random subset of `limit` records of a large one."""
    split = shards.ShardedSplit(split_dir)
    if len(split) <= limit:
        return split.take(np.arange(len(split)))
    return split.take(np.sort(np.random.default_rng(seed).choice(len(split), limit, replace=False)))


@torch.no_grad()
def reconstruct(vae, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Autoencoder round trip (posterior mean) of uint8 images, on the VAE's device."""
    device = next(vae.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = to_unit_range(images[i:i + batch_size]).to(device)
        out.append(to_uint8(vae.decode(vae.encode(x).latent_dist.mean).sample))
    return np.concatenate(out)
