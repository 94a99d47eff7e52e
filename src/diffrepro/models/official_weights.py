"""Strict loaders for the released checkpoints of DiT, DiMR, FineDiffusion and Patch Diffusion, and
the one table (`RELEASES`) through which a run with a `release` adopts its official file.

An explicit table maps every official tensor name to one tensor of our model. Loading is strict.
Each official tensor must land on exactly one of ours, with the official shape. Each of ours must
be covered. Otherwise a one-line `UserError` names the file, the release URL and the first
mismatch. Three official layouts differ from ours by more than a name, and each is converted exactly:
- DiMR stores its position table as an Embedding of H·W rows, where row h·W + w is position
  (h, w). Ours is a (1, H, W, d) tensor.
- EDM's attention convs emit q, k and v interleaved inside each head: channels in (head, c, q|k|v)
  order. Ours emit (q|k|v, head, c).
- EDM's ADM noise embedding is [cos, sin], and ours is [sin, cos]. So the input columns of
  `map_layer0` swap halves. (EDM's DDPM++ flips to [sin, cos] itself.)
EDM's resampling convs also store their FIR filter as a buffer. It must equal our fixed [1, 1]
filter, and it is checked, not loaded.

DiT, DiMR and FineDiffusion files are `torch.save` outputs, read with torch's weights-only unpickler.
Patch Diffusion (EDM) snapshots pickle code-carrying modules and are read with
`diffrepro.safe_unpickle`. docs/official_weights.md lists the releases, URLs and checksums.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from diffrepro.errors import UserError
from diffrepro.models.edm_unets import SongUNet
from diffrepro.safe_unpickle import PickledObject, load_pickle, module_state_dict
from diffrepro.sources import OFFICIAL_URLS, release_url



@dataclass(frozen=True)
class Slot:
    """Where one official tensor goes. `ours` is our tensor's name, or None for a constant that our
    code computes, which the file must then hold exactly. `shape` is the official shape, and
    `convert` turns the official layout into ours."""

    ours: str | None
    shape: tuple[int, ...]
    convert: Callable[[torch.Tensor], torch.Tensor] = torch.clone
    constant: torch.Tensor | None = None


Layout = dict[str, Slot]  # official name → slot


def _shape(tensor) -> tuple | str:
    return tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__


def load_strict(model: torch.nn.Module, official, build_layout: Callable[[torch.nn.Module], Layout],
                path: str | Path, url: str) -> torch.nn.Module:
    """Check every official tensor against the layout, then load them all into `model` (in place)."""

    def mismatch(detail: str) -> UserError:
        return UserError(f"{path} does not match the official release {url}: {detail}")

    try:
        layout = build_layout(model)
    except LookupError as err:  # our model has a tensor the official architecture lacks
        raise mismatch(err.args[0]) from None
    if not isinstance(official, dict):
        raise mismatch(f"it holds a {type(official).__name__}, not a name → tensor dict")
    for name, tensor in official.items():
        slot = layout.get(name)
        if slot is None:
            raise mismatch(f"unexpected tensor {name} {_shape(tensor)}, which this model has no place for")
        if _shape(tensor) != slot.shape:
            raise mismatch(f"{name} has shape {_shape(tensor)}, this model needs {slot.shape}")
        if slot.ours is None and not torch.equal(tensor.float(), slot.constant):
            raise mismatch(f"{name} is {tensor.flatten().tolist()}, not the fixed {slot.constant.flatten().tolist()}")
    for name, slot in layout.items():
        if name not in official:
            raise mismatch(f"missing tensor {name} {slot.shape} (our {slot.ours or 'fixed constant'})")
    model.load_state_dict({slot.ours: slot.convert(official[name]) for name, slot in layout.items() if slot.ours})
    return model


def read_torch_file(path: str | Path, url: str):
    """`torch.load` with torch's weights-only unpickler, which also accepts the argparse `args` that a
    DiT-style train.py checkpoint holds. Any other global is refused, in one line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"official checkpoint not found: {path}; download it from {url} "
                        f"(no checksum is published: sha256 UNKNOWN)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a refused global, a truncated or foreign file
        refused = re.search(r"GLOBAL (\S+)", str(err))
        reason = (f"refused to unpickle the global {refused[1]}" if refused
                  else f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}")
        raise UserError(f"{path} is not a readable checkpoint ({reason}); the release is {url}") from err


