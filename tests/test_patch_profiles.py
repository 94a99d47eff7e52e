"""Patch Diffusion's paper profiles: the official CelebA recipe (and the chosen AFHQv2-Wild one) with
its EDM baseline, EDM's unconditional DDPM++, and the profile's stages end to end at tiny size."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from diffrepro.config import run_names, run_params
from diffrepro.methods import get_method
from diffrepro.models.info import model_info
from diffrepro.profiles import compose
from diffrepro.runs import model_config
from params_util import recompose
from pipeline_repo import stage_in

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

BUDGET, LR_RAMP, EMA_HALF_LIFE = 200e6, 10e6, 0.5e6  # images: EDM train.py defaults
BATCH = 256
PATCH_IMAGES_PER_SLOT = 0.5 * 1 + 0.3 * 2 + 0.2 * 4  # real_p 0.5: sizes R, R/2, R/4 load 1, 2, 4 images


def _recipe(images_per_step: float, dropout: float, method: str, method_kwargs: dict) -> dict:
    """One run of EDM's 64 px DDPM++ recipe, its image quantities converted to optimizer steps."""
    return {"model": "ddpmpp", "method": method, "diffusion": "edm", "schedule": "linear", "space": "pixel",
            "data": "data/prepared", "init_from": "data/prepared", "release": None, "split": "train",
            "images_per_class": None, "model_kwargs": {"num_classes": None, "dropout": dropout},  # --cond=0
            "method_kwargs": method_kwargs, "assignment": "none",
            "steps": round(BUDGET / images_per_step), "batch_size": BATCH, "lr": 2e-4, "weight_decay": 0.0,
            "betas": [0.9, 0.999], "warmup_steps": int(LR_RAMP / images_per_step + 0.5),
            "ema_decay": 0.5 ** (images_per_step / EMA_HALF_LIFE), "ema_warmup": True, "grad_clip": 0.0,
            "bf16": False, "checkpoint_every": 5000, "eval_at": [], "sampler": "heun", "sample_steps": 50,
            "guidance_scale": 1.0, "guidance_schedule": "constant", "guidance_power": 1.0,
            "guided_channels": None, "seed": 0}


def _arms(dropout: float) -> dict:
    return {"patch": _recipe(BATCH * PATCH_IMAGES_PER_SLOT, dropout, "patch", {"class_dropout": 0.0, "real_p": 0.5}),
            "edm": _recipe(BATCH, dropout, "edm", {"class_dropout": 0.0})}


# CelebA: Zhendong-Wang/Patch-Diffusion README, `--cond=0 --arch=ddpmpp --batch=256 --cres=1,2,2,2
# --lr=2e-4 --dropout=0.05 --augment=0 --real_p=0.5` + train.py defaults (200 Mimg, EMA 0.5 Mimg,
# ramp 10 Mimg); generate.py `--steps=50`. `edm` = the same with real_p 1 (plain EDM).
# AFHQv2-Wild: no official command; chosen = EDM's AFHQv2 recipe (dropout 0.25) + real_p 0.5
# (docs/papers/patch_diffusion.md §2.2).
OFFICIAL = {"patch_celeba64": ("celeba64", _arms(0.05)), "patch_afhqv2wild64": ("afhqv2wild_64", _arms(0.25))}


@pytest.mark.parametrize("profile", OFFICIAL)
def test_patch_profile_runs_are_the_recipe_with_steps_from_the_200_mimg_budget(profile):
    params = compose(profile, conf_dir=CONF)
    dataset, runs = OFFICIAL[profile]
    assert {run: run_params(params, run) for run in run_names(params)} == runs
    assert (params["runs"]["edm"]["steps"], params["runs"]["patch"]["steps"]) == (781_250, 411_184)
    assert (params["data"]["dataset"], params["data"]["image_size"], params["features"]["kind"]) == \
        (dataset, 64, "inception")
    # EDM's FID: 50,000 samples of the one class, three seed sets (min reported)
    assert (params["sample"]["per_class"], params["sample"]["seed_sets"]) == (50_000, 3)
    assert (params["pretrain"]["steps"], params["pretrain"]["init_from"]) == (0, "data/prepared")


