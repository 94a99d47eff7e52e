"""`train@RUN` (and `pretrain`) stage: train one run with the loop of `diffrepro.training`.

Checkpoints (model, EMA, optimizer, step) go to `checkpoints/<run>/` — outside DVC's outputs, so
a killed stage resumes on the next `dvc repro`; the final weights appear in `models/<run>/` only
when training is complete. With a `DIFFREPRO_TRAIN_SECONDS` budget the stage checkpoints and
exits with status 75 when the budget is spent, and the next `dvc repro` resumes exactly. A run
with a `release` trains no step: its weights are that release's official file, adopted when the
Trainer is built, and train_metrics.json says which file (`adopted`).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from diffrepro import fingerprint
from diffrepro.atomic import atomic_path
from diffrepro.config import run_params
from diffrepro.errors import TrainingPaused, UserError
from diffrepro.execution import compile_requested, train_seconds_budget
from diffrepro.models.info import count_params
from diffrepro.paths import checkpoints_root, logs_dir, model_dir, pause_marker
from diffrepro.runs import set_matmul_precision
from diffrepro.sources import release_url
from diffrepro.training import HostBatch, Trainer


def stage(params: dict, run: str) -> None:
    from accelerate import Accelerator
    from dvclive import Live

    cfg = run_params(params, run)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              mixed_precision="bf16" if cfg["bf16"] else "no",
                              dynamo_backend="inductor" if compile_requested() else "no")
    set_matmul_precision(cfg)
    trainer = Trainer(params, run, accelerator)
    ckpt_dir, out_dir = checkpoints_root() / run, model_dir(run)
    start = _resume(trainer, ckpt_dir / "last.pt")
    if accelerator.is_main_process:
        pause_marker(run).unlink(missing_ok=True)
    live = Live(dir=str(logs_dir(params) / run), resume=start > 0, dvcyaml=None, save_dvc_exp=False) \
        if accelerator.is_main_process else None
    budget, started = train_seconds_budget(), time.perf_counter()
    step_times: list[float] = []
    losses: list[float] = []
    total, trainable = count_params(trainer.net)
    every, steps = params["train"]["log_every"], cfg["steps"]
    pbar = tqdm(range(start, steps), desc=f"train {run}", mininterval=10,
                disable=not accelerator.is_main_process, initial=start, total=steps)
    batches = _host_batches(trainer, start, steps, ahead=accelerator.device.type != "cpu")
    for step in pbar:
        tic = time.perf_counter()
        trainer.step(step, next(batches))
        step_times.append(time.perf_counter() - tic)
        if (step + 1) % every == 0 or step + 1 == steps:  # the only host sync of the loop
            losses.extend(trainer.logged_losses())
            if live is not None:
                recent = losses[-every:]
                live.step = step + 1  # before logging: each value is recorded at the step it ends
                live.log_metric("train/loss", sum(recent) / len(recent))
                live.log_metric("train/step_seconds", step_times[-1])
                live.next_step()
        if (step + 1) in cfg["eval_at"] and accelerator.is_main_process:
            _save_weights(trainer, ckpt_dir, step + 1)
        if (step + 1) % cfg["checkpoint_every"] == 0 and (step + 1) < steps:
            if accelerator.is_main_process:
                with atomic_path(ckpt_dir / "last.pt") as tmp:
                    torch.save(trainer.state(step + 1), tmp)
            if budget is not None and _all_agree(accelerator, time.perf_counter() - started > budget):
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    pause_marker(run).write_text(f"{step + 1}\n")
                raise TrainingPaused(f"{run}: the DIFFREPRO_TRAIN_SECONDS budget ({budget:g} s) is spent at "
                                     f"step {step + 1} of {steps}; run the same command again to resume")
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
    if cfg["release"]:  # adopted, not trained: which file, from where, and its sha256 (none is published)
        metrics["adopted"] = {"release": cfg["release"], "file": cfg["init_from"],
                              "url": release_url(cfg["release"], cfg["init_from"]),
                              "sha256": fingerprint.file_digest(cfg["init_from"])}
    if trainer.pair_distance:
        metrics["mean_image_noise_distance"] = sum(map(float, trainer.pair_distance)) / len(trainer.pair_distance)
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


def _host_batches(trainer: Trainer, start: int, steps: int, ahead: bool) -> Iterator[HostBatch]:
    """Each step's host batch, in order. `ahead` (a GPU, whose host idles while it computes): a
    thread draws step s + 1 while s trains. On the CPU the draw (about 1 ms) runs in line: a second
    thread there contends with the step's own compute threads and made every step 1.3–1.6× slower
    (benchmarks/bench_train_step.py, "Drawing the batch in a thread")."""
    if not ahead:
        for step in range(start, steps):
            yield trainer.draw(step)
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        upcoming = pool.submit(trainer.draw, start) if start < steps else None
        for step in range(start, steps):
            host = upcoming.result()
            if step + 1 < steps:
                upcoming = pool.submit(trainer.draw, step + 1)
            yield host


def _resume(trainer: Trainer, ckpt: Path) -> int:
    """The step `ckpt` continues from when it was written under these params; else 0, and the
    snapshots (`eval_at`) a killed run left beside it are discarded too."""
    if ckpt.exists():
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
        except Exception as err:  # a checkpoint cut short by a full disk or a kill during rename
            raise UserError(f"{ckpt} is unreadable ({type(err).__name__}); delete it to restart the run") from None
        if state.get("config_hash") == fingerprint.training(trainer.params, trainer.run):
            try:
                return trainer.load_state(state)
            except RuntimeError as err:
                raise UserError(f"{ckpt} is from another model ({str(err).splitlines()[0]}); delete it") from None
        print(f"{ckpt} was written with other params; starting {trainer.run} from scratch")
    if trainer.acc.is_main_process:
        shutil.rmtree(ckpt.parent / "snapshots", ignore_errors=True)
    return 0


def _all_agree(accelerator, flag: bool) -> bool:
    """True when any process says so: every process must stop at the same step."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.gather(torch.tensor([flag], device=accelerator.device)).any())


def _save_weights(trainer: Trainer, out: Path, step: int | None = None) -> None:
    """EMA (and, at the end, raw) weights; a PEFT run from a base keeps only its trained tensors."""
    model = trainer.net
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    delta_only = trainer.delta_of is not None
    targets = {"ema": trainer.ema} if step is not None else {"ema": trainer.ema, "model": model}
    for name, module in targets.items():
        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()
                 if not delta_only or k in trained}
        target = out / (f"{name}.safetensors" if step is None else f"snapshots/step-{step:07d}.safetensors")
        target.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(target))