# --- DiT and FineDiffusion -----------------------------------------------------------------------
# facebookresearch/DiT models.py uses the names of our models/dit.py: LayerNorms without affine
# parameters, a class table of num_classes rows plus the null row of classifier-free guidance.
# FineDiffusion/FineDiffusion models.py is the same DiT with affine LayerNorms and one class table
# of num_classes fine rows then num_super_classes superclass rows (no null row).


def dit_layout(model: torch.nn.Module) -> Layout:
    """DiT and FineDiffusion: every official tensor has our name and shape."""
    return {name: Slot(name, tuple(t.shape)) for name, t in model.state_dict().items()}


def read_dit_weights(path: str | Path, url: str):
    """The weights of a DiT-style file: a plain state dict, or a train.py checkpoint's `ema`, the
    one the official sample.py reads."""
    state = read_torch_file(path, url)
    return state["ema"] if isinstance(state, dict) and "ema" in state else state


def load_dit(model: torch.nn.Module, path: str | Path, url: str = OFFICIAL_URLS["DiT-XL/2-256"]) -> torch.nn.Module:
    """A released DiT (its EMA weights) goes into our DiT as is, class table included: build the
    model with the release's classes (ImageNet: 1000) and class dropout (the null row)."""
    return load_strict(model, read_dit_weights(path, url), dit_layout, path, url)


def load_finediffusion(model: torch.nn.Module, path: str | Path,
                       url: str = OFFICIAL_URLS["FineDiffusion-iNat"]) -> torch.nn.Module:
    """A released FineDiffusion DiT goes into our DiT, which must be built with affine_norms and
    num_super_classes."""
    if not getattr(model, "num_super_classes", 0):
        raise UserError(f"{path}: FineDiffusion's tiered class table needs a DiT built with num_super_classes > 0")
    return load_strict(model, read_dit_weights(path, url), dit_layout, path, url)


# --- DiMR -----------------------------------------------------------------------------------------
# Official names come from qihao067/DiMR libs/core/blocks.py. MRModel.stages[i] is our transformer
# (i = 0) or convnexts[i - 1]. Stage: input_layer = (EvenDownInterpolate, Conv2d, ChannelLast,
# PositionEmbeddings); class_embeds; upsample = (LayerNorm, PixelShuffleUpsample.kernel,
# LayerNorm); blocks[n].block1 = SelfAttention (norm, query_key_value, dense) or
# (ChannelFirst, depthwise Conv2d, ChannelLast); blocks[n].block2 = MLPBlock (norm, w0, w1, w2);
# skip_denses; output_layer = (LayerNorm, ChannelFirst, Conv2d). Time-dependent LayerNorm has
# weight/bias and RMSNorm has scale. Each of these is a TimeDependentParameter with
# param0, param1, nodecay_weight and nodecay_bias.

TD_LEAVES = {"p0": "param0", "p1": "param1", "slope": "nodecay_weight", "offset": "nodecay_bias"}
_TD, _P, _N = r"(?P<leaf>p0|p1|slope|offset)", r"(?P<p>weight|bias)", r"(?P<n>\d+)"
DIMR_NAMES = (  # ours, within a branch → official, within its stage
    (rf"patch_embed\.{_P}", "input_layer.1.{p}"),
    (r"position_embeddings", "input_layer.3.position_embeddings.weight"),
    (r"class_embedding\.weight", "class_embeds.weight"),
    (rf"upsample\.norm_in\.scale\.{_TD}", "upsample.0.weight.{leaf}"),
    (rf"upsample\.norm_in\.shift\.{_TD}", "upsample.0.bias.{leaf}"),
    (rf"upsample\.proj\.{_P}", "upsample.1.kernel.{p}"),
    (rf"upsample\.norm_out\.scale\.{_TD}", "upsample.2.weight.{leaf}"),
    (rf"upsample\.norm_out\.shift\.{_TD}", "upsample.2.bias.{leaf}"),
    (rf"stack\.blocks\.{_N}\.attn\.norm\.scale\.{_TD}", "blocks.{n}.block1.norm.scale.{leaf}"),
    (rf"stack\.blocks\.{_N}\.attn\.qkv\.weight", "blocks.{n}.block1.query_key_value.weight"),
    (rf"stack\.blocks\.{_N}\.attn\.proj\.{_P}", "blocks.{n}.block1.dense.{p}"),
    (rf"stack\.blocks\.{_N}\.dwconv\.{_P}", "blocks.{n}.block1.1.{p}"),
    (rf"stack\.blocks\.{_N}\.mlp\.norm\.scale\.{_TD}", "blocks.{n}.block2.norm.scale.{leaf}"),
    (rf"stack\.blocks\.{_N}\.mlp\.(?P<w>w[012])\.{_P}", "blocks.{n}.block2.{w}.{p}"),
    (rf"stack\.skip_fusions\.{_N}\.{_P}", "skip_denses.{n}.{p}"),
    (rf"head\.norm\.scale\.{_TD}", "output_layer.0.weight.{leaf}"),
    (rf"head\.norm\.shift\.{_TD}", "output_layer.0.bias.{leaf}"),
    (rf"head\.conv\.{_P}", "output_layer.2.{p}"),
)