def ddpmpp_params(in_channels: int, extra: int, channels=128, mult=(1, 2, 2, 2), blocks=4, attn_level=2) -> int:
    """DDPM++ parameters counted from its description (EDM's SongUNet): 4·C embedding MLP, a 3×3
    input conv, per level `blocks` residual blocks (+ a down block between levels), a middle pair
    (the first with attention), per level a decoder of `blocks + 1` skip-taking blocks (+ an up
    block), attention after every encoder block and the last decoder block of the 16×16 level."""
    emb = 4 * channels
    conv = lambda cin, cout, k: cin * cout * k * k + cout  # noqa: E731
    norm = lambda c: 2 * c  # noqa: E731

    def block(cin, cout, resample=False, attention=False):
        n = norm(cin) + conv(cin, cout, 3) + emb * cout + cout + norm(cout) + conv(cout, cout, 3)
        n += conv(cin, cout, 1) if cin != cout or resample else 0
        return n + (norm(cout) + conv(cout, 3 * cout, 1) + conv(cout, cout, 1) if attention else 0)

    total = conv(channels, emb, 1) + conv(emb, emb, 1) + conv(in_channels + extra, channels, 3)
    skips, c = [channels], channels
    for level, m in enumerate(mult):
        if level:
            total += block(c, c, resample=True)
            skips.append(c)
        for _ in range(blocks):
            total += block(c, channels * m, attention=level == attn_level)
            c = channels * m
            skips.append(c)
    total += block(c, c, attention=True) + block(c, c)
    for level, m in reversed(list(enumerate(mult))):
        if level != len(mult) - 1:
            total += block(c, c, resample=True)
        for idx in range(blocks + 1):
            total += block(c + skips.pop(), channels * m, attention=level == attn_level and idx == blocks)
            c = channels * m
    return total + norm(c) + conv(c, in_channels, 3)


@pytest.mark.parametrize("profile", OFFICIAL)
def test_both_arms_train_edms_unconditional_64px_ddpmpp(profile):
    """EDM Table 7 (as tests/test_edm.py quotes it): DDPM++ at 64 px has 61.80 M parameters; the
    patch arm adds only the 2 coordinate channels of the input conv."""
    params = compose(profile, conf_dir=CONF)
    counts = {}
    for name, run in params["runs"].items():
        method = get_method(run["method"], **run["method_kwargs"])
        kwargs = model_config(run, method, (3, 64, 64), 1, 1)  # the prepared data: one class
        assert kwargs["num_classes"] is None
        counts[name] = model_info(run["model"], **kwargs)["params"]
    assert counts["edm"] == ddpmpp_params(3, 0) and round(counts["edm"] / 1e6, 2) == 61.80
    assert counts["patch"] == ddpmpp_params(3, 2) == counts["edm"] + 2 * 128 * 3 * 3


def _drawn_multiplier(seed: int, step: int) -> int:
    """R/s of step `step` (the run's patch size draw, a hash of (seed, step) shared by all processes)."""
    u = int.from_bytes(hashlib.blake2b(f"patch-size:{seed}:{step}".encode(), digest_size=8).digest(), "little") / 2**64
    return 1 if u < 0.5 else 2 if u < 0.8 else 4


