"""`extract_latents` stage and the latent training set (the fast-DiT / U-ViT protocol).

Each image is encoded once; we store the posterior moments (mean, log-variance) of the image
and of its horizontal flip. Training draws a fresh latent from them every step — a random flip
and a fresh posterior sample — so pre-extraction loses neither augmentation nor VAE noise
(fast-DiT froze one sample per image; U-ViT stores both moments, as here).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffrepro.atomic import atomic_path
from diffrepro.data import shards
from diffrepro.models.autoencoder import load_autoencoder, to_unit_range

OUT_DIR = Path("data/latents")


@torch.no_grad()
def encode_moments(vae, images_uint8: np.ndarray, batch_size: int) -> np.ndarray:
    """(N, 2, 2C, h, w) float32: [mean ‖ logvar] of each image (index 0) and its flip (index 1)."""
    out = []
    for i in range(0, len(images_uint8), batch_size):
        x = to_unit_range(images_uint8[i:i + batch_size])
        both = torch.cat([x, x.flip(-1)])
        dist = vae.encode(both).latent_dist
        moments = torch.cat([dist.mean, dist.logvar], dim=1)
        out.append(torch.stack(moments.chunk(2), dim=1).float().numpy())
    return np.concatenate(out)


def extract_latents_stage(params: dict, splits=("train", "heldout", "train_small", "base")) -> None:
    prepared = Path(params["data"]["prepared_dir"])
    vae = load_autoencoder("models/autoencoder")
    batch_size = params["latents"]["batch_size"]
    with atomic_path(OUT_DIR, is_dir=True) as tmp:
        for split in splits:
            if not (prepared / split).exists():
                continue
            data = shards.read_split(prepared / split)
            with shards.ShardWriter(tmp / split) as writer:
                writer.set_meta(scaling_factor=vae.config.scaling_factor)
                for i in range(0, len(data["labels"]), 4096):
                    sl = slice(i, i + 4096)
                    writer.add_batch(moments=encode_moments(vae, data["images"][sl], batch_size),
                                     labels=data["labels"][sl], super_labels=data["super_labels"][sl])


class LatentSet:
    """In-memory latent moments of one split; `sample_batch` draws fresh, scaled latents."""

    def __init__(self, split_dir: str | Path):
        data = shards.read_split(split_dir)
        self.moments = torch.from_numpy(data["moments"])
        self.labels = torch.from_numpy(data["labels"])
        self.super_labels = torch.from_numpy(data["super_labels"])
        self.scaling_factor = shards.read_index(split_dir)["scaling_factor"]

    def __len__(self) -> int:
        return len(self.labels)

    def sample_batch(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Latents for records `index`: random flip view, posterior sample, × scaling_factor."""
        flip = torch.randint(0, 2, (len(index),), generator=generator)
        moments = self.moments[index, flip]
        mean, logvar = moments.chunk(2, dim=1)
        eps = torch.randn(mean.shape, generator=generator)
        return (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * eps) * self.scaling_factor
