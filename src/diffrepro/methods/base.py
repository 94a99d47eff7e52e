"""The hooks a paper's method plugs into the one training loop and the one sampler.

A method is a small object; the default implementation is plain class-conditional diffusion
training with classifier-free guidance (DiT). Papers override only what they change:

- `configure_model(model)`: what trains (requires_grad) — FineDiffusion / BitFit / DiffFit.
- `param_groups(model, weight_decay)`: optimizer groups — DiMR keeps TD-LN out of weight decay.
- `training_labels(labels, super_labels, generator)`: class dropout — to the null class (CFG) or
  to the superclass row (FineDiffusion).
- `guidance_labels(labels, super_labels)`: the labels of the "unconditional" branch at sampling.
- `transform_batch(x0, generator)`: Patch Diffusion crops patches and adds coordinate channels.

Noise assignment (Immiscible Diffusion) is orthogonal to the method: every run has an
`assignment` param, applied by the training loop (see `methods/immiscible.py`).
"""

from __future__ import annotations

import torch

METHODS: dict[str, type["Method"]] = {}


def register_method(name: str):
    def wrap(cls):
        METHODS[name] = cls
        cls.name = name
        return cls

    return wrap


@register_method("dit")
class Method:
    """Plain class-conditional training: all parameters, class dropout to the null class, CFG."""

    name = "dit"
    model_overrides: dict = {}  # constructor kwargs the method needs (e.g. affine LayerNorms)
    peft = False  # parameter-efficient: a fine-tuned run stores only its trained tensors
    tiered_classes = False  # class table holds the superclass rows too (built from the data)

    def __init__(self, class_dropout: float = 0.1, **unused):
        self.class_dropout = class_dropout

    def configure_model(self, model: torch.nn.Module) -> None:
        for p in model.parameters():
            p.requires_grad_(True)
        if hasattr(model, "pos_embed"):  # fixed sin-cos table, never trained
            model.pos_embed.requires_grad_(False)

    def param_groups(self, model: torch.nn.Module, weight_decay: float) -> list[dict]:
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": weight_decay}]

    def null_label(self, model) -> int:
        return model.num_classes

    def training_labels(self, labels, super_labels, generator, model):
        drop = torch.rand(labels.shape, generator=generator, device=labels.device) < self.class_dropout
        return torch.where(drop, torch.full_like(labels, self.null_label(model)), labels)

    def guidance_labels(self, labels, super_labels, model):
        """Labels of the branch that guidance pushes away from (CFG: the null class)."""
        return torch.full_like(labels, self.null_label(model))

    def transform_batch(self, x0, generator):
        """Return (model input batch, extra forward kwargs). Identity for whole-image methods."""
        return x0, {}
