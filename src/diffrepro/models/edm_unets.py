"""EDM's two pixel-space UNets, written from the papers' descriptions: DDPM++ (Song et al. 2021,
in EDM's form) and ADM (Dhariwal & Nichol 2021, in EDM's form). Patch Diffusion trains both.

Both are one residual UNet: an input conv, per resolution level `num_blocks` residual blocks (a
down-sampling block between levels), a middle pair of blocks (the first with self-attention), a
mirrored decoder whose blocks each take one encoder skip, and a GroupNorm–SiLU–conv output. Every
block is modulated by an embedding of the noise level c_noise (and the class); encoder blocks at an
attention resolution end with self-attention. They differ in:

|                      | DDPM++ (`ddpmpp`)                          | ADM (`adm`)                                 |
|----------------------|--------------------------------------------|---------------------------------------------|
| input conv           | → model_channels                           | → model_channels · channel_mult[0]          |
| embedding modulation | added to the features (a shift)            | scale and shift                             |
| residual sum         | multiplied by 1/√2; GroupNorm eps 1e-6     | not scaled; GroupNorm eps 1e-5              |
| resampling skip      | 1×1 conv after resampling                  | resampling only (no parameters)             |
| attention (decoder)  | 1 head; last block of a level              | 64 channels per head; every block           |
| noise embedding      | sin/cos, frequencies 1 … 1/10⁴; SiLU MLP   | sin/cos, 1 … (1/10⁴)^(1−2/C); SiLU MLP      |
| class label          | one-hot·√L → linear with bias, before MLP  | one-hot → linear, no bias, after MLP        |
| init                 | Xavier-uniform, output layers ×1e-5        | PyTorch default, output layers zero         |

Choices: resampling uses the FIR filter [1, 1] (EDM's default for both nets), i.e. exactly 2×2
average pooling down and nearest-neighbour up. Attention placement follows the *nominal*
resolution a level has at `input_size`, so the net is fully convolutional: Patch Diffusion feeds it
half- and quarter-size patches and the "16×16" attention then runs at 8×8 or 4×4.
Class labels are integers; the net one-hot encodes them, and the label `num_classes` (the null
class of classifier-free guidance) is the all-zero one-hot, EDM's unconditional input.
`extra_in_channels` (Patch Diffusion's two coordinate channels) are appended to the input by the
caller (`EDMDenoiser`); the output has `in_channels` channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffrepro.errors import UserError
from diffrepro.models.registry import register


@dataclass(frozen=True)
class Flavor:
    """What distinguishes DDPM++ blocks from ADM blocks (see the module table)."""

    eps: float
    skip_scale: float
    scale_shift: bool
    resample_proj: bool
    channels_per_head: int | None  # None: one head
    xavier: bool
    zero_gain: float


DDPMPP_FLAVOR = Flavor(eps=1e-6, skip_scale=math.sqrt(0.5), scale_shift=False, resample_proj=True,
                       channels_per_head=None, xavier=True, zero_gain=1e-5)
ADM_FLAVOR = Flavor(eps=1e-5, skip_scale=1.0, scale_shift=True, resample_proj=False,
                    channels_per_head=64, xavier=False, zero_gain=0.0)


def _init(layer: nn.Module, flavor: Flavor, gain: float = 1.0) -> nn.Module:
    """Xavier-uniform × gain with zero bias (DDPM++), or PyTorch's default × gain (ADM)."""
    with torch.no_grad():
        if flavor.xavier:
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        layer.weight.mul_(gain)
        if gain == 0.0:
            layer.bias.zero_()
    return layer


