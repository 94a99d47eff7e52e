"""diffrepro: one DVC pipeline that re-runs FineDiffusion, DiMR, Patch Diffusion and Immiscible Diffusion."""

__version__ = "0.1.0"
