"""Where every stage reads and writes: the repository layout dvc.yaml declares, in one module.

All paths are relative to the repository root (DVC runs every stage there). Per-profile folders
(`metrics/<profile>/`, `logs/<profile>/`) keep the results of different profiles apart.
`DIFFREPRO_CHECKPOINTS` (default `checkpoints`) holds resumable work — training checkpoints and
sample chunks — outside DVC's outputs; a self-hosted runner points it outside the checkout so
that a clean checkout never loses them.
"""

from __future__ import annotations

import os
from pathlib import Path

CONF_DIR = Path("conf")
NOTEBOOK_DIR = Path("notebooks")
MODELS = Path("models")
AUTOENCODER = MODELS / "autoencoder"
FEATURES = MODELS / "features"
LATENTS = Path("data/latents")
SAMPLES = Path("samples")
DEFAULT_REPORT_DIR = Path("reports")  # the default profile's; every other profile reports elsewhere
STAGE_RECORDS = Path("logs/stages")


def model_dir(run: str) -> Path:
    """A finished run's weights, config and training metrics (`train@RUN`'s output)."""
    return MODELS / run


def samples_dir(run: str) -> Path:
    return SAMPLES / run


def final_set_name(k: int) -> str:
    """Set 0 is `final` (what every single-set result means); set k > 0 is `final-set{k}`."""
    return "final" if k == 0 else f"final-set{k}"


def metrics_dir(params: dict) -> Path:
    """Where `evaluate@RUN` writes the profile's metrics: one folder per profile, so they never mix."""
    return Path("metrics") / params["profile"]


def metrics_file(params: dict, run: str) -> Path:
    return metrics_dir(params) / f"{run}.json"


def speed_file(params: dict) -> Path:
    """Where the `speed` stage writes the profile's interleaved measurements."""
    return metrics_dir(params) / "speed.json"


def logs_dir(params: dict) -> Path:
    """The profile's dvclive logs (`<run>/`), apart from other profiles'."""
    return Path("logs") / params["profile"]


def checkpoints_root() -> Path:
    return Path(os.environ.get("DIFFREPRO_CHECKPOINTS", "checkpoints"))


def pause_marker(run: str) -> Path:
    """Written by a training run that paused on its budget: tells the launcher why its workers exited."""
    return checkpoints_root() / run / "paused"


def adm_samples_npz(run: str) -> Path:
    """`checkpoints/<run>_adm_samples.npz`: git-ignored and outside every DVC output and dependency,
    so a 10 GB export neither shows in `git status` nor re-triggers `dvc repro`."""
    return Path("checkpoints") / f"{run}_adm_samples.npz"
