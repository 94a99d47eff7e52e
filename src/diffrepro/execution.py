"""The execution settings that are never tracked params.

Process count, per-device micro-batch, compilation and wall-time budgets change how a stage runs,
never what it computes, so they come from the environment: a stage's DVC hash is the same on a
laptop, one GPU or 64.

- `DIFFREPRO_BATCH_PER_DEVICE`: the largest batch one device holds at once; a process's share of
  the global batch is split into equal micro-batches and their gradients accumulated (EDM2's
  `--batch-gpu`). Unset: the whole share at once.
- `DIFFREPRO_TRAIN_SECONDS`: a wall-time budget for one training process; when it is spent the
  stage checkpoints and exits with status 75, and the next `dvc repro` resumes exactly.
- `DIFFREPRO_COMPILE=1`: `torch.compile` the network (accelerate's inductor backend).
"""

from __future__ import annotations

import os

from diffrepro.errors import UserError

PAUSED_EXIT_CODE = 75  # EX_TEMPFAIL: the work is not done, run the same command again


def _positive_env(name: str, kind=int):
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        number = kind(value)
    except ValueError:
        number = None
    if number is None or number <= 0:
        raise UserError(f"environment: {name}={value!r} must be a positive {kind.__name__}")
    return number


def num_processes() -> int | None:
    """`DIFFREPRO_NUM_PROCESSES`, if set (the launcher's first choice)."""
    return _positive_env("DIFFREPRO_NUM_PROCESSES")


def batch_per_device() -> int | None:
    return _positive_env("DIFFREPRO_BATCH_PER_DEVICE")


def train_seconds_budget() -> float | None:
    return _positive_env("DIFFREPRO_TRAIN_SECONDS", float)


def compile_requested() -> bool:
    return os.environ.get("DIFFREPRO_COMPILE", "") not in ("", "0")
