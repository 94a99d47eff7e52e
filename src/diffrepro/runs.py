"""What a run is made of: its training data, its network (+ method overrides), its noise process.

Shared by the train, sample and evaluate stages so that all three build exactly the same thing
from `params.yaml` and the run's saved `config.json`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffrepro.data import shards
from diffrepro.diffusion import Diffusion
from diffrepro.diffusion.edm import EDM
from diffrepro.diffusion.gaussian import GaussianDiffusion
from diffrepro.errors import UserError
from diffrepro.inputs import read_json, read_safetensors
from diffrepro.latents import LatentSet
from diffrepro.models.autoencoder import to_unit_range
from diffrepro.models.registry import build_model

SPACES = ("latent", "pixel")
NOISE_PROCESSES: dict[str, type[Diffusion]] = {"gaussian": GaussianDiffusion, "edm": EDM}  # by `diffusion`
DIFFUSIONS = tuple(NOISE_PROCESSES)


class ImageSet:
    """Pixel training set (memory-mapped uint8); `sample_batch` applies a random horizontal flip."""

    def __init__(self, split_dir: str | Path):
        self.split = shards.ShardedSplit(split_dir)
        self.labels = torch.from_numpy(self.split.column("labels"))
        self.super_labels = torch.from_numpy(self.split.column("super_labels"))

    def __len__(self) -> int:
        return len(self.labels)

    def sample_batch(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = to_unit_range(self.split.take(index.numpy())["images"])
        flip = torch.rand(len(index), generator=generator) < 0.5
        return torch.where(flip[:, None, None, None], x.flip(-1), x)


class PerClassSubset:
    """The first `k` records of each class of a training set.

    Data-set size per class is the regime variable of two claims (FineDiffusion's few-shot
    fine-tuning, Patch Diffusion's small data); as a run param, a sweep over it retrains only the
    runs that set it, on the prepared data every run shares.
    """

    def __init__(self, data, k: int, where: str):
        counts = torch.bincount(data.labels)
        if int(counts[counts > 0].min()) < k:
            raise UserError(f"{where}: images_per_class {k} exceeds the {int(counts[counts > 0].min())} "
                            "records of the split's smallest class; lower it")
        order = torch.argsort(data.labels, stable=True)
        first_of_class = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order)) - first_of_class[data.labels[order]]
        self.data, self.keep = data, torch.nonzero(rank < k).flatten()
        self.labels, self.super_labels = data.labels[self.keep], data.super_labels[self.keep]

    def __len__(self) -> int:
        return len(self.keep)

    def sample_batch(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.data.sample_batch(self.keep[index], generator)


def training_set(cfg: dict):
    if cfg["space"] not in SPACES:
        raise UserError(f"params.yaml: run space must be one of {SPACES}, got {cfg['space']!r}")
    split_dir = Path(cfg["data"]) / cfg["split"]
    if not split_dir.exists():
        raise UserError(f"{split_dir} does not exist: check the run's `data` and `split` params "
                        "(and run `dvc repro` for the data stages)")
    data = LatentSet(split_dir) if cfg["space"] == "latent" else ImageSet(split_dir)
    if len(data) == 0:
        raise UserError(f"{split_dir} holds no records (empty data set)")
    if cfg["images_per_class"] is not None:
        return PerClassSubset(data, cfg["images_per_class"], f"{split_dir} (run param images_per_class)")
    return data


def class_counts(prepared_dir: str | Path, split: str) -> tuple[int, int]:
    """(number of classes, number of superclasses) of a split: base split = the base classes."""
    classes = shards.read_classes(prepared_dir)
    table = classes["base_classes"] if split == "base" else classes["classes"]
    return len(table), len(classes["super_classes"])


def model_config(cfg: dict, method, data_shape: tuple[int, ...], num_classes: int, num_super: int) -> dict:
    """The constructor kwargs of the run's network: data shape + method needs + explicit params.

    A method with a tiered class table (FineDiffusion) gets one row per superclass of the data.
    """
    channels, size = data_shape[0], data_shape[-1]
    kwargs = {"input_size": size, "in_channels": channels, "num_classes": num_classes}
    if method.tiered_classes:
        kwargs["num_super_classes"] = num_super
    if method.coordinate_channels:
        kwargs["extra_in_channels"] = method.coordinate_channels
    return {**kwargs, **method.model_overrides, **cfg["model_kwargs"]}


def _process_class(diffusion: str) -> type[Diffusion]:
    if diffusion not in NOISE_PROCESSES:
        raise UserError(f"params.yaml: run diffusion must be one of {DIFFUSIONS}, got {diffusion!r}")
    return NOISE_PROCESSES[diffusion]


def noise_process(cfg: dict, model: torch.nn.Module) -> Diffusion:
    """The run's diffusion (its `diffusion` and `schedule` params) for its network `model`: the
    registered backbone or the network built around it (Gaussian: the same module)."""
    return _process_class(cfg["diffusion"]).for_run(cfg["schedule"], model)


def build_network(model_name: str, kwargs: dict, diffusion: str) -> torch.nn.Module:
    """The registered backbone, wrapped as the run's noise process calls it (EDM: preconditioned).

    The SD UNet (`sd-v1.4-unet`) is built from its kwargs alone, so the trained run rebuilds
    identically from config.json: `sd_dir` (the local SD v1.4 folder: its frozen text encoder
    encodes the class prompts once; with `pretrained`, its UNet weights are the start) and
    `classes_dir` (the prepared data, whose class names become the prompts).
    """
    return _process_class(diffusion).network(build_model(model_name, **kwargs))


def set_matmul_precision(cfg: dict) -> None:
    """TF32 matmuls/convolutions on CUDA as each paper's official code does: enabled by DiT, DiMR
    and the SD training scripts, disabled by EDM (and so Patch Diffusion). No effect on the CPU."""
    precision = _process_class(cfg["diffusion"]).fp32_precision
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision


def train_command(run: str) -> str:
    """The command that (re)builds `models/<run>/`."""
    return "dvc repro pretrain" if run == "pretrain" else f"dvc repro train@{run}"


def load_trained(run_dir: str | Path, which: str = "ema") -> tuple[torch.nn.Module, dict]:
    """Rebuild a trained run's network from its config.json and weights (base + delta for PEFT)."""
    run_dir = Path(run_dir)
    rebuild = train_command(run_dir.name)
    config = read_json(run_dir / "config.json", rebuild)
    model = build_network(config["model"], config["model_kwargs"], config["diffusion"])
    weights_file = run_dir / f"{which}.safetensors"
    weights = read_safetensors(weights_file, rebuild)
    if config.get("delta_of"):  # PEFT run: only the trained tensors were saved
        base_model, _ = load_trained(config["delta_of"], which)
        state = base_model.state_dict()
        state = {k: v for k, v in state.items() if k in model.state_dict() and
                 model.state_dict()[k].shape == v.shape}
        model.load_state_dict(state, strict=False)
    try:
        missing, unexpected = model.load_state_dict(weights, strict=not config.get("delta_of"))
    except RuntimeError as err:
        raise UserError(f"{weights_file} does not fit {run_dir}/config.json ({str(err).splitlines()[0]}): "
                        f"run `{rebuild}`") from None
    if unexpected:
        raise UserError(f"{weights_file} was saved from another model (unexpected {unexpected[:3]}): run `{rebuild}`")
    return model.eval().requires_grad_(False), config


def rng(*keys: int) -> torch.Generator:
    """A generator seeded by a tuple of integers (run seed, step, ...): resumable without state."""
    seed = int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)
