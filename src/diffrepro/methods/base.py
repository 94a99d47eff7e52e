"""The hooks a paper's method plugs into the one training loop and the one sampler.

A method is a small object; the default implementation is plain class-conditional diffusion
training with classifier-free guidance (DiT). `Method` declares every hook the loop and the
sampler call — they call each one on every run — and papers override only what they change:

- `configure_model(model)`: what trains (requires_grad) — FineDiffusion / BitFit / DiffFit.
- `param_groups(model, weight_decay)`: optimizer groups — DiMR keeps TD-LN out of weight decay.
- `eps_loss`: a replacement ε loss — DiMR's multi-scale loss.
- `plan_step(...)` and `transform_batch(...)`: Patch Diffusion's patch size, batch and crops.
- `training_labels(...)`: class dropout — to the null class (CFG) or to the superclass row
  (FineDiffusion); EDM's unconditional nets get no labels.
- `guidance_labels(...)`: the labels of the "unconditional" branch at sampling.
- `sampling_kwargs(...)`: extra network inputs at sampling — Patch Diffusion's coordinate grid.

Noise assignment (Immiscible Diffusion) is orthogonal to the method: every run selects one by its
`assignment` param (see `methods/immiscible.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

METHODS: dict[str, type["Method"]] = {}


def register_method(name: str):
    def wrap(cls):
        METHODS[name] = cls
        cls.name = name
        return cls

    return wrap


@dataclass(frozen=True)
class StepPlan:
    """What one optimizer step trains on: the patch side, how many images to load (and count as
    seen), and the pixels processed relative to a full-size step."""

    patch_size: int
    images: int
    pixel_fraction: float


@register_method("dit")
class Method:
    """Plain class-conditional training: all parameters, class dropout to the null class, CFG."""

    name = "dit"
    model_overrides: dict = {}  # constructor kwargs the method needs (e.g. affine LayerNorms)
    peft = False  # parameter-efficient: a fine-tuned run stores only its trained tensors
    tiered_classes = False  # class table holds the superclass rows too (built from the data)
    coordinate_channels = 0  # input channels the method appends to the image (Patch Diffusion: x, y)
    # (model output, noise) -> per-sample loss replacing the Gaussian diffusion's ε loss; None: its own
    eps_loss: Callable[[object, torch.Tensor], torch.Tensor] | None = None

    def __init__(self, class_dropout: float = 0.1, **unused):
        self.class_dropout = class_dropout

    def configure_model(self, model: torch.nn.Module) -> None:
        """Mark what trains: every parameter but the fixed sin-cos position table."""
        for p in model.parameters():
            p.requires_grad_(True)
        if hasattr(model, "pos_embed"):  # fixed sin-cos table, never trained
            model.pos_embed.requires_grad_(False)

    def param_groups(self, model: torch.nn.Module, weight_decay: float) -> list[dict]:
        """The optimizer's groups: every trained parameter with the run's weight decay."""
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": weight_decay}]

    def null_label(self, model) -> int:
        """The class row that stands for "no class" (the one after the real classes)."""
        return model.num_classes

    def plan_step(self, step: int, seed: int, batch_size: int, resolution: int) -> StepPlan:
        """What step `step` trains on (the same on every process): here full images, the run's batch."""
        return StepPlan(resolution, batch_size, 1.0)

    def training_labels(self, labels, super_labels, generator, model):
        """The labels the network is trained with: class dropout to the null class."""
        drop = torch.rand(labels.shape, generator=generator, device=labels.device) < self.class_dropout
        return torch.where(drop, torch.full_like(labels, self.null_label(model)), labels)

    def transform_batch(self, x0, generator, plan: StepPlan):
        """Return (model input batch, extra forward kwargs) for `plan`. Identity for whole-image methods."""
        return x0, {}

    def guidance_labels(self, labels, super_labels, model):
        """Labels of the branch that guidance pushes away from (CFG: the null class)."""
        return torch.full_like(labels, self.null_label(model))

    def sampling_kwargs(self, batch_size: int, resolution: int, device=None) -> dict:
        """Extra forward kwargs of the network at sampling (none for whole-image methods)."""
        return {}