def group_norm(channels: int, eps: float) -> nn.GroupNorm:
    """32 groups, fewer when a group would hold under 4 channels (small CPU configs)."""
    return nn.GroupNorm(min(32, channels // 4), channels, eps=eps)


def positional_embedding(x: torch.Tensor, channels: int, endpoint: bool) -> torch.Tensor:
    """Transformer sin/cos features of the scalar c_noise, frequencies 1 … 1/10⁴ (geometric)."""
    half = channels // 2
    exponent = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if endpoint else 0))
    angles = x.float()[:, None] * (1e-4 ** exponent)[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def resample(x: torch.Tensor, direction: str | None) -> torch.Tensor:
    """FIR [1, 1]: 2×2 average pooling down, nearest-neighbour up."""
    if direction == "down":
        return F.avg_pool2d(x, 2)
    if direction == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x


def one_hot(y: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """One-hot rows; the null label `num_classes` gives the all-zero row."""
    return (y[:, None] == torch.arange(num_classes, device=y.device)[None]).to(dtype)


class UNetBlock(nn.Module):
    """Residual block: GN–SiLU–(resample)–conv, noise-embedding modulation, GN–SiLU–dropout–conv,
    plus the (resampled, projected) input; then optional multi-head self-attention."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: Flavor,
                 resampling: str | None = None, attention: bool = False, dropout: float = 0.0,
                 takes_skip: bool = False):
        super().__init__()
        self.flavor, self.resampling, self.dropout = flavor, resampling, dropout
        self.takes_skip = takes_skip  # decoder blocks concatenate one encoder feature map first
        self.out_channels = out_channels
        self.norm0 = group_norm(in_channels, flavor.eps)
        self.conv0 = _init(nn.Conv2d(in_channels, out_channels, 3, padding=1), flavor)
        self.affine = _init(nn.Linear(emb_channels, out_channels * (2 if flavor.scale_shift else 1)), flavor)
        self.norm1 = group_norm(out_channels, flavor.eps)
        self.conv1 = _init(nn.Conv2d(out_channels, out_channels, 3, padding=1), flavor, flavor.zero_gain)
        project = in_channels != out_channels or (resampling is not None and flavor.resample_proj)
        self.skip = _init(nn.Conv2d(in_channels, out_channels, 1), flavor) if project else None
        self.num_heads = 0
        if attention:
            per_head = flavor.channels_per_head
            self.num_heads = 1 if per_head is None else max(1, out_channels // per_head)
            self.norm2 = group_norm(out_channels, flavor.eps)
            self.qkv = _init(nn.Conv2d(out_channels, 3 * out_channels, 1), flavor,
                             math.sqrt(0.2) if flavor.xavier else 1.0)
            self.proj = _init(nn.Conv2d(out_channels, out_channels, 1), flavor, flavor.zero_gain)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(resample(F.silu(self.norm0(x)), self.resampling))
        params = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.flavor.scale_shift:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(self.norm1(h) * (scale + 1) + shift)
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(F.dropout(h, self.dropout, self.training))
        skip = resample(x, self.resampling)
        x = (h + (self.skip(skip) if self.skip is not None else skip)) * self.flavor.skip_scale
        if self.num_heads:
            b, c, hh, ww = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(b, 3, self.num_heads, c // self.num_heads, hh * ww).unbind(1)
            a = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
            x = (self.proj(a.transpose(-1, -2).reshape(b, c, hh, ww)) + x) * self.flavor.skip_scale
        return x


class EDMUNet(nn.Module):
    """The shared encoder–decoder; subclasses give the flavor and the noise/label embedding."""

    flavor: Flavor

    def __init__(self, input_size: int, in_channels: int, extra_in_channels: int, num_classes: int | None,
                 model_channels: int, channel_mult: tuple[int, ...], num_blocks: int,
                 attn_resolutions: tuple[int, ...], dropout: float, first_channels: int, emb_channels: int):
        super().__init__()
        self.input_size, self.in_channels, self.out_channels = input_size, in_channels, in_channels
        self.extra_in_channels, self.num_classes = extra_in_channels, num_classes
        self.num_levels = len(channel_mult)
        if input_size % 2 ** (self.num_levels - 1):
            raise UserError(f"edm_unets: input_size {input_size} must be divisible by 2^{self.num_levels - 1} "
                            f"(channel_mult has {self.num_levels} levels)")
        fl = self.flavor

        def block(cin, cout, **kw):
            return UNetBlock(cin, cout, emb_channels, fl, dropout=dropout, **kw)

        self.input_conv = _init(nn.Conv2d(in_channels + extra_in_channels, first_channels, 3, padding=1), fl)
        self.encoder = nn.ModuleList()
        skips, cout = [first_channels], first_channels
        for level, mult in enumerate(channel_mult):
            res = input_size >> level
            if level > 0:
                self.encoder.append(block(cout, cout, resampling="down"))
                skips.append(cout)
            for _ in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.encoder.append(block(cin, cout, attention=res in attn_resolutions))
                skips.append(cout)
        self.decoder = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = input_size >> level
            if level == self.num_levels - 1:
                self.decoder.append(block(cout, cout, attention=True))
                self.decoder.append(block(cout, cout))
            else:
                self.decoder.append(block(cout, cout, resampling="up"))
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attend = res in attn_resolutions and (fl.channels_per_head is not None or idx == num_blocks)
                self.decoder.append(block(cin, cout, attention=attend, takes_skip=True))
        self.out_norm = group_norm(cout, fl.eps)
        self.out_conv = _init(nn.Conv2d(cout, self.out_channels, 3, padding=1), fl, fl.zero_gain)

    def embed(self, noise_labels: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, **unused) -> torch.Tensor:
        """x: (B, in+extra, H, W), H and W divisible by 2^(levels−1) (any patch size); t: (B,) c_noise;
        y: (B,) integer labels (num_classes = null) or None for an unconditional net."""
        if x.shape[-1] % 2 ** (self.num_levels - 1) or x.shape[-2] % 2 ** (self.num_levels - 1):
            raise UserError(f"edm_unets: input side {tuple(x.shape[-2:])} must be divisible by "
                            f"2^{self.num_levels - 1}; use larger patches or fewer levels")
        if (self.num_classes is None) != (y is None):
            raise ValueError("class labels y must be given exactly when the net is class-conditional")
        emb = self.embed(t, y)
        x = self.input_conv(x)
        skips = [x]
        for blk in self.encoder:
            x = blk(x, emb)
            skips.append(x)
        for blk in self.decoder:
            if blk.takes_skip:
                x = torch.cat([x, skips.pop()], dim=1)
            x = blk(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))

    def example_inputs(self, batch_size: int, device: torch.device) -> tuple:
        channels = self.in_channels + self.extra_in_channels
        x = torch.randn(batch_size, channels, self.input_size, self.input_size, device=device)
        t = torch.zeros(batch_size, device=device)
        y = torch.zeros(batch_size, dtype=torch.long, device=device) if self.num_classes is not None else None
        return (x, t, y)


class SongUNet(EDMUNet):
    """DDPM++ (Song et al. 2021) as configured by EDM."""

    flavor = DDPMPP_FLAVOR

    def __init__(self, input_size: int = 64, in_channels: int = 3, extra_in_channels: int = 0,
                 num_classes: int | None = None, model_channels: int = 128, channel_mult=(1, 2, 2, 2),
                 num_blocks: int = 4, attn_resolutions=(16,), dropout: float = 0.10):
        emb_channels = 4 * model_channels
        super().__init__(input_size, in_channels, extra_in_channels, num_classes, model_channels,
                         tuple(channel_mult), num_blocks, tuple(attn_resolutions), dropout,
                         first_channels=model_channels, emb_channels=emb_channels)
        self.noise_channels = model_channels
        fl = self.flavor
        self.map_label = _init(nn.Linear(num_classes, model_channels), fl) if num_classes else None
        self.map_layer0 = _init(nn.Linear(model_channels, emb_channels), fl)
        self.map_layer1 = _init(nn.Linear(emb_channels, emb_channels), fl)

    def embed(self, noise_labels, y):
        emb = positional_embedding(noise_labels, self.noise_channels, endpoint=True).to(self.map_layer0.weight.dtype)
        if self.map_label is not None:
            # one-hot·√L has the norm of an L-dim unit-variance vector, like the sin/cos features
            emb = emb + self.map_label(one_hot(y, self.num_classes, emb.dtype) * math.sqrt(self.num_classes))
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))


class DhariwalUNet(EDMUNet):
    """ADM (Dhariwal & Nichol 2021) as configured by EDM."""

    flavor = ADM_FLAVOR

    def __init__(self, input_size: int = 64, in_channels: int = 3, extra_in_channels: int = 0,
                 num_classes: int | None = 1000, model_channels: int = 192, channel_mult=(1, 2, 3, 4),
                 num_blocks: int = 3, attn_resolutions=(32, 16, 8), dropout: float = 0.10):
        emb_channels = 4 * model_channels
        super().__init__(input_size, in_channels, extra_in_channels, num_classes, model_channels,
                         tuple(channel_mult), num_blocks, tuple(attn_resolutions), dropout,
                         first_channels=model_channels * channel_mult[0], emb_channels=emb_channels)
        self.noise_channels = model_channels
        self.map_layer0 = nn.Linear(model_channels, emb_channels)
        self.map_layer1 = nn.Linear(emb_channels, emb_channels)
        self.map_label = None
        if num_classes:
            self.map_label = nn.Linear(num_classes, emb_channels, bias=False)
            nn.init.normal_(self.map_label.weight)  # unit-variance class embeddings

    def embed(self, noise_labels, y):
        emb = positional_embedding(noise_labels, self.noise_channels, endpoint=False).to(self.map_layer0.weight.dtype)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(one_hot(y, self.num_classes, emb.dtype))
        return F.silu(emb)


# Named configs. Paper scale (EDM Table 7 / Patch Diffusion README): DDPM++ at 64 px with cres
# 1,2,2,2 (FFHQ/AFHQv2-64, Patch Diffusion's CelebA-64 and AFHQv2-Wild-64), DDPM++ at 32 px
# (CIFAR-10), ADM at ImageNet-64. Dropout is a run param (CelebA 0.05, AFHQv2 0.25).
CONFIGS = {
    "ddpmpp": (SongUNet, dict(input_size=64, model_channels=128, channel_mult=(1, 2, 2, 2), num_blocks=4,
                              attn_resolutions=(16,), dropout=0.05)),
    "ddpmpp-cifar10": (SongUNet, dict(input_size=32, model_channels=128, channel_mult=(2, 2, 2), num_blocks=4,
                                      attn_resolutions=(16,), dropout=0.13)),
    "adm": (DhariwalUNet, dict(input_size=64, model_channels=192, channel_mult=(1, 2, 3, 4), num_blocks=3,
                               attn_resolutions=(32, 16, 8), dropout=0.10, num_classes=1000)),
    # CPU scale: 16×16 inputs, attention at the lowest (8×8) level.
    "ddpmpp-mini": (SongUNet, dict(input_size=16, model_channels=32, channel_mult=(1, 2), num_blocks=1,
                                   attn_resolutions=(8,), dropout=0.0)),
    "adm-mini": (DhariwalUNet, dict(input_size=16, model_channels=32, channel_mult=(1, 2), num_blocks=1,
                                    attn_resolutions=(8,), dropout=0.0, num_classes=None)),
}


def _builder(name: str, cls: type, defaults: dict):
    def build(**kwargs) -> EDMUNet:
        if "image_size" in kwargs:
            raise UserError(f"{name} is a pixel/latent-space UNet: give input_size (the side of its input), "
                            f"not image_size")
        return cls(**{**defaults, **kwargs})

    build.__doc__ = f"{name}: {cls.__name__} with {defaults}."
    return build


for _name, (_cls, _defaults) in CONFIGS.items():
    register(_name)(_builder(_name, _cls, _defaults))