def _dimr_official_name(name: str) -> str:
    """Our DiMR tensor name → the official one; LookupError if the official model has no such tensor."""
    branch = re.fullmatch(r"(?:transformer|convnexts\.(?P<i>\d+))\.(?P<rest>.+)", name)
    for pattern, template in DIMR_NAMES if branch else ():
        match = re.fullmatch(pattern, branch["rest"])
        if match:
            fields = match.groupdict()
            if "leaf" in fields:
                fields["leaf"] = TD_LEAVES[fields["leaf"]]
            stage = 0 if branch["i"] is None else int(branch["i"]) + 1
            return f"stages.{stage}.{template.format(**fields)}"
    raise LookupError(f"our tensor {name} has no counterpart in the official DiMR")


def dimr_layout(model: torch.nn.Module) -> Layout:
    layout = {}
    for name, tensor in model.state_dict().items():
        ours = tuple(tensor.shape)
        if name.endswith("position_embeddings"):  # (1, H, W, d) ← Embedding rows h·W + w
            layout[_dimr_official_name(name)] = Slot(name, (ours[1] * ours[2], ours[3]),
                                                     partial(torch.reshape, shape=ours))
        else:
            layout[_dimr_official_name(name)] = Slot(name, ours)
    return layout


def load_dimr(model: torch.nn.Module, path: str | Path, url: str = OFFICIAL_URLS["DiMR-XL/2R"]) -> torch.nn.Module:
    """A released DiMR `.pth` goes into our DiMR. The file is the plain state dict of the official
    MRModel, the one its eval.py loads with `load_state_dict`."""
    return load_strict(model, read_torch_file(path, url), dimr_layout, path, url)


# --- Patch Diffusion / EDM ------------------------------------------------------------------------
# Official names come from Zhendong-Wang/Patch-Diffusion training/networks.py, the same layout as
# NVlabs/edm. Patch_EDMPrecond.model is a SongUNet (DDPM++) or DhariwalUNet (ADM). Its blocks sit
# in ModuleDicts `enc` and `dec`, under keys '{r}x{r}_conv' (input conv), '{r}x{r}_down',
# '{r}x{r}_block{i}', '{r}x{r}_in0/1' (middle pair) and '{r}x{r}_up'. DDPM++ ends in
# dec '{R}x{R}_aux_norm' / '_aux_conv'; ADM ends in out_norm / out_conv. Block internals (norm0,
# conv0, affine, norm1, conv1, skip, norm2, qkv, proj) and map_label / map_layer0 / map_layer1
# share our names.

EDM_PRECONDS = ("Patch_EDMPrecond", "EDMPrecond")  # the D = c_skip·x + c_out·F(c_in·x) of EDMDenoiser
FIR_FILTER = torch.full((1, 1, 2, 2), 0.25)  # EDM's resample_filter [1, 1], stored as outer(f, f) / sum(f)²


