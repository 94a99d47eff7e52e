"""The one training loop every method plugs into (run by the `train@RUN` stage).

accelerate runs it on one CPU process, N GPUs or N nodes unchanged. Every random draw of step
`s` comes from a generator seeded by (run seed, s): the global batch's indices, timesteps/σ,
noise and class dropout are drawn identically on every process, and each process takes its
slice — so a 2-process run sees exactly the data of a 1-process run with the same global batch,
and a resumed run continues bit-identically without saving any RNG state.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.utils import ModelEmaV3

from diffrepro import fingerprint
from diffrepro.config import run_key, run_params
from diffrepro.errors import UserError
from diffrepro.execution import batch_per_device
from diffrepro.inputs import read_safetensors
from diffrepro.methods import get_method
from diffrepro.methods.immiscible import make_assigner, mean_pair_distance
from diffrepro.models.official_weights import adopt_release
from diffrepro.models.registry import build_model
from diffrepro.runs import class_counts, model_config, noise_process, rng, train_command, training_set


def _load_init(backbone: torch.nn.Module, network: torch.nn.Module, cfg: dict) -> str | None:
    """Weights a run starts from; returns the base run folder a PEFT delta will refer to.

    With a `release`, `init_from` is that release's official file, adopted by its strict loader
    into `network` (what the noise process calls: EDM's denoiser wraps the backbone). Otherwise
    `init_from` is a trained run folder (fine-tuning: its EMA weights, class table discarded) or
    the data folder the run trains on (from scratch).
    """
    from diffrepro.methods.finediffusion import load_base_state

    if cfg["release"]:
        adopt_release(cfg["release"], network, cfg["init_from"])
        return None
    init = Path(cfg["init_from"])
    if not (init / "config.json").exists():
        return None
    weights = init / "ema.safetensors"
    if not weights.exists():
        raise UserError(f"{weights} is missing: run `dvc repro` for the base run {init.name}")
    load_base_state(backbone, read_safetensors(weights, train_command(init.name)), str(weights))
    return str(init)


class RunEma(ModelEmaV3):
    """timm's EMA (one foreach lerp of every parameter, on their device) with the run's decay:
    `ema_decay`, or with `ema_warmup` min(ema_decay, (1 + s)/(10 + s)) at step s (TensorFlow's
    num_updates rule) — timm's own warm-up, 1 − (1 + s/γ)^−p, has another shape, so this class
    supplies the decay and timm does the averaging. Measured bit-identical to the hand-written
    foreach lerp it replaced (docs/gpu.md, "The EMA"); a frozen tensor's lerp towards itself is exact,
    so lerping every parameter (as DiT's official `update_ema` does) changes none of them.
    Buffers are copied, not averaged (no network here holds a trained buffer)."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool):
        super().__init__(model, decay=decay, exclude_buffers=True, stochastic_rounding=False)
        self.warmup = warmup

    def get_decay(self, step: int | None = None) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay


def micro_batch_count(batch_size: int, processes: int, per_device: int | None, where: str) -> int:
    """How many micro-batches each process splits its share of the global batch into."""
    if batch_size % processes:
        raise UserError(f"params.yaml: `{where}` {batch_size} is not divisible by the {processes} processes")
    share = batch_size // processes
    if per_device is None or per_device >= share:
        return 1
    if share % per_device:
        raise UserError(f"environment: DIFFREPRO_BATCH_PER_DEVICE={per_device} must divide each process's "
                        f"share of `{where}` ({share})")
    return share // per_device


@dataclass
class HostBatch:
    """Everything random about one global step, drawn on the host from the (seed, step) stream."""

    x0: torch.Tensor
    labels: torch.Tensor | None
    timesteps: torch.Tensor
    noise: torch.Tensor            # the global batch's noise (knn: this process's candidates)
    extra: dict
    images: int                    # images this step counts as seen (patches included)
    dropout_seed: int              # the global RNG's seed for the step (dropout inside the net)


class Trainer:
    """Holds one run's model, EMA, optimizer and noise process; `step(s)` trains global step s.

    The host draws step s's global batch (on a GPU in a background thread, one step ahead); everything
    else — assignment cost, loss, EMA — runs on the accelerator's device. Each process takes its
    contiguous slice of the global batch and splits it into micro-batches whose gradients it
    accumulates, so the update is the same for any process count or micro-batch size.
    """

    def __init__(self, params: dict, run: str, accelerator):
        self.params, self.run, self.acc = params, run, accelerator
        self.cfg = cfg = run_params(params, run)
        self.seed = cfg["seed"] + params["seed"]
        self.method = get_method(cfg["method"], **cfg["method_kwargs"])
        self.data = training_set(cfg)
        probe = self.data.sample_batch(torch.zeros(1, dtype=torch.long), torch.Generator().manual_seed(0))
        self.data_shape = tuple(probe.shape[1:])
        num_classes, num_super = class_counts(params["data"]["prepared_dir"], cfg["split"])
        self.model_kwargs = model_config(cfg, self.method, self.data_shape, num_classes, num_super)
        self.micro_batches = micro_batch_count(cfg["batch_size"], accelerator.num_processes, batch_per_device(),
                                               f"{run_key(run, params)}.batch_size")
        torch.manual_seed(self.seed)
        backbone = build_model(cfg["model"], **self.model_kwargs)
        self.diffusion = noise_process(cfg, backbone)
        self.model = self.diffusion.network(backbone)
        self.base_dir = _load_init(backbone, self.model, cfg)
        self.method.configure_model(self.model)
        self.delta_of = self.base_dir if self.method.peft else None
        groups = self.method.param_groups(self.model, cfg["weight_decay"])
        self.opt = torch.optim.AdamW(groups, lr=cfg["lr"], betas=tuple(cfg["betas"]),
                                     fused=True if accelerator.device.type == "cuda" else None)
        self.assigner = make_assigner(cfg["assignment"])
        # the EMA copies the network before `prepare` (timm's EMA makes a generator on the network's
        # device, which the `meta` stand-in cannot) and follows it to the training device
        self.averager = RunEma(self.model, cfg["ema_decay"], cfg["ema_warmup"])
        self.model, self.opt = accelerator.prepare(self.model, self.opt)  # DDP / torch.compile wrappers
        self.net = accelerator.unwrap_model(self.model, keep_torch_compile=False)  # the plain network
        self.ema = self.averager.to(accelerator.device).module.requires_grad_(False)
        self.images_seen = 0
        self.pending_losses: list[torch.Tensor] = []  # per-step loss of this process, on the device
        self.pair_distance: list[torch.Tensor] = []

    def lr_at(self, step: int) -> float:
        warmup = self.cfg["warmup_steps"]
        return self.cfg["lr"] * min(1.0, (step + 1) / warmup) if warmup else self.cfg["lr"]

    def draw(self, step: int) -> HostBatch:
        """Step `step`'s global batch, identical on every process (host only: safe in a thread)."""
        gen = rng(self.seed, step)
        dropout_seed = int(torch.randint(0, 2**31, (1,), generator=gen))
        plan = self.method.plan_step(step, self.seed, self.cfg["batch_size"], self.data_shape[-1])
        index = torch.randint(len(self.data), (plan.images,), generator=gen)
        x0 = self.data.sample_batch(index, gen)
        labels, supers = self.data.labels[index], self.data.super_labels[index]
        labels = self.method.training_labels(labels, supers, gen, self.net)
        x0, extra = self.method.transform_batch(x0, gen, plan)
        timesteps = self.diffusion.draw_levels(len(x0), gen)
        noise = self.assigner.draw(x0.shape, self.process_slice(len(x0)), gen,
                                   rng(self.seed, step, 1 + self.acc.process_index))  # this process's stream
        return HostBatch(x0, labels, timesteps, noise, extra, plan.images, dropout_seed)

    def process_slice(self, global_size: int) -> slice:
        """This process's contiguous share of a global batch (divisible: see `micro_batch_count`)."""
        n, k = self.acc.num_processes, self.acc.process_index
        return slice(k * global_size // n, (k + 1) * global_size // n)

    def on_device(self, host: HostBatch) -> tuple:
        """This process's slice of the global batch on the device, with the noise assigned."""
        dev = self.acc.device
        move = lambda v: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v  # noqa: E731
        part = self.process_slice(len(host.x0))
        x0 = move(host.x0)
        noise = self.assigner.assign(x0, host.noise, part)
        labels = None if host.labels is None else move(host.labels[part])
        extra = {key: move(v[part]) for key, v in host.extra.items()}
        return x0[part], labels, move(host.timesteps[part]), noise, extra

    def loss(self, x0, labels, timesteps, noise, extra) -> torch.Tensor:
        with self.acc.autocast():
            return self.diffusion.loss(self.model, x0, timesteps, noise, labels, extra, self.method.eps_loss).mean()

    def step(self, step: int, host: HostBatch | None = None) -> None:
        """One optimizer step. No host sync: the loss stays on the device until `logged_losses`."""
        host = self.draw(step) if host is None else host
        torch.manual_seed(host.dropout_seed)
        batch = self.on_device(host)
        if step % 50 == 0:  # with and without assignment: the quantity Immiscible Diffusion shrinks
            self.pair_distance.append(mean_pair_distance(batch[0], batch[3]))
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(step)
        self.opt.zero_grad(set_to_none=True)
        x0, labels, timesteps, noise, extra = batch
        m = self.micro_batches
        split = lambda v: v.chunk(m) if v is not None else [None] * m  # noqa: E731
        extras = [{k: v.chunk(m)[i] for k, v in extra.items()} for i in range(m)]
        total = None
        for i, micro in enumerate(zip(*map(split, (x0, labels, timesteps, noise)))):
            with self.acc.no_sync(self.model) if i < m - 1 else contextlib.nullcontext():
                loss = self.loss(*micro, extras[i])
                loss = loss / m if m > 1 else loss
                self.acc.backward(loss)
            total = loss.detach() if total is None else total + loss.detach()
        if self.cfg["grad_clip"] > 0:
            self.acc.clip_grad_norm_(self.model.parameters(), self.cfg["grad_clip"])
        self.opt.step()
        self.averager.update(self.net, step)
        self.images_seen += host.images
        self.pending_losses.append(total)

    def logged_losses(self) -> list[float]:
        """The global batch's mean loss of every step since the last call (one host sync)."""
        if not self.pending_losses:
            return []
        mine = torch.stack(self.pending_losses).float()
        self.pending_losses = []
        return self.acc.gather(mine).view(self.acc.num_processes, -1).mean(0).tolist()

    # --- checkpoints -------------------------------------------------------------------------
    def state(self, step: int) -> dict:
        return {"model": self.net.state_dict(), "ema": self.ema.state_dict(),
                "opt": self.opt.state_dict(), "step": step, "images_seen": self.images_seen,
                "config_hash": fingerprint.training(self.params, self.run)}

    def load_state(self, state: dict) -> int:
        self.net.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.images_seen = state["images_seen"]
        return state["step"]
