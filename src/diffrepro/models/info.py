"""`info MODEL`: parameter counts and multiply-accumulates of one forward pass of one sample.

Models are built on the meta device, so even billion-parameter configs are counted instantly.
GMACs = FLOPs counted by `torch.utils.flop_counter.FlopCounterMode`, halved (the papers quote
multiply-adds as "GFLOPs").
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffrepro.models.registry import build_model


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, parameters with requires_grad)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def count_gmacs(model: torch.nn.Module, example_inputs: tuple) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(*example_inputs)
    return counter.get_total_flops() / 2 / 1e9


def model_info(name: str, method: str | None = None, **kwargs) -> dict:
    """Build `name` on the meta device (after `method` selects its trainable parameters) and count it.

    Every backbone exposes `example_inputs(batch_size, device)` returning the forward arguments
    of one sample (noisy input, timestep, label, ...).
    """
    selector = None
    if method is not None:
        from diffrepro.methods import get_method

        selector = get_method(method)
        kwargs = {**selector.model_overrides, **kwargs}
    with torch.device("meta"):
        model = build_model(name, **kwargs)
    if selector is not None:
        selector.configure_model(model)
    total, trainable = count_params(model)
    gmacs = count_gmacs(model, model.example_inputs(1, torch.device("meta")))
    return {"model": name, "params": total, "trainable": trainable,
            "trainable_percent": round(100 * trainable / total, 4), "gmacs": round(gmacs, 3)}