def qkv_from_official(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Attention conv output channels in (head, c, q|k|v) order → ours, (q|k|v, head, c)."""
    return tensor.reshape(heads, -1, 3, *tensor.shape[1:]).movedim(2, 0).reshape(tensor.shape)


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """ADM's map_layer0 reads [cos, sin]; ours reads [sin, cos] (an involution)."""
    return torch.cat(tensor.chunk(2, dim=1)[::-1], dim=1)


def _block_keys(blocks, res: int, decoder: bool) -> tuple[list[str], int]:
    """The official ModuleDict keys of our encoder or decoder blocks, in order, and the final resolution."""
    keys, counts = [], Counter()
    for block in blocks:
        if block.resampling:
            res = res // 2 if block.resampling == "down" else res * 2
            keys.append(f"{res}x{res}_{block.resampling}")
        else:
            kind = "in" if decoder and not block.takes_skip else "block"
            keys.append(f"{res}x{res}_{kind}{counts[res, kind]}")
            counts[res, kind] += 1
    return keys, res


def edm_layout(denoiser: torch.nn.Module) -> Layout:
    net, res = denoiser.net, denoiser.net.input_size
    ddpmpp = isinstance(net, SongUNet)
    enc_keys, lowest = _block_keys(net.encoder, res, decoder=False)
    dec_keys, _ = _block_keys(net.decoder, lowest, decoder=True)
    blocks = {"encoder": ("enc", net.encoder, enc_keys), "decoder": ("dec", net.decoder, dec_keys)}
    modules = {"input_conv": f"enc.{res}x{res}_conv", "map_label": "map_label", "map_layer0": "map_layer0",
               "map_layer1": "map_layer1", "out_norm": f"dec.{res}x{res}_aux_norm" if ddpmpp else "out_norm",
               "out_conv": f"dec.{res}x{res}_aux_conv" if ddpmpp else "out_conv"}
    layout = {}
    for name, tensor in denoiser.state_dict().items():
        _, module, *rest = name.split(".")
        convert = torch.clone
        if module in blocks:
            index, *rest = rest
            prefix, modules_list, keys = blocks[module]
            block = modules_list[int(index)]
            official = f"model.{prefix}.{keys[int(index)]}.{'.'.join(rest)}"
            if rest[0] == "qkv":
                convert = partial(qkv_from_official, heads=block.num_heads)
        elif module in modules:
            official = f"model.{modules[module]}.{'.'.join(rest)}"
            if not ddpmpp and name == "net.map_layer0.weight":
                convert = swap_halves
        else:
            raise LookupError(f"our tensor {name} has no counterpart in the official EDM network")
        layout[official] = Slot(name, tuple(tensor.shape), convert)
    for prefix, modules_list, keys in blocks.values():
        for key, block in zip(keys, modules_list):
            if block.resampling:
                for conv in ("conv0", "skip"):
                    layout[f"model.{prefix}.{key}.{conv}.resample_filter"] = Slot(None, tuple(FIR_FILTER.shape),
                                                                                   constant=FIR_FILTER)
    return layout


def load_patch_diffusion(denoiser: torch.nn.Module, path: str | Path,
                         url: str = OFFICIAL_URLS["Patch-Diffusion"]) -> torch.nn.Module:
    """The `ema` network of a Patch Diffusion (or EDM) `network-snapshot-*.pkl` goes into `denoiser`.
    That is our EDMDenoiser around a SongUNet (DDPM++) or DhariwalUNet (ADM), whose
    extra_in_channels hold Patch Diffusion's 2 coordinate channels. The pickle is read without
    running any of its code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"official checkpoint not found: {path}; download it from {url} "
                        f"(no checksum is published: sha256 UNKNOWN)")
    snapshot = load_pickle(path)
    ema = snapshot.get("ema") if isinstance(snapshot, dict) else None
    state = ema.state if isinstance(ema, PickledObject) and isinstance(ema.state, dict) else {}
    model = state.get("_modules", {}).get("model")
    ours = type(denoiser.net).__name__
    problem = None
    if not isinstance(ema, PickledObject) or ema.type_name not in EDM_PRECONDS:
        problem = f"its `ema` is {ema!r}, not an EDM-preconditioned network ({' or '.join(EDM_PRECONDS)})"
    elif state.get("sigma_data") != denoiser.sigma_data:
        problem = f"its sigma_data is {state.get('sigma_data')!r}, this denoiser's {denoiser.sigma_data}"
    elif not isinstance(model, PickledObject) or model.type_name != ours:
        problem = f"its network is {model!r}, this denoiser's a {ours}"
    if problem:
        raise UserError(f"{path} does not match the official release {url}: {problem}")
    return load_strict(denoiser, module_state_dict(ema, str(path)), edm_layout, path, url)


# --- adopting a release as a run's weights --------------------------------------------------------
# A run with `release` (schema.Release) adopts `init_from`, that release's official file, as its
# weights instead of training (training.py); preflight.py names a missing file with its URL.

RELEASES = {"dit": load_dit, "finediffusion": load_finediffusion, "dimr": load_dimr,  # release → its strict loader
            "patch_diffusion": load_patch_diffusion}


def adopt_release(release: str, network: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Load `path` into `network`, the network the run's noise process calls (EDM: the
    preconditioned denoiser), with the strict loader of `release`."""
    return RELEASES[release](network, path, release_url(release, path))
