"""DiMR (Liu et al., 2024): what its training adds to plain class-conditional diffusion.

- Class dropout and guidance are DiT's/U-ViT's: labels drop to the null row (`num_classes`) with
  p_uncond 0.1, and CFG pushes away from it (the inherited `Method` hooks).
- The optimizer keeps each TD-LN gate out of weight decay: the official `trainable_parameters`
  exempts only the slope w' (w = 1 + w') and the offset b of every time-dependent parameter;
  p0, p1 and everything else decay (AdamW 0.03).
- The ε loss is multi-scale: each branch's prediction is compared with the noise downsampled to
  its resolution, weights [1/4, 1] for the released "/2R" models (see `multiscale_eps_loss`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffrepro.errors import UserError
from diffrepro.methods.base import Method, register_method
from diffrepro.models.dimr import TimeDependentParameter

LOSS_WEIGHTS = (0.25, 1.0)  # official loss_coeffs, lowest resolution first


def downsample_noise(noise: torch.Tensor, ratio: int) -> torch.Tensor:
    """Sum of each ratio×ratio block divided by ratio (= average pool × ratio): the sum of r² iid
    unit-variance values has variance r², so this keeps unit variance (official "scale_correction")."""
    if ratio == 1:
        return noise
    return F.avg_pool2d(noise, ratio) * ratio


def multiscale_eps_loss(outputs, noise: torch.Tensor, weights=LOSS_WEIGHTS) -> torch.Tensor:
    """Per-sample Σ_k weight_k · mean over (C, H, W) of (ε̂_k − down_k(ε))², ε̂_k lowest resolution first."""
    if not isinstance(outputs, (list, tuple)) or len(outputs) != len(weights):
        got = len(outputs) if isinstance(outputs, (list, tuple)) else "a single tensor"
        raise UserError(f"method dimr: loss_weights has {len(weights)} entries but the model returned {got} "
                        f"ε predictions; give one weight per resolution (lowest first), and train in training mode")
    loss = torch.zeros(noise.shape[0], device=noise.device, dtype=torch.float32)
    for weight, pred in zip(weights, outputs):
        ratio = noise.shape[-1] // pred.shape[-1]
        if pred.shape[-2] * ratio != noise.shape[-2] or pred.shape[-1] * ratio != noise.shape[-1]:
            raise ValueError(f"ε prediction {tuple(pred.shape)} is not an integer downsampling of {tuple(noise.shape)}")
        target = downsample_noise(noise, ratio)
        loss = loss + weight * (pred.float() - target.float()).square().mean(dim=(1, 2, 3))
    return loss


@register_method("dimr")
class DiMRMethod(Method):
    """Null-class dropout + CFG; TD-LN gates without weight decay; multi-scale ε loss."""

    def __init__(self, loss_weights=LOSS_WEIGHTS, **params):
        super().__init__(**params)
        self.loss_weights = tuple(float(w) for w in loss_weights)

    def param_groups(self, model: torch.nn.Module, weight_decay: float) -> list[dict]:
        gates = {id(p) for m in model.modules() if isinstance(m, TimeDependentParameter) for p in m.gate_parameters()}
        trainable = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in trainable if id(p) not in gates], "weight_decay": weight_decay},
                  {"params": [p for p in trainable if id(p) in gates], "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def eps_loss(self, model_output, noise: torch.Tensor) -> torch.Tensor:
        """The hook for `GaussianDiffusion.training_losses(..., eps_loss=method.eps_loss)`."""
        return multiscale_eps_loss(model_output, noise, self.loss_weights)
