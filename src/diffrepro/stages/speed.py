"""`speed` stage: each speed claim measured with its two runs interleaved in one process.

Stage wall times are taken at different moments, so whatever else loads the machine can flip them
(two repros of one commit gave DiffFit vs full fine-tuning 1.28× and 0.89×). Here a method and its
baseline train on the same data in the same process, in alternating rounds of `speed.steps` steps
(after `speed.warmup` steps each), so a load hits both alike. Every round gives one ratio per
measure; the stage writes their median and range:
- `per_step`: the baseline's seconds per step / the method's (PEFT vs full fine-tuning: 1.56×);
- `per_image`: the method's images per second / the baseline's (a patch step loads R/s times the
  images at (s/R)² of the pixels);
- `to_budget`: the seconds of the baseline's whole run / the method's (each run's `steps` × its
  seconds per step): Patch Diffusion's "≈2× faster" to the same image budget.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from diffrepro import fingerprint
from diffrepro.atomic import atomic_path
from diffrepro.config import run_params
from diffrepro.papers import speed_pairs
from diffrepro.paths import speed_file

MEASURES = ("per_step", "per_image", "to_budget")


def timed_round(trainer, first_step: int, steps: int) -> tuple[float, int]:
    """(seconds, images) of `steps` training steps; reading the losses back waits for the device."""
    images = trainer.images_seen
    tic = time.perf_counter()
    for step in range(first_step, first_step + steps):
        trainer.step(step)
    trainer.logged_losses()
    return time.perf_counter() - tic, trainer.images_seen - images


def summary(ratios: list[float]) -> dict:
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": ratios}


def measure_pair(params: dict, method: str, baseline: str, accelerator) -> dict:
    """Interleaved rounds of `method` and `baseline` (which goes first alternates)."""
    from diffrepro.training import Trainer

    cfg = params["speed"]
    trainers = {run: Trainer(params, run, accelerator) for run in (method, baseline)}
    for trainer in trainers.values():
        timed_round(trainer, 0, cfg["warmup"])
    ratios: dict[str, list[float]] = {m: [] for m in MEASURES}
    for r in range(cfg["rounds"]):
        order = (method, baseline) if r % 2 == 0 else (baseline, method)
        start = cfg["warmup"] + r * cfg["steps"]
        took = {run: timed_round(trainers[run], start, cfg["steps"]) for run in order}
        step_s = {run: seconds / cfg["steps"] for run, (seconds, _) in took.items()}
        images_per_s = {run: images / seconds for run, (seconds, images) in took.items()}
        ratios["per_step"].append(step_s[baseline] / step_s[method])
        ratios["per_image"].append(images_per_s[method] / images_per_s[baseline])
        ratios["to_budget"].append(run_params(params, baseline)["steps"] * step_s[baseline] /
                                   (run_params(params, method)["steps"] * step_s[method]))
    return {"method": method, "baseline": baseline, **{m: summary(v) for m, v in ratios.items()}}


def stage(params: dict) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    pairs = speed_pairs(params)  # declared by the papers (src/diffrepro/papers/)
    results = {f"{m}_vs_{b}": measure_pair(params, m, b, accelerator) for m, b in pairs}
    with atomic_path(speed_file(params)) as tmp:
        tmp.write_text(json.dumps({"pairs": results, "params_sha256": fingerprint.speed(params, pairs)}, indent=1))
