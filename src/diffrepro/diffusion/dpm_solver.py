"""DPM-Solver++ on a discrete-time VP diffusion, in the setting DiMR and U-ViT sample with.

Their eval scripts run DPM-Solver (Lu et al. 2022) with data prediction (`predict_x0=True`, i.e.
DPM-Solver++), method "fast" (single-step updates of order 3, with one order-1 or order-2 step
at the end so the model is evaluated exactly `steps` times), a time-uniform grid of `steps + 1`
points from t = 1 down to t = 1/N, and no final denoising step. The intermediate points of each
order-k update are the grid points it spans.

The discrete schedule becomes continuous as U-ViT's `NoiseScheduleVP('discrete')` does:
log α(t) is piecewise linear in t through the knots (n/N, ½·log ᾱ_{n-1}), n = 1..N, so the
model is called at fractional timesteps t·N − 1 on the 0-based scale of ᾱ (the float form of
DPM-Solver's "type-1" discrete time input).
"""

from __future__ import annotations

import math
from typing import Callable

import torch


class DiscreteVPSchedule:
    """α_t, σ_t and half-log-SNR λ_t of a discrete ᾱ table, on continuous t ∈ [1/N, 1]."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
        self.num_timesteps = len(alphas_cumprod)
        self.knots_t = torch.arange(1, self.num_timesteps + 1, dtype=torch.float64) / self.num_timesteps
        self.knots_log_alpha = 0.5 * torch.log(alphas_cumprod)

    def log_alpha(self, t: float) -> float:
        """Piecewise-linear interpolation through the knots (linear extrapolation outside)."""
        n = len(self.knots_t)
        i = int(torch.searchsorted(self.knots_t, torch.tensor(t, dtype=torch.float64)).clamp(1, n - 1))
        t0, t1 = float(self.knots_t[i - 1]), float(self.knots_t[i])
        y0, y1 = float(self.knots_log_alpha[i - 1]), float(self.knots_log_alpha[i])
        return y0 + (t - t0) * (y1 - y0) / (t1 - t0)

    def alpha(self, t: float) -> float:
        return math.exp(self.log_alpha(t))

    def sigma(self, t: float) -> float:
        return math.sqrt(-math.expm1(2.0 * self.log_alpha(t)))

    def lam(self, t: float) -> float:
        return math.log(self.alpha(t)) - math.log(self.sigma(t))

    def model_timestep(self, t: float) -> float:
        """Continuous t ↦ the 0-based timestep index the network was trained on."""
        return t * self.num_timesteps - 1.0


def fast_orders(steps: int) -> list[int]:
    """Orders of the "fast" schedule: third-order steps, ending with one lower-order step so the
    orders sum to exactly `steps` model evaluations."""
    k = steps // 3 + 1
    if steps % 3 == 0:
        return [3] * (k - 2) + [2, 1]
    if steps % 3 == 1:
        return [3] * (k - 1) + [1]
    return [3] * (k - 1) + [2]


def sample(
    eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_T: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    steps: int,
    progress: bool = False,
) -> torch.Tensor:
    """Integrate the probability-flow ODE from t = 1 to t = 1/N with `steps` calls of
    `eps_fn(x, t)` (t: float tensor (B,) of 0-based original timesteps, ε-prediction)."""
    schedule = DiscreteVPSchedule(alphas_cumprod)
    grid = torch.linspace(1.0, 1.0 / schedule.num_timesteps, steps + 1, dtype=torch.float64).tolist()
    orders = fast_orders(steps)
    if progress:
        from tqdm.auto import tqdm

        orders = tqdm(orders, desc="dpm-solver")
    x, i = x_T, 0
    for order in orders:
        x = singlestep_update(eps_fn, schedule, x, grid[i : i + order + 1])
        i += order
    return x


def singlestep_update(eps_fn, schedule: DiscreteVPSchedule, x: torch.Tensor, times: list[float]) -> torch.Tensor:
    """One DPM-Solver++ step of order len(times) − 1 from times[0] to times[-1]; the points in
    between are where the extra data predictions are made (DPM-Solver++ paper, singlestep)."""

    def data_prediction(x_s: torch.Tensor, s: float) -> torch.Tensor:
        t_dtype = torch.promote_types(x_s.dtype, torch.float32)
        t_in = torch.full((x_s.shape[0],), schedule.model_timestep(s), device=x_s.device, dtype=t_dtype)
        return (x_s - schedule.sigma(s) * eps_fn(x_s, t_in)) / schedule.alpha(s)

    s, t = times[0], times[-1]
    lam_s, sigma_s = schedule.lam(s), schedule.sigma(s)
    h = schedule.lam(t) - lam_s

    def first_order(tau: float, d_s: torch.Tensor) -> torch.Tensor:
        """x_τ = (σ_τ/σ_s)·x − α_τ·(e^{−h_τ} − 1)·D_s, with h_τ = λ_τ − λ_s."""
        h_tau = schedule.lam(tau) - lam_s
        return (schedule.sigma(tau) / sigma_s) * x - (schedule.alpha(tau) * math.expm1(-h_tau)) * d_s

    d_s = data_prediction(x, s)
    order = len(times) - 1
    if order == 1:
        return first_order(t, d_s)
    alpha_t, phi_1 = schedule.alpha(t), math.expm1(-h)
    s1 = times[1]
    r1 = (schedule.lam(s1) - lam_s) / h
    d_1 = data_prediction(first_order(s1, d_s), s1)
    if order == 2:
        return first_order(t, d_s) - (0.5 / r1) * (alpha_t * phi_1) * (d_1 - d_s)
    s2 = times[2]
    r2 = (schedule.lam(s2) - lam_s) / h
    phi_22 = math.expm1(-r2 * h) / (r2 * h) + 1.0
    u_2 = first_order(s2, d_s) + (r2 / r1) * (schedule.alpha(s2) * phi_22) * (d_1 - d_s)
    d_2 = data_prediction(u_2, s2)
    phi_2 = phi_1 / h + 1.0
    return first_order(t, d_s) + (1.0 / r2) * (alpha_t * phi_2) * (d_2 - d_s)
