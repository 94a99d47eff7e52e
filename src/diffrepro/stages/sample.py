"""`sample@RUN` stage: class-balanced samples of a trained run, decoded to uint8 images.

How images are drawn, resumed and split across processes: `diffrepro.sampling`. Writes
`samples/<run>/final.npz` (images, labels, super_labels), one npz per training snapshot
(`step-XXXXXXX.npz`, for quality vs steps), `final-set<k>.npz` for EDM's extra seed sets, a
labelled grid `samples/<run>/grid.png` and `sampling.json` (the sampler settings).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import torch

from diffrepro.atomic import atomic_path
from diffrepro.config import run_key, run_params
from diffrepro.errors import UserError
from diffrepro.fingerprint import sampling as sampling_fingerprint
from diffrepro.inputs import read_safetensors
from diffrepro.models.autoencoder import load_autoencoder
from diffrepro.paths import AUTOENCODER, checkpoints_root, final_set_name, model_dir, samples_dir
from diffrepro.runs import class_counts, load_trained, set_matmul_precision, train_command
from diffrepro.sampling import RunSampler, assemble, sample_labels, sample_set, save_grid


def stage(params: dict, run: str) -> None:
    from accelerate import Accelerator

    cfg, scfg = run_params(params, run), params["sample"]
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    set_matmul_precision(cfg)
    seed = params["seed"] + cfg["seed"]
    run_dir = model_dir(run)
    model, config = load_trained(run_dir)
    vae = load_autoencoder(AUTOENCODER) if config["space"] == "latent" else None
    labels, supers = sample_labels(params["data"]["prepared_dir"], cfg["split"], scfg["per_class"])
    num_classes, _ = class_counts(params["data"]["prepared_dir"], cfg["split"])
    if config["model_kwargs"]["num_classes"] not in (None, num_classes):  # None: an unconditional net
        raise UserError(f"{run_dir} was trained on {config['model_kwargs']['num_classes']} classes but the "
                        f"prepared data has {num_classes}: re-run `{train_command(run)}`")
    work = checkpoints_root() / run / "samples"
    where = run_key(run, params)
    snapshots = [(snap.stem, snap, 0) for snap in sorted((run_dir / "snapshots").glob("step-*.safetensors"))]
    finals = [(final_set_name(k), None, k * len(labels)) for k in range(scfg["seed_sets"])]
    for name, snap, offset in snapshots + finals:  # snapshots first: quality vs training steps
        net = model
        if snap is not None:
            net, _ = load_trained(run_dir)
            net.load_state_dict(_full_state(net, read_safetensors(snap, train_command(run))))
        sampler = RunSampler(net, config, cfg, seed, vae, accelerator.device, where=where)
        weights = snap if snap is not None else run_dir / "ema.safetensors"
        sample_set(sampler, labels, supers, scfg["batch_size"], work / name, f"sample {run} {name}",
                   sampling_fingerprint(params, run, weights), accelerator, index_offset=offset)
    accelerator.end_training()
    if not accelerator.is_main_process:
        return
    with atomic_path(samples_dir(run), is_dir=True) as tmp:
        for name, _, _ in snapshots + finals:  # one set in memory at a time
            images = assemble(work / name, len(labels), scfg["batch_size"], f"dvc repro sample@{run}")
            np.savez(tmp / f"{name}.npz", images=images, labels=labels, super_labels=supers)
        images = np.load(tmp / "final.npz")["images"]
        shown = labels < scfg["grid_classes"]
        save_grid(images[shown], labels[shown], min(8, scfg["per_class"]), tmp / "grid.png",
                  f"{run}: {config['model']} {config['method']}, {cfg['sampler']} {cfg['sample_steps']} steps, "
                  f"guidance {cfg['guidance_scale']}")
        (tmp / "sampling.json").write_text(json.dumps({
            "num_images": int(len(labels)), "seed_sets": scfg["seed_sets"],
            **{k: cfg[k] for k in ("sampler", "sample_steps", "guidance_scale", "guidance_schedule",
                                   "guidance_power", "guided_channels")}}, indent=1))
    shutil.rmtree(work, ignore_errors=True)


def _full_state(model: torch.nn.Module, snapshot: dict) -> dict:
    """A snapshot of a PEFT run holds only the trained tensors: complete it from the loaded model."""
    return {**model.state_dict(), **snapshot}
