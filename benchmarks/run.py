"""All benchmarks in one process on this machine; writes reports/benchmarks.md.

    PYTHONPATH=src python benchmarks/run.py      # after `bash run.sh repro` (or `dvc repro`)

Every figure is a ratio of two things measured in this same run, or a record of the default
`dvc repro` itself:
- training step of each run: FLOP/s vs the matmul peak; the papers' speed claims (bench_train_step);
- sampling throughput per sampler and the cost per network evaluation (bench_sampling);
- latent extraction vs the autoencoder's bare encoder (bench_latents);
- wall time and peak memory of every stage, the whole repro, a no-change repro (bench_pipeline).
It needs the outputs of `dvc repro` (data, autoencoder, trained runs): a missing one is reported
as one line, before anything is measured.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import torch

import bench_latents
import bench_pipeline
import bench_sampling
import bench_train_step
from diffrepro.atomic import atomic_path
from diffrepro.config import load_params
from diffrepro.errors import UserError
from timing import matmul_peak

OUT = Path("reports/benchmarks.md")
COMMAND = "PYTHONPATH=src python benchmarks/run.py"


def required_inputs(params: dict) -> list[Path]:
    """What the sections read: the data and autoencoder, each benchmarked run's data and weights."""
    runs = params["runs"]
    paths = [Path("dvc.lock"), Path(params["data"]["prepared_dir"]), Path("models/autoencoder")]
    for run in bench_train_step.RUNS:
        if run in runs:
            paths += [Path(runs[run]["data"]), Path(runs[run]["init_from"])]
    paths += [Path("models") / run for run in ("dit", "edm_small") if run in runs]
    return list(dict.fromkeys(paths))


def check_inputs(params: dict) -> None:
    for path in required_inputs(params):
        if not path.exists():
            raise UserError(f"{path} is missing: run `dvc repro` (or `bash run.sh repro`) before {COMMAND}")


def main() -> None:
    params = load_params()
    check_inputs(params)
    torch.manual_seed(0)
    peak = matmul_peak()
    lines = [f"# Benchmarks (generated: `{COMMAND}`)", "",
             f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}, Python {sys.version.split()[0]}. Measured fp32 matmul peak "
             f"(2048³): {peak / 1e9:.1f} GFLOP/s.", ""]
    for section in (bench_train_step.section(params, peak), bench_sampling.section(params),
                    bench_latents.section(params), bench_pipeline.section()):
        lines += section + [""]
    with atomic_path(OUT) as tmp:
        tmp.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
