"""Strict loaders for the released DiT, DiMR, FineDiffusion and Patch Diffusion checkpoints, the
table through which a run adopts one (`adopt_release`), and the restricted unpickler that reads
EDM-style pickles.

Each format is tested at a tiny configuration. A model with random weights is written in the
official layout and saved the way the official code saves it. It is then loaded into a fresh
model, and both must give the same forward pass. The layout gets three independent checks:
- its key set and shapes are compared against an enumeration written here from the official
  constructors;
- a few name pairs are checked by hand;
- the converted tensors are checked against the official semantics: TD-LN, the position table,
  attention channel order and the noise embedding.
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import math
import os
import pickle
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffrepro.diffusion.edm import EDMDenoiser
from diffrepro.errors import UserError
from diffrepro.models import official_weights as ow
from diffrepro.models.dimr import ConvNeXtStage, DiMR, TransformerStage
from diffrepro.models.dit import DiT
from diffrepro.models.edm_unets import DhariwalUNet, SongUNet
from diffrepro.models.registry import build_model
from diffrepro.safe_unpickle import PickledObject, load_pickle, module_state_dict

FIR = torch.full((1, 1, 2, 2), 0.25)
TD_LEAVES = ("param0", "param1", "nodecay_weight", "nodecay_bias")


def randomize(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Random values everywhere (the zero-initialised layers too), so every tensor shapes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


# --- tiny models --------------------------------------------------------------------------------------

def tiny_dit() -> DiT:
    return DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=20).eval()


def tiny_finediffusion() -> DiT:
    return DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
               num_classes=20, num_super_classes=3, affine_norms=True).eval()


def tiny_dimr() -> DiMR:
    return DiMR(8, 4, 10, TransformerStage(dim=32, depth=3, num_heads=2), (ConvNeXtStage(dim=16, depth=3),)).eval()


def tiny_ddpmpp() -> EDMDenoiser:
    return EDMDenoiser(SongUNet(input_size=16, in_channels=3, extra_in_channels=2, model_channels=32,
                                channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), dropout=0.0)).eval()


def tiny_adm() -> EDMDenoiser:
    # 64 channels per head: the 128-channel level attends with 2 heads.
    return EDMDenoiser(DhariwalUNet(input_size=8, in_channels=4, extra_in_channels=2, num_classes=5, model_channels=64,
                                    channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), dropout=0.0)).eval()


# --- official key sets, enumerated from the official constructors -------------------------------------

def official_dit_shapes(depth=2, hidden=32, channels=4, patch=2, grid=4, rows=21, affine=False) -> dict:
    """facebookresearch/DiT models.py: LayerNorms without parameters and a class table of classes + 1
    (the null row) rows. FineDiffusion's models.py (`affine`) gives the LayerNorms their γ and β."""
    norms = {}

    def norm(prefix):
        if affine:
            norms.update({f"{prefix}.weight": (hidden,), f"{prefix}.bias": (hidden,)})

    shapes = {"pos_embed": (1, grid * grid, hidden), "x_embedder.proj.weight": (hidden, channels, patch, patch),
              "x_embedder.proj.bias": (hidden,), "t_embedder.mlp.0.weight": (hidden, 256),
              "t_embedder.mlp.0.bias": (hidden,), "t_embedder.mlp.2.weight": (hidden, hidden),
              "t_embedder.mlp.2.bias": (hidden,), "y_embedder.embedding_table.weight": (rows, hidden)}
    for n in range(depth):
        b = f"blocks.{n}"
        norm(f"{b}.norm1")
        norm(f"{b}.norm2")
        shapes.update({f"{b}.attn.qkv.weight": (3 * hidden, hidden), f"{b}.attn.qkv.bias": (3 * hidden,),
                       f"{b}.attn.proj.weight": (hidden, hidden), f"{b}.attn.proj.bias": (hidden,),
                       f"{b}.mlp.fc1.weight": (4 * hidden, hidden), f"{b}.mlp.fc1.bias": (4 * hidden,),
                       f"{b}.mlp.fc2.weight": (hidden, 4 * hidden), f"{b}.mlp.fc2.bias": (hidden,),
                       f"{b}.adaLN_modulation.1.weight": (6 * hidden, hidden),
                       f"{b}.adaLN_modulation.1.bias": (6 * hidden,)})
    norm("final_layer.norm_final")
    out = patch * patch * 2 * channels
    shapes.update({"final_layer.linear.weight": (out, hidden), "final_layer.linear.bias": (out,),
                   "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
                   "final_layer.adaLN_modulation.1.bias": (2 * hidden,)})
    return {**shapes, **norms}


