"""Immiscible Diffusion's SD profiles: the official recipe, twin arms that differ only in the noise
assignment, and the same profile structure driven through the generic stages at toy size (tiny SD
components in an SD v1.4 folder layout, the ImageNet folder fixture)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffrepro.config import run_params
from diffrepro.profiles import compose
from params_util import recompose

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SD_DIR = "models/stable-diffusion-v1-4"
# docs/papers/immiscible.md §4 (Linear_Assignment-stable_diffusion/train_{scratch,ft}.sh, the
# diffusers train_text_to_image defaults they keep, generate.py); bf16 is this repo's choice (official fp16).
COMMON_RECIPE = {"model": "sd-v1.4-unet", "method": "dit", "method_kwargs": {"class_dropout": 0.0},
                 "diffusion": "gaussian", "schedule": "scaled_linear", "space": "latent", "split": "train",
                 "init_from": "data/latents", "betas": [0.9, 0.999], "weight_decay": 0.01, "warmup_steps": 0,
                 "ema_decay": 0.9999, "ema_warmup": True, "grad_clip": 1.0, "bf16": True,
                 "checkpoint_every": 2500, "sampler": "pndm", "sample_steps": 20, "guidance_scale": 7.5,
                 "guidance_schedule": "constant", "guidance_power": 1.0, "guided_channels": None}
OFFICIAL_RECIPE = {
    "scratch": {**COMMON_RECIPE, "batch_size": 2048, "steps": 20_000, "lr": 1e-4},  # 8 GPUs x 256
    "finetune": {**COMMON_RECIPE, "batch_size": 512, "steps": 5_000, "lr": 1e-5},  # 4 GPUs x 128
}
PROFILES = {"immiscible_sd_scratch": ("scratch", ["vanilla", "immiscible"]),  # vanilla_sd_* + the immiscible arm
            "immiscible_sd_finetune": ("finetune", ["vanilla", "immiscible"]),
            "vanilla_sd_scratch": ("scratch", ["vanilla"]),
            "vanilla_sd_finetune": ("finetune", ["vanilla"])}
WORDS = {"n01440764": "tench, Tinca tinca", "n01443537": "goldfish, Carassius auratus",
         "n01484850": "great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias"}
TOY_UNET = {"block_out_channels": [8, 16, 32, 32], "norm_num_groups": 4, "attention_head_dim": 2,
            "cross_attention_dim": 16}  # tiny_sd_components' UNet, for the scratch arms


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("profile", PROFILES)
def test_sd_profile_runs_are_the_official_recipe(profile):
    params = compose(profile, conf_dir=CONF)
    setting, arms = PROFILES[profile]
    assert list(params["runs"]) == arms
    for run in params["runs"].values():
        assert {key: run[key] for key in OFFICIAL_RECIPE[setting]} == OFFICIAL_RECIPE[setting]
        assert run["model_kwargs"] == {"sd_dir": SD_DIR, "pretrained": setting == "finetune",
                                       "classes_dir": "data/prepared", "gradient_checkpointing": True,
                                       "synset_words": "data/raw/LOC_synset_mapping.txt"}
    assert [run["assignment"] for run in params["runs"].values()] == \
        (["none", "lsa_global"] if "immiscible" in arms else ["none"])
    assert (params["data"]["dataset"], params["data"]["image_size"]) == ("imagenet", 256)
    assert params["autoencoder"] == {**params["autoencoder"], "kind": "sd_vae", "path": f"{SD_DIR}/vae"}
    assert params["features"]["kind"] == "inception"
    assert params["sample"]["per_class"] * 1000 == 50_000  # ImageNet-1k: exactly 50,000 samples


def test_the_two_arms_differ_only_in_the_noise_assignment():
    for setting in ("scratch", "finetune"):
        runs = compose(f"immiscible_sd_{setting}", conf_dir=CONF)["runs"]
        differing = {key for key in runs["immiscible"] if runs["immiscible"][key] != runs["vanilla"][key]}
        assert differing == {"assignment"}
        assert runs["vanilla"] == compose(f"vanilla_sd_{setting}", conf_dir=CONF)["runs"]["vanilla"]


def test_info_gives_sd_v14_unets_859_520_964_parameters(capsys):
    from diffrepro.cli import main

    main(["info", "sd-v1.4-unet"])
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["params"] == info["trainable"] == 859_520_964


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Both SD profiles' runs at toy size in one repo folder: the fine-tune arms (`immiscible`,
    `vanilla`) and the scratch arms (`immiscible_scratch`, `vanilla_scratch`) with the tiny UNet's
    config as overrides; data through the prepare, autoencoder (sd_vae) and latents stages."""
    from fixtures_real import build_imagenet_tree
    from tiny_sd import tiny_sd_components

    from diffrepro.stages.extract_latents import stage as extract_latents_stage
    from diffrepro.stages.prepare import stage as prepare_stage
    from diffrepro.stages.autoencoder import stage as autoencoder_stage

    work = tmp_path_factory.mktemp("sd_profile")
    params = compose("immiscible_sd_finetune", conf_dir=CONF)
    scratch = compose("immiscible_sd_scratch", conf_dir=CONF)
    per_run = ("runs", "train_runs", "sample_runs", "profile", "report")
    assert {k: v for k, v in scratch.items() if k not in per_run} == {k: v for k, v in params.items() if k not in per_run}
    params["runs"].update({f"{name}_scratch": run for name, run in scratch["runs"].items()})
    params["data"]["image_size"] = 16
    params["sample"].update(per_class=1, batch_size=8)
    for name, run in params["runs"].items():
        run.update(steps=2, batch_size=4, bf16=False)
        if name.endswith("_scratch"):
            run["model_kwargs"].update(TOY_UNET)
    recompose(params)
    tiny = tiny_sd_components(seed=1)  # the "released" weights; the runs' own init draws from seed 0
    for part in ("vae", "text_encoder", "tokenizer", "unet"):
        getattr(tiny, part).save_pretrained(work / SD_DIR / part)
    build_imagenet_tree(work / "data" / "raw")
    (work / "data" / "raw" / "LOC_synset_mapping.txt").write_text(
        "".join(f"{wnid} {words}\n" for wnid, words in WORDS.items()))
    with contextlib.chdir(work):
        for stage in (prepare_stage, autoencoder_stage, extract_latents_stage):
            stage(params)
    return work, params, tiny


