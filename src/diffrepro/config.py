"""params.yaml: loading, validation, and each stage's view of it.

Every stage reads only its own section (plus the global `seed`). Validation happens before any
work: the schema (schema.py: every key, type, range and closed choice), then the rules that
involve several params (eval_at within steps, the sampler of the run's diffusion, the seeds, no
training of a released checkpoint, `train_runs`/`sample_runs` being the expansion of `runs`). Each
error is one line naming the key.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from diffrepro.data.synthetic import HUES_PER_FAMILY, SHAPE_FAMILIES
from diffrepro.errors import UserError
from diffrepro.paths import DEFAULT_REPORT_DIR
from diffrepro.replicates import expand
from diffrepro.schema import EDM_SAMPLERS, GAUSSIAN_SAMPLERS, errors

PARAMS_FILE = "params.yaml"


def _check_run(cfg: dict, where: str, source: str) -> None:
    """The ranges of one declared run that depend on another of its params, or hold a list."""
    seeds = cfg["seeds"]
    if (not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise UserError(f"{source}: `{where}.seeds` must be a non-empty list of distinct non-negative "
                        f"integers, got {seeds!r}")
    if where == "pretrain" and len(seeds) != 1:
        raise UserError(f"{source}: `pretrain.seeds` must hold one seed (one base model), got {seeds!r}")
    if cfg["release"] and cfg["steps"] != 0:
        raise UserError(f"{source}: `{where}.steps` must be 0: the run adopts the {cfg['release']} release "
                        f"(`{where}.release`) as is, got {cfg['steps']}")
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
    _check_replicates(params, source)
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
    features = params.get("features", {})
    if params.get("evaluate", {}).get("reference_batch") and (features.get("kind"), features.get("inception_dims")) \
            != ("inception", 2048):
        raise UserError(f"{source}: `evaluate.reference_batch` holds 2048-d Inception statistics: it needs "
                        f"`features.kind: inception` and `features.inception_dims: 2048`")
    report_dir = params.get("report", {}).get("dir")
    if report_dir is not None and Path(report_dir) == DEFAULT_REPORT_DIR and params.get("profile") != "default":
        raise UserError(f"{source}: `report.dir` of profile {params.get('profile')!r} must not be "
                        f"{DEFAULT_REPORT_DIR}/ (the default profile's report); use {DEFAULT_REPORT_DIR}/<profile>")


def _check_replicates(params: dict, source: str) -> None:
    """`train_runs` / `sample_runs` must be the expansion of `runs`: params.yaml is composed, not edited."""
    if "runs" not in params:
        return
    train_runs, sample_runs = expand(params["runs"])
    if len(train_runs) != sum(len(cfg["seeds"]) for cfg in params["runs"].values()):
        raise UserError(f"{source}: two runs' replicates share a name (`<run>_seed<s>`): rename one of `runs`")
    if params.get("train_runs") != train_runs or params.get("sample_runs") != sample_runs:
        raise UserError(f"{source}: `train_runs` / `sample_runs` do not match `runs`: params.yaml is composed "
                        f"from conf/; edit conf/ and run `python -m diffrepro params --profile "
                        f"{params.get('profile', 'default')}` (or `dvc exp run -S ...`)")


def validate(params: dict, source: str = PARAMS_FILE) -> dict:
    """The schema (schema.py: one line per error, all of them), then the cross-field rules."""
    found = errors(params)
    if found:
        raise UserError("\n".join(f"{source}: {line}" for line in found))
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


def run_names(params: dict) -> list[str]:
    """Every run of the profile, one per declared run and seed (`<run>`, `<run>_seed<s>`)."""
    return list(params.get("train_runs", {}))


def declared_run(params: dict, run: str) -> str:
    """The `runs` entry a replicate comes from (`finediffusion_seed1` → `finediffusion`)."""
    runs = params.get("runs", {})
    base, _, seed = run.rpartition("_seed")
    return base if run not in runs and base in runs and seed.isdigit() else run


def run_key(run: str, params: dict) -> str:
    """Where a run's params are declared, for messages: `runs.<run>` (or `pretrain`); a replicate's
    are its declared run's (`finediffusion_seed1` → `runs.finediffusion`)."""
    return "pretrain" if run == "pretrain" else f"runs.{declared_run(params, run)}"


def training_params(params: dict, run: str) -> dict:
    """What training `run` reads: `train_runs.<run>` (or `pretrain` with its one seed)."""
    if run == "pretrain":
        cfg = {k: v for k, v in params["pretrain"].items() if k != "seeds"}
        return {**cfg, "seed": params["pretrain"]["seeds"][0]}
    runs = params.get("train_runs", {})
    if run not in runs:
        raise UserError(f"{PARAMS_FILE}: no run named {run!r}; runs: {', '.join(runs)}")
    return runs[run]


def run_params(params: dict, run: str) -> dict:
    """All params of one run (one seed): its training and, for the runs (not pretrain), its sampling."""
    cfg = training_params(params, run)
    return cfg if run == "pretrain" else {**cfg, **params["sample_runs"][run]}