def official_finediffusion_shapes(depth=2, hidden=32, channels=4, patch=2, grid=4, rows=23) -> dict:
    """FineDiffusion models.py: DiT with affine LayerNorms and a (classes + superclasses)-row table."""
    return official_dit_shapes(depth, hidden, channels, patch, grid, rows, affine=True)


def official_dimr_shapes(d1=32, depth1=3, grid1=4, d2=16, depth2=3, grid2=8, channels=4, class_rows=11) -> dict:
    """qihao067/DiMR MRModel with a Transformer stage then a ConvNeXt stage (libs/core/blocks.py)."""
    shapes = {}

    def td(prefix, size):  # a TimeDependentParameter
        shapes.update({f"{prefix}.{leaf}": (size,) for leaf in TD_LEAVES})

    def linear(prefix, out, inp, bias=True):
        shapes[f"{prefix}.weight"] = (out, inp)
        if bias:
            shapes[f"{prefix}.bias"] = (out,)

    def stage(s, dim, depth, grid, patch, transformer):
        shapes[f"{s}.input_layer.1.weight"] = (dim, channels, patch, patch)
        shapes[f"{s}.input_layer.1.bias"] = (dim,)
        shapes[f"{s}.input_layer.3.position_embeddings.weight"] = (grid * grid, dim)
        for n in range(depth):
            b = f"{s}.blocks.{n}"
            if transformer:
                td(f"{b}.block1.norm.scale", dim)
                linear(f"{b}.block1.query_key_value", 3 * dim, dim, bias=False)
                linear(f"{b}.block1.dense", dim, dim)
            else:
                shapes[f"{b}.block1.1.weight"] = (dim, 1, 7, 7)
                shapes[f"{b}.block1.1.bias"] = (dim,)
            td(f"{b}.block2.norm.scale", dim)
            linear(f"{b}.block2.w0", 2 * dim, dim)
            linear(f"{b}.block2.w1", 2 * dim, dim)
            linear(f"{b}.block2.w2", dim, 2 * dim)
        for n in range(depth // 2):
            linear(f"{s}.skip_denses.{n}", dim, 2 * dim)
        td(f"{s}.output_layer.0.weight", dim)
        td(f"{s}.output_layer.0.bias", dim)
        shapes[f"{s}.output_layer.2.weight"] = (channels, dim, 3, 3)
        shapes[f"{s}.output_layer.2.bias"] = (channels,)

    stage("stages.0", d1, depth1, grid1, 2, transformer=True)
    shapes["stages.0.class_embeds.weight"] = (class_rows, d1)
    stage("stages.1", d2, depth2, grid2, 1, transformer=False)
    lowres = d1 * (depth1 + 1)
    td("stages.1.upsample.0.weight", lowres)
    td("stages.1.upsample.0.bias", lowres)
    linear("stages.1.upsample.1.kernel", 4 * d2, lowres)
    td("stages.1.upsample.2.weight", d2)
    td("stages.1.upsample.2.bias", d2)
    return shapes


def official_unet_shapes(adm: bool, res: int, in_channels: int, out_channels: int, model_channels: int,
                         channel_mult: tuple, num_blocks: int, attn: tuple, label_dim: int) -> dict:
    """Patch_EDMPrecond.model as training/networks.py builds it: SongUNet (DDPM++) or DhariwalUNet (ADM)."""
    shapes = {}
    emb = 4 * model_channels

    def conv(prefix, out, inp, kernel):
        shapes[f"{prefix}.weight"] = (out, inp, kernel, kernel)
        shapes[f"{prefix}.bias"] = (out,)

    def linear(prefix, out, inp, bias=True):
        shapes[f"{prefix}.weight"] = (out, inp)
        if bias:
            shapes[f"{prefix}.bias"] = (out,)

    def norm(prefix, ch):
        shapes[f"{prefix}.weight"] = shapes[f"{prefix}.bias"] = (ch,)

    def block(prefix, cin, cout, resample=False, attention=False):
        norm(f"{prefix}.norm0", cin)
        conv(f"{prefix}.conv0", cout, cin, 3)
        if resample:
            shapes[f"{prefix}.conv0.resample_filter"] = (1, 1, 2, 2)
        linear(f"{prefix}.affine", cout * (2 if adm else 1), emb)
        norm(f"{prefix}.norm1", cout)
        conv(f"{prefix}.conv1", cout, cout, 3)
        if cout != cin or resample:
            if not adm or cout != cin:  # DDPM++ projects every resampled skip; ADM only on a width change
                conv(f"{prefix}.skip", cout, cin, 1)
            if resample:
                shapes[f"{prefix}.skip.resample_filter"] = (1, 1, 2, 2)
        heads = (cout // 64 if adm else 1) if attention else 0
        if heads:
            norm(f"{prefix}.norm2", cout)
            conv(f"{prefix}.qkv", 3 * cout, cout, 1)
            conv(f"{prefix}.proj", cout, cout, 1)

    m = "model"
    linear(f"{m}.map_layer0", emb, model_channels)
    linear(f"{m}.map_layer1", emb, emb)
    if label_dim:
        linear(f"{m}.map_label", emb if adm else model_channels, label_dim, bias=not adm)
    cout, skips = in_channels, []
    for level, mult in enumerate(channel_mult):
        r = res >> level
        if level == 0:
            cin, cout = cout, model_channels * (mult if adm else 1)
            conv(f"{m}.enc.{r}x{r}_conv", cout, cin, 3)
        else:
            block(f"{m}.enc.{r}x{r}_down", cout, cout, resample=True)
        skips.append(cout)
        for idx in range(num_blocks):
            cin, cout = cout, model_channels * mult
            block(f"{m}.enc.{r}x{r}_block{idx}", cin, cout, attention=r in attn)
            skips.append(cout)
    for level, mult in reversed(list(enumerate(channel_mult))):
        r = res >> level
        if level == len(channel_mult) - 1:
            block(f"{m}.dec.{r}x{r}_in0", cout, cout, attention=True)
            block(f"{m}.dec.{r}x{r}_in1", cout, cout)
        else:
            block(f"{m}.dec.{r}x{r}_up", cout, cout, resample=True)
        for idx in range(num_blocks + 1):
            cin, cout = cout + skips.pop(), model_channels * mult
            block(f"{m}.dec.{r}x{r}_block{idx}", cin, cout, attention=r in attn and (adm or idx == num_blocks))
        if not adm and level == 0:
            norm(f"{m}.dec.{r}x{r}_aux_norm", cout)
            conv(f"{m}.dec.{r}x{r}_aux_conv", out_channels, cout, 3)
    if adm:
        norm(f"{m}.out_norm", cout)
        conv(f"{m}.out_conv", out_channels, cout, 3)
    return shapes


# --- our tensors in the official layout (the loader's names; conversions inverted independently) ----

def official_dit(model) -> dict:
    """DiT and FineDiffusion: our names and shapes are the official ones."""
    return {name: t.clone() for name, t in model.state_dict().items()}


def official_dimr(model) -> dict:
    ours = model.state_dict()
    official = {}
    for name, slot in ow.dimr_layout(model).items():
        t = ours[slot.ours]
        table = name.endswith("position_embeddings.weight")  # ours (1, H, W, d) → official (H·W, d)
        official[name] = t.reshape(-1, t.shape[-1]).clone() if table else t.clone()
    return official


def official_edm(denoiser) -> dict:
    ours = denoiser.state_dict()
    official = {}
    for name, slot in ow.edm_layout(denoiser).items():
        if slot.ours is None:
            official[name] = FIR.clone()
            continue
        t = ours[slot.ours].clone()
        if ".qkv." in name:  # ours (q|k|v, head, c) → official (head, c, q|k|v)
            heads = denoiser.get_submodule(slot.ours.rsplit(".", 2)[0]).num_heads
            t = t.reshape(3, heads, -1, *t.shape[1:]).movedim(0, 2).reshape(t.shape)
        if name == "model.map_layer0.weight" and isinstance(denoiser.net, DhariwalUNet):  # [sin, cos] → [cos, sin]
            half = t.shape[1] // 2
            t = torch.cat([t[:, half:], t[:, :half]], dim=1)
        official[name] = t
    return official


# --- saving as the official code does -----------------------------------------------------------------

def save_dit(official: dict, directory: Path, name: str = "DiT-XL-2-256x256.pt") -> Path:
    """DiT's release (download.py): torch.save of the EMA state dict alone."""
    path = directory / name
    torch.save(official, path)
    return path


def save_finediffusion(official: dict, directory: Path, name: str = "FineDiffusion-iNat.pt") -> Path:
    """FineDiffusion train.py: torch.save({model, ema, opt, args}); sample.py loads `ema`."""
    path = directory / name
    decoy = {k: torch.zeros_like(v) for k, v in official.items()}  # the non-EMA weights must not be read
    torch.save({"model": decoy, "ema": official,
                "opt": {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(3)}},
                        "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "weight_decay": 0, "params": [0]}]},
                "args": argparse.Namespace(model="DiT-XL/2", num_classes=20, num_super_classes=3)}, path)
    return path


def save_dimr(official: dict, directory: Path, name: str = "DiMR-XL_2R_800epochs.pth") -> Path:
    """DiMR utils.TrainState.save: torch.save(nnet_ema.state_dict()); eval.py loads it as is."""
    path = directory / name
    torch.save(official, path)
    return path


def _reconstruct_persistent_obj(meta):  # what EDM's unpickling would call; the loader must not
    raise AssertionError("the pickle's reconstructor was called")


_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"


@contextlib.contextmanager
def fake_official_modules(**modules: dict):
    """Make module names importable for pickling only; they are gone again before anything is loaded."""
    for name, attrs in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module
    try:
        yield
    finally:
        for name in modules:
            del sys.modules[name]


class Persistent(torch.nn.Module):
    """A module pickled as EDM's persistent classes are: a reconstructor call whose meta holds the
    class name, the module's Python source (here: code that would create `marker`) and its state."""

    def __init__(self, class_name: str, source: str):
        super().__init__()
        self.class_name, self.source = class_name, source

    def __reduce__(self):
        state = {k: v for k, v in self.__dict__.items() if k not in ("class_name", "source")}
        meta = dict(type="class", version=6, module_src=self.source, class_name=self.class_name, state=state)
        return _reconstruct_persistent_obj, (meta,)


def _edm_class(path: list[str], net_class: str) -> str:
    """Class of the official module at `path` (names under Patch_EDMPrecond)."""
    last = path[-1]
    if last == "model":
        return net_class
    if len(path) == 3:  # enc/dec entries
        return "GroupNorm" if last.endswith("aux_norm") else "Conv2d" if last.endswith("conv") else "UNetBlock"
    if last.startswith(("map_", "affine")):
        return "Linear"
    return "GroupNorm" if "norm" in last else "Conv2d"


def save_edm(official: dict, directory: Path, net_class: str, marker: Path) -> Path:
    """EDM/Patch Diffusion training_loop: pickle.dump(dict(ema, loss_fn, augment_pipe, dataset_kwargs))."""
    source = f"open({str(marker)!r}, 'w').close()\n"
    root = Persistent("Patch_EDMPrecond", source)
    root.sigma_data, root.img_resolution = 0.5, 16
    for name, tensor in official.items():
        *path, leaf = name.split(".")
        node = root
        for depth, part in enumerate(path):
            if part not in node._modules:
                if part in ("enc", "dec"):
                    child = torch.nn.ModuleDict()
                else:
                    child = Persistent(_edm_class(path[:depth + 1], net_class), source)
                if child.__class__ is Persistent and child.class_name == "UNetBlock":
                    child.skip_scale = np.sqrt(0.5)  # official blocks hold numpy scalars
                    child._init_kwargs = dict(init_attn=dict(init_weight=np.sqrt(0.2)))
                node.add_module(part, child)
            node = node._modules[part]
        if leaf == "resample_filter":
            node.register_buffer(leaf, tensor)
        else:
            node.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=False))
    root._modules["model"].add_module("map_noise", Persistent("PositionalEmbedding", source))
    snapshot = dict(ema=root, loss_fn=Persistent("Patch_EDMLoss", source), augment_pipe=None,
                    dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="celeba-64x64.zip"))
    path = directory / "network-snapshot-200000.pkl"
    persistence = {"_reconstruct_persistent_obj": _reconstruct_persistent_obj}
    with fake_official_modules(torch_utils={}, **{"torch_utils.persistence": persistence}):
        with open(path, "wb") as f:
            pickle.dump(snapshot, f)
    return path


