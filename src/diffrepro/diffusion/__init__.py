"""The noise processes a run trains and samples with (its `diffusion` param): Gaussian (DDPM,
`gaussian.py`) and EDM (`edm.py`).

Both implement `Diffusion`, so the training loop and the sampler call the same four things and
never ask which process a run uses; `runs.noise_process` picks the class from the param.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Diffusion(ABC):
    """What the training loop and the sampler need of a run's noise process."""

    fp32_precision = "tf32"  # CUDA fp32 matmul/convolution precision of the paper's official code

    @classmethod
    @abstractmethod
    def for_run(cls, schedule: str, model: torch.nn.Module) -> "Diffusion":
        """The process of a run with noise schedule `schedule` and network `model` (bare or wrapped)."""

    @staticmethod
    def network(backbone: torch.nn.Module) -> torch.nn.Module:
        """The network the process calls, around the registered backbone (Gaussian: the backbone)."""
        return backbone

    @abstractmethod
    def draw_levels(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """The noise levels (timesteps or σ) of n training images, from the step's host generator."""

    @abstractmethod
    def loss(self, model, x0: torch.Tensor, levels: torch.Tensor, noise: torch.Tensor, labels,
             model_kwargs: dict, eps_loss=None) -> torch.Tensor:
        """Per-sample training loss of x0 noised to `levels` with `noise` (`eps_loss`: a method's ε loss)."""

    def check_sampling(self, cfg: dict, where: str) -> None:
        """Raise a UserError for sampler params (`cfg`, at `where` in params.yaml) it cannot use."""

    @abstractmethod
    def sample_images(self, model, x_T: torch.Tensor, labels, guide_labels, cfg: dict, generators,
                      model_kwargs: dict) -> torch.Tensor:
        """x_0 from the unit noise x_T with the run's sampler params `cfg`, guided away from `guide_labels`."""
