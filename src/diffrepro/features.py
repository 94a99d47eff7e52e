"""`features` stage: the FID network and the real data's reference statistics.

Default scale: train the judge CNN on the real training images, report its held-out accuracy
(must be ≥ 95 % fine-class to be a trustworthy judge) and its accuracy on the autoencoder's
reconstructions (the ceiling any latent model can reach). Paper scale: pytorch-fid's InceptionV3
loaded from a local weights file. Both write the reference statistics (μ, Σ) of the training
split once, so every run's FID reuses them.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_fid.fid_score import calculate_frechet_distance
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from diffrepro.atomic import atomic_path
from diffrepro.data import shards
from diffrepro.errors import UserError
from diffrepro.models.autoencoder import load_autoencoder, to_uint8, to_unit_range
from diffrepro.models.judge import Judge

OUT_DIR = Path("models/features")
INCEPTION_HELP = ("download pt_inception-2015-12-05-6726825d.pth from "
                  "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/ "
                  "(sha256 UNKNOWN: not published) and set features.inception_weights to its path")


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(μ, Σ) of a feature matrix, float64, as pytorch-fid computes them."""
    features = np.asarray(features, np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def split_statistics(net: "FeatureNet", split_dir: Path, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(μ, Σ) of a whole split's features, streamed chunk by chunk (float64 running sums), so a
    paper-scale reference set never has to fit in memory."""
    split = shards.ShardedSplit(split_dir)
    n, total, outer = 0, None, None
    for start in range(0, len(split), chunk):
        f = net(split.take(np.arange(start, min(start + chunk, len(split))))["images"])["features"]
        f = f.astype(np.float64)
        total = f.sum(0) if total is None else total + f.sum(0)
        outer = f.T @ f if outer is None else outer + f.T @ f
        n += len(f)
    mu = total / n
    return mu, (outer - n * np.outer(mu, mu)) / (n - 1)


def frechet_distance(stats_a, stats_b) -> float:
    """FID between two (μ, Σ) pairs, by pytorch-fid's `calculate_frechet_distance`."""
    return float(calculate_frechet_distance(stats_a[0], stats_a[1], stats_b[0], stats_b[1]))


class FeatureNet:
    """Features and class predictions of uint8 NHWC images, whichever network the profile uses."""

    def __init__(self, kind: str, judge: Judge | None = None, inception=None):
        self.kind, self.judge, self.inception = kind, judge, inception

    @classmethod
    def load(cls, params: dict) -> "FeatureNet":
        cfg = params["features"]
        if cfg["kind"] == "inception":
            return cls("inception", inception=load_inception(cfg["inception_weights"]))
        config = json.loads((OUT_DIR / "judge_config.json").read_text())
        judge = Judge(**config)
        judge.load_state_dict(load_file(OUT_DIR / "judge.safetensors"))
        return cls("judge", judge=judge.eval())

    @torch.no_grad()
    def __call__(self, images: np.ndarray, batch_size: int = 512) -> dict[str, np.ndarray]:
        """{"features"} plus, for the judge, {"fine_pred", "super_pred"}."""
        out: dict[str, list] = {"features": [], "fine_pred": [], "super_pred": []}
        for i in range(0, len(images), batch_size):
            x = to_unit_range(images[i:i + batch_size])
            if self.kind == "inception":
                out["features"].append(self.inception((x + 1) / 2)[0].flatten(1).numpy())
                continue
            h = self.judge.features(x)
            out["features"].append(h.numpy())
            out["fine_pred"].append(self.judge.fine_head(h).argmax(1).numpy())
            out["super_pred"].append(self.judge.super_head(h).argmax(1).numpy())
        return {k: np.concatenate(v) for k, v in out.items() if v}


def load_inception(weights_path: str):
    """pytorch-fid's InceptionV3 (2048-d pool features) with weights from a LOCAL file."""
    from pytorch_fid import inception as fid_inception

    path = Path(weights_path)
    if not path.exists():
        raise UserError(f"Inception weights {path} not found: {INCEPTION_HELP}")
    original = fid_inception.load_state_dict_from_url
    fid_inception.load_state_dict_from_url = lambda *a, **k: torch.load(path, map_location="cpu", weights_only=True)
    try:
        net = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]],
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
    """Autoencoder round trip (posterior mean) of uint8 images."""
    out = []
    for i in range(0, len(images), batch_size):
        x = to_unit_range(images[i:i + batch_size])
        out.append(to_uint8(vae.decode(vae.encode(x).latent_dist.mean).sample))
    return np.concatenate(out)


def features_stage(params: dict) -> None:
    cfg, prepared = params["features"], Path(params["data"]["prepared_dir"])
    classes = shards.read_classes(prepared)
    metrics: dict = {"kind": cfg["kind"]}
    with atomic_path(OUT_DIR, is_dir=True) as tmp:
        if cfg["kind"] == "judge":
            start = time.perf_counter()
            train = shards.read_split(prepared / "train")
            judge = train_judge(train["images"], train["labels"], train["super_labels"],
                                len(classes["classes"]), len(classes["super_classes"]), cfg, params["seed"])
            metrics["train_seconds"] = round(time.perf_counter() - start, 1)
            save_file(judge.state_dict(), tmp / "judge.safetensors")
            (tmp / "judge_config.json").write_text(json.dumps(judge.config))
            net = FeatureNet("judge", judge=judge)
        elif cfg["kind"] == "inception":
            net = FeatureNet("inception", inception=load_inception(cfg["inception_weights"]))
        else:
            raise UserError(f"params.yaml: features.kind must be judge or inception, got {cfg['kind']!r}")
        reference = split_statistics(net, prepared / "train")
        np.savez(tmp / "reference_stats.npz", mu=reference[0], sigma=reference[1])
        heldout = heldout_sample(prepared / params["data"]["heldout_split"], params["seed"])
        held = net(heldout["images"])
        metrics["fid_heldout_vs_train"] = frechet_distance(feature_statistics(held["features"]), reference)
        metrics["heldout_images_scored"] = int(len(heldout["labels"]))
        if net.kind == "judge":
            metrics["heldout_fine_accuracy"] = float((held["fine_pred"] == heldout["labels"]).mean())
            metrics["heldout_super_accuracy"] = float((held["super_pred"] == heldout["super_labels"]).mean())
            if (Path("models/autoencoder") / "config.json").exists():
                recon = net(reconstruct(load_autoencoder("models/autoencoder"), heldout["images"]))
                metrics["reconstruction_fine_accuracy"] = float((recon["fine_pred"] == heldout["labels"]).mean())
                metrics["reconstruction_super_accuracy"] = float(
                    (recon["super_pred"] == heldout["super_labels"]).mean())
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
    if metrics.get("heldout_fine_accuracy", 1.0) < 0.95:
        print(f"warning: the judge reaches only {metrics['heldout_fine_accuracy']:.1%} fine-class accuracy "
              "on held-out images (target ≥ 95 %); raise features.steps")