# --- the formats --------------------------------------------------------------------------------------

@dataclass
class Format:
    name: str
    build: Callable
    official: Callable
    save: Callable
    load: Callable
    url: str
    expected_shapes: Callable
    inputs: Callable
    probe: str  # an official tensor that the mismatch tests remove or reshape


def _marker(directory: Path) -> Path:
    return directory / "created-by-pickled-code"


FORMATS = [
    Format("dit", tiny_dit, official_dit, save_dit, ow.load_dit, ow.OFFICIAL_URLS["DiT-XL/2-256"],
           official_dit_shapes, lambda: (torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([5, 20])),
           "blocks.0.attn.proj.weight"),  # 20: the null row
    Format("finediffusion", tiny_finediffusion, official_dit, save_finediffusion, ow.load_finediffusion,
           ow.OFFICIAL_URLS["FineDiffusion-iNat"], official_finediffusion_shapes,
           lambda: (torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([5, 22])),  # 22: superclass row 2
           "blocks.1.mlp.fc1.weight"),
    Format("dimr", tiny_dimr, official_dimr, save_dimr, ow.load_dimr, ow.OFFICIAL_URLS["DiMR-XL/2R"],
           official_dimr_shapes, lambda: (torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([3, 10])),
           "stages.1.blocks.0.block2.w1.weight"),
    Format("ddpmpp", tiny_ddpmpp, official_edm,
           lambda official, d: save_edm(official, d, "SongUNet", _marker(d)), ow.load_patch_diffusion,
           ow.OFFICIAL_URLS["Patch-Diffusion"],
           lambda: official_unet_shapes(False, 16, 5, 3, 32, (1, 2), 1, (8,), 0),
           lambda: (torch.randn(2, 3, 16, 16), torch.tensor([0.3, 4.0]), None, torch.rand(2, 2, 16, 16) * 2 - 1),
           "model.dec.8x8_block1.qkv.weight"),
    Format("adm", tiny_adm, official_edm,
           lambda official, d: save_edm(official, d, "DhariwalUNet", _marker(d)), ow.load_patch_diffusion,
           ow.OFFICIAL_URLS["Patch-Diffusion"],
           lambda: official_unet_shapes(True, 8, 6, 4, 64, (1, 2), 1, (4,), 5),
           lambda: (torch.randn(2, 4, 8, 8), torch.tensor([0.3, 4.0]), torch.tensor([1, 4]),
                    torch.rand(2, 2, 8, 8) * 2 - 1),
           "model.dec.4x4_in0.qkv.weight"),
]