def test_patch_celeba64_structure_runs_at_tiny_size_on_unpacked_celeba(tmp_path, one_thread):
    """The profile as is, tiny dims: the unpacked CelebA layout at 32 px, DDPM++ mini, a 40-image
    budget at batch 4 (edm 10 steps, patch round(40 / 7.6) = 5), 3 seed sets of 4 samples, random
    Inception and LPIPS weights in their real layouts. The stage commands run in this process."""
    from fixtures_real import CELEBA_PARTITION, build_celeba_tree
    from diffrepro.device_standin import random_fid_inception_state
    from random_weights import save_random_lpips_weights

    params = compose("patch_celeba64", conf_dir=CONF)
    tiny = copy.deepcopy(params)
    tiny["data"]["image_size"] = 32  # LPIPS's AlexNet trunk needs at least 32 px
    tiny["features"].update(inception_weights="models/inception.pth", inception_dims=64)  # a 64-d FID: fast sqrtm
    tiny["sample"].update(per_class=4, batch_size=4)
    budget, batch = 40, 4
    for run in [tiny["pretrain"], *tiny["runs"].values()]:
        per_step = batch * (PATCH_IMAGES_PER_SLOT if run["method"] == "patch" else 1)
        run.update(model="ddpmpp-mini", batch_size=batch, sample_steps=3,
                   steps=0 if run is tiny["pretrain"] else round(budget / per_step))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(recompose(tiny)))
    build_celeba_tree(tmp_path / "data" / "raw")
    (tmp_path / "models").mkdir()
    torch.save(random_fid_inception_state(), tmp_path / "models" / "inception.pth")
    save_random_lpips_weights(tmp_path / "models")
    for stage in ("prepare", "features"):  # pixel runs: no autoencoder or latents needed
        stage_in(tmp_path, stage)
    stage_in(tmp_path, "train", "pretrain")
    for run in ("patch", "edm"):
        for stage in ("train", "sample"):
            stage_in(tmp_path, stage, run)
    stage_in(tmp_path, "evaluate", "patch")  # each seed set's FID is a 2048-d sqrtm: one arm suffices

    report = json.loads((tmp_path / "data" / "prepared" / "prepare_report.json").read_text())
    assert report["split_sizes"] == {s: CELEBA_PARTITION.count(c) for s, c in (("train", 0), ("val", 1), ("test", 2))}
    trained = {run: json.loads((tmp_path / "models" / run / "train_metrics.json").read_text())
               for run in ("pretrain", "patch", "edm")}
    assert trained["pretrain"]["steps"] == trained["pretrain"]["images_seen"] == 0
    assert (trained["edm"]["steps"], trained["edm"]["images_seen"]) == (10, budget)
    multipliers = [_drawn_multiplier(0, step) for step in range(5)]
    assert trained["patch"]["steps"] == 5 and set(multipliers) == {1, 2, 4}  # 32, 16 and 8 px patches
    assert trained["patch"]["images_seen"] == batch * sum(multipliers)
    for run, extra in (("patch", 2), ("edm", 0)):
        config = json.loads((tmp_path / "models" / run / "config.json").read_text())
        kwargs = config["model_kwargs"]
        assert (kwargs["num_classes"], kwargs["input_size"], kwargs.get("extra_in_channels", 0)) == (None, 32, extra)
        assert kwargs["dropout"] == 0.05
        sets = [np.load(tmp_path / "samples" / run / f"{name}.npz")["images"]
                for name in ("final", "final-set1", "final-set2")]
        assert all(s.shape == (4, 32, 32, 3) and s.dtype == np.uint8 for s in sets)
        assert not np.array_equal(sets[0], sets[1]) and not np.array_equal(sets[1], sets[2])  # own seeds
    metrics = json.loads((tmp_path / "metrics" / "patch_celeba64" / "patch.json").read_text())
    assert len(metrics["fid_seed_sets"]) == 3 and metrics["num_samples"] == 4
    assert metrics["fid"] == metrics["fid_seed_sets"][0] and metrics["fid_min"] == min(metrics["fid_seed_sets"])
    assert (metrics["sampling"]["sampler"], metrics["sampling"]["sample_steps"]) == ("heun", 3)
    assert metrics["train"]["images_seen"] == trained["patch"]["images_seen"]


def test_patch_afhqv2wild64_prepares_only_the_wild_images(tmp_path, monkeypatch):
    """The profile's data section on the afhq_v2 layout: one class, `wild`, train and test kept apart."""
    from fixtures_real import AFHQ_COUNTS, build_afhq

    from diffrepro.stages.prepare import stage as prepare_stage

    params = compose("patch_afhqv2wild64", conf_dir=CONF)
    build_afhq(tmp_path / "data" / "raw")
    monkeypatch.chdir(tmp_path)  # the stage itself: the CLI would first ask for the profile's weight files
    prepare_stage(params)
    prepared = tmp_path / "data" / "prepared"
    assert [c["name"] for c in json.loads((prepared / "classes.json").read_text())["classes"]] == ["wild"]
    report = json.loads((prepared / "prepare_report.json").read_text())
    assert report["split_sizes"] == {split: counts["wild"] for split, counts in AFHQ_COUNTS.items()}
    assert params["data"]["heldout_split"] in report["split_sizes"]
