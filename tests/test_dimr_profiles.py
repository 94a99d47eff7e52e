"""DiMR's paper profiles: the published models with the official recipe, the profile's stages
end to end at tiny size, the ADM evaluator's .npz, and class-balanced sampling on any process count."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from diffrepro.adm_npz import evaluator_order
from diffrepro.methods import get_method
from diffrepro.models.info import model_info
from diffrepro.profiles import compose
from diffrepro.runs import model_config
from params_util import recompose
from pipeline_repo import stage_in

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# README of qihao067/DiMR: parameters and GMACs ("Gflops" = multiply-accumulates) at 256 px.
PUBLISHED = {"dimr_xl2r_imagenet256": ("DiMR-XL/2R", 505_046_408, 160.2),
             "dimr_g2r_imagenet256": ("DiMR-G/2R", 1_056_352_904, 331.1)}
# configs/DiMR-*-2R_imagenet256.py, train.py (no clipping, EMA 0.9999 each step), eval.py
# (DPM-Solver 250 steps, U-ViT scale 0.4 = w 1.4 on every channel); bf16 is this repo's choice.
OFFICIAL_RECIPE = {"method": "dimr", "diffusion": "gaussian", "schedule": "scaled_linear", "space": "latent",
                   "init_from": "data/latents", "lr": 2e-4, "betas": [0.99, 0.99], "weight_decay": 0.03,
                   "warmup_steps": 5000, "ema_decay": 0.9999, "ema_warmup": False, "batch_size": 1024,
                   "steps": 1_000_000, "grad_clip": 0.0, "bf16": True, "sampler": "dpm_solver",
                   "sample_steps": 250, "guidance_scale": 1.4, "guided_channels": None}
LATENT_256 = (4, 32, 32)  # SD-VAE latent of a 256 px image


def _counts(run: dict, num_classes: int = 1000) -> dict:
    """model_info of a run's network built with the kwargs the train stage would give it."""
    method = get_method(run["method"], **run["method_kwargs"])
    kwargs = model_config(run, method, LATENT_256, num_classes, 1)
    return model_info(run["model"], method=run["method"], **kwargs)


@pytest.mark.parametrize("profile", PUBLISHED)
def test_dimr_profile_is_the_published_model_with_the_official_recipe(profile):
    params = compose(profile, conf_dir=CONF)
    name, num_params, gmacs = PUBLISHED[profile]
    run = params["runs"]["dimr"]
    assert run["model"] == name
    assert {key: run[key] for key in OFFICIAL_RECIPE} == OFFICIAL_RECIPE
    assert run["method_kwargs"] == {"class_dropout": 0.1, "loss_weights": [0.25, 1.0]}  # p_uncond, loss_coeffs
    assert (params["data"]["dataset"], params["data"]["image_size"], params["data"]["heldout_split"]) == \
        ("imagenet", 256, "val")
    assert params["autoencoder"] == {**params["autoencoder"], "kind": "sd_vae", "path": "models/sd-vae-ft-ema"}
    assert params["features"]["kind"] == "inception" and params["sample"]["per_class"] * 1000 == 50_000
    assert (params["pretrain"]["steps"], params["pretrain"]["init_from"]) == (0, "data/latents")
    info = _counts(run)
    assert info["params"] == info["trainable"] == num_params
    assert info["gmacs"] == pytest.approx(gmacs, rel=0.01)


@pytest.mark.parametrize("profile", PUBLISHED)
def test_dit_baseline_is_dits_release_sampled_with_dits_settings(profile):
    runs = compose(profile, conf_dir=CONF)["runs"]
    run = runs["dit_released"]
    assert "dit" not in runs and (run["release"], run["steps"]) == ("dit", 0)  # adopted, never retrained
    assert (run["model"], run["schedule"]) == ("DiT-XL/2", "linear")
    assert (run["sampler"], run["sample_steps"], run["guidance_scale"], run["guided_channels"]) == ("ddpm", 250, 1.5, 3)
    info = _counts(run)
    assert info["params"] == 675_129_632 and info["gmacs"] == pytest.approx(118.6, rel=0.01)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """The XL/2R profile as is but at tiny dims, through `train dimr`: the ImageNet folder fixture,
    a tiny VAE in the SD folder layout (f = 8, scaling 0.18215), random Inception weights. The stage
    commands run in this process (`stage_in`), on one thread as a stage process with OMP_NUM_THREADS=1."""
    from fixtures_real import build_imagenet_tree
    from diffrepro.device_standin import random_fid_inception_state
    from random_weights import save_random_lpips_weights

    from diffrepro.models.autoencoder import tiny_autoencoder

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("dimr_profile")
    params = compose("dimr_xl2r_imagenet256", conf_dir=CONF)
    params["data"]["image_size"] = 32
    params["features"]["inception_weights"] = "models/inception.pth"
    params["sample"].update(per_class=2, batch_size=8)  # 6 samples: precision/recall need > 3
    params["runs"] = {"dimr": params["runs"]["dimr"]}  # the run the report here is made of
    for run in (params["pretrain"], params["runs"]["dimr"]):
        run.update(model="DiMR-mini/2R", steps=min(run["steps"], 2), batch_size=4, sample_steps=3, bf16=False)
    (work / "params.yaml").write_text(yaml.safe_dump(recompose(params)))
    build_imagenet_tree(work / "data" / "raw")
    vae = tiny_autoencoder(32, (8, 8, 8, 8), 4, 1)
    vae.register_to_config(scaling_factor=0.18215)
    vae.save_pretrained(work / "models" / "sd-vae-ft-ema")
    torch.save(random_fid_inception_state(), work / "models" / "inception.pth")
    save_random_lpips_weights(work / "models")
    arr_0 = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    np.savez(work / "models" / "VIRTUAL_imagenet256_labeled.npz", arr_0=arr_0, mu=np.zeros(2048), sigma=np.eye(2048),
             mu_s=np.zeros(2023), sigma_s=np.eye(2023))  # the official keys and shapes
    for stage in ("prepare", "autoencoder", "extract-latents", "features"):
        stage_in(work, stage)
    stage_in(work, "train", "pretrain")
    stage_in(work, "train", "dimr")
    yield work
    torch.set_num_threads(threads)


