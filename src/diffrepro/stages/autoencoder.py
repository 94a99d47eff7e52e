"""`autoencoder` stage: train the tiny KL autoencoder once (default) or adopt the SD VAE (paper).

Every latent run shares this one autoencoder, so its quality is the ceiling of every latent
model: the stage reports its held-out reconstruction error (the `features` stage adds the
judge's accuracy on its reconstructions).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from diffrepro.atomic import atomic_path
from diffrepro.data import shards
from diffrepro.errors import UserError
from diffrepro.sources import SD_VAE_HELP
from diffrepro.models.autoencoder import kl_autoencoder_loss, latent_std, load_autoencoder, tiny_autoencoder, to_unit_range
from diffrepro.paths import AUTOENCODER

SD_SCALING_FACTOR = 0.18215


def stage(params: dict) -> None:
    cfg, data = params["autoencoder"], params["data"]
    if cfg["kind"] == "sd_vae":
        vae = load_autoencoder(cfg["path"], SD_VAE_HELP)
        if abs(vae.config.scaling_factor - SD_SCALING_FACTOR) > 1e-6:
            raise UserError(f"{cfg['path']}/config.json: scaling_factor is {vae.config.scaling_factor}, "
                            f"expected the SD VAE's {SD_SCALING_FACTOR}")
        with atomic_path(AUTOENCODER, is_dir=True) as tmp:
            shutil.copytree(cfg["path"], tmp, dirs_exist_ok=True)
        return
    if cfg["kind"] != "tiny":
        raise UserError(f"params.yaml: autoencoder.kind must be tiny or sd_vae, got {cfg['kind']!r}")
    prepared = Path(data["prepared_dir"])
    train = to_unit_range(shards.read_split(prepared / "train")["images"])
    heldout = to_unit_range(shards.read_split(prepared / params["data"]["heldout_split"])["images"])
    vae, seconds = train_tiny(train, cfg, params["seed"], data["image_size"])
    with torch.no_grad():
        _, mse = kl_autoencoder_loss(vae.eval(), heldout, 0.0)
    metrics = {"heldout_mse": mse.item(), "heldout_psnr_db": 10 * math.log10(4.0 / mse.item()),
               "train_seconds": round(seconds, 1), "scaling_factor": vae.config.scaling_factor,
               "latent_shape": list(vae.encode(heldout[:1]).latent_dist.mean.shape[1:])}
    with atomic_path(AUTOENCODER, is_dir=True) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))


def train_tiny(images: torch.Tensor, cfg: dict, seed: int, image_size: int):
    """AdamW on the KL-VAE objective over random flips of `images`; returns (vae, seconds)."""
    from accelerate import Accelerator

    torch.manual_seed(seed)
    vae = tiny_autoencoder(image_size, cfg["block_out_channels"], cfg["latent_channels"],
                           cfg["layers_per_block"])
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg["lr"], weight_decay=0.0)
    vae, opt = accelerator.prepare(vae, opt)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in tqdm(range(cfg["steps"]), desc="autoencoder", mininterval=5):
        idx = torch.randint(len(images), (cfg["batch_size"],), generator=generator)
        x = images[idx]
        flip = torch.rand(len(x), generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x).to(accelerator.device)
        lr = cfg["lr"] * 0.5 * (1 + math.cos(math.pi * step / cfg["steps"]))  # cosine decay
        for group in opt.param_groups:
            group["lr"] = lr
        loss, _ = kl_autoencoder_loss(vae, x, cfg["kl_weight"])
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        opt.step()
    seconds = time.perf_counter() - start
    vae = accelerator.unwrap_model(vae).eval().requires_grad_(False).cpu()
    vae.register_to_config(scaling_factor=1.0 / latent_std(vae, images))
    return vae, seconds
