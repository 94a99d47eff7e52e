"""Does any paper-scale code path leave a tensor on the CPU? Checked without a GPU.

The harness replaces the accelerator's device by `meta`, a device that holds shapes but no
values: an op mixing a meta tensor with a (non-scalar) CPU tensor raises, and so does any copy of
a meta tensor to the host (`.item()`, `.cpu()`, `.tolist()`). So a check that passes here shows
that everything it ran stayed on the device — as it must on a GPU, where a stray CPU tensor is
either a crash or a host sync per step. It runs, on a tiny smoke-size workspace:
- one training step of every method and every noise-assignment mode, and one with micro-batches;
- one sampling chunk of every sampler (decoded by the autoencoder);
- one latent-extraction batch and one feature batch (the judge and Inception).

What stays on the host by design (and why) is listed in HOST_BY_DESIGN; the harness stands in a
device-side identity permutation for the one host computation inside a training step.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import traceback
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import yaml

from diffrepro.paths import AUTOENCODER

HOST_BY_DESIGN = {
    "the global batch": "drawn on the host from the (seed, step) stream, one step ahead in a thread, "
                        "then copied: the same bytes on any device and process count",
    "scipy's linear assignment": "`lsa_permutation` copies the B×B cost matrix to the host (scipy has no GPU "
                                 "solver): the one host transfer inside a training step",
    "per-image sampling noise": "each image's noise comes from its own CPU generator seeded by its index, so "
                                "any subset of samples regenerates bit-identically on any device",
    "losses": "read back every `train.log_every` steps, not every step",
    "results": "uint8 images, features and statistics are copied to the host to be written",
}
STANDIN = torch.device("meta")
METHOD_RUNS = {  # method → (model, space, diffusion, schedule, sampler) of a tiny run
    "dit": ("DiT-tiny/2", "latent", "gaussian", "linear", "ddim"),
    "finediffusion": ("DiT-tiny/2", "latent", "gaussian", "linear", "ddim"),
    "full_finetune": ("DiT-tiny/2", "latent", "gaussian", "linear", "ddim"),
    "bitfit": ("DiT-tiny/2", "latent", "gaussian", "linear", "ddim"),
    "difffit": ("DiT-tiny/2", "latent", "gaussian", "linear", "ddim"),
    "dimr": ("DiMR-mini/2R", "latent", "gaussian", "scaled_linear", "dpm_solver"),
    "edm": ("ddpmpp-mini", "pixel", "edm", "linear", "heun"),
    "patch": ("ddpmpp-mini", "pixel", "edm", "linear", "heun"),
}
GAUSSIAN_SAMPLERS = ("ddpm", "ddim", "dpm_solver", "pndm")


def random_fid_inception_state() -> dict:
    """Random weights in the real FID Inception layout (pytorch-fid's fid_inception_v3 structure)."""
    from pytorch_fid import inception as fi

    net = fi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    for name, block in [("Mixed_5b", fi.FIDInceptionA(192, pool_features=32)),
                        ("Mixed_5c", fi.FIDInceptionA(256, pool_features=64)),
                        ("Mixed_5d", fi.FIDInceptionA(288, pool_features=64)),
                        ("Mixed_6b", fi.FIDInceptionC(768, channels_7x7=128)),
                        ("Mixed_6c", fi.FIDInceptionC(768, channels_7x7=160)),
                        ("Mixed_6d", fi.FIDInceptionC(768, channels_7x7=160)),
                        ("Mixed_6e", fi.FIDInceptionC(768, channels_7x7=192)),
                        ("Mixed_7b", fi.FIDInceptionE_1(1280)), ("Mixed_7c", fi.FIDInceptionE_2(2048))]:
        setattr(net, name, block)
    return net.state_dict()


def smoke_workspace(root: Path) -> dict:
    """The smoke profile's data, autoencoder and latents under `root` (the stages themselves, in
    this process); returns its params."""
    from diffrepro.stages.features import stage as features_stage
    from diffrepro.stages.extract_latents import stage as extract_latents_stage
    from diffrepro.stages.download import stage as download_stage
    from diffrepro.stages.prepare import stage as prepare_stage
    from diffrepro.profiles import compose
    from diffrepro.stages.autoencoder import stage as autoencoder_stage

    params = compose("smoke", conf_dir=Path(__file__).resolve().parents[2] / "conf")
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    with _inside(root):
        for stage in (download_stage, prepare_stage, autoencoder_stage, extract_latents_stage, features_stage):
            stage(params)
    return params


@contextlib.contextmanager
def _inside(folder: Path):
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def standin_accelerator():
    """A real single-process accelerator whose `device` is the stand-in. The property is patched
    on the class, not the shared state, which accelerate re-initialises (e.g. in `prepare`).
    Moving a module to `meta` would create new Parameter objects (CPU → CUDA keeps them), leaving
    the optimizer on the old ones: swapping tensors in place keeps them, as on a GPU."""
    from accelerate import Accelerator

    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        with mock.patch.object(Accelerator, "device", new_callable=mock.PropertyMock, return_value=STANDIN):
            yield Accelerator(cpu=True)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)


