"""DiT backbone: the paper's sizes and compute, adaLN-Zero init, fixed embeddings, conditioning."""

from __future__ import annotations

import math

import pytest
import torch

from diffrepro.errors import UserError
from diffrepro.models.dit import DiT, sincos_2d, timestep_frequencies
from diffrepro.models.info import model_info
from diffrepro.models.registry import build_model


def tiny_dit(**kwargs) -> DiT:
    torch.manual_seed(0)
    defaults = dict(input_size=8, in_channels=4, num_classes=10)
    return build_model("DiT-tiny/2", **{**defaults, **kwargs})


def randomize_zero_layers(model: DiT, std: float = 0.05) -> None:
    """Give the zero-initialised adaLN and output layers small random weights (as after training)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layers = [b.adaLN_modulation[-1] for b in model.blocks]
        layers += [model.final_layer.adaLN_modulation[-1], model.final_layer.linear]
        for layer in layers:
            layer.weight.copy_(std * torch.randn(layer.weight.shape, generator=gen))
            layer.bias.copy_(std * torch.randn(layer.bias.shape, generator=gen))


@pytest.mark.parametrize("name, params", [
    ("DiT-S/2", 32_963_360), ("DiT-B/2", 130_512_416), ("DiT-L/2", 458_102_816), ("DiT-XL/2", 675_129_632),
])
def test_dit_parameter_counts_match_the_released_models(name, params):
    assert model_info(name, num_classes=1000, image_size=256)["params"] == params


def test_dit_xl2_costs_118_6_gflops_at_256px():
    # DiT counts multiply-adds as "GFLOPs": 118.6 for XL/2 at 256 px.
    assert model_info("DiT-XL/2", num_classes=1000, image_size=256)["gmacs"] == pytest.approx(118.6, rel=0.01)


def test_image_size_in_pixels_sets_the_latent_side():
    with torch.device("meta"):
        model = build_model("DiT-XL/2", image_size=512)
    assert model.input_size == 64 and model.pos_embed.shape == (1, 1024, 1152)
    with pytest.raises(UserError):
        build_model("DiT-XL/2", image_size=250)


def test_adaln_zero_makes_the_fresh_model_output_exactly_zero():
    model = tiny_dit()
    out = model(torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([0, 3, 10]))
    assert out.shape == (3, 8, 8, 8)  # learned sigma: ε and variance channels
    assert torch.equal(out, torch.zeros_like(out))


def test_every_block_is_the_identity_at_init():
    model = tiny_dit()
    x, c = torch.randn(2, 16, 64), torch.randn(2, 64)
    for block in model.blocks:
        assert torch.equal(block(x, c), x)


def test_fixed_positional_table_matches_the_sincos_formula():
    model = tiny_dit(input_size=16)  # 8×8 grid of 64-d tokens
    table, dim, grid = model.pos_embed[0], 64, 8
    assert not model.pos_embed.requires_grad
    quarter = dim // 4
    for row, col in [(0, 0), (0, 5), (3, 1), (7, 7)]:
        token = row * grid + col
        for d in [0, 3, quarter - 1]:
            omega = 10000 ** (-d / quarter)
            assert table[token, d].item() == pytest.approx(math.sin(col * omega), abs=1e-6)
            assert table[token, quarter + d].item() == pytest.approx(math.cos(col * omega), abs=1e-6)
            assert table[token, 2 * quarter + d].item() == pytest.approx(math.sin(row * omega), abs=1e-6)
            assert table[token, 3 * quarter + d].item() == pytest.approx(math.cos(row * omega), abs=1e-6)
    assert torch.allclose(table, sincos_2d(dim, grid).float())


def test_timestep_code_is_cos_then_sin_with_max_period_10000():
    code = timestep_frequencies(torch.tensor([0.0, 37.0, 999.0]), dim=256)
    for i, t in enumerate([0.0, 37.0, 999.0]):
        for k in [0, 5, 127]:
            freq = math.exp(-math.log(10000) * k / 128)
            assert code[i, k].item() == pytest.approx(math.cos(t * freq), abs=1e-4)
            assert code[i, 128 + k].item() == pytest.approx(math.sin(t * freq), abs=1e-4)


def test_class_label_changes_the_prediction_for_the_same_noise():
    model = tiny_dit(class_embed_init_std=1.0)
    randomize_zero_layers(model)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([400])
    with torch.no_grad():
        a, a_again = model(x, t, torch.tensor([2])), model(x, t, torch.tensor([2]))
        b = model(x, t, torch.tensor([7]))
        other_noise = model(torch.randn(1, 4, 8, 8), t, torch.tensor([2]))
    assert torch.equal(a, a_again)
    # a different label moves the output by a sizeable fraction of what different noise does
    assert (a - b).norm() > 0.1 * (a - other_noise).norm()


def test_unpatchify_inverts_patchify_in_row_major_token_order():
    model = tiny_dit(learn_sigma=False)
    x = torch.randn(2, 4, 8, 8)
    tokens = model.patchify(x)
    assert torch.equal(model.unpatchify(tokens), x)
    p = 2
    for token, (row, col) in [(0, (0, 0)), (1, (0, 1)), (5, (1, 1)), (15, (3, 3))]:
        patch = x[:, :, row * p:(row + 1) * p, col * p:(col + 1) * p]  # (B, C, p, p)
        assert torch.equal(tokens[:, token], patch.permute(0, 2, 3, 1).reshape(2, -1))


def test_label_table_has_a_null_row_or_the_superclass_rows():
    assert tiny_dit(num_classes=10).y_embedder.embedding_table.num_embeddings == 11
    assert tiny_dit(num_classes=10, num_super_classes=3).y_embedder.embedding_table.num_embeddings == 13


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for flag in (False, True):
        model = tiny_dit(grad_checkpointing=flag)
        randomize_zero_layers(model)
        torch.manual_seed(3)
        out = model(torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 4]))
        out.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
