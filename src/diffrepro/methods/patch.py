"""What does Patch Diffusion (Wang et al. 2023) change? It trains EDM on random crops that carry
their position in the full image as two extra input channels.

- Patch size per step: R with probability real_p, R/2 with 0.6·(1 − real_p), R/4 with
  0.4·(1 − real_p) (R = the data's side in pixels or latents); `num_patch_sizes=2` is the latent
  recipe, R/2 with 1 − real_p. The draw is a hash of (run seed, step), so every process of a
  multi-process run trains the same size in a step (the official code draws per GPU, and DDP then
  waits for the slowest, full-size rank).
- Crop: a uniform top-left corner per image; all images of a step share the size.
- Coordinates: channel 0 = x (column), channel 1 = y (row) of each pixel in the FULL image,
  2·index/(R − 1) − 1 ∈ [−1, 1]. `EDMDenoiser` appends them to the scaled input c_in·x.
  Sampling passes the full grid (`coordinate_grid`).
- Batch: a step on patches of side s loads R/s times the batch (the paper's rule at 64 px:
  1, 2, 4 for 64, 32, 16; the official table breaks at 32 and 128 px). The pixels per step are
  then s/R of a full-size step, never more, so memory is bounded by the full-size batch.
- Progress counts images: each patch is one image seen, as in the paper's Mimg (the official code
  adds the expected batch·1.9; we add the realised count, `StepPlan.images`).
"""

from __future__ import annotations

import hashlib

import torch

from diffrepro.errors import UserError
from diffrepro.methods.base import Method, StepPlan, register_method

SMALLER_SIZE_SHARES = {2: 0.6, 4: 0.4}  # of 1 − real_p, by R / s


def patch_size_probabilities(resolution: int, real_p: float, num_patch_sizes: int = 3) -> dict[int, float]:
    """{patch side: probability}, largest first."""
    if not 0.0 <= real_p <= 1.0:
        raise UserError(f"params: patch real_p must be in [0, 1], got {real_p}")
    if num_patch_sizes not in (2, 3):
        raise UserError(f"params: num_patch_sizes must be 3 (pixel recipe) or 2 (latent recipe), got {num_patch_sizes}")
    smallest = 2 ** (num_patch_sizes - 1)
    if resolution % smallest:
        raise UserError(f"params: resolution {resolution} must be divisible by {smallest} "
                        f"for {num_patch_sizes} patch sizes")
    if num_patch_sizes == 2:
        return {resolution: real_p, resolution // 2: 1.0 - real_p}
    return {resolution: real_p, **{resolution // k: share * (1.0 - real_p) for k, share in SMALLER_SIZE_SHARES.items()}}


def shared_uniform(seed: int, step: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, step): equal on every process."""
    digest = hashlib.blake2b(f"patch-size:{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def draw_patch_size(probabilities: dict[int, float], seed: int, step: int) -> int:
    u, total = shared_uniform(seed, step), 0.0
    for size, p in probabilities.items():
        total += p
        if u < total:
            return size
    return min(s for s, p in probabilities.items() if p > 0)  # u ≥ the rounded sum: the last size


def batch_multiplier(patch_size: int, resolution: int) -> int:
    """Images per full-size batch slot: R / s."""
    return resolution // patch_size


def _coordinates(rows: torch.Tensor, cols: torch.Tensor, resolution: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, 2, h, w) [x, y] channels for per-image row (B, h) and column (B, w) indices."""
    def to_unit(idx):
        return (2.0 * idx / (resolution - 1) - 1.0).to(dtype)

    x = to_unit(cols)[:, None, :].expand(-1, rows.shape[1], -1)
    y = to_unit(rows)[:, :, None].expand(-1, -1, cols.shape[1])
    return torch.stack([x, y], dim=1)


def coordinate_grid(resolution: int, batch_size: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The full-image (B, 2, R, R) coordinate channels, for sampling."""
    idx = torch.arange(resolution, device=device).expand(batch_size, -1)
    return _coordinates(idx, idx, resolution, dtype)


def crop_patches(x0: torch.Tensor, patch_size: int, generator: torch.Generator | None = None):
    """Random (patch_size × patch_size) crops, one uniform position per image, and their coordinates."""
    b, _, h, w = x0.shape
    if h != w:
        raise UserError(f"Patch Diffusion needs square images, got {h}×{w}")
    gen_device = generator.device if generator is not None else x0.device
    top, left = (torch.randint(0, h - patch_size + 1, (b,), generator=generator, device=gen_device).to(x0.device)
                 for _ in range(2))
    span = torch.arange(patch_size, device=x0.device)
    rows, cols = top[:, None] + span, left[:, None] + span
    patches = x0[torch.arange(b, device=x0.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return patches.permute(0, 3, 1, 2).contiguous(), _coordinates(rows, cols, h, x0.dtype)


@register_method("edm")
class EDMMethod(Method):
    """EDM on full images: one image per batch slot, no coordinate channels."""

    def training_labels(self, labels, super_labels, generator, model):
        if labels is None or model.num_classes is None:  # unconditional (CelebA, AFHQv2)
            return None
        return super().training_labels(labels, super_labels, generator, model)


@register_method("patch")
class PatchMethod(EDMMethod):
    """Patch Diffusion: random patch sizes and crops with full-image coordinate channels."""

    coordinate_channels = 2

    def __init__(self, real_p: float = 0.5, num_patch_sizes: int = 3, **kwargs):
        super().__init__(**kwargs)
        patch_size_probabilities(64, real_p, num_patch_sizes)  # validate the params now
        self.real_p, self.num_patch_sizes = real_p, num_patch_sizes

    def probabilities(self, resolution: int) -> dict[int, float]:
        return patch_size_probabilities(resolution, self.real_p, self.num_patch_sizes)

    def mean_batch_multiplier(self, resolution: int) -> float:
        """Expected images per batch slot (1.9 for real_p = 0.5): converts an image budget to steps."""
        return sum(p * batch_multiplier(s, resolution) for s, p in self.probabilities(resolution).items())

    def plan_step(self, step: int, seed: int, batch_size: int, resolution: int) -> StepPlan:
        size = draw_patch_size(self.probabilities(resolution), seed, step)
        return StepPlan(size, batch_size * batch_multiplier(size, resolution), size / resolution)

    def transform_batch(self, x0, generator, plan: StepPlan):
        """Crop every image of the (already multiplied) batch to the plan's patch size."""
        patches, coords = crop_patches(x0, plan.patch_size, generator)
        return patches, {"coords": coords}

    def sampling_kwargs(self, batch_size: int, resolution: int, device=None) -> dict:
        return {"coords": coordinate_grid(resolution, batch_size, device)}