def _trainer(workspace, run):
    from accelerate import Accelerator

    from diffrepro.training import Trainer

    work, params, _ = workspace
    with contextlib.chdir(work):
        return Trainer(params, run, Accelerator(cpu=True))


def test_prompt_table_has_one_row_per_class_and_the_empty_prompt_as_null_row(workspace):
    from diffrepro.models.sd_unet import encode_prompts

    _, _, tiny = workspace
    model = _trainer(workspace, "immiscible").model
    expected = encode_prompts(tiny.text_encoder, tiny.tokenizer, [*WORDS.values(), ""])
    assert model.num_classes == 3 and model.class_context.shape == (4, 16, 16)
    assert torch.allclose(model.class_context, expected, atol=1e-6)
    assert torch.allclose(model.class_context[3], encode_prompts(tiny.text_encoder, tiny.tokenizer, [""])[0],
                          atol=1e-6)


def test_fine_tune_arms_start_from_the_sd_folders_unet_and_scratch_arms_do_not(workspace):
    _, _, tiny = workspace
    given = tiny.unet.state_dict()
    for run in ("immiscible", "vanilla"):
        trainer = _trainer(workspace, run)
        for module in (trainer.model, trainer.ema):
            state = module.unet.state_dict()
            assert state.keys() == given.keys() and all(torch.equal(state[k], given[k]) for k in given)
    scratch = _trainer(workspace, "immiscible_scratch").model.unet.state_dict()
    assert scratch.keys() == given.keys()
    assert not any(torch.equal(scratch[k], given[k]) for k in given if given[k].ndim > 1)  # conv/linear


