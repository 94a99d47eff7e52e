"""FineDiffusion's claims: what it trains (1.77 % of DiT-XL/2), superclass dropout and guidance,
delta storage, and fine-tuning from a base DiT's weights; plus the BitFit / DiffFit baselines."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from diffrepro.errors import UserError
from diffrepro.methods import get_method
from diffrepro.methods.finediffusion import load_base_state
from diffrepro.models.info import model_info
from diffrepro.models.registry import build_model

NUM_CLASSES, NUM_SUPER = 10, 3


def tiny_dit(seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    params = dict(input_size=8, in_channels=4, num_classes=NUM_CLASSES, class_embed_init_std=1.0)
    return build_model("DiT-tiny/2", **{**params, **kwargs})


def tiny_finediffusion(seed: int = 0):
    model = tiny_dit(seed, num_super_classes=NUM_SUPER, affine_norms=True)
    get_method("finediffusion").configure_model(model)
    return model


def randomize(model, seed: int = 1) -> None:
    """Small random values everywhere except the fixed positional table (a 'pretrained' model)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                is_scale = ("norm" in name and name.endswith(".weight")) or ".gamma_" in name
                p.copy_(0.1 * torch.randn(p.shape, generator=gen) + (1.0 if is_scale else 0.0))


def inputs(batch: int = 4, seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
    return x, t, y


def test_finediffusion_trains_1_77_percent_of_dit_xl2():
    info = model_info("DiT-XL/2", method="finediffusion", num_classes=10000, num_super_classes=11,
                      image_size=256, affine_norms=True)
    hidden, depth, patch_out = 1152, 28, 2 * 2 * 8
    table = (10000 + 11) * hidden
    block_biases = 3 * hidden + hidden + 4 * hidden + hidden + 6 * hidden  # qkv, proj, fc1, fc2, adaLN
    block_norms = 2 * 2 * hidden  # norm1, norm2: γ and β
    outside = hidden + 2 * hidden + 2 * hidden + patch_out + 2 * hidden  # patch, t-MLP, final adaLN, linear, LN
    assert info["trainable"] == table + depth * (block_biases + block_norms) + outside == 12_153_632
    assert info["params"] == 685_640_480
    assert round(100 * info["trainable"] / info["params"], 2) == 1.77


def test_bitfit_trains_biases_and_the_new_class_table():
    info = model_info("DiT-XL/2", method="bitfit", num_classes=10000, image_size=256)
    hidden = 1152
    biases = 28 * 15 * hidden + hidden + 2 * hidden + 2 * hidden + 32
    assert info["trainable"] == 10001 * hidden + biases
    model = tiny_dit()
    get_method("bitfit").configure_model(model)
    for name, p in model.named_parameters():
        assert p.requires_grad == (name.endswith(".bias") or name == "y_embedder.embedding_table.weight"), name


def test_difffit_adds_one_scale_per_channel_per_branch_and_trains_it():
    hidden = 1152
    plain = model_info("DiT-XL/2", method="bitfit", num_classes=10000, image_size=256)
    scaled = model_info("DiT-XL/2", method="difffit", num_classes=10000, image_size=256, block_scales=True)
    assert scaled["params"] - plain["params"] == 28 * 2 * hidden
    assert scaled["trainable"] - plain["trainable"] == 28 * 2 * hidden
    model = tiny_dit(block_scales=True)
    get_method("difffit").configure_model(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {f"blocks.{i}.gamma_{b}" for i in range(2) for b in ("msa", "mlp")} <= trainable
    assert all(torch.equal(b.gamma_msa, torch.ones(64)) and torch.equal(b.gamma_mlp, torch.ones(64))
               for b in model.blocks)
    assert not any(n.endswith(".weight") and "embedding_table" not in n for n in trainable)
    with pytest.raises(UserError):
        get_method("difffit").configure_model(tiny_dit())


def test_scale_factors_multiply_the_residual_branches():
    scaled, plain = tiny_dit(block_scales=True), tiny_dit()
    randomize(scaled)
    plain.load_state_dict(scaled.state_dict(), strict=False)
    x, c = torch.randn(2, 16, 64), torch.randn(2, 64)
    with torch.no_grad():
        scaled.blocks[0].gamma_msa.fill_(1.0)
        scaled.blocks[0].gamma_mlp.fill_(1.0)
        assert torch.equal(scaled.blocks[0](x, c), plain.blocks[0](x, c))  # γ = 1: DiT's block
        assert not torch.equal(scaled.blocks[0](x, c), x)
        scaled.blocks[0].gamma_msa.zero_()
        scaled.blocks[0].gamma_mlp.zero_()
        assert torch.equal(scaled.blocks[0](x, c), x)  # γ = 0: both branches switched off


def test_frozen_weights_get_no_gradient_and_stay_out_of_the_optimizer():
    model = tiny_finediffusion()
    randomize(model)
    get_method("finediffusion").configure_model(model)
    x, t, y = inputs()
    model(x, t, y).square().mean().backward()
    for name, p in model.named_parameters():
        trainable = name != "pos_embed" and ("embedding_table" in name or "bias" in name or "norm" in name)
        assert p.requires_grad == trainable, name
        assert (p.grad is not None) == trainable, name
    groups = get_method("finediffusion").param_groups(model, weight_decay=0.0)
    in_optimizer = {id(p) for g in groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}


def test_superclass_dropout_maps_to_superclass_rows_and_leaves_labels_untouched():
    method = get_method("finediffusion", class_dropout=0.5)
    model = tiny_finediffusion()
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9] * 10)
    supers = labels % NUM_SUPER
    labels_before, supers_before = labels.clone(), supers.clone()
    dropped = method.training_labels(labels, supers, torch.Generator().manual_seed(7), model)
    mask = torch.rand(labels.shape, generator=torch.Generator().manual_seed(7)) < 0.5
    assert 20 < mask.sum() < 80
    assert torch.equal(dropped[mask], NUM_CLASSES + supers[mask])
    assert torch.equal(dropped[~mask], labels[~mask])
    assert torch.equal(labels, labels_before) and torch.equal(supers, supers_before)