def forward(model, inputs):
    with torch.no_grad():
        if isinstance(model, DiMR):
            return torch.cat([o.flatten() for o in model(*inputs, all_resolutions=True)])
        return model(*inputs)


# --- round trips --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_official_layout_matches_the_official_architecture(fmt):
    official = fmt.official(randomize(fmt.build()))
    assert {name: tuple(t.shape) for name, t in official.items()} == fmt.expected_shapes()


PAPER_SCALE = {  # name: (our model, its loader's layout, the official shapes, published parameter count)
    "DiT-XL/2 256": (lambda: build_model("DiT-XL/2", image_size=256, num_classes=1000), ow.dit_layout,
                     lambda: official_dit_shapes(28, 1152, 4, 2, 16, 1001), 675_129_632),
    "DiMR-XL/2R": (lambda: build_model("DiMR-XL/2R"), ow.dimr_layout,
                   lambda: official_dimr_shapes(960, 39, 16, 480, 21, 32, 4, 1001), 505_046_408),
    "DiMR-G/2R": (lambda: build_model("DiMR-G/2R"), ow.dimr_layout,
                  lambda: official_dimr_shapes(1152, 57, 16, 576, 29, 32, 4, 1001), 1_056_352_904),
    "FineDiffusion-iNat": (lambda: build_model("DiT-XL/2", image_size=256, num_classes=10000, num_super_classes=11,
                                               affine_norms=True), ow.dit_layout,
                           lambda: official_finediffusion_shapes(28, 1152, 4, 2, 16, 10011), 685_640_480),
    "Patch-Diffusion DDPM++ 64": (
        lambda: EDMDenoiser(build_model("ddpmpp", in_channels=3, extra_in_channels=2)), ow.edm_layout,
        lambda: official_unet_shapes(False, 64, 5, 3, 128, (1, 2, 2, 2), 4, (16,), 0), None),
    "Patch-Diffusion ADM latent 32": (
        lambda: EDMDenoiser(build_model("adm", input_size=32, in_channels=4, extra_in_channels=2, num_classes=1000)),
        ow.edm_layout, lambda: official_unet_shapes(True, 32, 6, 4, 192, (1, 2, 3, 4), 3, (32, 16, 8), 1000), None),
}