def test_immiscible_arm_pairs_the_twins_noise_by_assignment(workspace):
    from diffrepro.methods.immiscible import mean_pair_distance

    immiscible, vanilla = _trainer(workspace, "immiscible"), _trainer(workspace, "vanilla")
    for step in range(3):
        x0, labels, t, noise, _ = immiscible.on_device(immiscible.draw(step))
        x0_v, labels_v, t_v, drawn, _ = vanilla.on_device(vanilla.draw(step))
        assert torch.equal(x0, x0_v) and torch.equal(labels, labels_v) and torch.equal(t, t_v)
        match = (noise.flatten(1)[:, None] == drawn.flatten(1)[None]).all(-1)  # row i of noise = row j of drawn
        assert match.sum(0).tolist() == match.sum(1).tolist() == [1] * len(x0)  # a permutation
        assert mean_pair_distance(x0, noise) <= mean_pair_distance(x0, drawn)


def test_generic_training_loss_is_sds_ddpm_epsilon_objective(workspace):
    """The Trainer's loss == diffusers' DDPMScheduler (SD v1.4 config) add_noise + ε MSE, with the
    class prompts' embeddings as the UNet's text context."""
    from diffusers import DDPMScheduler

    from diffrepro.models.sd_unet import SD_V14_SCHEDULER_CONFIG

    trainer = _trainer(workspace, "immiscible_scratch")
    x0, labels, t, noise, extra = trainer.on_device(trainer.draw(0))
    loss = trainer.loss(x0, labels, t, noise, extra)
    unet, context = trainer.model.unet, trainer.model.class_context
    with torch.no_grad():
        noisy = DDPMScheduler.from_config(SD_V14_SCHEDULER_CONFIG).add_noise(x0, noise, t)
        expected = F.mse_loss(unet(noisy, t, context[labels]).sample, noise)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_trained_arms_sample_with_pndm_as_the_stable_diffusion_pipeline_does(workspace):
    """train@RUN for both arms, then the sampling stage's RunSampler (PNDM 20 steps, CFG 7.5 against
    the null class = "") gives the images of diffusers' StableDiffusionPipeline run on the trained
    EMA UNet with the class prompts and the same x_T (within one uint8 level)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from diffrepro.models.autoencoder import load_autoencoder
    from diffrepro.models.sd_unet import SD_V14_SCHEDULER_CONFIG, imagenet_prompts
    from diffrepro.runs import load_trained
    from diffrepro.sampling import RunSampler
    from diffrepro.stages.train import stage as train_stage

    work, params, tiny = workspace
    with contextlib.chdir(work):
        for run in ("immiscible", "vanilla"):
            train_stage(params, run)
        model, config = load_trained("models/immiscible")
        vae = load_autoencoder("models/autoencoder")
    assert json.loads((work / "models" / "vanilla" / "train_metrics.json").read_text())["steps"] == 2
    assert config["model_kwargs"]["num_classes"] == 3 and model.num_classes == 3
    assert not all(torch.equal(a, b) for a, b in zip(model.unet.parameters(), tiny.unet.parameters()))

    cfg = run_params(params, "immiscible")
    sampler = RunSampler(model, config, cfg, params["seed"] + cfg["seed"], vae, where="runs.immiscible")
    labels, indices = np.array([0, 1, 2]), np.arange(3)
    images = sampler(labels, np.zeros(3, np.int64), indices)

    x_T = torch.stack([torch.randn(4, 8, 8, generator=g) for g in sampler.generators(indices)])
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=model.unet,
                                   scheduler=PNDMScheduler.from_config(SD_V14_SCHEDULER_CONFIG),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(imagenet_prompts(list(WORDS.values())), height=16, width=16, num_inference_steps=20,
                     guidance_scale=7.5, latents=x_T, output_type="pt").images  # [0, 1]
    reference = (255 * reference + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
    assert np.abs(images.astype(int) - reference.astype(int)).max() <= 1
    assert images.std() > 0