def _device_identity_permutation(cost: torch.Tensor) -> torch.Tensor:
    return torch.arange(len(cost), device=cost.device)


def run_params(params: dict, method: str, assignment: str = "none") -> dict:
    """A tiny from-scratch run of `method` on the smoke data (one step, nothing saved), declared
    as `runs.standin` and expanded as the composition expands every run."""
    from diffrepro.replicates import expand

    model, space, diffusion, schedule, sampler = METHOD_RUNS[method]
    data = "data/latents" if space == "latent" else params["data"]["prepared_dir"]
    run = {**params["runs"]["dit"], "model": model, "method": method, "space": space, "diffusion": diffusion,
           "schedule": schedule, "data": data, "init_from": data, "assignment": assignment, "steps": 1,
           "sampler": sampler, "eval_at": [], "model_kwargs": {}, "method_kwargs": {"class_dropout": 0.1}}
    if method == "dimr":
        run["guidance_schedule"] = "increasing"
    train_runs, sample_runs = expand({"standin": run})
    return {**params, "runs": {"standin": run}, "train_runs": train_runs, "sample_runs": sample_runs}


def check_training_step(params: dict, method: str, assignment: str = "none") -> str:
    from diffrepro.training import Trainer

    with standin_accelerator() as accelerator, \
            mock.patch("diffrepro.methods.immiscible.lsa_permutation", _device_identity_permutation):
        trainer = Trainer(run_params(params, method, assignment), "standin", accelerator)
        trainer.step(0)
        tensors = [*trainer.net.parameters(), *trainer.ema.parameters(),
                   *trainer.pending_losses, *trainer.pair_distance]
        tensors += [v for state in trainer.opt.state.values() for v in state.values() if torch.is_tensor(v)]
    stray = [t.device for t in tensors if t.device != STANDIN and t.ndim > 0]
    if stray:
        raise AssertionError(f"{len(stray)} tensors left on {stray[0]}")
    if not trainer.opt.state:
        raise AssertionError("the optimizer holds no state: it never updated the model's parameters")
    return f"{len(trainer.opt.state)} optimizer states, {trainer.micro_batches} micro-batch(es)"


def check_sampling_chunk(params: dict, method: str, sampler: str) -> str:
    from diffrepro.methods import get_method
    from diffrepro.models.autoencoder import load_autoencoder
    from diffrepro.runs import build_network, model_config
    from diffrepro.sampling import RunSampler

    run = run_params(params, method)["runs"]["standin"]
    run["sampler"] = sampler
    if sampler == "pndm":  # SD v1.4's scheduler: defined on its scaled-linear schedule only
        run["schedule"] = "scaled_linear"
    method_obj = get_method(method, **run["method_kwargs"])
    shape = (4, 8, 8) if run["space"] == "latent" else (3, 16, 16)
    kwargs = model_config(run, method_obj, shape, 4, 2)
    model = build_network(run["model"], kwargs, run["diffusion"]).eval()
    config = {**run, "model_kwargs": kwargs}
    vae = load_autoencoder(AUTOENCODER) if run["space"] == "latent" else None
    chunk = RunSampler(model, config, run, 0, vae, STANDIN, where="runs.standin")
    labels, supers = np.array([0, 1, 2, 3]), np.array([0, 0, 1, 1])
    images = chunk.on_device(labels, supers, np.arange(4))
    if images.device != STANDIN or images.shape != (4, 3, 16, 16):
        raise AssertionError(f"images on {images.device}, shape {tuple(images.shape)}")
    return f"{sampler}, {run['sample_steps']} steps, images {tuple(images.shape)}"