@pytest.mark.parametrize("name", PAPER_SCALE)
def test_paper_scale_layouts_match_the_official_architectures(name):
    """The released configurations, built on the meta device. DiMR's README counts (505M, 1.06B) and
    FineDiffusion's 685,640,480 (the denominator of its 1.77 %) come out of the official layout."""
    build, layout_of, official_shapes, count = PAPER_SCALE[name]
    with torch.device("meta"):
        model = build()
    layout = {official: slot.shape for official, slot in layout_of(model).items()}
    assert layout == official_shapes()
    if count is not None:
        assert sum(math.prod(shape) for shape in layout.values()) == count


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_round_trip_gives_the_same_forward_pass(fmt, tmp_path, one_thread):
    source = randomize(fmt.build())
    path = fmt.save(fmt.official(source), tmp_path)
    fresh = fmt.build()
    inputs = fmt.inputs()
    assert not torch.allclose(forward(fresh, inputs), forward(source, inputs))
    assert fmt.load(fresh, path) is fresh
    torch.testing.assert_close(forward(fresh, inputs), forward(source, inputs))
    for ours, theirs in zip(fresh.state_dict().values(), source.state_dict().values()):
        assert torch.equal(ours, theirs)
    assert not _marker(tmp_path).exists()  # the module source inside the pickle never ran


