"""How is the noise assigned to the images? (Immiscible Diffusion and its KNN follow-up)

Immiscible Diffusion (Li et al., NeurIPS'24) re-pairs a batch of Gaussian noises with the batch of
images so that the summed image–noise distance is minimal (a linear assignment). Only the pairing
changes: the batch of noises is the same set of Gaussian draws, and the timesteps, images and labels
keep their order. "Improved Immiscible Diffusion" (arXiv 2505.18521) replaces the assignment by a
per-sample k-nearest choice: draw k candidate noises per image and keep the closest one.

The training loop calls a `NoiseAssigner` right after encoding a batch, instead of drawing the noise
itself, and before drawing the timesteps (so, as in the official code, t plays no part):

    noise = assigner(x0, generator)        # or assigner.assign(x0, drawn_noise)

The cost matrix is built on the batch's device; only scipy's solve runs on the host (a B×B copy).

Modes (the run param `assignment`):
- `none`: plain N(0, I) noise.
- `lsa`: linear assignment over the batch this process holds.
- `lsa_global`: linear assignment over the global batch of all processes, as the official SD runs
  (8 GPUs x 256 = 2048). The training loop draws the global batch on every process anyway, so
  each process solves the same problem on it (cost matrix on its device) and keeps its slice —
  no communication; the official code solves on rank 0 and sends the slices, with the same result.
- `knn`: k candidates per image, keep the nearest. Local, no communication. Unlike a permutation it
  changes the noise marginal (see `norm_bias`).

The cost follows the official repository: the (not squared) L2 distance between flattened image
and noise; with `quantize_fp16` both sides are scaled by 0.1 and rounded to fp16, and the distance
matrix is rounded to fp16 (the paper's "quantized assignment"; scipy then solves in float64).
Distances are built in the matmul form ‖x‖² + ‖n‖² − 2 x·nᵀ (one addmm, then in-place ops), 40× faster
than pairwise differences. `squared=True` uses the squared distance instead (the minibatch-OT convention).
scipy solves the row- and column-reduced matrix (the Hungarian method's first step), which has the
same optimal permutations and halves scipy's time at batch 1024.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

from diffrepro.errors import UserError

MODES = ("none", "lsa", "lsa_global", "knn")
FP16_SCALE = 0.1  # the official code scales by 0.1 before the fp16 cast (an overflow guard)


def _flat(x: torch.Tensor, quantize_fp16: bool) -> torch.Tensor:
    x = x.flatten(1).float()
    return (FP16_SCALE * x).half().float() if quantize_fp16 else x


def _finish(sq_dist: torch.Tensor, quantize_fp16: bool, squared: bool) -> torch.Tensor:
    """Distances from fresh squared distances, in place (sq_dist is consumed)."""
    cost = sq_dist.clamp_min_(0)  # the matmul form can go slightly negative for near-equal rows
    if not squared:
        cost = cost.sqrt_()
    return cost.half().float() if quantize_fp16 else cost


def pair_cost(x0: torch.Tensor, noise: torch.Tensor, quantize_fp16: bool = True,
              squared: bool = False) -> torch.Tensor:
    """(len(x0), len(noise)) matrix of image–noise distances, on x0's device, float32."""
    a, b = _flat(x0, quantize_fp16), _flat(noise, quantize_fp16)
    sq = torch.addmm(b.square().sum(1), a, b.T, alpha=-2).add_(a.square().sum(1, keepdim=True))
    return _finish(sq, quantize_fp16, squared)


def lsa_permutation(cost: torch.Tensor) -> torch.Tensor:
    """Noise index assigned to each image: the permutation minimising the summed cost.

    Subtracting each row's minimum, then each column's, lowers every permutation's total by the
    same constant, so the optimum is unchanged; in float64 the subtraction is exact for fp16 or
    fp32 costs of one magnitude. scipy's shortest augmenting path starts from these better duals.
    """
    reduced = cost.detach().to("cpu", torch.float64, copy=True)  # C order, scipy's dtype
    reduced -= reduced.amin(1, keepdim=True)
    reduced -= reduced.amin(0, keepdim=True)
    _, cols = linear_sum_assignment(reduced.numpy())  # rows are 0..B-1
    return torch.as_tensor(cols, device=cost.device)


def knn_select(x0: torch.Tensor, candidates: torch.Tensor, quantize_fp16: bool = True,
               squared: bool = False) -> torch.Tensor:
    """From candidates (B, k, ...) keep, for each image of x0 (B, ...), the nearest one."""
    b, k = candidates.shape[:2]
    a = _flat(x0, quantize_fp16)  # (B, D)
    c = _flat(candidates.reshape(b * k, *candidates.shape[2:]), quantize_fp16).view(b, k, -1)
    dot = torch.bmm(c, a[:, :, None])[..., 0]  # (B, k)
    sq = a.square().sum(1, keepdim=True) + c.square().sum(2) - 2 * dot
    nearest = _finish(sq, quantize_fp16, squared).argmin(1)  # first index on fp16 ties
    return candidates[torch.arange(b, device=candidates.device), nearest]


class NoiseAssigner:
    """Draws the training noise for a batch and pairs it with the images by `mode`."""

    def __init__(self, mode: str = "none", k: int = 64, quantize_fp16: bool = True,
                 squared: bool = False):
        if mode not in MODES:
            raise UserError(f"assignment mode {mode!r} is unknown; use one of {', '.join(MODES)}")
        if mode == "knn" and k < 1:
            raise UserError(f"knn assignment needs k >= 1 candidate noises, got k={k}")
        self.mode, self.k, self.quantize_fp16, self.squared = mode, k, quantize_fp16, squared

    @torch.no_grad()
    def __call__(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise shaped like x0. With k = 1 or mode `none` this is exactly `randn(x0.shape)`."""
        if self.mode == "knn":
            candidates = self._randn((x0.shape[0], self.k, *x0.shape[1:]), x0, generator)
            return knn_select(x0, candidates, self.quantize_fp16, self.squared)
        return self.assign(x0, self._randn(x0.shape, x0, generator))

    @torch.no_grad()
    def assign(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Re-pair given noise with x0 (modes none/lsa/lsa_global): returns a permutation of it.
        `lsa` and `lsa_global` differ only in the batch they are given (a process's or the global)."""
        if self.mode == "knn":
            raise UserError("knn assignment draws its own candidates; call the assigner, not assign()")
        if self.mode == "none":
            return noise
        return noise[lsa_permutation(pair_cost(x0, noise, self.quantize_fp16, self.squared))]

    @staticmethod
    def _randn(shape, x0, generator):
        device = generator.device if generator is not None else x0.device
        return torch.randn(shape, generator=generator, device=device).to(x0.device, x0.dtype)


def norm_bias(noise: torch.Tensor) -> float:
    """Relative bias of the mean ‖ε‖² against its N(0, I) expectation d: 0 for unbiased noise.

    A permutation (lsa) leaves it exactly unchanged; knn prefers small-norm candidates, since
    ‖x − ε‖² also rewards small ‖ε‖, so its kept noise is biased low.
    """
    d = noise[0].numel()
    return (noise.flatten(1).double().square().sum(1).mean() / d - 1).item()


def mean_pair_distance(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Mean L2 distance between each image and the noise paired with it (0-d float64, on their
    device: the training loop reads it once at the end, not every step)."""
    return (x0.flatten(1).double() - noise.flatten(1).double()).norm(dim=1).mean()
