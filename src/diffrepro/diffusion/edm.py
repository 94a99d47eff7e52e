"""EDM (Karras et al. 2022): the preconditioned denoiser, its training loss and the Heun sampler,
written from the paper's equations (Table 1, Eq. 7–8, Algorithms 1–2, config F).

- Denoiser: D(x; σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x; c_noise(σ)), with
  c_skip = σd²/(σ²+σd²), c_out = σ·σd/√(σ²+σd²), c_in = 1/√(σ²+σd²), c_noise = ln(σ)/4.
  Patch Diffusion's coordinate channels are appended to the *scaled* input c_in·x, unscaled.
- Loss: ln σ ~ N(P_mean, P_std²), λ(σ) = (σ²+σd²)/(σ·σd)², L = λ(σ)‖D(y + σn; σ) − y‖². The
  per-sample loss is the SUM over elements (EDM's normalisation; Patch Diffusion relies on it: a
  patch sample carries its pixels' share of the squared error). Its mean over the batch is EDM's loss.
- Sampler: σ_i = (σ_max^(1/ρ) + i/(N−1)(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, σ_N = 0; Heun's 2nd-order
  step except an Euler last step (NFE = 2N − 1); optional churn (S_churn, S_min, S_max, S_noise)
  lifts σ_i to σ̂ = σ_i(1 + γ) with fresh noise first. Arithmetic in float64, as EDM.
- `EDM`: these as a run's noise process (the `Diffusion` interface the training loop and the
  sampler call).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn as nn

from diffrepro.diffusion import Diffusion
from diffrepro.errors import UserError

SIGMA_DATA = 0.5
P_MEAN, P_STD = -1.2, 1.2
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0

DenoiserFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None


def preconditioning(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA):
    """(c_skip, c_out, c_in, c_noise) of EDM Table 1, elementwise in σ."""
    total = sigma**2 + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data / total.sqrt(), 1 / total.sqrt(), sigma.log() / 4


def loss_weight(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """λ(σ) = (σ²+σd²)/(σ·σd)² = 1/c_out²: the loss on F is unit-weighted at every σ."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def _per_sample(sigma, x: torch.Tensor) -> torch.Tensor:
    """σ as a (B, 1, 1, …) tensor in x's dtype, from a scalar or a (B,) tensor."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.expand(x.shape[0]).reshape(-1, *([1] * (x.ndim - 1)))


class EDMDenoiser(nn.Module):
    """D(x; σ) around a network F(x, c_noise, y); `coords` (Patch Diffusion) join F's input unscaled."""

    def __init__(self, net: nn.Module, sigma_data: float = SIGMA_DATA):
        super().__init__()
        self.net, self.sigma_data = net, sigma_data
        self.in_channels, self.input_size = net.in_channels, net.input_size
        self.num_classes = net.num_classes

    def forward(self, x: torch.Tensor, sigma, y: torch.Tensor | None = None,
                coords: torch.Tensor | None = None) -> torch.Tensor:
        sigma = _per_sample(sigma, x)
        c_skip, c_out, c_in, c_noise = preconditioning(sigma, self.sigma_data)
        net_dtype = next(self.net.parameters()).dtype
        net_in = c_in * x
        if coords is not None:
            net_in = torch.cat([net_in, coords.to(x.dtype)], dim=1)
        out = self.net(net_in.to(net_dtype), c_noise.flatten().to(net_dtype), y)
        return c_skip * x + c_out * out.to(x.dtype)


