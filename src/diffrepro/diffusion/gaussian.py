"""Gaussian (DDPM) diffusion with the semantics of OpenAI's ADM/IDDPM code, which DiT and
FineDiffusion train and sample with, and whose ᾱ DiMR samples with (through DPM-Solver).

- ε-prediction. With `learn_sigma` the network also outputs C "variance" channels v' ∈ [−1, 1]
  and Σ is LEARNED_RANGE: log Σ_t = v·log β_t + (1 − v)·log β̃_t, v = (v' + 1)/2.
  Without it the variance is fixed, ADM's "fixedlarge" (β_t, with β̃_1 at t = 0) by default or
  "fixedsmall" (β̃_t); it only matters to the DDPM sampler.
- The hybrid loss is DiT's: loss type MSE, so L = mean(‖ε − ε̂‖²) + L_vb, where L_vb (bits per
  dimension) is NOT multiplied by T/1000 (that is ADM's RESCALED_MSE; with T = 1000 the two
  agree) and is computed with ε̂ detached, so it trains only the variance channels.
- Schedule tables are float64, as in ADM's numpy code, and cast to the data's dtype on use.
- Timesteps are 0-based indices into the tables. A respaced diffusion keeps the original ᾱ at
  its kept steps and `timestep_map` sends its indices back to the original ones: the network
  always sees original-scale t.
- A run's `GaussianDiffusion` (T = 1000, `for_run`) is its noise process: the `Diffusion`
  interface the training loop and the sampler call.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from diffrepro.diffusion import Diffusion, dpm_solver
from diffrepro.errors import UserError

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NUM_TIMESTEPS = 1000  # T of every run (DiT, FineDiffusion, DiMR, SD)
Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(shape, generator: Generators, device, dtype=torch.float32) -> torch.Tensor:
    """N(0, I) draws; a sequence of generators gives row i from generator i (per-sample seeds)."""
    if isinstance(generator, (list, tuple)):
        rows = [torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype) for g in generator]
        return torch.stack(rows).to(device)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def make_betas(name: str, num_timesteps: int) -> torch.Tensor:
    """β_1..β_T: "linear" (DDPM/ADM, scaled so any T spans the same total noise) or
    "scaled_linear" (Stable Diffusion's, used by U-ViT and DiMR: linear in √β)."""
    if name == "linear":
        scale = 1000 / num_timesteps
        return torch.linspace(1e-4 * scale, 0.02 * scale, num_timesteps, dtype=torch.float64)
    if name == "scaled_linear":
        return torch.linspace(0.00085**0.5, 0.012**0.5, num_timesteps, dtype=torch.float64) ** 2
    raise UserError(f"params: unknown noise schedule {name!r}; use 'linear' or 'scaled_linear'")


def space_timesteps(num_timesteps: int, section_counts: str) -> list[int]:
    """ADM's rule for which original steps a respaced sampler keeps.

    "ddimN": the stride i for which range(0, T, i) has exactly N steps. Otherwise a comma list
    "a,b,...": T is cut into equal sections and section k keeps a_k steps evenly spread over it,
    both ends included ("250" keeps 0 and T − 1).
    """
    if section_counts.startswith("ddim"):
        desired = int(section_counts[len("ddim") :])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired:
                return list(range(0, num_timesteps, stride))
        raise UserError(
            f"params: cannot take exactly {desired} evenly strided steps of {num_timesteps}; use a plain count"
        )
    counts = [int(c) for c in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(counts))
    kept, start = [], 0
    for k, count in enumerate(counts):
        size = size_per + (1 if k < extra else 0)
        if not 1 <= count <= size:
            raise UserError(f"params: cannot keep {count} steps of a section of {size} (of T={num_timesteps})")
        stride = 1.0 if count == 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """ADM's tanh approximation of Φ, kept so the decoder NLL matches its numbers."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log-probability of data in [−1, 1] quantised to 256 levels under N(means, e^{2·log_scales}):
    the Gaussian mass of each value's bin of width 2/255, the two end bins open to ±∞."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


class GaussianDiffusion(Diffusion):
    """The forward process q, the reverse p_θ from a network output, and the hybrid loss."""

    def __init__(
        self,
        betas: torch.Tensor,
        learn_sigma: bool = True,
        fixed_variance: str = "large",
        timestep_map: list[int] | torch.Tensor | None = None,
    ):
        if fixed_variance not in ("large", "small"):
            raise UserError(f"params: fixed_variance must be 'large' or 'small', got {fixed_variance!r}")
        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        if betas.ndim != 1 or len(betas) < 2 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise UserError("params: betas must be a 1-D schedule of at least 2 values in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)
        self.learn_sigma = learn_sigma
        self.fixed_variance = fixed_variance
        identity = torch.arange(self.num_timesteps)
        self.timestep_map = identity if timestep_map is None else torch.as_tensor(timestep_map, dtype=torch.long)
        self.is_respaced = not torch.equal(self.timestep_map, identity)

        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        # q(x_{t-1} | x_t, x_0) = N(coef1·x_0 + coef2·x_t, β̃_t)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # β̃_0 = 0, so its log is replaced by log β̃_1 (ADM's "clipped" table).
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)

    @classmethod
    def for_run(cls, schedule: str, model: torch.nn.Module) -> "GaussianDiffusion":
        """T = 1000 steps of `schedule`; Σ is learned when the network outputs 2C channels (DiT:
        ε and the variance), fixed when it outputs C (DiMR and the UNets: ε only)."""
        return cls(make_betas(schedule, NUM_TIMESTEPS), learn_sigma=model.out_channels == 2 * model.in_channels)

    def respaced(self, section_counts: str) -> "GaussianDiffusion":
        """The diffusion on the kept steps: β'_i = 1 − ᾱ_{k_i}/ᾱ_{k_{i−1}}, so ᾱ is unchanged there."""
        if self.is_respaced:
            raise UserError("respacing applies to the full T-step diffusion, not to an already respaced one")
        kept = space_timesteps(self.num_timesteps, section_counts)
        alphas_cumprod = self.alphas_cumprod[kept]
        previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        betas = 1.0 - alphas_cumprod / previous
        return GaussianDiffusion(betas, self.learn_sigma, self.fixed_variance, timestep_map=kept)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Original-scale timesteps the network is called with for this diffusion's indices t."""
        return self._on(self.timestep_map, t.device)[t] if self.is_respaced else t

    def _on(self, table: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`table` on `device`, copied once: per-step lookups never sync with the host."""
        cache = self.__dict__.setdefault("_device_tables", {})
        key = (id(table), str(device))
        if key not in cache:
            cache[key] = table.to(device)
        return cache[key]

    def _gather(self, table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        values = self._on(table, t.device)[t].to(device=like.device, dtype=like.dtype)
        return values.view(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε."""
        noise = torch.randn_like(x0) if noise is None else noise
        signal = self._gather(self.sqrt_alphas_cumprod, t, x0) * x0
        return signal + self._gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """(mean, variance, clipped log-variance) of q(x_{t−1} | x_t, x_0)."""
        gather = lambda table: self._gather(table, t, x_t)  # noqa: E731
        mean = gather(self.posterior_mean_coef1) * x0 + gather(self.posterior_mean_coef2) * x_t
        return mean, gather(self.posterior_variance), gather(self.posterior_log_variance_clipped)

    def split_output(self, model_output: torch.Tensor, x_t: torch.Tensor):
        """(ε̂, variance values or None) from the raw network output."""
        channels = x_t.shape[1]
        expected = 2 * channels if self.learn_sigma else channels
        if model_output.shape[1] != expected:
            raise UserError(
                f"model: outputs {model_output.shape[1]} channels, the diffusion expects {expected} "
                f"({'ε and variance' if self.learn_sigma else 'ε only'}); set learn_sigma to match the model"
            )
        if self.learn_sigma:
            return model_output[:, :channels], model_output[:, channels:]
        return model_output, None

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        scaled = self._gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
        return scaled - self._gather(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

    def p_mean_variance(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False
    ) -> dict:
        """p_θ(x_{t−1} | x_t): dict of mean, variance, log_variance, pred_xstart, eps."""
        eps, var_values = self.split_output(model_output, x_t)
        if self.learn_sigma:
            min_log = self._gather(self.posterior_log_variance_clipped, t, x_t)
            max_log = self._gather(torch.log(self.betas), t, x_t)
            frac = (var_values + 1.0) / 2.0
            log_variance = frac * max_log + (1.0 - frac) * min_log
        elif self.fixed_variance == "large":
            large = torch.cat([self.posterior_variance[1:2], self.betas[1:]])
            log_variance = self._gather(torch.log(large), t, x_t).expand_as(x_t)
        else:
            log_variance = self._gather(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        pred_xstart = self.predict_x0_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {
            "mean": mean,
            "variance": torch.exp(log_variance),
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "eps": eps,
        }

    def vb_terms_bpd(
        self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample variational bound term in bits/dim: KL(q(x_{t−1}|x_t,x_0) ‖ p_θ) for t > 0,
        the discretised decoder NLL −log p_θ(x_0|x_1) at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t.to(kl.device) == 0, nll, kl)

    def training_losses(
        self,
        model: Callable,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        model_kwargs: dict | None = None,
        eps_loss: Callable | None = None,
    ) -> dict:
        """Per-sample terms {loss, mse, vb}. `eps_loss(model_output, noise)` replaces the ε loss
        (DiMR's multi-scale loss; the output may then be a list) and drops the vb term."""
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.q_sample(x0, t, noise)
        model_output = model(x_t, self.model_timesteps(t), **(model_kwargs or {}))
        if eps_loss is not None:
            loss = eps_loss(model_output, noise)
            return {"loss": loss, "mse": loss, "vb": torch.zeros_like(loss)}
        eps, var_values = self.split_output(model_output, x_t)
        mse = mean_flat((noise - eps) ** 2)
        if self.learn_sigma:
            vb = self.vb_terms_bpd(torch.cat([eps.detach(), var_values], dim=1), x0, x_t, t)
        else:
            vb = torch.zeros_like(mse)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def draw_levels(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """t ~ U{0, ..., T − 1} for each of n images."""
        return torch.randint(self.num_timesteps, (n,), generator=generator)

    def loss(self, model, x0, levels, noise, labels, model_kwargs, eps_loss=None):
        """The hybrid loss (or `eps_loss`) per sample, the labels passed as the network's `y`."""
        return self.training_losses(model, x0, levels, noise=noise, model_kwargs={"y": labels, **model_kwargs},
                                    eps_loss=eps_loss)["loss"]

    def sample_images(self, model, x_T, labels, guide_labels, cfg, generators, model_kwargs):
        """`cfg["sampler"]` in `cfg["sample_steps"]` calls of the guided model (`guided_model_fn`)."""
        fn = guided_model_fn(model, labels, guide_labels, cfg["guidance_scale"], guided_channels=cfg["guided_channels"],
                             scale_schedule=cfg["guidance_schedule"], num_timesteps=self.num_timesteps,
                             scale_power=cfg["guidance_power"], **model_kwargs)
        return sample(self, fn, x_T.shape, sampler=cfg["sampler"], steps=cfg["sample_steps"], noise=x_T,
                      generator=generators)


def guided_model_fn(
    model: Callable,
    labels: torch.Tensor,
    guide_labels: torch.Tensor,
    scale: float,
    guided_channels: int | None = 3,
    scale_schedule: str = "constant",
    num_timesteps: int = 1000,
    scale_power: float = 1.0,
    **model_kwargs,
) -> ModelFn:
    """Classifier-free guidance as a model_fn(x, t): ε̂ = ε_g + w·(ε_c − ε_g), where ε_c is
    conditioned on `labels` and ε_g on `guide_labels` (the null class for CFG, the superclass row
    for FineDiffusion), from ONE forward pass on the doubled batch.

    w is DiT's convention (w = 1: no guidance; U-ViT/DiMR's "scale 0.4" is w = 1.4). Only the first
    `guided_channels` ε channels are guided (DiT and FineDiffusion guide 3 of 4 latent channels;
    None guides all); the other ε channels and the variance channels are the conditional ones.
    "increasing" is the power-cosine schedule of DiMR's eval.py (from MDT):
    w(t) = 1 + (w − 1)·½·(1 − cos(π·(1 − (t + 1)/T)^scale_power)), 1 at pure noise, ≈w near data.
    Models returning a list of outputs (DiMR) are read at the last, full-resolution entry.
    `model_kwargs` go unchanged to the forward pass.
    """
    if scale_schedule not in ("constant", "increasing"):
        raise UserError(f"params: guidance scale_schedule must be 'constant' or 'increasing', got {scale_schedule!r}")

    def final_output(out):
        return out[-1] if isinstance(out, (list, tuple)) else out

    def conditional(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return final_output(model(x, t, y=labels, **model_kwargs))

    if scale == 1.0:
        return conditional

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        both_labels = torch.cat([labels, guide_labels])
        out = final_output(model(torch.cat([x, x]), torch.cat([t, t]), y=both_labels, **model_kwargs))
        cond, guide = out.chunk(2)
        if scale_schedule == "constant":
            w = scale
        else:
            remaining = (1.0 - (t.to(torch.float64) + 1.0) / num_timesteps).clamp(min=0.0)
            ramp = 0.5 * (1.0 - torch.cos(math.pi * remaining**scale_power))
            w = (1.0 + (scale - 1.0) * ramp).to(out.dtype).view(-1, *([1] * (out.ndim - 1)))
        k = x.shape[1] if guided_channels is None else guided_channels
        eps = guide[:, :k] + w * (cond[:, :k] - guide[:, :k])
        return torch.cat([eps, cond[:, k:]], dim=1)

    return guided


class _CountedModel:
    """Counts network evaluations (NFE) of a model_fn."""

    def __init__(self, model_fn: ModelFn):
        self.model_fn = model_fn
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model_fn(x, t)


def sample(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    shape: tuple[int, ...],
    sampler: str = "ddpm",
    steps: int = 250,
    generator: Generators = None,
    noise: torch.Tensor | None = None,
    eta: float = 0.0,
    progress: bool = False,
    device: torch.device | str | None = None,
    return_nfe: bool = False,
):
    """Draw samples of `shape` from the full T-step `diffusion` with exactly `steps` calls of
    `model_fn(x, t)` (t: ORIGINAL 0-based timesteps, long for DDPM/DDIM, float for DPM-Solver).

    ddpm: ancestral sampling over `space_timesteps(T, str(steps))`, no clipping (DiT).
    ddim: the same steps, DDIM update with `eta`. dpm_solver: see `dpm_solver.py`. pndm: Stable
    Diffusion's PLMS scheduler (`pndm.py`; `steps + 1` calls: its first timestep is evaluated twice).
    Deterministic given `noise` (x_T) and `generator` (x_T if `noise` is None, and the
    per-step noise); a sequence of generators (one per sample) makes each sample depend only on
    its own seed, whatever batch it is drawn in. Returns x_0, or (x_0, NFE) with `return_nfe`.
    """
    if diffusion.is_respaced:
        raise UserError("sample() takes the full T-step diffusion; it respaces to `steps` itself")
    if not 2 <= steps <= diffusion.num_timesteps:
        raise UserError(f"params: sampling steps must be in 2..{diffusion.num_timesteps}, got {steps}")
    if device is None:
        device = noise.device if noise is not None else getattr(generator, "device", "cpu")
    x = noise.to(device) if noise is not None else randn(shape, generator, device)
    counted = _CountedModel(model_fn)
    with torch.no_grad():
        if sampler == "dpm_solver":

            def eps_fn(x_s, t_s):
                out = counted(x_s, t_s)
                return diffusion.split_output(out, x_s)[0]

            x = dpm_solver.sample(eps_fn, x, diffusion.alphas_cumprod, steps, progress=progress)
        elif sampler == "pndm":
            from diffrepro.diffusion.pndm import pndm_sample

            x = pndm_sample(diffusion, counted, x, steps)
        elif sampler in ("ddpm", "ddim"):
            x = _respaced_loop(diffusion.respaced(str(steps)), counted, x, sampler, generator, eta, progress)
        else:
            raise UserError(f"params: unknown sampler {sampler!r}; use 'ddpm', 'ddim', 'dpm_solver' or 'pndm'")
    return (x, counted.calls) if return_nfe else x


def _respaced_loop(
    spaced: GaussianDiffusion, model_fn: ModelFn, x: torch.Tensor, sampler: str, generator, eta: float, progress: bool
) -> torch.Tensor:
    """The reverse chain over a respaced diffusion's steps, T' − 1 down to 0."""
    indices = list(range(spaced.num_timesteps))[::-1]
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc=sampler)
    for i in indices:
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        out = spaced.p_mean_variance(model_fn(x, spaced.model_timesteps(t)), x, t)
        if sampler == "ddpm":
            x = out["mean"]
            if i > 0:
                z = randn(x.shape, generator, x.device, x.dtype)
                x = x + torch.exp(0.5 * out["log_variance"]) * z
        else:
            x = _ddim_step(spaced, out, x, t, i, generator, eta)
    return x


def _ddim_step(
    spaced: GaussianDiffusion, out: dict, x: torch.Tensor, t: torch.Tensor, i: int, generator, eta: float
) -> torch.Tensor:
    """x_{t'} = √ᾱ_{t'}·x̂_0 + √(1 − ᾱ_{t'} − σ²)·ε̂ + σ·z,
    σ = η·√((1 − ᾱ_{t'})/(1 − ᾱ_t))·√(1 − ᾱ_t/ᾱ_{t'}), t' the previous kept step."""
    alpha_bar = spaced._gather(spaced.alphas_cumprod, t, x)
    alpha_bar_prev = spaced._gather(spaced.alphas_cumprod_prev, t, x)
    eps = (x - alpha_bar.sqrt() * out["pred_xstart"]) / (1.0 - alpha_bar).sqrt()
    sigma = eta * ((1.0 - alpha_bar_prev) / (1.0 - alpha_bar)).sqrt() * (1.0 - alpha_bar / alpha_bar_prev).sqrt()
    x = alpha_bar_prev.sqrt() * out["pred_xstart"] + (1.0 - alpha_bar_prev - sigma**2).sqrt() * eps
    if i > 0 and eta > 0:
        x = x + sigma * randn(x.shape, generator, x.device, x.dtype)
    return x
