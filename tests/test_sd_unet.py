"""SD v1.4 UNet: exact size, local loading, class prompts, the training loss the generic loop
computes for it and the PNDM sampler the generic sampling stage uses, at toy size."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_sd import tiny_sd_components

from diffrepro.diffusion.gaussian import GaussianDiffusion, guided_model_fn, make_betas
from diffrepro.diffusion.pndm import pndm_sample
from diffrepro.errors import UserError
from diffrepro.models.info import count_params
from diffrepro.models.registry import build_model
from diffrepro.models.sd_unet import (SD_V14_SCHEDULER_CONFIG, SDUNet, class_prompts, encode_prompts,
                                      imagenet_prompts, prompt_table, tokenize)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return tiny_sd_components(seed=0)


@pytest.fixture(scope="module")
def sd_folder(tiny, tmp_path_factory):
    """A local folder laid out like CompVis/stable-diffusion-v1-4, holding the tiny components."""
    root = tmp_path_factory.mktemp("sd-v1-4")
    for name in ("vae", "text_encoder", "tokenizer", "unet"):
        getattr(tiny, name).save_pretrained(root / name)
    return root


def test_sd_v14_unet_has_859_520_964_parameters():
    """(`python -m diffrepro info sd-v1.4-unet` is checked in test_sd_profiles.py.)"""
    with torch.device("meta"):
        model = build_model("sd-v1.4-unet", input_size=32)  # 256 px: the latent side does not change weights
    assert count_params(model) == (859_520_964, 859_520_964)
    assert (model.in_channels, model.out_channels, model.input_size) == (4, 4, 32)


def test_missing_sd_folder_names_the_path_and_where_to_get_it(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "text_encoder").mkdir()
    loaders = {"tokenizer": lambda d: prompt_table(str(d), ("tench",)),
               "unet": lambda d: build_model("sd-v1.4-unet", sd_dir=d, pretrained=True)}
    for missing, load in loaders.items():
        with pytest.raises(UserError) as err:
            load(tmp_path)
        message = str(err.value)
        assert str(tmp_path / missing) in message and "CompVis/stable-diffusion-v1-4" in message
        assert "\n" not in message
    (tmp_path / "unet").mkdir()  # present but empty: the loader's own error, as one line naming it
    with pytest.raises(UserError, match="unet.*CompVis/stable-diffusion-v1-4") as err:
        build_model("sd-v1.4-unet", sd_dir=tmp_path, pretrained=True)
    assert str(tmp_path / "unet") in str(err.value) and "\n" not in str(err.value)


def test_training_loss_is_ddpm_epsilon_mse_on_sds_schedule_with_the_class_prompt_as_context(tiny):
    """The loss the generic loop computes for an SD run (GaussianDiffusion on SD's scaled-linear
    betas, ε target, no learned variance) == the closed form; gradients reach the UNet only."""
    model = SDUNet(tiny.unet)
    prompts = ["tench, Tinca tinca", "goldfish, Carassius auratus"]
    model.set_class_prompts(tiny.text_encoder, tiny.tokenizer, prompts)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t, y = torch.tensor([3, 997]), torch.tensor([1, 0])
    diffusion = GaussianDiffusion(make_betas("scaled_linear", 1000), learn_sigma=False)
    loss = diffusion.training_losses(model, x0, t, noise=eps, model_kwargs={"y": y})["loss"].mean()
    loss.backward()
    assert all(p.grad is not None for p in tiny.unet.parameters())
    assert all(p.grad is None and not p.requires_grad for p in tiny.text_encoder.parameters())
    tiny.unet.zero_grad(set_to_none=True)

    # x_t = √ᾱ x0 + √(1−ᾱ) ε on betas linear in √β (0.00085 → 0.012), target ε, prompt y as context
    with torch.no_grad():
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        a = torch.cumprod(1 - betas, 0)[t].float().view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        context = encode_prompts(tiny.text_encoder, tiny.tokenizer, [prompts[1], prompts[0]])
        expected = (tiny.unet(x_t, t, context).sample - eps).square().mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_class_labels_select_their_prompt_and_the_null_class_is_the_empty_prompt(tiny):
    model = SDUNet(tiny.unet)
    prompts = ["tench, Tinca tinca", "goldfish, Carassius auratus", "great white shark"]
    model.set_class_prompts(tiny.text_encoder, tiny.tokenizer, prompts)
    assert model.num_classes == 3
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([10, 900])
    context = encode_prompts(tiny.text_encoder, tiny.tokenizer, [prompts[2], ""])
    with torch.no_grad():
        expected = tiny.unet(x, t, context).sample
        assert torch.allclose(model(x, t, torch.tensor([2, 3])), expected, atol=1e-6)


def test_fine_tune_starts_from_the_given_unet_weights(tiny, sd_folder):
    """The official "ft" script re-initialised the UNet it had loaded; here loading is the start."""
    given = tiny.unet.state_dict()
    state = build_model("sd-v1.4-unet", sd_dir=str(sd_folder), pretrained=True).unet.state_dict()
    assert state.keys() == given.keys()
    assert all(torch.equal(state[k], given[k]) for k in given)
    scratch = tiny_sd_components(seed=1).unet.state_dict()  # so the equality above is not vacuous
    assert not all(torch.equal(scratch[k], given[k]) for k in given)


def test_class_prompts_are_encoded_by_the_folders_tokenizer_and_text_encoder(tiny, sd_folder):
    table = prompt_table(str(sd_folder), ("crane", "tench, Tinca tinca"))
    assert torch.equal(table, encode_prompts(tiny.text_encoder, tiny.tokenizer, ["crane", "tench, Tinca tinca", ""]))
    assert not torch.equal(table[0], table[2])  # the prompts are not all encoded alike
    ids = tokenize(tiny.tokenizer, ["crane"])[0]  # character by character, padded with <|endoftext|>
    assert ids.tolist()[:7] == [0, *tiny.tokenizer.convert_tokens_to_ids(["c", "r", "a", "n", "e</w>"]), 1]


def test_imagenet_prompts_make_the_two_cranes_unique():
    names = [f"class name {i}" for i in range(1000)]
    names[134] = names[517] = "crane"
    prompts = imagenet_prompts(names)
    assert len(set(prompts)) == 1000
    assert (prompts[134], prompts[517], prompts[0]) == ("crane (class 134)", "crane (class 517)", names[0])
    assert imagenet_prompts(names, unique=False) == names


def test_class_prompts_turn_imagenet_wnids_into_their_synonym_lines(tmp_path):
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    wnids = ["n01440764", "n02012849", "n03126707"]  # tench, crane (the bird), crane (the machine)
    (prepared / "classes.json").write_text(json.dumps({"classes": [{"name": w, "super": 0} for w in wnids]}))
    words = tmp_path / "LOC_synset_mapping.txt"
    words.write_text("n01440764 tench, Tinca tinca\nn02012849 crane\nn03126707 crane\nn09999999 unused\n")
    assert class_prompts(prepared, words) == ["tench, Tinca tinca", "crane (class 1)", "crane (class 2)"]
    with pytest.raises(UserError) as err:
        class_prompts(prepared, tmp_path / "absent.txt")
    assert str(tmp_path / "absent.txt") in str(err.value) and "\n" not in str(err.value)
    words.write_text("n01440764 tench, Tinca tinca\n")
    with pytest.raises(UserError, match="no line for n02012849"):
        class_prompts(prepared, words)


def test_pndm_sampler_is_the_stable_diffusion_loop_bit_for_bit(tiny):
    """pndm_sample with the generic guided ε function == diffusers' PNDMScheduler driven as
    StableDiffusionPipeline drives it (CFG 7.5 against "", 20 steps = 21 UNet calls)."""
    from diffusers import PNDMScheduler

    model = SDUNet(tiny.unet)
    model.set_class_prompts(tiny.text_encoder, tiny.tokenizer, ["tench, Tinca tinca", "goldfish"])
    labels = torch.tensor([1, 0, 1])
    x_T = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    calls = []
    hook = tiny.unet.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            diffusion = GaussianDiffusion(make_betas("scaled_linear", 1000), learn_sigma=False)
            fn = guided_model_fn(model, labels, torch.full_like(labels, 2), 7.5, guided_channels=None)
            ours = pndm_sample(diffusion, fn, x_T, 20)

            scheduler = PNDMScheduler.from_config(SD_V14_SCHEDULER_CONFIG)
            scheduler.set_timesteps(20)
            text, empty = model.class_context[labels], model.class_context[[2, 2, 2]]
            latents = x_T * scheduler.init_noise_sigma
            for t in scheduler.timesteps:
                both = tiny.unet(torch.cat([latents] * 2), t, torch.cat([text, empty])).sample
                eps_text, eps_uncond = both.chunk(2)
                eps = eps_uncond + 7.5 * (eps_text - eps_uncond)
                latents = scheduler.step(eps, t, latents).prev_sample
    finally:
        hook.remove()
    assert calls == [6] * 21 * 2 and len(scheduler.timesteps) == 21
    assert torch.equal(ours, latents)
    with pytest.raises(UserError, match="scaled_linear"):
        pndm_sample(GaussianDiffusion(make_betas("linear", 1000), learn_sigma=False), fn, x_T, 20)
