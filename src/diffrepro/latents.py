"""What the `extract_latents` stage stores, and the latent training set (fast-DiT / U-ViT protocol).

Each image is encoded once; we store the posterior moments (mean, log-variance) of the image
and of its horizontal flip. Training draws a fresh latent from them every step — a random flip
and a fresh posterior sample — so pre-extraction loses neither augmentation nor VAE noise
(fast-DiT froze one sample per image; U-ViT stores both moments, as here).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffrepro.data import shards
from diffrepro.models.autoencoder import to_unit_range


@torch.no_grad()
def encode_moments(vae, images_uint8: np.ndarray, batch_size: int) -> torch.Tensor:
    """(N, 2, 2C, h, w) float32 on the VAE's device: [mean ‖ logvar] of each image (index 0) and
    its flip (index 1)."""
    device = next(vae.parameters()).device
    out = []
    for i in range(0, len(images_uint8), batch_size):
        x = to_unit_range(images_uint8[i:i + batch_size]).to(device)
        both = torch.cat([x, x.flip(-1)])
        dist = vae.encode(both).latent_dist
        moments = torch.cat([dist.mean, dist.logvar], dim=1)
        out.append(torch.stack(moments.chunk(2), dim=1).float())
    return torch.cat(out)


def encode_shared(vae, images_uint8: np.ndarray, batch_size: int, accelerator, moment_shape) -> np.ndarray:
    """`encode_moments` of a chunk, split over the processes in contiguous shares and gathered back
    in order on every process (padded to equal length for the collective, then trimmed)."""
    n, k = accelerator.num_processes, accelerator.process_index
    bounds = np.linspace(0, len(images_uint8), n + 1).astype(int)
    share = images_uint8[bounds[k]:bounds[k + 1]]
    mine = (encode_moments(vae, share, batch_size) if len(share) else
            torch.empty((0, *moment_shape), device=accelerator.device))
    if n == 1:
        return mine.cpu().numpy()
    longest = int(np.diff(bounds).max())
    padded = torch.cat([mine, mine.new_zeros((longest - len(mine), *moment_shape))])
    gathered = accelerator.gather(padded).view(n, longest, *moment_shape)
    return torch.cat([gathered[i, :bounds[i + 1] - bounds[i]] for i in range(n)]).cpu().numpy()


class LatentSet:
    """Latent moments of one split (memory-mapped); `sample_batch` draws fresh, scaled latents."""

    def __init__(self, split_dir: str | Path):
        self.split = shards.ShardedSplit(split_dir)
        self.labels = torch.from_numpy(self.split.column("labels"))
        self.super_labels = torch.from_numpy(self.split.column("super_labels"))
        self.scaling_factor = self.split.meta["scaling_factor"]

    def __len__(self) -> int:
        return len(self.labels)

    def sample_batch(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Latents for records `index`: random flip view, posterior sample, × scaling_factor."""
        moments = torch.from_numpy(self.split.take(index.numpy())["moments"])
        flip = torch.randint(0, 2, (len(index),), generator=generator)
        moments = moments[torch.arange(len(index)), flip]
        mean, logvar = moments.chunk(2, dim=1)
        eps = torch.randn(mean.shape, generator=generator)
        return (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * eps) * self.scaling_factor
