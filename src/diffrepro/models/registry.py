"""Model registry: a name (`DiT-XL/2`, `DiMR-XL/2R`, `ddpmpp`, `sd-v1.4-unet`, ...) → constructor.

Each backbone module registers its named configs with `@register("Name")`. The registry imports
those modules lazily so `python -m diffrepro info` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch.nn as nn

from diffrepro.errors import UserError

BACKBONE_MODULES = (
    "diffrepro.models.dit",
    "diffrepro.models.dimr",
    "diffrepro.models.edm_unets",
    "diffrepro.models.sd_unet",
)

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    """Decorator: register a constructor `fn(**kwargs) -> nn.Module` under `name`."""

    def wrap(fn):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return wrap


def _load_all() -> None:
    for module in BACKBONE_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:  # a real missing dependency, not an absent backbone file
                raise


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model; unknown names get one line listing the known ones."""
    _load_all()
    if name not in _REGISTRY:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**kwargs)
