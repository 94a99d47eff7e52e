"""params.yaml: loading, validation against one schema, and per-stage sections.

Every stage reads only its own section (plus the global `seed`). Validation happens before any
work: an unknown key, a wrong type, a value out of its range (every param that divides, indexes
or loops, checked with the params it depends on), an unknown method or model stops the stage with
one line naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from diffrepro.data.synthetic import HUES_PER_FAMILY, SHAPE_FAMILIES
from diffrepro.errors import UserError

PARAMS_FILE = "params.yaml"

# Leaf types: a type, a tuple of types, or "list" / "optional:<type>" markers handled below.
RUN_SCHEMA: dict[str, Any] = {
    "model": str,
    "method": str,
    "diffusion": str,        # gaussian | edm
    "schedule": str,         # Gaussian β schedule: linear (DiT) | scaled_linear (DiMR, SD)
    "space": str,            # latent | pixel
    "data": str,             # folder the run trains on (a DVC dep)
    "init_from": str,        # a trained model folder to fine-tune, or the data folder (= scratch)
    "split": str,            # which prepared split to train on (train | base | train_small)
    "model_kwargs": dict,
    "method_kwargs": dict,
    "assignment": str,       # Immiscible noise assignment: none | lsa | lsa_global | knn
    "steps": int,
    "batch_size": int,
    "lr": float,
    "weight_decay": float,
    "betas": list,
    "warmup_steps": int,
    "ema_decay": float,
    "ema_warmup": bool,
    "grad_clip": float,
    "bf16": bool,
    "checkpoint_every": int,
    "eval_at": list,         # extra steps at which to sample + score (quality vs steps)
    "sampler": str,
    "sample_steps": int,
    "guidance_scale": float,
    "guidance_schedule": str,  # constant | increasing (DiMR eval.py's power-cosine ramp of w)
    "guidance_power": float,   # the ramp's exponent (eval.py's --cfg_scale_pow); unused when constant
    "guided_channels": (int, type(None)),
    "seed": int,
}

SCHEMA: dict[str, Any] = {
    "seed": int,
    "profile": str,
    "needs_gpu": bool,       # a paper profile: its stages refuse to start without CUDA (see preflight.py)
    "data": {
        "dataset": str,
        "image_size": int,
        "raw_dir": str,
        "prepared_dir": str,
        "skip_corrupt": bool,
        "heldout_split": str,    # held-out split of the prepared data (synthetic: heldout; iNat/ImageNet: val)
        "synthetic": {"num_super": int, "base_per_family": int, "images_per_class": int,
                      "heldout_per_class": int, "base_images_per_class": int,
                      "small_subset_per_class": int},
    },
    "autoencoder": {"kind": str, "path": str, "block_out_channels": list, "latent_channels": int,
                    "layers_per_block": int, "steps": int, "batch_size": int, "lr": float,
                    "kl_weight": float},
    "latents": {"batch_size": int},
    "features": {"kind": str, "inception_weights": str, "steps": int, "batch_size": int,
                 "lr": float, "width": int},
    "train": {"num_workers": int, "log_every": int},
    "pretrain": RUN_SCHEMA,
    "runs": {"*": RUN_SCHEMA},
    "sample": {"per_class": int, "batch_size": int, "grid_classes": int,
               "seed_sets": int},   # independent final sample sets (EDM: FID = min over 3)
    "speed": {"rounds": int, "steps": int, "warmup": int},  # the interleaved speed measurements (speed.py)
    "evaluate": {"diversity_pairs": int, "lpips_weights": str, "alexnet_weights": str},
    "report": {"title": str,
               "dir": str},  # results.md, results.csv, plots/, figures/ (the default's: reports/)
}

POSITIVE_INTS = {"image_size", "images_per_class", "heldout_per_class", "batch_size", "num_super",
                 "base_per_family", "base_images_per_class", "small_subset_per_class", "latent_channels",
                 "layers_per_block", "width", "log_every", "checkpoint_every", "guided_channels", "per_class",
                 "sample_steps", "grid_classes", "seed_sets", "diversity_pairs"}
NON_NEGATIVE_INTS = {"steps", "warmup_steps",  # steps 0: adopt `init_from` as is (official weights)
                     "seed", "num_workers", "warmup"}
POSITIVE_FLOATS = {"guidance_power"}
NON_NEGATIVE_FLOATS = {"lr", "weight_decay", "grad_clip", "kl_weight", "guidance_scale"}
UNIT_INTERVAL = {"ema_decay"}
GAUSSIAN_SAMPLERS = ("ddpm", "ddim", "dpm_solver", "pndm")
EDM_SAMPLERS = ("heun",)
CHOICES = {  # every closed choice (tests/test_config.py keeps them equal to what the code implements)
    "guidance_schedule": ("constant", "increasing"),
    "sampler": GAUSSIAN_SAMPLERS + EDM_SAMPLERS,
    "assignment": ("none", "lsa", "lsa_global", "knn"),
    "space": ("latent", "pixel"),
    "diffusion": ("gaussian", "edm"),
    "schedule": ("linear", "scaled_linear"),
    "method": ("dit", "finediffusion", "full_finetune", "bitfit", "difffit", "dimr", "edm", "patch"),
}
KINDS = {"autoencoder": ("tiny", "sd_vae"), "features": ("judge", "inception")}  # the `kind` of a section
DEFAULT_REPORT_DIR = Path("reports")  # the default profile's; every other profile reports elsewhere


def _type_name(t) -> str:
    if isinstance(t, tuple):
        return " or ".join("null" if x is type(None) else x.__name__ for x in t)
    return t.__name__


def _check(value: Any, schema: Any, where: str, source: str) -> None:
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            raise UserError(f"{source}: `{where}` must be a mapping, got {type(value).__name__}")
        if "*" in schema:
            for key, item in value.items():
                _check(item, schema["*"], f"{where}.{key}", source)
            return
        if schema is RUN_SCHEMA:  # a run must say everything: no silent defaults for a paper setting
            missing = [key for key in schema if key not in value]
            if missing:
                raise UserError(f"{source}: `{where}` is missing key `{missing[0]}`")
        for key, item in value.items():
            full = f"{where}.{key}" if where else key
            if key not in schema:
                raise UserError(f"{source}: unknown key `{full}`; known keys here: {', '.join(schema)}")
            _check(item, schema[key], full, source)
        return
    expected = schema if isinstance(schema, tuple) else (schema,)
    if float in expected and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and bool not in expected:
        ok = False
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise UserError(f"{source}: `{where}` must be {_type_name(schema)}, got {type(value).__name__} {value!r}"
                        + (" (YAML reads 1e-3 as a string: write floats like 1.0e-3)"
                           if float in expected and _looks_like_float(value) else ""))
    leaf = where.rsplit(".", 1)[-1]
    if leaf in POSITIVE_INTS and isinstance(value, int) and value <= 0:
        raise UserError(f"{source}: `{where}` must be a positive integer, got {value}")
    if leaf in NON_NEGATIVE_INTS and isinstance(value, int) and value < 0:
        raise UserError(f"{source}: `{where}` must be a non-negative integer, got {value}")
    if leaf in POSITIVE_FLOATS and value <= 0:
        raise UserError(f"{source}: `{where}` must be a positive number, got {value}")
    if leaf in NON_NEGATIVE_FLOATS and value < 0:
        raise UserError(f"{source}: `{where}` must be a non-negative number, got {value}")
    if leaf in UNIT_INTERVAL and not 0 <= value <= 1:
        raise UserError(f"{source}: `{where}` must be between 0 and 1, got {value}")
    choices = KINDS.get(where.split(".")[0]) if leaf == "kind" else CHOICES.get(leaf)
    if choices is not None and value not in choices:
        raise UserError(f"{source}: `{where}` must be one of {', '.join(choices)}, got {value!r}")


def _looks_like_float(value) -> bool:
    """A string that reads as a number, such as 1e-3 (YAML 1.1 wants a dot: 1.0e-3)."""
    if not isinstance(value, str):
        return False
    try:
        float(value)
    except ValueError:
        return False
    return True


def _check_run(cfg: dict, where: str, source: str) -> None:
    """The ranges of one run that depend on another of its params, or hold a list."""
    for step in cfg["eval_at"]:
        if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= cfg["steps"]:
            raise UserError(f"{source}: `{where}.eval_at` entries must be steps in 1..{where}.steps "
                            f"({cfg['steps']}), got {step!r}")
    samplers = EDM_SAMPLERS if cfg["diffusion"] == "edm" else GAUSSIAN_SAMPLERS
    if cfg["sampler"] not in samplers:
        raise UserError(f"{source}: `{where}.sampler` must be one of {', '.join(samplers)} for a "
                        f"{cfg['diffusion']} run, got {cfg['sampler']!r}")
    if cfg["sampler"] == "pndm" and cfg["schedule"] != "scaled_linear":
        raise UserError(f"{source}: `{where}.sampler` pndm is SD v1.4's scheduler: set `{where}.schedule` "
                        f"to scaled_linear, got {cfg['schedule']!r}")
    betas = cfg["betas"]
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                  for b in betas):
        raise UserError(f"{source}: `{where}.betas` must be two numbers in [0, 1), got {betas!r}")


def _check_ranges(params: dict, source: str) -> None:
    """Ranges that involve more than one param, or a list, or a limit of the code."""
    if "pretrain" in params:
        _check_run(params["pretrain"], "pretrain", source)
    for name, cfg in params.get("runs", {}).items():
        _check_run(cfg, f"runs.{name}", source)
    synthetic = params.get("data", {}).get("synthetic", {})
    for key, limit in (("num_super", len(SHAPE_FAMILIES)), ("base_per_family", HUES_PER_FAMILY)):
        if synthetic.get(key, 1) > limit:
            raise UserError(f"{source}: `data.synthetic.{key}` must be at most {limit}, got {synthetic[key]}")
    channels = params.get("autoencoder", {}).get("block_out_channels", [1])
    if not channels or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels):
        raise UserError(f"{source}: `autoencoder.block_out_channels` must be a non-empty list of positive "
                        f"integers, got {channels!r}")
    speed = params.get("speed", {})
    for key in ("rounds", "steps"):
        if speed.get(key, 1) < 1:
            raise UserError(f"{source}: `speed.{key}` must be a positive integer, got {speed[key]}")
    report_dir = params.get("report", {}).get("dir")
    if report_dir is not None and Path(report_dir) == DEFAULT_REPORT_DIR and params.get("profile") != "default":
        raise UserError(f"{source}: `report.dir` of profile {params.get('profile')!r} must not be "
                        f"{DEFAULT_REPORT_DIR}/ (the default profile's report); use {DEFAULT_REPORT_DIR}/<profile>")


def validate(params: dict, source: str = PARAMS_FILE) -> dict:
    _check(params, SCHEMA, "", source)
    _check_ranges(params, source)
    return params


def load_params(path: str | Path = PARAMS_FILE) -> dict:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} not found: run from the repository root (where params.yaml is)")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    return validate(params or {}, str(path))


def metrics_dir(params: dict) -> Path:
    """Where `evaluate@RUN` writes the profile's metrics: one folder per profile, so they never mix."""
    return Path("metrics") / params["profile"]


def metrics_file(params: dict, run: str) -> Path:
    return metrics_dir(params) / f"{run}.json"


def logs_dir(params: dict) -> Path:
    """The profile's dvclive logs (`<run>/`) and stage records (`stages/`), apart from other profiles'."""
    return Path("logs") / params["profile"]


def run_key(run: str) -> str:
    """Where a run's params live in params.yaml, for messages: `runs.<run>` (or `pretrain`)."""
    return "pretrain" if run == "pretrain" else f"runs.{run}"


def run_params(params: dict, run: str) -> dict:
    """The `runs.<run>` section (or `pretrain`, the base model fine-tuning starts from)."""
    if run == "pretrain":
        return params["pretrain"]
    runs = params.get("runs", {})
    if run not in runs:
        raise UserError(f"{PARAMS_FILE}: no run named {run!r}; runs: {', '.join(runs)}")
    return runs[run]
