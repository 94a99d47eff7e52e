"""What each paper adds on top of the generic training loop and sampler, one file per paper.

`get_method(name)` returns the Method object named in a run's params (`method: finediffusion`).
Every module of this package is imported first, so a new paper's module registers its methods
(`@register_method`) by being here.
"""

from __future__ import annotations

import importlib
import pkgutil

from diffrepro.errors import UserError
from diffrepro.methods.base import METHODS, Method


def get_method(name: str, **params) -> Method:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name](**params)
