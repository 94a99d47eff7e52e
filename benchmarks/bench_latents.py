"""Latent extraction throughput (the extract_latents stage's encoder loop) vs the bare encoder.

`encode_moments` encodes every image and its flip and keeps the posterior moments; the bare
pass is `vae.encode` on the same float batches (image + flip), so the ratio is the cost of the
uint8 conversion, the flip and the moment bookkeeping.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffrepro.data import shards
from diffrepro.latents import encode_moments
from diffrepro.models.autoencoder import load_autoencoder, to_unit_range
from timing import best_of

IMAGES = 2048


def section(params: dict) -> list[str]:
    vae = load_autoencoder("models/autoencoder")
    batch = params["latents"]["batch_size"]
    split = shards.ShardedSplit(Path(params["data"]["prepared_dir"]) / "train")
    images = split.take(np.arange(min(IMAGES, len(split))))["images"]
    inputs = [torch.cat([x, x.flip(-1)]) for x in (to_unit_range(images[i:i + batch])
                                                   for i in range(0, len(images), batch))]

    @torch.no_grad()
    def bare():
        for x in inputs:
            vae.encode(x)

    extraction = best_of(lambda: encode_moments(vae, images, batch))
    encoder = best_of(bare)
    n = len(images)
    return ["## Latent extraction", "",
            f"{n} training images (each encoded with its flip), batch {batch}.", "",
            "| | images/s | seconds |", "|---|---|---|",
            f"| extract_latents (`encode_moments`) | {n / extraction:.0f} | {extraction:.3f} |",
            f"| bare `vae.encode` of the same batches | {n / encoder:.0f} | {encoder:.3f} |",
            f"| overhead of extraction | {100 * (extraction / encoder - 1):+.1f} % | |"]
