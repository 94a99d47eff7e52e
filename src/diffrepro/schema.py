"""The schema of params.yaml, as pydantic models: every key, its type, its range, every closed choice.

Strict: no key may be missing or unknown, an int is not a float's only spelling (1 is a valid lr,
"1e-3" is not), a bool is not an int. Cross-field rules (eval_at within steps, the sampler of the
run's diffusion, ...) are in config.py, after these. `errors()` turns pydantic's errors into one
line each, naming the params key as a user writes it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

GAUSSIAN_SAMPLERS = ("ddpm", "ddim", "dpm_solver", "pndm")
EDM_SAMPLERS = ("heun",)
Sampler = Literal["ddpm", "ddim", "dpm_solver", "pndm", "heun"]
Method = Literal["dit", "finediffusion", "full_finetune", "bitfit", "difffit", "dimr", "edm", "patch"]
Assignment = Literal["none", "lsa", "lsa_global", "knn"]  # Immiscible Diffusion's noise assignment
Space = Literal["latent", "pixel"]
Diffusion = Literal["gaussian", "edm"]
Schedule = Literal["linear", "scaled_linear"]  # Gaussian β schedule: DiT's | DiMR's and SD's
GuidanceSchedule = Literal["constant", "increasing"]  # increasing: DiMR eval.py's power-cosine ramp of w
Release = Literal["dit", "finediffusion", "dimr", "patch_diffusion"]  # official weights: models/official_weights.py

PositiveInt = Annotated[int, Field(gt=0)]
Count = Annotated[int, Field(ge=0)]
Rate = Annotated[float, Field(ge=0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Training(Section):
    """What training a run reads, but its seed."""
    model: str
    method: Method
    diffusion: Diffusion
    schedule: Schedule
    space: Space
    data: str                # the folder the run trains on (a DVC dep)
    init_from: str           # a trained model folder to fine-tune, an official weight file, or the data (= scratch)
    release: Release | None  # init_from is this release's official file, adopted by its strict loader (steps 0)
    split: str               # the prepared split it trains on (train | base)
    images_per_class: PositiveInt | None  # only the first k records of each class (null: all)
    model_kwargs: dict[str, Any]
    method_kwargs: dict[str, Any]
    assignment: Assignment
    steps: Count             # 0: adopt the release (or save the initialisation, a placeholder `pretrain`)
    batch_size: PositiveInt
    lr: Rate
    weight_decay: Rate
    betas: list[Any]         # two numbers in [0, 1): config.py
    warmup_steps: Count
    ema_decay: Annotated[float, Field(ge=0, le=1)]
    ema_warmup: bool
    grad_clip: Rate
    bf16: bool
    checkpoint_every: PositiveInt
    eval_at: list[Any]       # extra steps at which to sample + score (quality vs steps): config.py


class TrainRun(Training):
    """What training one run at one seed reads: `train_runs.<run>` (generated from `runs`)."""
    seed: Count


class SampleRun(Section):
    """How one run is sampled: `sample_runs.<run>` (a change here resamples without retraining)."""
    sampler: Sampler
    sample_steps: PositiveInt
    guidance_scale: Rate
    guidance_schedule: GuidanceSchedule
    guidance_power: Annotated[float, Field(gt=0)]  # the ramp's exponent (eval.py's --cfg_scale_pow)
    guided_channels: PositiveInt | None           # guide only the first k ε channels; null = all


class Run(SampleRun, Training):
    """A declared run (`runs.<run>`, `pretrain`): both parts, and its seeds (each one a run)."""
    seeds: list[Any]


class Synthetic(Section):
    num_super: PositiveInt
    base_per_family: PositiveInt
    images_per_class: PositiveInt
    heldout_per_class: PositiveInt
    base_images_per_class: PositiveInt


class Data(Section):
    dataset: str
    image_size: PositiveInt
    raw_dir: str
    prepared_dir: str
    skip_corrupt: bool
    heldout_split: str       # synthetic: heldout; iNat/ImageNet: val
    synthetic: Synthetic


class Autoencoder(Section):
    kind: Literal["tiny", "sd_vae"]
    path: str
    block_out_channels: list[Any]
    latent_channels: PositiveInt
    layers_per_block: PositiveInt
    steps: Count
    batch_size: PositiveInt
    lr: Rate
    kl_weight: Rate


class Latents(Section):
    batch_size: PositiveInt


class Features(Section):
    kind: Literal["judge", "inception"]
    inception_weights: str
    inception_dims: Literal[64, 192, 768, 2048]  # pytorch-fid's --dims; the papers' FID: 2048
    steps: Count
    batch_size: PositiveInt
    lr: Rate
    width: PositiveInt


class Train(Section):
    log_every: PositiveInt


class Sample(Section):
    per_class: PositiveInt
    batch_size: PositiveInt
    grid_classes: PositiveInt
    seed_sets: PositiveInt   # independent final sample sets (EDM: FID = min over 3)


class Speed(Section):
    rounds: PositiveInt
    steps: PositiveInt
    warmup: Count


class Evaluate(Section):
    diversity_pairs: PositiveInt
    alexnet_weights: str
    reference_batch: str | None  # the ADM evaluator's reference .npz (ImageNet profiles), or null


class Report(Section):
    title: str
    dir: str                 # results.md, results.csv, plots/, figures/ (the default's: reports/)


class Params(Section):
    profile: str
    seed: Count
    needs_gpu: bool          # a paper profile: its stages refuse to start without CUDA (preflight.py)
    data: Data
    autoencoder: Autoencoder
    latents: Latents
    features: Features
    train: Train
    sample: Sample
    speed: Speed
    evaluate: Evaluate
    report: Report
    regime: dict[str, Any]   # the claims' regime variables the runs interpolate (a sweep's -S target)
    pretrain: Run
    runs: dict[str, Run]
    train_runs: dict[str, Any]   # generated from `runs`: config.py checks they are its expansion
    sample_runs: dict[str, Any]


def choices(annotation) -> tuple[str, ...]:
    return get_args(annotation)


CHOICES = {  # every closed choice (tests keep them equal to what the code implements)
    "method": choices(Method), "sampler": choices(Sampler), "assignment": choices(Assignment),
    "space": choices(Space), "diffusion": choices(Diffusion), "schedule": choices(Schedule),
    "guidance_schedule": choices(GuidanceSchedule), "release": choices(Release),
}
KINDS = {"autoencoder": choices(Autoencoder.model_fields["kind"].annotation),
         "features": choices(Features.model_fields["kind"].annotation)}

_TYPES = {"int_type": "int", "float_type": "float", "bool_type": "bool", "string_type": "str",
          "dict_type": "a mapping", "list_type": "a list", "model_type": "a mapping", "int_from_float": "int"}


def _where(loc: tuple) -> str:
    return ".".join(str(part) for part in loc if part not in ("function-after", "constrained-int"))


def _known_keys(loc: tuple) -> list[str]:
    """The keys the model at `loc` (an unknown key's parent) knows."""
    model: Any = Params
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if isinstance(model, type) else None
        if field is None:  # a key of `runs`
            model = Run
            continue
        model = field.annotation
        if getattr(model, "__origin__", None) is dict:
            model = get_args(model)[1]
    return list(model.model_fields) if isinstance(model, type) else []


def _looks_like_float(value) -> bool:
    """A string that reads as a number, such as 1e-3 (YAML 1.1 wants a dot: 1.0e-3)."""
    if not isinstance(value, str):
        return False
    try:
        float(value)
    except ValueError:
        return False
    return True


def _line(error: dict) -> str:
    where, kind, value, ctx = _where(error["loc"]), error["type"], error.get("input"), error.get("ctx") or {}
    if kind == "missing":
        return f"`{where}` is missing"
    if kind == "extra_forbidden":
        return f"unknown key `{where}`; known keys here: {', '.join(_known_keys(error['loc']))}"
    if kind == "literal_error":
        leaf = where.rsplit(".", 1)[-1]
        allowed = KINDS[where.split(".")[0]] if leaf == "kind" else CHOICES[leaf]
        return f"`{where}` must be one of {', '.join(allowed)}, got {value!r}"
    if kind in _TYPES:
        hint = (" (YAML reads 1e-3 as a string: write floats like 1.0e-3)"
                if kind == "float_type" and _looks_like_float(value) else "")
        return f"`{where}` must be {_TYPES[kind]}, got {type(value).__name__} {value!r}{hint}"
    number = "integer" if isinstance(value, int) else "number"
    if kind == "greater_than" and ctx.get("gt") == 0:
        return f"`{where}` must be a positive {number}, got {value}"
    if kind == "greater_than_equal" and ctx.get("ge") == 0:
        return f"`{where}` must be a non-negative {number}, got {value}"
    if kind in ("less_than_equal", "greater_than_equal"):
        return f"`{where}` must be between 0 and 1, got {value}"
    return f"`{where}`: {error['msg']}"


def errors(params: dict) -> list[str]:
    """One line per schema error of `params` (empty when it conforms)."""
    try:
        Params.model_validate(params)
    except ValidationError as err:
        return [_line(e) for e in err.errors()]
    return []