def test_superclass_guidance_equals_the_hand_formula():
    method = get_method("finediffusion")
    model = tiny_finediffusion()
    randomize(model)
    x, t, _ = inputs(3)
    y, s, w = torch.tensor([1, 4, 9]), torch.tensor([2, 0, 1]), 3.0
    guide = method.guidance_labels(y, s, model)
    with torch.no_grad():
        batched = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, guide]))
        eps_fine, eps_super = batched.chunk(2)
        guided = eps_super + w * (eps_fine - eps_super)
        rows = torch.tensor([NUM_CLASSES + 2, NUM_CLASSES + 0, NUM_CLASSES + 1])
        by_hand_super = model(x, t, rows)
        by_hand = by_hand_super + w * (model(x, t, y) - by_hand_super)
    assert torch.allclose(guided, by_hand, atol=1e-5)
    null_guided = get_method("full_finetune").guidance_labels(y, s, tiny_dit())
    assert torch.equal(null_guided, torch.full_like(y, NUM_CLASSES))


def test_finediffusion_needs_superclass_rows():
    with pytest.raises(UserError):
        get_method("finediffusion").configure_model(tiny_dit(affine_norms=True))


def test_stored_delta_reassembles_the_finetuned_model_exactly(tmp_path):
    """The training stage's weight files for a PEFT run (train._save_weights: trained tensors only)
    rebuilt on the base run by runs.load_trained, as the sample stage does."""
    from safetensors.torch import load_file, save_file

    from diffrepro.runs import load_trained
    from diffrepro.stages.train import _save_weights

    base_kwargs = dict(input_size=8, in_channels=4, num_classes=NUM_CLASSES, class_embed_init_std=1.0)
    fine_kwargs = dict(base_kwargs, num_super_classes=NUM_SUPER, affine_norms=True)
    base = tiny_dit()  # the pretrain run: an 11-row class table, no LayerNorm affines
    randomize(base)
    base_dir, fine_dir = tmp_path / "pretrain", tmp_path / "finediffusion"
    base_dir.mkdir()
    for which in ("ema", "model"):
        save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(base_dir / f"{which}.safetensors"))
    (base_dir / "config.json").write_text(json.dumps(
        {"model": "DiT-tiny/2", "model_kwargs": base_kwargs, "diffusion": "gaussian", "delta_of": None}))

    model = tiny_finediffusion()
    fitting = {k: v for k, v in base.state_dict().items() if v.shape == model.state_dict()[k].shape}
    model.load_state_dict(fitting, strict=False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(3):
        x, t, y = inputs(seed=step)
        optimizer.zero_grad()
        model(x, t, y).square().mean().backward()
        optimizer.step()
    x, t, y = inputs(seed=99)
    with torch.no_grad():
        finetuned = model(x, t, y)
    fine_dir.mkdir()
    _save_weights(SimpleNamespace(net=model, ema=model, delta_of=str(base_dir)), fine_dir)
    config = {"model": "DiT-tiny/2", "model_kwargs": fine_kwargs, "diffusion": "gaussian", "delta_of": str(base_dir)}
    (fine_dir / "config.json").write_text(json.dumps(config))

    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    for which in ("ema", "model"):
        stored = load_file(str(fine_dir / f"{which}.safetensors"))
        assert set(stored) == trained and len(trained) < len(model.state_dict())
        rebuilt, _ = load_trained(fine_dir, which)
        with torch.no_grad():
            assert torch.equal(rebuilt(x, t, y), finetuned)
    fresh = tiny_finediffusion(seed=123)  # without the delta the model is another one
    fresh.load_state_dict(fitting, strict=False)
    with torch.no_grad():
        assert not torch.equal(fresh(x, t, y), finetuned)

    config["model_kwargs"]["num_super_classes"] = NUM_SUPER + 2  # a 15-row table ≠ the 13-row delta
    (fine_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="does not fit"):
        load_trained(fine_dir)


OFFICIAL_KEYS_TWO_BLOCKS = {
    "pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias",
    "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
    "y_embedder.embedding_table.weight",
    *(f"blocks.{i}.{m}.{w}" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2",
                                                        "adaLN_modulation.1") for w in ("weight", "bias")),
    "final_layer.linear.weight", "final_layer.linear.bias",
    "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias",
}


