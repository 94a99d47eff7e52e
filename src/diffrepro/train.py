"""`train@RUN` stage: the one training loop every method plugs into.

accelerate runs it on one CPU process, N GPUs or N nodes unchanged. Every random draw of step
`s` comes from a generator seeded by (run seed, s): the global batch's indices, timesteps/σ,
noise and class dropout are drawn identically on every process, and each process takes its
slice — so a 2-process run sees exactly the data of a 1-process run with the same global batch,
and a resumed run continues bit-identically without saving any RNG state.

Checkpoints (model, EMA, optimizer, step) go to `checkpoints/<run>/` — outside DVC's outputs, so
a killed stage resumes on the next `dvc repro`; the final weights appear in `models/<run>/` only
when training is complete.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from diffrepro.atomic import atomic_path
from diffrepro.config import run_params
from diffrepro.errors import UserError
from diffrepro.methods import get_method
from diffrepro.methods.immiscible import NoiseAssigner, mean_pair_distance
from diffrepro.models.info import count_params
from diffrepro.runs import learns_sigma, build_network, class_counts, model_config, rng, training_set

NUM_TIMESTEPS = 1000


def _config_hash(params: dict, run: str) -> str:
    relevant = {"seed": params["seed"], "run": run_params(params, run)}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _load_init(model: torch.nn.Module, cfg: dict) -> str | None:
    """Weights a run starts from; returns the base run folder a PEFT delta will refer to.

    `init_from` is a trained run folder (fine-tuning: its EMA weights, class table discarded), an
    official DiT checkpoint file (`*.pt`: the paper-scale `pretrain` adopts it), or the data
    folder the run trains on (from scratch).
    """
    from diffrepro.methods.finediffusion import load_base_state, load_official_dit

    init = Path(cfg["init_from"])
    if init.suffix == ".pt":
        load_official_dit(model, init)
        return None
    if not (init / "config.json").exists():
        return None
    weights = init / "ema.safetensors"
    if not weights.exists():
        raise UserError(f"{weights} is missing: run `dvc repro` for the base run {init.name}")
    load_base_state(model, load_file(str(weights)), str(weights))
    return str(init)


def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            if p.requires_grad:
                e.lerp_(p.detach(), 1.0 - decay)


class Trainer:
    """Holds one run's model, EMA, optimizer and noise process; `step(s)` trains global step s."""

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
        torch.manual_seed(self.seed)
        self.model = build_network(cfg["model"], self.model_kwargs, cfg["diffusion"])
        self.base_dir = _load_init(self.model.net if cfg["diffusion"] == "edm" else self.model, cfg)
        self.method.configure_model(self.model)
        self.delta_of = self.base_dir if self.method.peft else None
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        groups = self.method.param_groups(self.model, cfg["weight_decay"])
        self.opt = torch.optim.AdamW(groups, lr=cfg["lr"], betas=tuple(cfg["betas"]))
        self.assigner = NoiseAssigner(cfg["assignment"])
        if cfg["diffusion"] == "gaussian":
            from diffrepro.diffusion.gaussian import GaussianDiffusion, make_betas

            self.diffusion = GaussianDiffusion(make_betas(cfg["schedule"], NUM_TIMESTEPS),
                                               learn_sigma=learns_sigma(self.model))
        self.model, self.opt = accelerator.prepare(self.model, self.opt)
        self.images_seen = 0
        self.pair_distance: list[float] = []

    def lr_at(self, step: int) -> float:
        warmup = self.cfg["warmup_steps"]
        return self.cfg["lr"] * min(1.0, (step + 1) / warmup) if warmup else self.cfg["lr"]

    def ema_decay_at(self, step: int) -> float:
        decay = self.cfg["ema_decay"]
        return min(decay, (1 + step) / (10 + step)) if self.cfg["ema_warmup"] else decay

    def global_batch(self, step: int):
        """Draw step `step`'s global batch on every process; return this process's slice."""
        gen = rng(self.seed, step)
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))  # dropout etc.
        plan = None
        batch = self.cfg["batch_size"]
        if hasattr(self.method, "plan_step"):
            plan = self.method.plan_step(step, self.seed, batch, self.data_shape[-1])
            batch = plan.images
        index = torch.randint(len(self.data), (batch,), generator=gen)
        x0 = self.data.sample_batch(index, gen)
        labels, supers = self.data.labels[index], self.data.super_labels[index]
        unwrapped = self.acc.unwrap_model(self.model)
        labels = self.method.training_labels(labels, supers, gen, unwrapped)
        if plan is not None:
            x0, extra = self.method.transform_batch(x0, gen, plan.patch_size)
        else:
            x0, extra = self.method.transform_batch(x0, gen)
        if self.cfg["diffusion"] == "edm":  # ln σ ~ N(P_mean, P_std²), drawn for the global batch
            from diffrepro.diffusion.edm import P_MEAN, P_STD

            timesteps = (torch.randn(len(x0), generator=gen) * P_STD + P_MEAN).exp()
        else:
            timesteps = torch.randint(NUM_TIMESTEPS, (len(x0),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        n, k = self.acc.num_processes, self.acc.process_index
        if len(x0) % n:
            raise UserError(f"params.yaml: runs.{self.run}.batch_size {len(x0)} is not divisible by "
                            f"the {n} processes")
        part = slice(k * len(x0) // n, (k + 1) * len(x0) // n)
        sliced = lambda v: v[part] if torch.is_tensor(v) else v  # noqa: E731
        x0, noise, timesteps = x0[part], noise[part], timesteps[part]
        labels = sliced(labels)
        extra = {key: sliced(v) for key, v in extra.items()}
        if self.assigner.mode == "knn":
            noise = self.assigner(x0, rng(self.seed, step, 1 + k), self.acc)
        else:
            noise = self.assigner.assign(x0, noise, self.acc)
        return x0, labels, timesteps, noise, extra, batch

    def loss(self, x0, labels, timesteps, noise, extra) -> torch.Tensor:
        dev = self.acc.device
        x0, noise, timesteps = x0.to(dev), noise.to(dev), timesteps.to(dev)
        labels = None if labels is None else labels.to(dev)
        extra = {k: v.to(dev) for k, v in extra.items()}
        with self.acc.autocast():
            if self.cfg["diffusion"] == "edm":
                from diffrepro.diffusion.edm import edm_loss

                return edm_loss(self.model, x0, labels, noise=noise, sigma=timesteps, **extra).mean()
            losses = self.diffusion.training_losses(self.model, x0, timesteps, noise=noise,
                                                    model_kwargs={"y": labels, **extra},
                                                    eps_loss=getattr(self.method, "eps_loss", None))
            return losses["loss"].mean()

    def step(self, step: int) -> float:
        x0, labels, timesteps, noise, extra, images = self.global_batch(step)
        if step % 50 == 0:  # with and without assignment: the quantity Immiscible Diffusion shrinks
            self.pair_distance.append(mean_pair_distance(x0, noise))
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(step)
        loss = self.loss(x0, labels, timesteps, noise, extra)
        self.opt.zero_grad(set_to_none=True)
        self.acc.backward(loss)
        if self.cfg["grad_clip"] > 0:
            self.acc.clip_grad_norm_(self.model.parameters(), self.cfg["grad_clip"])
        self.opt.step()
        update_ema(self.ema, self.acc.unwrap_model(self.model), self.ema_decay_at(step))
        self.images_seen += images
        return self.acc.gather(loss.detach()[None]).mean().item()  # the global batch's mean loss

    # --- checkpoints -------------------------------------------------------------------------
    def state(self, step: int) -> dict:
        return {"model": self.acc.unwrap_model(self.model).state_dict(), "ema": self.ema.state_dict(),
                "opt": self.opt.state_dict(), "step": step, "images_seen": self.images_seen,
                "config_hash": _config_hash(self.params, self.run)}

    def load_state(self, state: dict) -> int:
        self.acc.unwrap_model(self.model).load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.images_seen = state["images_seen"]
        return state["step"]


def _resume(trainer: Trainer, ckpt: Path) -> int:
    if not ckpt.exists():
        return 0
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as err:  # a checkpoint cut short by a full disk or a kill during rename
        raise UserError(f"{ckpt} is unreadable ({type(err).__name__}); delete it to restart the run") from None
    if state.get("config_hash") != _config_hash(trainer.params, trainer.run):
        print(f"{ckpt} was written with other params; starting {trainer.run} from scratch")
        return 0
    try:
        return trainer.load_state(state)
    except RuntimeError as err:
        raise UserError(f"{ckpt} is from another model ({str(err).splitlines()[0]}); delete it") from None


def _save_weights(trainer: Trainer, out: Path, step: int | None = None) -> None:
    """EMA (and, at the end, raw) weights; a PEFT run from a base keeps only its trained tensors."""
    model = trainer.acc.unwrap_model(trainer.model)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    delta_only = trainer.delta_of is not None
    targets = {"ema": trainer.ema} if step is not None else {"ema": trainer.ema, "model": model}
    for name, module in targets.items():
        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()
                 if not delta_only or k in trained}
        target = out / (f"{name}.safetensors" if step is None else f"snapshots/step-{step:07d}.safetensors")
        target.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(target))


def train_stage(params: dict, run: str) -> None:
    from accelerate import Accelerator
    from dvclive import Live

    cfg = run_params(params, run)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              mixed_precision="bf16" if cfg["bf16"] else "no")
    trainer = Trainer(params, run, accelerator)
    ckpt_dir, out_dir = Path("checkpoints") / run, Path("models") / run
    start = _resume(trainer, ckpt_dir / "last.pt")
    live = Live(dir=str(Path("logs") / run), resume=start > 0, dvcyaml=None, save_dvc_exp=False) \
        if accelerator.is_main_process else None
    step_times: list[float] = []
    losses: list[float] = []
    total, trainable = count_params(accelerator.unwrap_model(trainer.model))
    pbar = tqdm(range(start, cfg["steps"]), desc=f"train {run}", mininterval=10,
                disable=not accelerator.is_main_process, initial=start, total=cfg["steps"])
    for step in pbar:
        tic = time.perf_counter()
        loss = trainer.step(step)
        step_times.append(time.perf_counter() - tic)
        losses.append(loss)
        every = params["train"]["log_every"]
        if live is not None and ((step + 1) % every == 0 or step + 1 == cfg["steps"]):
            recent = losses[-every:]
            live.step = step + 1  # before logging: each value is recorded at the step it ends
            live.log_metric("train/loss", sum(recent) / len(recent))
            live.log_metric("train/step_seconds", step_times[-1])
            live.next_step()
        if (step + 1) in cfg["eval_at"] and accelerator.is_main_process:
            _save_weights(trainer, ckpt_dir, step + 1)
        if (step + 1) % cfg["checkpoint_every"] == 0 and (step + 1) < cfg["steps"] and accelerator.is_main_process:
            with atomic_path(ckpt_dir / "last.pt") as tmp:
                torch.save(trainer.state(step + 1), tmp)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # close the process group cleanly (gloo can abort at exit otherwise)
    if not accelerator.is_main_process:
        return
    if live is not None:
        live.end()
    timed = step_times[min(5, len(step_times) // 2):] or step_times
    metrics = {
        "steps": cfg["steps"], "images_seen": trainer.images_seen, "params": total, "trainable": trainable,
        "trainable_percent": 100.0 * trainable / total, "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
        "step_seconds": sum(timed) / max(1, len(timed)), "train_seconds": sum(step_times),
        "resumed_from_step": start,
    }
    if trainer.pair_distance:
        metrics["mean_image_noise_distance"] = sum(trainer.pair_distance) / len(trainer.pair_distance)
    config = {"run": run, "model": cfg["model"], "model_kwargs": trainer.model_kwargs,
              "diffusion": cfg["diffusion"], "schedule": cfg["schedule"], "method": cfg["method"], "space": cfg["space"],
              "method_kwargs": cfg["method_kwargs"],
              "init_from": trainer.base_dir, "delta_of": trainer.delta_of}
    with atomic_path(out_dir, is_dir=True) as tmp:
        _save_weights(trainer, tmp)
        snapshots = ckpt_dir / "snapshots"
        if snapshots.exists():
            shutil.copytree(snapshots, tmp / "snapshots")
        metrics["checkpoint_bytes"] = (tmp / "ema.safetensors").stat().st_size
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        (tmp / "train_metrics.json").write_text(json.dumps(metrics, indent=1))
    shutil.rmtree(ckpt_dir, ignore_errors=True)