def _randn(shape, generator: Generators, device) -> torch.Tensor:
    """Standard normal draws; a sequence of generators gives row i from generator i (per-seed noise)."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(shape[1:], generator=g, device=g.device) for g in generator]).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


def edm_loss(denoiser: Callable, x0: torch.Tensor, labels: torch.Tensor | None = None,
             generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
             p_mean: float = P_MEAN, p_std: float = P_STD, sigma_data: float = SIGMA_DATA,
             sigma: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """Per-sample λ(σ)‖D(x0 + σn; σ) − x0‖² summed over elements, shape (B,).

    σ is drawn first (ln σ ~ N(p_mean, p_std²)), then n ~ N(0, I) unless `noise` is given (unit
    variance, e.g. re-paired by Immiscible Diffusion). `kwargs` (e.g. coords) go to the denoiser.
    A given `sigma` (B,) is used as drawn (the training loop draws it for the global batch).
    """
    if sigma is None:
        sigma = (_randn((x0.shape[0],), generator, x0.device) * p_std + p_mean).exp()
    sigma = sigma.to(x0.dtype)
    n = noise if noise is not None else _randn(x0.shape, generator, x0.device).to(x0.dtype)
    if n.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(n.shape)} != data shape {tuple(x0.shape)}")
    sig = _per_sample(sigma, x0)
    denoised = denoiser(x0 + sig * n, sigma, labels, **kwargs)
    return (loss_weight(sig, sigma_data) * (denoised - x0) ** 2).flatten(1).sum(1)


def edm_sigmas(steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
               rho: float = RHO) -> torch.Tensor:
    """The N noise levels σ_0 = σ_max … σ_{N−1} = σ_min, then σ_N = 0 (float64, length N + 1)."""
    if steps < 1:
        raise UserError(f"params: EDM sampling steps must be at least 1, got {steps}")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    inv = sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    return torch.cat([inv**rho, torch.zeros(1, dtype=torch.float64)])


def heun_nfe(steps: int) -> int:
    """Network evaluations of `edm_sample`: two per step, one on the last (Euler) step."""
    return 2 * steps - 1


def edm_sample(denoiser_fn: DenoiserFn, shape: tuple[int, ...], steps: int = 18, generator: Generators = None,
               noise: torch.Tensor | None = None, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
               rho: float = RHO, S_churn: float = 0.0, S_min: float = 0.0, S_max: float = math.inf,
               S_noise: float = 1.0, device: torch.device | str | None = None, progress: bool = False,
               return_nfe: bool = False):
    """EDM Algorithm 2 (Algorithm 1 when S_churn = 0): samples of `shape`, float32.

    `denoiser_fn(x, sigma)` gets float64 x and a (B,) float64 σ and returns D(x; σ) (see
    `make_denoiser_fn`). `noise` is the unit initial noise (x_0 = σ_max·noise); `generator` draws it if
    absent and draws the churn noise; a sequence of generators (one per sample) makes each sample
    depend only on its own seed. Returns x, or (x, NFE) with `return_nfe`.
    """
    if device is None:
        device = noise.device if noise is not None else getattr(generator, "device", "cpu")
    sigmas = edm_sigmas(steps, sigma_min, sigma_max, rho).tolist()
    x = (noise if noise is not None else _randn(shape, generator, device)).to(device, torch.float64) * sigmas[0]
    gamma_max = min(S_churn / steps, math.sqrt(2) - 1)
    nfe = 0

    def denoise(x, sigma):
        nonlocal nfe
        nfe += 1
        return denoiser_fn(x, torch.full((x.shape[0],), sigma, dtype=torch.float64, device=x.device)).to(torch.float64)

    indices = range(steps)
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="edm heun")
    with torch.no_grad():
        for i in indices:
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            gamma = gamma_max if S_min <= sigma <= S_max else 0.0
            sigma_hat = sigma * (1 + gamma)
            if gamma > 0:
                eps = _randn(x.shape, generator, x.device).to(torch.float64)
                x = x + math.sqrt(sigma_hat**2 - sigma**2) * S_noise * eps
            d = (x - denoise(x, sigma_hat)) / sigma_hat
            x_next = x + (sigma_next - sigma_hat) * d
            if i < steps - 1:
                d_next = (x_next - denoise(x_next, sigma_next)) / sigma_next
                x_next = x + (sigma_next - sigma_hat) * (d + d_next) / 2
            x = x_next
    x = x.float()
    return (x, nfe) if return_nfe else x


def make_denoiser_fn(denoiser: Callable, labels: torch.Tensor | None = None, guidance: float = 1.0,
                null_labels: torch.Tensor | None = None, **kwargs) -> DenoiserFn:
    """`(x, σ) ↦ D(x; σ)` for the sampler, conditioned on `labels` and `kwargs` (e.g. coords).

    With guidance w ≠ 1 (classifier-free guidance, DiT's convention: w = 1 is none), one forward
    pass on the doubled batch gives D = D_null + w·(D_cond − D_null), where D_null is conditioned on
    `null_labels` (the null class for CFG).
    """

    def conditional(x, sigma):
        return denoiser(x, sigma, labels, **kwargs)

    if guidance == 1.0:
        return conditional
    if labels is None or null_labels is None:
        raise UserError("params: classifier-free guidance (guidance != 1) needs a class-conditional model "
                        "and null labels")
    doubled = {k: torch.cat([v, v]) for k, v in kwargs.items()}

    def guided(x, sigma):
        out = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([labels, null_labels]), **doubled)
        cond, null = out.chunk(2)
        return null + guidance * (cond - null)

    return guided


class EDM(Diffusion):
    """EDM as a run's noise process: ln σ ~ N(P_mean, P_std²), EDM's loss, the Heun sampler."""

    fp32_precision = "ieee"  # EDM's code (and so Patch Diffusion's) disables TF32

    @classmethod
    def for_run(cls, schedule: str, model: nn.Module) -> "EDM":
        """EDM has its own σ schedule: the run's `schedule` plays no part."""
        return cls()

    @staticmethod
    def network(backbone: nn.Module) -> nn.Module:
        return EDMDenoiser(backbone)

    def draw_levels(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return (torch.randn(n, generator=generator) * P_STD + P_MEAN).exp()

    def loss(self, model, x0, levels, noise, labels, model_kwargs, eps_loss=None):
        """`edm_loss` at the drawn σ (`levels`); EDM predicts no ε, so a method's `eps_loss` plays no part."""
        return edm_loss(model, x0, labels, noise=noise, sigma=levels, **model_kwargs)

    def check_sampling(self, cfg: dict, where: str) -> None:
        if cfg["guidance_schedule"] != "constant":
            raise UserError(f"params.yaml: `{where}.guidance_schedule` must be constant for an EDM run "
                            f"(the increasing schedule is defined on DDPM timesteps), got {cfg['guidance_schedule']!r}")

    def sample_images(self, model, x_T, labels, guide_labels, cfg, generators, model_kwargs):
        """Heun in `cfg["sample_steps"]` steps, classifier-free guided by `cfg["guidance_scale"]`."""
        fn = make_denoiser_fn(model, labels, cfg["guidance_scale"], guide_labels, **model_kwargs)
        return edm_sample(fn, x_T.shape, steps=cfg["sample_steps"], noise=x_T, generator=generators)
