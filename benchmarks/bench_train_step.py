"""Training step of each default run, and the papers' speed claims measured as ratios here.

- model FLOP/s of each run's training step / the measured fp32 matmul peak (2048³ loop);
- FineDiffusion vs full fine-tuning step time (paper: 1.56×);
- Patch Diffusion vs EDM images per second (paper: ~2×);
- noise-assignment time / training step time (Immiscible; target ≤ 5 %), and the assignment alone
  at batch 1024 (target ≤ 100 ms; the paper quotes 22.8 ms on a GPU machine's CPU).
"""

from __future__ import annotations

import statistics
import time

import torch
from accelerate import Accelerator
from torch.utils.flop_counter import FlopCounterMode

from diffrepro.methods.immiscible import make_assigner
from diffrepro.stages.train import _host_batches  # the mechanism measured, not a copy of it
from diffrepro.training import Trainer
from timing import timed

RUNS = ("dit", "dimr", "finediffusion", "full_finetune", "edm_small", "patch_small", "immiscible")
STEPS, WARMUP = 20, 5
DRAW_AHEAD_RUNS = ("finediffusion", "dit", "patch_small")


def bench_run(params: dict, run: str, steps: int = STEPS, warmup: int = WARMUP) -> dict:
    """Mean step time and FLOPs over the same `steps` steps (patch sizes vary from step to step,
    so FLOPs are counted on exactly the timed steps, by a second trainer replaying them)."""
    timed_steps = range(warmup, warmup + steps)
    trainer = Trainer(params, run, Accelerator(cpu=True))
    for s in range(warmup):
        trainer.step(s)
    images_before = trainer.images_seen
    seconds = sum(timed(lambda s=s: trainer.step(s)) for s in timed_steps)
    images = trainer.images_seen - images_before
    replay = Trainer(params, run, Accelerator(cpu=True))
    counter = FlopCounterMode(display=False)
    with counter:
        for s in timed_steps:
            replay.step(s)
    return {"step_s": seconds / steps, "flops": counter.get_total_flops() / steps, "images_per_s": images / seconds,
            "data_shape": trainer.data_shape}


def bench_draw_ahead(params: dict, run: str, steps: int = 40, rounds: int = 3) -> dict:
    """Mean step time with the batch drawn in line vs by a thread one step ahead (the train stage's
    choice on a GPU), both through the train stage's own `_host_batches`, in interleaved rounds on
    one trainer, and the draw alone."""
    trainer = Trainer(params, run, Accelerator(cpu=True))
    for s in range(WARMUP):
        trainer.step(s)
    start = WARMUP

    def seconds_per_step(first: int, ahead: bool) -> float:
        tic = time.perf_counter()
        for s, host in zip(range(first, first + steps), _host_batches(trainer, first, first + steps, ahead)):
            trainer.step(s, host)
        return (time.perf_counter() - tic) / steps

    times = {"in line": [], "ahead": [], "draw": []}
    for _ in range(rounds):
        for name, ahead in (("in line", False), ("ahead", True)):
            times[name].append(seconds_per_step(start, ahead))
            start += steps
        times["draw"].append(statistics.mean(timed(lambda s=s: trainer.draw(s)) for s in range(start, start + steps)))
    return {name: statistics.median(values) for name, values in times.items()}


def bench_assignment(batch: int, shape: tuple[int, ...], repeats: int = 5) -> float:
    """Median seconds of drawing and assigning the noise of one batch (mode lsa)."""
    assigner, everything = make_assigner("lsa"), slice(None)
    x0 = torch.randn(batch, *shape)
    gen = torch.Generator().manual_seed(0)

    def draw_and_assign():
        return assigner.assign(x0, assigner.draw(x0.shape, everything, gen, gen), everything)

    draw_and_assign()
    return statistics.median(timed(draw_and_assign) for _ in range(repeats))


def section(params: dict, peak: float) -> list[str]:
    results = {run: bench_run(params, run) for run in RUNS if run in params["runs"]}
    lines = ["## Training step of each default run", "",
             f"Means over the same {STEPS} steps after {WARMUP} warm-up steps.", "",
             "| run | model | batch | s/step | images/s | GFLOP/step | GFLOP/s | % of matmul peak |",
             "|---|---|---|---|---|---|---|---|"]
    for run, r in results.items():
        cfg = params["runs"][run]
        lines.append(f"| {run} | {cfg['model']} | {cfg['batch_size']} | {r['step_s']:.4f} | "
                     f"{r['images_per_s']:.0f} | {r['flops'] / 1e9:.2f} | {r['flops'] / r['step_s'] / 1e9:.1f} | "
                     f"{100 * r['flops'] / r['step_s'] / peak:.1f} |")
    lines += ["", "## Drawing the batch in a thread", "",
              "The train stage draws each step's batch in line on the CPU and, on a GPU, in a thread one step "
              "ahead. Median over 3 interleaved rounds of 40 steps on one trainer:", "",
              "| run | in line s/step | thread ahead s/step | thread / in line | the draw alone |", "|---|---|---|---|---|"]
    for run in DRAW_AHEAD_RUNS:
        if run in params["runs"]:
            d = bench_draw_ahead(params, run)
            lines.append(f"| {run} | {d['in line']:.4f} | {d['ahead']:.4f} | {d['ahead'] / d['in line']:.2f}× | "
                         f"{1000 * d['draw']:.2f} ms |")
    lines += ["", "## The papers' speed claims, measured here", "", "| claim | here | paper |", "|---|---|---|"]
    if "finediffusion" in results and "full_finetune" in results:
        ratio = results["full_finetune"]["step_s"] / results["finediffusion"]["step_s"]
        lines.append(f"| FineDiffusion vs full fine-tuning, step-time speed-up | {ratio:.2f}× | 1.56× |")
    if "patch_small" in results and "edm_small" in results:
        ratio = results["patch_small"]["images_per_s"] / results["edm_small"]["images_per_s"]
        lines.append(f"| Patch Diffusion vs EDM, images/s | {ratio:.2f}× | ~2× |")
    if "immiscible" in results:
        shape = results["immiscible"]["data_shape"]
        batch = params["runs"]["immiscible"]["batch_size"]
        at_batch = bench_assignment(batch, shape)
        lines.append(f"| Immiscible: assignment / training step at batch {batch} | "
                     f"{100 * at_batch / results['immiscible']['step_s']:.2f} % | \"no extra cost\" (target ≤ 5 %) |")
        lines.append(f"| Immiscible: assignment alone at batch 1024 ({'×'.join(map(str, shape))} latents) | "
                     f"{1000 * bench_assignment(1024, shape):.0f} ms | 22.8 ms (GPU machine's CPU; target ≤ 100 ms) |")
    return lines
