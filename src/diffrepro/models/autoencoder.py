"""The latent space: a tiny `diffusers.AutoencoderKL` trained on the default data, or the SD VAE.

Both scales use the same class and the same loading path (`AutoencoderKL.from_pretrained` on a
local folder), so the default exercises exactly the code that loads `sd-vae-ft-ema`/`-mse` at
paper scale. `scaling_factor` in the saved config makes latents unit-variance (SD: 0.18215).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffrepro.errors import UserError



def tiny_autoencoder(image_size: int, block_out_channels=(32, 64), latent_channels: int = 4,
                     layers_per_block: int = 1):
    """A small KL autoencoder; each entry of `block_out_channels` after the first halves the size."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
        norm_num_groups=min(16, block_out_channels[0]), sample_size=image_size,
        mid_block_add_attention=False,  # 4× cheaper per step here, no loss in reconstruction at 16 px
    )


def load_autoencoder(path: str | Path, how_to_get: str = "run `dvc repro autoencoder`"):
    """Load an AutoencoderKL folder (tiny or SD; safetensors weights only); one clear line, and no
    diffusers warnings, when it is missing or broken, ending with `how_to_get` it (the stage that
    builds it, or where to download it)."""
    from diffusers import AutoencoderKL
    from diffusers.utils import logging as diffusers_logging

    path = Path(path)
    if not (path / "config.json").exists():
        raise UserError(f"autoencoder folder {path} has no config.json: {how_to_get}")
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)  # it logs the error it then raises
    try:
        vae = AutoencoderKL.from_pretrained(path, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(f"cannot load the autoencoder in {path} ({str(err).splitlines()[0]}): {how_to_get}") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return vae.eval().requires_grad_(False)


def to_unit_range(images_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC → float NCHW in [-1, 1]."""
    x = torch.as_tensor(images_uint8)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float NCHW in [-1, 1] → uint8 NHWC (DiT's clamp(127.5·x + 128))."""
    return torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def kl_autoencoder_loss(vae, x: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, reconstruction MSE) of the VAE objective on a batch in [-1, 1]."""
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample()).sample
    mse = F.mse_loss(recon, x)
    return mse + kl_weight * posterior.kl().mean(), mse


@torch.no_grad()
def latent_std(vae, images: torch.Tensor, batch_size: int = 256) -> float:
    """Std of the posterior means over `images`: scaling_factor = 1 / this (unit-variance latents)."""
    means = [vae.encode(images[i:i + batch_size]).latent_dist.mean for i in range(0, len(images), batch_size)]
    return torch.cat(means).std().item()