RELEASE_OF = {"dit": "dit", "finediffusion": "finediffusion", "dimr": "dimr", "ddpmpp": "patch_diffusion",
              "adm": "patch_diffusion"}  # format → the run's `release` that reads it


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_a_run_adopts_each_release_through_its_own_strict_loader(fmt, tmp_path, one_thread):
    source = randomize(fmt.build())
    path = fmt.save(fmt.official(source), tmp_path)
    fresh, inputs = fmt.build(), fmt.inputs()
    assert ow.adopt_release(RELEASE_OF[fmt.name], fresh, path) is fresh
    torch.testing.assert_close(forward(fresh, inputs), forward(source, inputs))
    assert ow.release_url(RELEASE_OF[fmt.name], path) == fmt.url
    other = "dimr" if fmt.name != "dimr" else "dit"  # another release's loader refuses the file, naming it
    with pytest.raises(UserError, match=str(path)):
        ow.adopt_release(other, fmt.build(), path)


def test_a_known_file_name_gives_its_own_release_url():
    from diffrepro import sources

    assert sources.release_url("dimr", "models/DiMR-G_2R_800epochs.pth") == sources.OFFICIAL_URLS["DiMR-G/2R"]
    assert sources.release_url("dit", "elsewhere/DiT-XL-2-512x512.pt") == sources.OFFICIAL_URLS["DiT-XL/2-512"]
    assert sources.release_url("dimr", "models/renamed.pth") == sources.OFFICIAL_URLS["DiMR-XL/2R"]  # the release's
    assert set(sources.RELEASE_FILES.values()) | set(sources.RELEASE_DEFAULT.values()) <= set(sources.OFFICIAL_URLS)
    assert set(sources.RELEASE_DEFAULT) == set(ow.RELEASES)  # every release has a loader and a URL


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("defect", ["missing", "extra", "shape"])
def test_mismatch_is_one_line_naming_file_url_and_tensor(fmt, defect, tmp_path):
    official = fmt.official(randomize(fmt.build()))
    shape = tuple(official[fmt.probe].shape)
    if defect == "missing":
        del official[fmt.probe]
        expected = ["missing tensor", fmt.probe, str(shape)]
    elif defect == "extra":
        extra = fmt.probe.rsplit(".", 2)[0] + ".extra.weight"
        official[extra] = torch.zeros(3, 7)
        expected = ["unexpected tensor", extra, "(3, 7)"]
    else:
        official[fmt.probe] = torch.zeros(shape[0] + 1, *shape[1:])
        expected = [fmt.probe, str((shape[0] + 1, *shape[1:])), str(shape)]
    path = fmt.save(official, tmp_path)
    with pytest.raises(UserError) as info:
        fmt.load(fmt.build(), path)
    message = str(info.value)
    assert "\n" not in message
    for part in [str(path), fmt.url, *expected]:
        assert part in message


def test_our_tensor_without_official_counterpart_is_refused(tmp_path):
    path = save_dimr(official_dimr(tiny_dimr()), tmp_path)
    no_td_ln = DiMR(8, 4, 10, TransformerStage(dim=32, depth=3, num_heads=2), (ConvNeXtStage(dim=16, depth=3),),
                    td_ln=False)
    with pytest.raises(UserError, match=r"our tensor transformer\.stack\.blocks\.0\.attn\.norm\.scale\.value has no"):
        ow.load_dimr(no_td_ln, path)


def test_finediffusion_needs_the_tiered_table(tmp_path):
    path = save_finediffusion(official_dit(tiny_finediffusion()), tmp_path)
    with pytest.raises(UserError, match="num_super_classes"):
        plain = DiT(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=20, affine_norms=True)
        ow.load_finediffusion(plain, path)


def test_edm_network_class_must_match(tmp_path):
    path = save_edm(official_edm(tiny_ddpmpp()), tmp_path, "SongUNet", _marker(tmp_path))
    with pytest.raises(UserError, match="SongUNet.*this denoiser's a DhariwalUNet"):
        ow.load_patch_diffusion(tiny_adm(), path)


def test_missing_file_names_the_release(tmp_path):
    with pytest.raises(UserError, match="QHL067/DiMR.*UNKNOWN"):
        ow.load_dimr(tiny_dimr(), tmp_path / "absent.pth")


# --- the mapping, checked against the official semantics ----------------------------------------------

def test_dimr_names_by_hand():
    layout = ow.dimr_layout(tiny_dimr())
    pairs = {
        "stages.0.blocks.0.block1.query_key_value.weight": "transformer.stack.blocks.0.attn.qkv.weight",
        "stages.0.blocks.2.block2.w0.weight": "transformer.stack.blocks.2.mlp.w0.weight",
        "stages.0.blocks.2.block2.w1.bias": "transformer.stack.blocks.2.mlp.w1.bias",
        "stages.0.skip_denses.0.bias": "transformer.stack.skip_fusions.0.bias",
        "stages.0.class_embeds.weight": "transformer.class_embedding.weight",
        "stages.1.upsample.1.kernel.weight": "convnexts.0.upsample.proj.weight",
        "stages.1.upsample.2.bias.param1": "convnexts.0.upsample.norm_out.shift.p1",
        "stages.1.blocks.1.block1.1.weight": "convnexts.0.stack.blocks.1.dwconv.weight",
        "stages.1.output_layer.0.weight.nodecay_bias": "convnexts.0.head.norm.scale.offset",
    }
    assert {name: layout[name].ours for name in pairs} == pairs