def test_a_base_dit_loads_under_a_fine_tuning_variant_with_its_class_table_discarded():
    pretrained = tiny_dit(num_classes=7)  # a "pretrained" vanilla DiT on other classes
    randomize(pretrained, seed=11)
    assert set(pretrained.state_dict()) == OFFICIAL_KEYS_TWO_BLOCKS

    model = tiny_dit(seed=4, num_super_classes=NUM_SUPER, affine_norms=True, block_scales=True)
    table_before = model.y_embedder.embedding_table.weight.clone()
    fresh = load_base_state(model, pretrained.state_dict(), "models/pretrain/ema.safetensors")
    assert set(fresh) == {"y_embedder.embedding_table.weight", "final_layer.norm_final.weight",
                          "final_layer.norm_final.bias"} | {
        f"blocks.{i}.{n}" for i in range(2) for n in ("norm1.weight", "norm1.bias", "norm2.weight",
                                                       "norm2.bias", "gamma_msa", "gamma_mlp")}
    loaded = model.state_dict()
    for key, value in pretrained.state_dict().items():
        if key != "y_embedder.embedding_table.weight":
            assert torch.equal(loaded[key], value), key
    assert torch.equal(model.y_embedder.embedding_table.weight, table_before)
    assert torch.equal(model.blocks[1].norm2.weight, torch.ones(64))


def test_a_base_of_another_size_or_with_tensors_missing_is_refused():
    other_width = build_model("DiT-mini/2", input_size=8, num_classes=NUM_CLASSES)
    with pytest.raises(UserError, match="mini/ema.safetensors does not fit this DiT"):
        load_base_state(tiny_dit(), other_width.state_dict(), "models/mini/ema.safetensors")
    state = tiny_dit().state_dict()
    del state["blocks.0.attn.qkv.weight"]
    with pytest.raises(UserError, match="blocks.0.attn.qkv.weight"):
        load_base_state(tiny_dit(), state, "models/partial/ema.safetensors")
