"""Training-step benchmarks of the default runs, measured in one process on this machine.

    PYTHONPATH=src python benchmarks/bench_train_step.py          # after `dvc repro` built the data

Writes reports/benchmarks.md. Every figure is a ratio of two things measured in this same run:
- model FLOP/s of each run's training step / the measured fp32 matmul peak (2048³ loop);
- FineDiffusion vs full fine-tuning step time (paper: 1.56×);
- Patch Diffusion vs EDM images per second (paper: ~2×);
- noise-assignment time / training step time (Immiscible; target ≤ 5 %), and the assignment alone
  at batch 1024 (target ≤ 100 ms; the paper quotes 22.8 ms on a GPU machine's CPU).
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffrepro.config import load_params
from diffrepro.methods.immiscible import NoiseAssigner
from diffrepro.train import Trainer

OUT = Path("reports/benchmarks.md")
RUNS = ("dit", "dimr", "finediffusion", "full_finetune", "edm", "patch", "immiscible")


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """fp32 FLOP/s of an n³ matmul, best of `repeats`."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


def bench_run(params: dict, run: str, steps: int = 20, warmup: int = 5) -> dict:
    """Mean step time and FLOPs over the same `steps` steps (patch sizes vary from step to step,
    so FLOPs are counted on exactly the timed steps, by a second trainer replaying them)."""
    from accelerate import Accelerator

    timed_steps = range(warmup, warmup + steps)
    trainer = Trainer(params, run, Accelerator(cpu=True))
    for s in range(warmup):
        trainer.step(s)
    images_before = trainer.images_seen
    seconds = sum(_timed(lambda s=s: trainer.step(s)) for s in timed_steps)
    images = trainer.images_seen - images_before
    replay = Trainer(params, run, Accelerator(cpu=True))
    counter = FlopCounterMode(display=False)
    with counter:
        for s in timed_steps:
            replay.step(s)
    return {"step_s": seconds / steps, "flops": counter.get_total_flops() / steps, "images_per_s": images / seconds}


def bench_assignment(batch: int, shape: tuple[int, ...], repeats: int = 5) -> float:
    assigner = NoiseAssigner("lsa")
    x0 = torch.randn(batch, *shape)
    gen = torch.Generator().manual_seed(0)
    assigner(x0, gen)
    return statistics.median(_timed(lambda: assigner(x0, gen)) for _ in range(repeats))


def main() -> None:
    torch.manual_seed(0)
    params = load_params()
    peak = matmul_peak()
    results = {run: bench_run(params, run) for run in RUNS if run in params["runs"]}
    lines = ["# Benchmarks (generated: `PYTHONPATH=src python benchmarks/bench_train_step.py`)", "",
             f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}, Python {sys.version.split()[0]}. Measured fp32 matmul peak "
             f"(2048³): {peak / 1e9:.1f} GFLOP/s. Step times and FLOPs are means over the same 20 steps after 5 warm-up steps.",
             "", "## Training step of each default run", "",
             "| run | model | batch | s/step | images/s | GFLOP/step | GFLOP/s | % of matmul peak |",
             "|---|---|---|---|---|---|---|---|"]
    for run, r in results.items():
        cfg = params["runs"][run]
        lines.append(f"| {run} | {cfg['model']} | {cfg['batch_size']} | {r['step_s']:.4f} | "
                     f"{r['images_per_s']:.0f} | {r['flops'] / 1e9:.2f} | {r['flops'] / r['step_s'] / 1e9:.1f} | "
                     f"{100 * r['flops'] / r['step_s'] / peak:.1f} |")
    lines += ["", "## The papers' speed claims, measured here", "", "| claim | here | paper |", "|---|---|---|"]
    if "finediffusion" in results and "full_finetune" in results:
        ratio = results["full_finetune"]["step_s"] / results["finediffusion"]["step_s"]
        lines.append(f"| FineDiffusion vs full fine-tuning, step-time speed-up | {ratio:.2f}× | 1.56× |")
    if "patch" in results and "edm" in results:
        ratio = results["patch"]["images_per_s"] / results["edm"]["images_per_s"]
        lines.append(f"| Patch Diffusion vs EDM, images/s | {ratio:.2f}× | ~2× |")
    if "immiscible" in results:
        shape = tuple(Trainer(params, "immiscible", __import__("accelerate").Accelerator(cpu=True)).data_shape)
        batch = params["runs"]["immiscible"]["batch_size"]
        at_batch = bench_assignment(batch, shape)
        lines.append(f"| Immiscible: assignment / training step at batch {batch} | "
                     f"{100 * at_batch / results['immiscible']['step_s']:.2f} % | \"no extra cost\" (target ≤ 5 %) |")
        lines.append(f"| Immiscible: assignment alone at batch 1024 ({'×'.join(map(str, shape))} latents) | "
                     f"{1000 * bench_assignment(1024, shape):.0f} ms | 22.8 ms (GPU machine's CPU; target ≤ 100 ms) |")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