def test_dimr_time_dependent_norms_and_positions_follow_the_official_code(tmp_path):
    official = official_dimr(randomize(tiny_dimr()))
    model = ow.load_dimr(tiny_dimr(), save_dimr(official, tmp_path))
    tau = torch.tensor([-0.7, 0.2])
    for prefix, ours in [("stages.0.blocks.1.block1.norm.scale", model.transformer.stack.blocks[1].attn.norm.scale),
                         ("stages.1.output_layer.0.bias", model.convnexts[0].head.norm.shift)]:
        p0, p1, w, b = (official[f"{prefix}.{leaf}"] for leaf in TD_LEAVES)
        # libs/core/sigmoid/kernel.py: param1 + σ(τ·(nodecay_weight + 1) + nodecay_bias)·(param0 − param1)
        expected = p1 + torch.sigmoid(tau[:, None] * (w + 1) + b) * (p0 - p1)
        torch.testing.assert_close(ours(tau), expected)
    table = official["stages.1.input_layer.3.position_embeddings.weight"]  # row h·max_width + w
    for h, w in [(0, 0), (1, 2), (7, 5)]:
        assert torch.equal(model.convnexts[0].position_embeddings[0, h, w], table[h * 8 + w])


def test_edm_names_by_hand():
    layout = ow.edm_layout(tiny_ddpmpp())
    pairs = {
        "model.enc.16x16_conv.weight": "net.input_conv.weight",
        "model.enc.8x8_down.conv0.weight": "net.encoder.1.conv0.weight",
        "model.enc.8x8_block0.qkv.bias": "net.encoder.2.qkv.bias",
        "model.dec.8x8_in1.conv1.bias": "net.decoder.1.conv1.bias",
        "model.dec.8x8_block1.proj.weight": "net.decoder.3.proj.weight",
        "model.dec.16x16_up.skip.weight": "net.decoder.4.skip.weight",
        "model.dec.16x16_block1.norm0.weight": "net.decoder.6.norm0.weight",
        "model.dec.16x16_aux_conv.weight": "net.out_conv.weight",
    }
    assert {name: layout[name].ours for name in pairs} == pairs
    assert layout["model.dec.16x16_up.conv0.resample_filter"].ours is None


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f.name in ("ddpmpp", "adm")], ids=lambda f: f.name)
def test_edm_attention_reads_q_k_v_in_the_official_channel_order(fmt, tmp_path):
    official = fmt.official(randomize(fmt.build()))
    denoiser = fmt.load(fmt.build(), fmt.save(official, tmp_path))
    block = denoiser.net.decoder[0]  # the middle block `in0`: attention, no resampling, no skip projection
    key = {"ddpmpp": "model.dec.8x8_in0", "adm": "model.dec.4x4_in0"}[fmt.name]
    with torch.no_grad():  # silence the residual branch: what remains is skip_scale·x, then attention
        block.conv1.weight.zero_()
        block.conv1.bias.zero_()
    c, heads, scale = block.out_channels, block.num_heads, block.flavor.skip_scale
    x = torch.randn(2, c, 4, 4)
    emb = torch.randn(2, block.affine.in_features)
    # training/networks.py UNetBlock: q, k, v = qkv(norm2(x)).reshape(N·heads, C/heads, 3, −1).unbind(2),
    # weights softmax(qᵀk / √(C/heads)) over the keys
    xs = x * scale
    h = F.group_norm(xs, block.norm2.num_groups, official[f"{key}.norm2.weight"], official[f"{key}.norm2.bias"],
                     block.norm2.eps)
    qkv = F.conv2d(h, official[f"{key}.qkv.weight"], official[f"{key}.qkv.bias"])
    q, k, v = qkv.reshape(2 * heads, c // heads, 3, -1).unbind(2)
    weights = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(c // heads)).softmax(dim=2)
    a = torch.einsum("nqk,nck->ncq", weights, v).reshape(x.shape)
    expected = (F.conv2d(a, official[f"{key}.proj.weight"], official[f"{key}.proj.bias"]) + xs) * scale
    with torch.no_grad():
        torch.testing.assert_close(block(x, emb), expected)
    assert heads == (2 if fmt.name == "adm" else 1)


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f.name in ("ddpmpp", "adm")], ids=lambda f: f.name)
def test_edm_noise_embedding_follows_the_official_code(fmt, tmp_path):
    official = fmt.official(randomize(fmt.build()))
    net = fmt.load(fmt.build(), fmt.save(official, tmp_path)).net
    c_noise = torch.tensor([-1.3, 0.4])
    half = net.noise_channels // 2
    adm = fmt.name == "adm"
    # PositionalEmbedding: [cos, sin] of c_noise·(1/10⁴)^(j/(half − endpoint)); SongUNet then flips to [sin, cos]
    angles = c_noise[:, None] * (1e-4 ** (torch.arange(half) / (half - (0 if adm else 1))))[None]
    code = torch.cat([angles.cos(), angles.sin()] if adm else [angles.sin(), angles.cos()], dim=1)
    hidden = F.silu(F.linear(code, official["model.map_layer0.weight"], official["model.map_layer0.bias"]))
    emb = F.linear(hidden, official["model.map_layer1.weight"], official["model.map_layer1.bias"])
    labels = torch.tensor([1, 4]) if adm else None
    if adm:  # DhariwalUNet: + map_label(one-hot), then SiLU
        emb = emb + F.linear(F.one_hot(labels, 5).float(), official["model.map_label.weight"])
    with torch.no_grad():
        torch.testing.assert_close(net.embed(c_noise, labels), F.silu(emb))


