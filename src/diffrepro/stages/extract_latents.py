"""`extract_latents` stage: encode every image and its flip once; store the posterior moments.

What is stored and how training draws from it: `diffrepro.latents`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from diffrepro.atomic import atomic_path
from diffrepro.data import shards
from diffrepro.latents import encode_moments, encode_shared
from diffrepro.models.autoencoder import load_autoencoder
from diffrepro.paths import AUTOENCODER, LATENTS


def stage(params: dict) -> None:
    """Every split of the prepared data (whatever the data set calls them) gets its latents; every
    process encodes its share of each chunk on its device, the main process writes."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    prepared = Path(params["data"]["prepared_dir"])
    splits = sorted(p.name for p in prepared.iterdir() if (p / "index.json").exists())
    vae = load_autoencoder(AUTOENCODER).to(accelerator.device)
    batch_size = params["latents"]["batch_size"]
    with atomic_path(LATENTS, is_dir=True) if main else contextlib.nullcontext() as tmp:
        for split in splits:
            source = shards.ShardedSplit(prepared / split)
            moment_shape = tuple(encode_moments(vae, source.take(np.arange(1))["images"], 1).shape[1:])
            with shards.ShardWriter(tmp / split) if main else contextlib.nullcontext() as writer:
                if writer is not None:
                    writer.set_meta(scaling_factor=vae.config.scaling_factor)
                for start in range(0, len(source), 4096):
                    part = source.take(np.arange(start, min(start + 4096, len(source))))
                    moments = encode_shared(vae, part["images"], batch_size, accelerator, moment_shape)
                    if writer is not None:
                        writer.add_batch(moments=moments, labels=part["labels"], super_labels=part["super_labels"])
    accelerator.end_training()
