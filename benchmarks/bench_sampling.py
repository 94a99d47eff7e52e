"""Sampling throughput per sampler, and what one network evaluation costs inside a sampler.

For the dit run (DDIM, DDPM, DPM-Solver) and the edm run (Heun), one batch of the sample stage's
size is drawn with the run's steps and guidance, as `sample.py` draws it. A sampler's cost per
network evaluation (NFE) is its loop time / NFE; the overhead is that against a bare forward pass
of the network on exactly the input one evaluation sees (the doubled batch under guidance). The
sampler's arithmetic and guidance mixing should add at most 10 %. Images/s include the VAE decode.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffrepro.methods import get_method
from diffrepro.runs import load_trained
from timing import best_of, timed

GAUSSIAN_SAMPLERS = ("ddim", "ddpm", "dpm_solver")
TARGET_OVERHEAD = 10.0  # percent
LOOP_REPEATS = 2  # sampling loops timed (best of), after a warm-up loop


def _labels(num_classes: int, batch: int) -> torch.Tensor:
    return torch.arange(batch) % num_classes


def bench_gaussian(params: dict, run: str, batch: int) -> list[dict]:
    from diffrepro.diffusion.gaussian import guided_model_fn, sample
    from diffrepro.models.autoencoder import load_autoencoder
    from diffrepro.runs import noise_process

    cfg = params["runs"][run]
    model, config = load_trained(Path("models") / run)
    vae = load_autoencoder("models/autoencoder")
    kw = config["model_kwargs"]
    method = get_method(config["method"], **config["method_kwargs"])
    y = _labels(kw["num_classes"], batch)
    guide = method.guidance_labels(y, y, model)
    scale = cfg["guidance_scale"]
    fn = guided_model_fn(model, y, guide, scale, guided_channels=cfg["guided_channels"])
    diffusion = noise_process(config, model)
    x_T = torch.randn(batch, kw["in_channels"], kw["input_size"], kw["input_size"],
                      generator=torch.Generator().manual_seed(0))
    x, t, labels = (torch.cat([x_T, x_T]), torch.full((2 * batch,), 500), torch.cat([y, guide])) \
        if scale != 1.0 else (x_T, torch.full((batch,), 500), y)
    with torch.no_grad():
        forward = best_of(lambda: model(x, t, y=labels))
        decode = best_of(lambda: vae.decode(x_T / vae.config.scaling_factor).sample)
    rows = []
    for sampler in GAUSSIAN_SAMPLERS:
        def draw(s=sampler):
            return sample(diffusion, fn, x_T.shape, sampler=s, steps=cfg["sample_steps"], noise=x_T,
                          generator=torch.Generator().manual_seed(1), return_nfe=True)[1]

        nfe = draw()  # also the warm-up
        loop = min(timed(draw) for _ in range(LOOP_REPEATS))
        rows.append(_row(run, sampler, cfg["sample_steps"], nfe, batch, loop, decode, forward))
    return rows


def bench_edm(params: dict, run: str, batch: int) -> list[dict]:
    from diffrepro.diffusion.edm import edm_sample, make_denoiser_fn

    cfg = params["runs"][run]
    model, config = load_trained(Path("models") / run)
    kw = config["model_kwargs"]
    method = get_method(config["method"], **config["method_kwargs"])
    y = _labels(kw["num_classes"], batch)
    guide = method.guidance_labels(y, y, model)
    scale = cfg["guidance_scale"]
    extra = method.sampling_kwargs(batch, kw["input_size"], "cpu") if hasattr(method, "sampling_kwargs") else {}
    fn = make_denoiser_fn(model, y, scale, guide, **extra)
    x_T = torch.randn(batch, kw["in_channels"], kw["input_size"], kw["input_size"],
                      generator=torch.Generator().manual_seed(0))
    sigma = torch.full((batch,), 1.0, dtype=torch.float64)
    if scale != 1.0:
        doubled = {k: torch.cat([v, v]) for k, v in extra.items()}
        args = (torch.cat([x_T, x_T]).double(), torch.cat([sigma, sigma]), torch.cat([y, guide]))
    else:
        doubled, args = extra, (x_T.double(), sigma, y)
    with torch.no_grad():
        forward = best_of(lambda: model(*args, **doubled))
    steps = cfg["sample_steps"]
    nfe = edm_sample(fn, x_T.shape, steps=steps, noise=x_T, return_nfe=True)[1]  # also the warm-up
    loop = min(timed(lambda: edm_sample(fn, x_T.shape, steps=steps, noise=x_T)) for _ in range(LOOP_REPEATS))
    return [_row(run, "heun", steps, nfe, batch, loop, 0.0, forward)]


def _row(run, sampler, steps, nfe, batch, loop, decode, forward) -> dict:
    return {"run": run, "sampler": sampler, "steps": steps, "nfe": nfe, "batch": batch,
            "images_per_s": batch / (loop + decode), "per_nfe": loop / nfe, "forward": forward,
            "overhead": 100 * (loop / nfe / forward - 1)}


def section(params: dict) -> list[str]:
    batch = params["sample"]["batch_size"]
    rows = []
    if "dit" in params["runs"]:
        rows += bench_gaussian(params, "dit", batch)
    if "edm_small" in params["runs"]:
        rows += bench_edm(params, "edm_small", batch)
    lines = ["## Sampling throughput per sampler", "",
             f"One batch of {batch} (the sample stage's batch) with each run's steps and guidance; "
             "images/s include the VAE decode (latent runs). Overhead: the sampler's time per network "
             "evaluation against a bare forward pass of the network on the same input "
             f"(target ≤ {TARGET_OVERHEAD:.0f} %).", "",
             "| run | sampler | steps | NFE | images/s | ms per NFE | ms bare forward | overhead |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['sampler']} | {r['steps']} | {r['nfe']} | {r['images_per_s']:.1f} | "
                     f"{1000 * r['per_nfe']:.1f} | {1000 * r['forward']:.1f} | {r['overhead']:+.1f} % |")
    return lines
