"""Fingerprints: a sha256 of exactly what determines a result, so that no stale result is reused.

Every result that outlives the command that made it carries one: a training checkpoint, a folder
of sample chunks, a metrics file. Whoever picks such a result up recomputes the fingerprint from
params.yaml (and the files the result came from) and discards or refuses the result when they
differ, so a changed param can never mix old and new numbers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from diffrepro.config import training_params
from diffrepro.paths import MODELS

DATA_SECTIONS = ("data", "autoencoder", "latents")  # what a run trains on
METRICS_SECTIONS = ("data", "features", "sample", "evaluate")  # the params of dvc.yaml's evaluate stage


def digest(value) -> str:
    """sha256 of a JSON-able value, independent of key order."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def file_digest(path: str | Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            sha.update(chunk)
    return sha.hexdigest()


def lineage(params: dict, run: str) -> dict[str, dict]:
    """The training params of `run` and of every run it is initialised from (`init_from: models/<run>`)."""
    sections: dict[str, dict] = {}
    while run not in sections:
        sections[run] = cfg = training_params(params, run)
        base = Path(cfg["init_from"])
        if base.parent != MODELS or (base.name != "pretrain" and base.name not in params.get("train_runs", {})):
            break
        run = base.name
    return sections


def training(params: dict, run: str) -> str:
    """A training checkpoint's: the seed, the run's lineage and the data it trains on."""
    return digest({"seed": params["seed"], "runs": lineage(params, run),
                   **{key: params[key] for key in DATA_SECTIONS}})


def sampling(params: dict, run: str, weights: str | Path) -> str:
    """One set of sample chunks': what trained the weights, the weights file itself, how it samples."""
    return digest({"training": training(params, run), "weights": file_digest(weights),
                   "sample_run": params["sample_runs"][run], "sample": params["sample"]})


def speed(params: dict, pairs: list[tuple[str, str]]) -> str:
    """The speed measurements': `speed` and what each measured run trains (not the machine)."""
    runs = sorted({run for pair in pairs for run in pair})
    return digest({"speed": params["speed"], "runs": {r: training(params, r) for r in runs}})


def metrics(params: dict, run: str) -> str:
    """A metrics file's: what trained the run (its lineage and the data it trains on, the
    autoencoder included), its sampling and the params of the evaluate stage."""
    return digest({"training": training(params, run), "sample_run": params["sample_runs"][run],
                   **{key: params[key] for key in METRICS_SECTIONS}})
