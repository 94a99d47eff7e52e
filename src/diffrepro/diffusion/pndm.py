"""PNDM sampling, as Stable Diffusion samples: the sampler of Immiscible Diffusion's SD evaluation.

The official `generate.py` runs diffusers' StableDiffusionPipeline with SD v1.4's default
scheduler: `PNDMScheduler` with `skip_prk_steps` (pseudo linear multistep, PLMS), 20 steps. This
module drives that scheduler itself (not a re-implementation) with the ε function every sampler
of `gaussian.sample` gets, so guidance, labels and x_T come from the generic sampling stage.
PLMS evaluates its first timestep twice: `steps` steps make `steps + 1` network calls.
"""

from __future__ import annotations

import torch

from diffrepro.errors import UserError
from diffrepro.models.sd_unet import SD_V14_SCHEDULER_CONFIG


def pndm_sample(diffusion, model_fn, x_T: torch.Tensor, steps: int) -> torch.Tensor:
    """x_0 from x_T by SD v1.4's PNDM scheduler over `steps` steps; `model_fn(x, t)` returns ε
    (t: the original 0-based timesteps, long), plus variance channels if `diffusion` learns Σ."""
    from diffusers import PNDMScheduler

    scheduler = PNDMScheduler.from_config(SD_V14_SCHEDULER_CONFIG)
    alphas_cumprod = scheduler.alphas_cumprod.double()
    if diffusion.alphas_cumprod.shape != alphas_cumprod.shape or \
            not torch.allclose(diffusion.alphas_cumprod, alphas_cumprod, rtol=1e-5, atol=0):
        raise UserError("params: the pndm sampler is SD v1.4's scheduler (1000 scaled-linear β from "
                        "0.00085 to 0.012): set the run's schedule to scaled_linear")
    scheduler.set_timesteps(steps)
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = model_fn(x, t.expand(len(x)).to(x.device))
        x = scheduler.step(diffusion.split_output(out, x)[0], t, x).prev_sample
    return x
