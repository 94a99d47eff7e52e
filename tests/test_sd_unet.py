"""SD v1.4 UNet: exact size, local loading, the official training step and sampler at toy size."""

from __future__ import annotations

import pytest
import torch

from diffrepro.errors import UserError
from diffrepro.methods.immiscible import NoiseAssigner
from diffrepro.models.info import model_info
from diffrepro.models.registry import build_model
from diffrepro.models.sd_unet import (SDUNet, encode_prompts, generate_images, imagenet_prompts,
                                      load_sd_components, sd_noise_scheduler, sd_training_loss,
                                      tiny_sd_components, tokenize)


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
    info = model_info("sd-v1.4-unet")
    assert info["params"] == 859_520_964 == info["trainable"]
    with torch.device("meta"):
        model = build_model("sd-v1.4-unet")
    assert (model.in_channels, model.out_channels, model.input_size) == (4, 4, 64)


def test_missing_sd_folder_names_the_path_and_where_to_get_it(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "text_encoder").mkdir()
    loaders = {"tokenizer": load_sd_components,
               "unet": lambda d: build_model("sd-v1.4-unet", pretrained=d)}
    for missing, load in loaders.items():
        with pytest.raises(UserError) as err:
            load(tmp_path)
        message = str(err.value)
        assert str(tmp_path / missing) in message and "CompVis/stable-diffusion-v1-4" in message
        assert "\n" not in message
    (tmp_path / "unet").mkdir()  # present but empty: the loader's own error, as one line naming it
    with pytest.raises(UserError, match="unet.*CompVis/stable-diffusion-v1-4") as err:
        build_model("sd-v1.4-unet", pretrained=tmp_path)
    assert str(tmp_path / "unet") in str(err.value) and "\n" not in str(err.value)


def test_training_step_is_ddpm_epsilon_mse_and_leaves_the_frozen_encoders_without_grads(tiny):
    model = SDUNet(tiny.unet)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ids = tokenize(tiny.tokenizer, ["tench, Tinca tinca", "goldfish, Carassius auratus"])
    loss = sd_training_loss(model, tiny, images, ids, sd_noise_scheduler(), NoiseAssigner("none"),
                            torch.Generator().manual_seed(2))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad
               for p in [*tiny.vae.parameters(), *tiny.text_encoder.parameters()])
    assert all(p.grad is not None for p in tiny.unet.parameters())
    tiny.unet.zero_grad(set_to_none=True)

    # the same objective from the closed form: scaled-linear betas, x_t = √ᾱ x0 + √(1−ᾱ) ε, target ε,
    # with the random draws in the order the step makes them (posterior sample, noise, t)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        posterior = tiny.vae.encode(images).latent_dist
        z = torch.randn(posterior.mean.shape, generator=g)
        x0 = (posterior.mean + posterior.std * z) * 0.18215
        eps = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (2,), generator=g)
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        alpha_bar = torch.cumprod(1 - betas, 0)
        a = alpha_bar[t].float().view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        context = tiny.text_encoder(ids)[0]
        expected = (tiny.unet(x_t, t, context).sample - eps).square().mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


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


def test_pndm_generation_runs_guided_steps_and_returns_images(tiny):
    calls = []
    hook = tiny.unet.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    try:
        images = generate_images(tiny, ["tench", "goldfish"], num_inference_steps=2, height=16, width=16,
                                 generator=torch.Generator().manual_seed(4))
    finally:
        hook.remove()
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    # PLMS (PNDM with skip_prk_steps) evaluates its first timestep twice: 2 steps → 3 UNet calls,
    # each on the conditional and the "" batch together (classifier-free guidance)
    assert calls == [4, 4, 4]


def test_fine_tune_starts_from_the_given_unet_weights(tiny, sd_folder):
    """The official "ft" script re-initialised the UNet it had loaded; here loading is the start."""
    given = tiny.unet.state_dict()
    finetuned = build_model("sd-v1.4-unet", pretrained=str(sd_folder))
    loaded = load_sd_components(sd_folder)
    for state in (finetuned.unet.state_dict(), loaded.unet.state_dict()):
        assert state.keys() == given.keys()
        assert all(torch.equal(state[k], given[k]) for k in given)
    scratch = tiny_sd_components(seed=1).unet.state_dict()  # so the equality above is not vacuous
    assert not all(torch.equal(scratch[k], given[k]) for k in given)
    assert not any(p.requires_grad for p in loaded.vae.parameters())
    assert torch.equal(tokenize(loaded.tokenizer, ["crane"]), tokenize(tiny.tokenizer, ["crane"]))


def test_imagenet_prompts_make_the_two_cranes_unique():
    names = [f"class name {i}" for i in range(1000)]
    names[134] = names[517] = "crane"
    prompts = imagenet_prompts(names)
    assert len(set(prompts)) == 1000
    assert (prompts[134], prompts[517], prompts[0]) == ("crane (class 134)", "crane (class 517)", names[0])
    assert imagenet_prompts(names, unique=False) == names
