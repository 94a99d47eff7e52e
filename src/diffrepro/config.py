"""params.yaml: loading, validation against one schema, and per-stage sections.

Every stage reads only its own section (plus the global `seed`). Validation happens before any
work: an unknown key, a wrong type, a negative size, an unknown method or model stops the stage
with one line naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

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
    "evaluate": {"diversity_pairs": int, "lpips_weights": str, "alexnet_weights": str},
    "report": {"title": str},
}

POSITIVE_INTS = {"image_size", "images_per_class", "heldout_per_class", "batch_size",
                 "num_super", "per_class", "sample_steps", "seed_sets", "diversity_pairs"}
NON_NEGATIVE_INTS = {"steps", "warmup_steps"}  # steps 0: adopt `init_from` as is (official weights)
POSITIVE_FLOATS = {"guidance_power"}
CHOICES = {"guidance_schedule": ("constant", "increasing")}


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
        raise UserError(f"{source}: `{where}` must be {_type_name(schema)}, got "
                        f"{type(value).__name__} {value!r} (write floats like 1.0e-3, not 1e-3)")
    leaf = where.rsplit(".", 1)[-1]
    if leaf in POSITIVE_INTS and isinstance(value, int) and value <= 0:
        raise UserError(f"{source}: `{where}` must be a positive integer, got {value}")
    if leaf in NON_NEGATIVE_INTS and isinstance(value, int) and value < 0:
        raise UserError(f"{source}: `{where}` must be a non-negative integer, got {value}")
    if leaf in POSITIVE_FLOATS and value <= 0:
        raise UserError(f"{source}: `{where}` must be a positive number, got {value}")
    if leaf in CHOICES and value not in CHOICES[leaf]:
        raise UserError(f"{source}: `{where}` must be one of {', '.join(CHOICES[leaf])}, got {value!r}")


def validate(params: dict, source: str = PARAMS_FILE) -> dict:
    _check(params, SCHEMA, "", source)
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


def run_params(params: dict, run: str) -> dict:
    """The `runs.<run>` section (or `pretrain`, the base model fine-tuning starts from)."""
    if run == "pretrain":
        return params["pretrain"]
    runs = params.get("runs", {})
    if run not in runs:
        raise UserError(f"{PARAMS_FILE}: no run named {run!r}; runs: {', '.join(runs)}")
    return runs[run]
