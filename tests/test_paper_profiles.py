"""Paper profiles: they compose, name the papers' exact models, and run at tiny size end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from diffrepro.models.info import model_info
from diffrepro.profiles import compose, profile_names
from params_util import recompose
from pipeline_repo import stage_in

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
PAPER_PROFILES = [p for p in profile_names(CONF) if p not in ("default", "smoke")]


@pytest.mark.parametrize("profile", PAPER_PROFILES)
def test_profile_composes_and_validates(profile):
    params = compose(profile, conf_dir=CONF)
    assert params["profile"] == profile and params["runs"]


def test_finediffusion_inat256_is_dit_xl2_with_1_77_percent_trainable():
    params = compose("finediffusion_inat256", conf_dir=CONF)
    run = params["runs"]["finediffusion"]
    assert (run["model"], run["lr"], run["ema_decay"], run["sample_steps"]) == ("DiT-XL/2", 0.0001, 0.9999, 250)
    assert params["pretrain"]["init_from"].endswith("DiT-XL-2-256x256.pt") and params["pretrain"]["steps"] == 0
    info = model_info(run["model"], method=run["method"], num_classes=10000, num_super_classes=11,
                      image_size=params["data"]["image_size"])
    assert (info["params"], info["trainable"]) == (685640480, 12153632)


def test_finediffusion_inat256_structure_runs_at_tiny_size(tmp_path, one_thread):
    """The profile as is, but tiny dims: an iNat-layout fixture, a tiny VAE in the SD folder layout,
    a tiny DiT checkpoint in the official key layout, random Inception weights. The stage commands
    run in this process (`stage_in`)."""
    from fixtures_real import build_inat
    from diffrepro.device_standin import random_fid_inception_state
    from random_weights import save_random_lpips_weights

    from diffrepro.models.autoencoder import tiny_autoencoder
    from diffrepro.models.registry import build_model

    params = compose("finediffusion_inat256", conf_dir=CONF)
    params["data"]["image_size"] = 16
    params["autoencoder"]["path"] = "models/sd-vae-ft-mse"
    params["features"].update(inception_weights="models/inception.pth", inception_dims=64)  # a 64-d FID: fast sqrtm
    params["sample"].update(per_class=1, batch_size=8)
    params["runs"] = {run: params["runs"][run] for run in ("finediffusion", "full_finetune")}  # the report's: all
    for run in [params["pretrain"], *params["runs"].values()]:
        run.update(model="DiT-tiny/2", steps=min(run["steps"], 2), batch_size=4, sample_steps=3, bf16=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(recompose(params)))
    build_inat(tmp_path / "data" / "raw")
    vae = tiny_autoencoder(16, (8, 8, 8, 8), 4, 1)  # f = 8, as the SD VAE
    vae.register_to_config(scaling_factor=0.18215)
    vae.save_pretrained(tmp_path / "models" / "sd-vae-ft-mse")
    official = build_model("DiT-tiny/2", input_size=2, in_channels=4, num_classes=1000)
    torch.save(official.state_dict(), tmp_path / "models" / "DiT-XL-2-256x256.pt")
    torch.save(random_fid_inception_state(), tmp_path / "models" / "inception.pth")
    save_random_lpips_weights(tmp_path / "models")

    for stage in ("prepare", "autoencoder", "extract-latents", "features"):
        stage_in(tmp_path, stage)
    stage_in(tmp_path, "train", "pretrain")
    for run in ("finediffusion", "full_finetune"):
        for stage in ("train", "sample", "evaluate"):
            stage_in(tmp_path, stage, run)
    stage_in(tmp_path, "speed")
    stage_in(tmp_path, "report")

    classes = json.loads((tmp_path / "data" / "prepared" / "classes.json").read_text())
    assert len(classes["classes"]) == 3 and classes["super_classes"] == ["Birds", "Fungi", "Plants"]
    config = json.loads((tmp_path / "models" / "finediffusion" / "config.json").read_text())
    assert config["model_kwargs"]["num_super_classes"] == 3 and config["delta_of"] == "models/pretrain"
    fd = json.loads((tmp_path / "metrics" / "finediffusion_inat256" / "finediffusion.json").read_text())
    ft = json.loads((tmp_path / "metrics" / "finediffusion_inat256" / "full_finetune.json").read_text())
    assert fd["num_samples"] == 3 and fd["fid"] >= 0
    # only the PEFT delta is stored: far smaller than the full fine-tuned model
    assert fd["train"]["checkpoint_bytes"] < ft["train"]["checkpoint_bytes"] / 2
    assert "FineDiffusion" in (tmp_path / "reports" / "finediffusion_inat256" / "results.md").read_text()