def check_latent_batch(params: dict) -> str:
    from diffrepro.data import shards
    from diffrepro.latents import encode_moments
    from diffrepro.models.autoencoder import load_autoencoder

    images = shards.ShardedSplit(Path(params["data"]["prepared_dir"]) / "train").take(np.arange(4))["images"]
    moments = encode_moments(load_autoencoder(AUTOENCODER).to(STANDIN), images, 2)
    if moments.device != STANDIN:
        raise AssertionError(f"moments on {moments.device}")
    return f"moments {tuple(moments.shape)}"


def check_feature_batch(params: dict, kind: str) -> str:
    from diffrepro.data import shards
    from diffrepro.features import FeatureNet, load_inception

    images = shards.ShardedSplit(Path(params["data"]["prepared_dir"]) / "train").take(np.arange(4))["images"]
    if kind == "inception":
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(random_fid_inception_state(), Path(tmp) / "inception.pth")
            net = FeatureNet("inception", inception=load_inception(str(Path(tmp) / "inception.pth")),
                             device=STANDIN)
    else:
        net = FeatureNet.load(params, device=STANDIN)
    out = net.on_device(images)
    stray = [k for k, v in out.items() if v.device != STANDIN]
    if stray:
        raise AssertionError(f"{stray} not on the device")
    return f"features {tuple(out['features'].shape)}"


def checks(params: dict) -> list[tuple[str, callable]]:
    """(name, zero-argument check) of everything the harness runs."""
    items = [(f"train step: {m}", lambda m=m: check_training_step(params, m)) for m in METHOD_RUNS]
    items += [(f"train step: dit, assignment {a}", lambda a=a: check_training_step(params, "dit", a))
              for a in ("lsa", "lsa_global", "knn")]
    items += [("train step: dit, 2 micro-batches", lambda: _with_micro_batches(params))]
    items += [(f"sampling chunk: {s}", lambda s=s: check_sampling_chunk(params, "dit", s)) for s in GAUSSIAN_SAMPLERS]
    items += [("sampling chunk: dimr, dpm_solver", lambda: check_sampling_chunk(params, "dimr", "dpm_solver"))]
    items += [(f"sampling chunk: {m}, heun", lambda m=m: check_sampling_chunk(params, m, "heun"))
              for m in ("edm", "patch")]
    items += [("latent extraction batch", lambda: check_latent_batch(params))]
    items += [(f"feature batch: {k}", lambda k=k: check_feature_batch(params, k)) for k in ("judge", "inception")]
    return items


def _with_micro_batches(params: dict) -> str:
    share = params["runs"]["dit"]["batch_size"]
    with mock.patch.dict(os.environ, {"DIFFREPRO_BATCH_PER_DEVICE": str(share // 2)}):
        return check_training_step(params, "dit")


def run_harness(workspace: Path | None = None) -> list[dict]:
    """Every check on the stand-in device: rows {"check", "ok", "detail"}."""
    with tempfile.TemporaryDirectory() if workspace is None else contextlib.nullcontext(workspace) as root:
        root = Path(root)
        params = smoke_workspace(root) if not (root / "models" / "autoencoder").exists() else \
            yaml.safe_load((root / "params.yaml").read_text())
        rows = []
        with _inside(root):
            for name, check in checks(params):
                try:
                    rows.append({"check": name, "ok": True, "detail": check()})
                except Exception as err:  # noqa: BLE001 - every failure is a row of the table
                    where = traceback.extract_tb(err.__traceback__)[-1]
                    rows.append({"check": name, "ok": False, "detail": f"{type(err).__name__}: "
                                 f"{str(err).splitlines()[0] if str(err) else ''} ({Path(where.filename).name}:"
                                 f"{where.lineno})"})
        return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| check on the `meta` stand-in | result | detail |", "|---|---|---|"]
    lines += [f"| {r['check']} | {'ok' if r['ok'] else 'FAILED'} | {r['detail']} |" for r in rows]
    lines += ["", "On the host by design:"] + [f"- {k}: {v}" for k, v in HOST_BY_DESIGN.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    table = run_harness()
    print(format_table(table))
    raise SystemExit(0 if all(r["ok"] for r in table) else 1)
