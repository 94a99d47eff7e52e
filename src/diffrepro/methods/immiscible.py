"""How is the noise assigned to the images? (Immiscible Diffusion and its KNN follow-up)

Immiscible Diffusion (Li et al., NeurIPS'24) re-pairs a batch of Gaussian noises with the batch of
images so that the summed image–noise distance is minimal (a linear assignment). Only the pairing
changes: the batch of noises is the same set of Gaussian draws, and the timesteps, images and labels
keep their order. "Improved Immiscible Diffusion" (arXiv 2505.18521) replaces the assignment by a
per-sample k-nearest choice: draw k candidate noises per image and keep the closest one.

A run selects its assignment by the param `assignment` (`make_assigner`, one class per mode). The
training loop draws each step's noise with it on the host (`draw`) and pairs that noise with the
images on the device (`assign`); as in the official code, the timesteps play no part. The cost
matrix is built on the batch's device; only scipy's solve runs on the host (a B×B copy).

Modes:
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


class NoiseAssignment:
    """Every assignment's two steps, which the training loop calls whatever the run selects:
    `draw` on the host (in the thread that draws the step one ahead) and `assign` on the device;
    both see the global batch, as every process draws it. As it stands this is `none`: each
    image keeps the N(0, I) noise drawn in its position."""

    def draw(self, shape: tuple[int, ...], part: slice, step_generator: torch.Generator,
             process_generator: torch.Generator) -> torch.Tensor:
        """The noise `assign` pairs (host): the global batch's, from the step's generator."""
        return torch.randn(shape, generator=step_generator)

    def assign(self, x0: torch.Tensor, noise: torch.Tensor, part: slice) -> torch.Tensor:
        """The noise of this process's images x0[part], on x0's device (x0: the global batch)."""
        return noise[part].to(x0.device, non_blocking=True)


class LocalAssignment(NoiseAssignment):
    """`lsa`: the optimal permutation of the noise over the images this process holds."""

    def __init__(self, quantize_fp16: bool = True, squared: bool = False):
        self.quantize_fp16, self.squared = quantize_fp16, squared

    def pair(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The permutation of `noise` minimising the summed image–noise distance to x0."""
        return noise[lsa_permutation(pair_cost(x0, noise, self.quantize_fp16, self.squared))]

    @torch.no_grad()
    def assign(self, x0, noise, part):
        return self.pair(x0[part], super().assign(x0, noise, part))


class GlobalAssignment(LocalAssignment):
    """`lsa_global`: the optimal permutation over the global batch; every process solves the same
    problem on its device and keeps its slice."""

    @torch.no_grad()
    def assign(self, x0, noise, part):
        return self.pair(x0, noise.to(x0.device, non_blocking=True))[part]


class NearestOfK(LocalAssignment):
    """`knn`: k candidate noises per image of this process (from its own stream), keep the nearest."""

    def __init__(self, k: int = 64, **cost):
        if k < 1:
            raise UserError(f"knn assignment needs k >= 1 candidate noises, got k={k}")
        super().__init__(**cost)
        self.k = k

    def draw(self, shape, part, step_generator, process_generator):
        images = len(range(shape[0])[part])
        return torch.randn((images, self.k, *shape[1:]), generator=process_generator)

    @torch.no_grad()
    def assign(self, x0, noise, part):
        candidates = noise.to(x0.device, non_blocking=True)
        return knn_select(x0[part], candidates, self.quantize_fp16, self.squared)


ASSIGNERS = {"none": NoiseAssignment, "lsa": LocalAssignment, "lsa_global": GlobalAssignment, "knn": NearestOfK}
MODES = tuple(ASSIGNERS)


def make_assigner(mode: str, **options) -> NoiseAssignment:
    """The noise assignment a run selects by its `assignment` param (`options`: k, quantize_fp16, squared)."""
    if mode not in ASSIGNERS:
        raise UserError(f"assignment mode {mode!r} is unknown; use one of {', '.join(MODES)}")
    return ASSIGNERS[mode](**options)


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