# --- the restricted unpickler -------------------------------------------------------------------------

class Payload:
    """An object whose unpickling would call `func(*args)`."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker: Path):
    return [
        (os.system, (f"touch {marker}",)),
        (builtins.eval, (f"open({str(marker)!r}, 'w')",)),
        (builtins.exec, (f"open({str(marker)!r}, 'w').close()",)),
        (subprocess.call, (["touch", str(marker)],)),
    ]


@pytest.mark.parametrize("index", range(4), ids=["os.system", "eval", "exec", "subprocess.call"])
def test_unpickler_refuses_code_that_would_create_a_file(index, tmp_path):
    marker = tmp_path / "pwned"
    func, args = _payloads(marker)[index]
    path = tmp_path / "network-snapshot.pkl"
    path.write_bytes(pickle.dumps({"ema": [Payload(func, *args)]}))
    with pytest.raises(UserError) as info:
        load_pickle(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and f"{func.__module__}.{func.__name__}" in message
    assert not marker.exists()


def test_torch_file_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "DiMR-XL_2R_800epochs.pth"
    torch.save({"stages.0.class_embeds.weight": Payload(os.system, f"touch {marker}")}, path)
    with pytest.raises(UserError) as info:
        ow.load_dimr(tiny_dimr(), path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "system" in message
    assert not marker.exists()


def test_unpickler_records_a_pickled_module_tree_without_importing_it(tmp_path):
    """Plain torch modules whose classes live in the official `training.networks`: pickled by class
    name, then loaded with that module gone."""

    class GroupNorm(torch.nn.Module):
        def __init__(self, ch):
            super().__init__()
            self.weight, self.bias = torch.nn.Parameter(torch.randn(ch)), torch.nn.Parameter(torch.randn(ch))

    class UNetBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm0 = GroupNorm(8)
            self.conv0 = torch.nn.Conv2d(8, 8, 3)
            self.register_buffer("resample_filter", FIR.clone())
            self.register_buffer("scratch", torch.zeros(3), persistent=False)
            self.skip_scale = np.sqrt(0.5)

    class SongUNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.map_layer0 = torch.nn.Linear(4, 8)
            self.map_label = None
            self.enc = torch.nn.ModuleDict({"8x8_block0": UNetBlock(), "4x4_down": UNetBlock()})

    classes = {cls.__name__: cls for cls in (GroupNorm, UNetBlock, SongUNet)}
    for cls in classes.values():
        cls.__module__, cls.__qualname__ = "training.networks", cls.__name__
    net = SongUNet()
    with fake_official_modules(training={}, **{"training.networks": classes}):
        data = pickle.dumps({"ema": net, "dataset_kwargs": {"path": "x.zip"}})
    path = tmp_path / "snapshot.pkl"
    path.write_bytes(data)
    record = load_pickle(path)["ema"]
    assert "training.networks" not in sys.modules
    assert isinstance(record, PickledObject) and record.type_name == "training.networks.SongUNet"
    assert record.state["_modules"]["enc"].type_name == "torch.nn.modules.container.ModuleDict"
    flat = module_state_dict(record, str(path))
    expected = net.state_dict()
    assert list(flat) == list(expected)  # same names, same order; the non-persistent buffer left out
    for name, tensor in expected.items():
        assert torch.equal(flat[name], tensor)
