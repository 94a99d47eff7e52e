"""What each paper adds on top of the generic training loop and sampler, one file per paper.

`get_method(name)` returns the Method object named in a run's params (`method: finediffusion`).
"""

from __future__ import annotations

import importlib

from diffrepro.errors import UserError
from diffrepro.methods.base import METHODS, Method

METHOD_MODULES = (
    "diffrepro.methods.base",
    "diffrepro.methods.finediffusion",
    "diffrepro.methods.dimr",
    "diffrepro.methods.patch",
)


def get_method(name: str, **params) -> Method:
    for module in METHOD_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name](**params)