def test_dimr_xl2r_profile_structure_runs_at_tiny_size_and_exports_the_adm_npz(workspace):
    for stage in ("sample", "evaluate"):
        stage_in(workspace, stage, "dimr")
    stage_in(workspace, "speed")
    stage_in(workspace, "report")
    stage_in(workspace, "adm-npz", "dimr")

    classes = json.loads((workspace / "data" / "prepared" / "classes.json").read_text())
    assert len(classes["classes"]) == 3
    config = json.loads((workspace / "models" / "dimr" / "config.json").read_text())
    assert (config["model"], config["method"], config["schedule"]) == ("DiMR-mini/2R", "dimr", "scaled_linear")
    assert (config["model_kwargs"]["num_classes"], config["model_kwargs"]["input_size"]) == (3, 4)  # 32 px / 8
    assert json.loads((workspace / "models" / "pretrain" / "train_metrics.json").read_text())["steps"] == 0
    metrics = json.loads((workspace / "metrics" / "dimr_xl2r_imagenet256" / "dimr.json").read_text())
    assert metrics["num_samples"] == 6 and metrics["sampling"]["sampler"] == "dpm_solver"
    assert metrics["fid_reference_batch"] > 0 and 1 <= metrics["inception_score"] <= 1008  # the ADM protocol ran
    assert metrics["sfid_reference_batch"] > 0 and 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert "DiMR" in (workspace / "reports" / "dimr_xl2r_imagenet256" / "results.md").read_text()

    with np.load(workspace / "samples" / "dimr" / "final.npz") as npz:
        images, labels = npz["images"], npz["labels"]
    with np.load(workspace / "checkpoints" / "dimr_adm_samples.npz") as adm:
        assert sorted(adm.files) == ["arr_0", "arr_1"]
        arr_0, arr_1 = adm["arr_0"], adm["arr_1"]
    assert arr_0.dtype == np.uint8 and arr_0.shape == (6, 32, 32, 3)
    order = evaluator_order(6)
    assert sorted(order.tolist()) == list(range(6)) and sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert np.array_equal(arr_0, images[order]) and arr_1.tolist() == labels[order].tolist()


def test_sampling_is_class_balanced_and_independent_of_the_process_count(workspace, tmp_path):
    """9 images in chunks of 2: one process (this one) makes all 5 chunks; two processes started by
    `accelerate launch` split them 3 + 2."""
    per_class = 3
    outputs = {}
    for name in ("one", "two"):
        work = tmp_path / name
        shutil.copytree(workspace, work, ignore=shutil.ignore_patterns("samples", "metrics", "reports", "checkpoints"))
        params = yaml.safe_load((work / "params.yaml").read_text())
        params["sample"].update(per_class=per_class, batch_size=2)
        (work / "params.yaml").write_text(yaml.safe_dump(params))
        if name == "one":
            stage_in(work, "sample", "dimr")
        else:
            proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                                   "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                                   "-m", "diffrepro", "sample", "dimr"], cwd=work, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1",
                                       "ACCELERATE_USE_CPU": "1"})
            assert proc.returncode == 0, proc.stderr[-3000:]
        with np.load(work / "samples" / "dimr" / "final.npz") as npz:
            outputs[name] = {key: npz[key] for key in npz.files}
    one, two = outputs["one"], outputs["two"]
    assert one["images"].shape == (3 * per_class, 32, 32, 3)
    assert np.bincount(one["labels"]).tolist() == [per_class] * 3
    for key in ("images", "labels", "super_labels"):
        assert one[key].tobytes() == two[key].tobytes(), key
