"""DiMR: a multi-resolution diffusion backbone with time-dependent layer norm (Liu et al., 2024).

The network reads the same noisy latent at several resolutions (branches), lowest first:
- a Transformer branch (patch 2 for "/2R"): U-ViT's class token and long skips, gated-GELU MLPs;
- ConvNeXt branches at higher resolutions (patch 1 = full latent resolution for "/2R").
Every block output of a branch is concatenated, normalised, projected and pixel-shuffled up, then
added to the next branch's input embedding; this cascade replaces the one-shot linear+pixel-shuffle
output of DiT/U-ViT, which the paper blames for distortion. Each branch predicts ε at its own
resolution (the multi-scale loss is in `methods/dimr.py`).

Time enters only through TD-LN: every norm parameter θ is p1 + σ(w⊙τ + b)⊙(p0 − p1), four
vectors per θ, instead of an adaLN MLP (662,400 parameters in all of DiMR-XL, 0.13 %). Blocks use a
time-dependent RMSNorm (scale only); the upsamplers and output heads a time-dependent LayerNorm.

Output: a list of ε predictions, lowest resolution first, in training mode; only the full-resolution
ε tensor in eval mode (what the sampler calls). `forward(..., all_resolutions=True/False)` overrides.

Layout follows the official qihao067/DiMR code (channel-last features, qkv split, pixel-shuffle
channel order, concatenation order) so that its checkpoints map onto this module by renaming keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from diffrepro.errors import UserError
from diffrepro.models.registry import register

MLP_RATIO = 2  # gated MLP hidden width = 2·dim (three dim×hidden matrices)
VAE_DOWNSAMPLE = 8  # SD-VAE: 256 px → 32×32×4 latent


def time_condition(t: torch.Tensor, num_timesteps: int = 1000) -> torch.Tensor:
    """τ ∈ (−1, 1] from the 0-based DDPM timestep, exactly as the official code computes it.

    It calls n/N·8 − 4 "log_snr" for the 1-based step n = t + 1 and feeds τ = log_snr / 4: not a real
    log-SNR but a linear remap of the step that grows with the noise level.
    """
    return ((t.float() + 1) / num_timesteps * 8 - 4) / 4


class TimeDependentParameter(nn.Module):
    """A norm's scale or shift vector as a function of time: θ(τ) = p1 + σ(w⊙τ + b)⊙(p0 − p1).

    p0 = p1 at initialisation and w = 1 + slope with slope = b = 0, so θ starts time-independent.
    The gate (slope, offset) is what the official optimizer keeps out of weight decay.
    `time_dependent=False` (the ablation) makes it one plain learned vector.
    """

    def __init__(self, size: int, init_value: float, time_dependent: bool = True):
        super().__init__()
        self.time_dependent = time_dependent
        if time_dependent:
            self.p0 = nn.Parameter(torch.full((size,), init_value))
            self.p1 = nn.Parameter(torch.full((size,), init_value))
            self.slope = nn.Parameter(torch.zeros(size))
            self.offset = nn.Parameter(torch.zeros(size))
        else:
            self.value = nn.Parameter(torch.full((size,), init_value))

    def gate_parameters(self) -> list[nn.Parameter]:
        return [self.slope, self.offset] if self.time_dependent else []

    def forward(self, tau: torch.Tensor) -> torch.Tensor:
        """(B,) → (B, size)."""
        if not self.time_dependent:
            return self.value.expand(tau.shape[0], -1)
        gate = torch.sigmoid(torch.addcmul(self.offset, tau[:, None], 1 + self.slope))
        return torch.addcmul(self.p1, gate, self.p0 - self.p1)


def _per_sample(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, C) → broadcastable against channel-last x of shape (B, ..., C)."""
    return theta.view(theta.shape[0], *([1] * (x.dim() - 2)), theta.shape[1]).to(x.dtype)


class TimeDependentRMSNorm(nn.Module):
    """RMSNorm with a time-dependent scale and no shift (every block). The official eps is added to
    the RMS, not under the square root."""

    eps = 1e-8

    def __init__(self, dim: int, time_dependent: bool = True):
        super().__init__()
        self.dim = dim
        self.scale = TimeDependentParameter(dim, 1.0, time_dependent)

    def forward(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        rms = x.norm(dim=-1, keepdim=True) / math.sqrt(self.dim)
        return x / (rms + self.eps) * _per_sample(self.scale(tau), x)


class TimeDependentLayerNorm(nn.Module):
    """LayerNorm with a time-dependent scale and shift (the upsamplers and output heads)."""

    eps = 1e-5

    def __init__(self, dim: int, time_dependent: bool = True):
        super().__init__()
        self.dim = dim
        self.scale = TimeDependentParameter(dim, 1.0, time_dependent)
        self.shift = TimeDependentParameter(dim, 0.0, time_dependent)

    def forward(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x, (self.dim,), eps=self.eps)
        return torch.addcmul(_per_sample(self.shift(tau), x), _per_sample(self.scale(tau), x), x)


class GatedMLP(nn.Module):
    """Pre-norm gated-GELU MLP: W2 (GELU(W0 x) ⊙ W1 x)."""

    def __init__(self, dim: int, hidden: int, td_ln: bool):
        super().__init__()
        self.norm = TimeDependentRMSNorm(dim, td_ln)
        self.w0 = nn.Linear(dim, hidden)
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        x = self.norm(x, tau)
        return self.w2(F.gelu(self.w0(x)) * self.w1(x))


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention; qkv without bias, output projection with bias."""

    def __init__(self, dim: int, num_heads: int, td_ln: bool):
        super().__init__()
        if dim % num_heads:
            raise UserError(f"DiMR: Transformer dim {dim} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = TimeDependentRMSNorm(dim, td_ln)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(self.norm(x, tau)).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, td_ln: bool):
        super().__init__()
        self.attn = SelfAttention(dim, num_heads, td_ln)
        self.mlp = GatedMLP(dim, MLP_RATIO * dim, td_ln)

    def forward(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x, tau)
        return x + self.mlp(x, tau)


class ConvNeXtBlock(nn.Module):
    """x + depthwise conv(x) (no norm before it), then x + gated MLP(TD-RMSNorm(x)); channel-last."""

    def __init__(self, dim: int, kernel_size: int, td_ln: bool):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.mlp = GatedMLP(dim, MLP_RATIO * dim, td_ln)

    def forward(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        x = x + self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(x, tau)


class LongSkipStack(nn.Module):
    """U-ViT long skips over an odd number of blocks: the first half keeps its outputs, one middle
    block, then each second-half block first fuses Linear(2d → d)[x, last kept output]."""

    def __init__(self, blocks: list[nn.Module], dim: int, grad_checkpointing: bool):
        super().__init__()
        if len(blocks) % 2 == 0:
            raise UserError(f"DiMR: a branch needs an odd depth (in-half, middle, out-half), got {len(blocks)}")
        self.blocks = nn.ModuleList(blocks)
        self.skip_fusions = nn.ModuleList(nn.Linear(2 * dim, dim) for _ in range(len(blocks) // 2))
        self.grad_checkpointing = grad_checkpointing

    def forward(self, x: torch.Tensor, tau: torch.Tensor, keep_outputs: bool) -> tuple[torch.Tensor, list]:
        """Returns the last output and, with `keep_outputs`, every block's output in order."""
        half = len(self.blocks) // 2
        skips, outputs = [], []
        for i, block in enumerate(self.blocks):
            if i > half:
                x = self.skip_fusions[i - half - 1](torch.cat([x, skips.pop()], dim=-1))
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, tau, use_reentrant=False)
            else:
                x = block(x, tau)
            if i < half:
                skips.append(x)
            if keep_outputs:
                outputs.append(x)
        return x, outputs


def pixel_shuffle_channels_last(x: torch.Tensor, ratio: int) -> torch.Tensor:
    """(B, H, W, r·r·C) → (B, r·H, r·W, C); output pixel (r·h + i, r·w + j) reads channels
    [(i·r + j)·C, (i·r + j + 1)·C) — the official channel order (not torch's pixel_shuffle)."""
    b, h, w, c = x.shape
    c //= ratio * ratio
    x = x.reshape(b, h, w, ratio, ratio, c).transpose(2, 3)
    return x.reshape(b, h * ratio, w * ratio, c)


class LowResUpsampler(nn.Module):
    """All block maps of the lower branch (concatenated) → TD-LN → Linear → pixel shuffle → TD-LN."""

    def __init__(self, lowres_channels: int, dim: int, ratio: int, td_ln: bool):
        super().__init__()
        self.ratio = ratio
        self.norm_in = TimeDependentLayerNorm(lowres_channels, td_ln)
        self.proj = nn.Linear(lowres_channels, dim * ratio * ratio)
        self.norm_out = TimeDependentLayerNorm(dim, td_ln)

    def forward(self, features: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        x = pixel_shuffle_channels_last(self.proj(self.norm_in(features, tau)), self.ratio)
        return self.norm_out(x, tau)


class OutputHead(nn.Module):
    """TD-LayerNorm then a 3×3 conv to ε at the branch's resolution."""

    def __init__(self, dim: int, out_channels: int, td_ln: bool, kernel_size: int = 3):
        super().__init__()
        self.norm = TimeDependentLayerNorm(dim, td_ln)
        self.conv = nn.Conv2d(dim, out_channels, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(x, tau).permute(0, 3, 1, 2))


@dataclass(frozen=True)
class TransformerStage:
    dim: int
    depth: int  # blocks actually built (odd)
    num_heads: int
    patch_size: int = 2


@dataclass(frozen=True)
class ConvNeXtStage:
    dim: int
    depth: int  # blocks actually built (odd)
    patch_size: int = 1
    kernel_size: int = 7


class TransformerBranch(nn.Module):
    """Lowest resolution: patchify, learned positions, class token, Transformer blocks, ε head."""

    def __init__(self, stage: TransformerStage, in_channels: int, grid: int, num_classes: int | None,
                 td_ln: bool, grad_checkpointing: bool):
        super().__init__()
        p = stage.patch_size
        self.patch_embed = nn.Conv2d(in_channels, stage.dim, p, stride=p)
        self.position_embeddings = nn.Parameter(torch.zeros(1, grid, grid, stage.dim))
        # One extra row: the null label that classifier-free guidance drops labels to.
        self.class_embedding = nn.Embedding(num_classes + 1, stage.dim) if num_classes else None
        self.stack = LongSkipStack([TransformerBlock(stage.dim, stage.num_heads, td_ln) for _ in range(stage.depth)],
                                   stage.dim, grad_checkpointing)
        self.head = OutputHead(stage.dim, in_channels, td_ln)

    def forward(self, x: torch.Tensor, tau: torch.Tensor, y: torch.Tensor | None, keep_outputs: bool):
        h = self.patch_embed(x).permute(0, 2, 3, 1) + self.position_embeddings
        b, g, _, d = h.shape
        h = h.reshape(b, g * g, d)
        if self.class_embedding is not None:
            h = torch.cat([self.class_embedding(y)[:, None], h], dim=1)
        maps = [h]
        h, outputs = self.stack(h, tau, keep_outputs)
        n_cls = 1 if self.class_embedding is not None else 0
        maps = [m[:, n_cls:].reshape(b, g, g, d) for m in maps + outputs] if keep_outputs else []
        return self.head(h[:, n_cls:].reshape(b, g, g, d), tau), maps


class ConvNeXtBranch(nn.Module):
    """Higher resolution: embed, learned positions, + upsampled lower-branch maps, ConvNeXt blocks, ε head."""

    def __init__(self, stage: ConvNeXtStage, in_channels: int, grid: int, lowres_channels: int, ratio: int,
                 td_ln: bool, grad_checkpointing: bool):
        super().__init__()
        p = stage.patch_size
        self.patch_embed = nn.Conv2d(in_channels, stage.dim, p, stride=p)
        self.position_embeddings = nn.Parameter(torch.zeros(1, grid, grid, stage.dim))
        self.upsample = LowResUpsampler(lowres_channels, stage.dim, ratio, td_ln)
        self.stack = LongSkipStack([ConvNeXtBlock(stage.dim, stage.kernel_size, td_ln) for _ in range(stage.depth)],
                                   stage.dim, grad_checkpointing)
        self.head = OutputHead(stage.dim, in_channels, td_ln)

    def forward(self, x: torch.Tensor, tau: torch.Tensor, lowres_maps: list, keep_outputs: bool):
        h = self.patch_embed(x).permute(0, 2, 3, 1) + self.position_embeddings
        h = h + self.upsample(torch.cat(lowres_maps, dim=-1), tau)
        maps = [h]
        h, outputs = self.stack(h, tau, keep_outputs)
        return self.head(h, tau), (maps + outputs if keep_outputs else [])


class DiMR(nn.Module):
    """Transformer branch → ConvNeXt branch(es), each fed all block maps of the one below.

    forward(x, t, y) — x: (B, C, H, W) latents; t: (B,) 0-based timestep indices (int or float);
    y: (B,) class rows, `num_classes` being the null label. Returns ε predictions, lowest resolution
    first (training mode), or the full-resolution ε only (eval mode); `all_resolutions` overrides.
    """

    def __init__(self, input_size: int, in_channels: int, num_classes: int | None,
                 transformer: TransformerStage, convnexts: tuple[ConvNeXtStage, ...],
                 td_ln: bool = True, grad_checkpointing: bool = False, num_timesteps: int = 1000):
        super().__init__()
        patches = [transformer.patch_size] + [s.patch_size for s in convnexts]
        if convnexts and patches[-1] != 1:
            raise UserError(f"DiMR: the last branch must run at full resolution (patch 1), got patches {patches}")
        for coarse, fine in zip(patches, patches[1:]):
            if coarse <= fine or coarse % fine:
                raise UserError(f"DiMR: branch patch sizes {patches} must decrease by integer ratios")
        if input_size % patches[0]:
            raise UserError(f"DiMR: input_size {input_size} is not a multiple of the Transformer patch {patches[0]}")
        self.input_size = input_size
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.num_classes = num_classes or None
        self.num_timesteps = num_timesteps
        self.transformer = TransformerBranch(transformer, in_channels, input_size // patches[0], self.num_classes,
                                             td_ln, grad_checkpointing)
        lowres_channels = transformer.dim * (transformer.depth + 1)  # input embedding + every block
        self.convnexts = nn.ModuleList()
        for stage, coarse in zip(convnexts, patches):
            self.convnexts.append(ConvNeXtBranch(stage, in_channels, input_size // stage.patch_size, lowres_channels,
                                                 coarse // stage.patch_size, td_ln, grad_checkpointing))
            lowres_channels = stage.dim * (stage.depth + 1)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Official init: trunc-normal(0.02) Linears (zero bias), embeddings and position tables;
        convolutions keep PyTorch's default."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=0.02)
        for branch in [self.transformer, *self.convnexts]:
            nn.init.trunc_normal_(branch.position_embeddings, std=0.02)

    def time_dependent_parameters(self) -> list[TimeDependentParameter]:
        return [m for m in self.modules() if isinstance(m, TimeDependentParameter)]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                all_resolutions: bool | None = None, **unused):
        if self.num_classes is not None and y is None:
            raise ValueError("this DiMR is class-conditional: forward needs labels y")
        tau = time_condition(t.reshape(-1).expand(x.shape[0]), self.num_timesteps)
        n = len(self.convnexts)
        eps, maps = self.transformer(x, tau, y, keep_outputs=n > 0)
        outputs = [eps]
        for i, branch in enumerate(self.convnexts):
            eps, maps = branch(x, tau, maps, keep_outputs=i < n - 1)
            outputs.append(eps)
        if all_resolutions is None:
            all_resolutions = self.training
        return outputs if all_resolutions else outputs[-1]

    def example_inputs(self, batch_size: int, device: torch.device) -> tuple:
        x = torch.randn(batch_size, self.in_channels, self.input_size, self.input_size, device=device)
        t = torch.full((batch_size,), 500, dtype=torch.long, device=device)
        y = torch.zeros(batch_size, dtype=torch.long, device=device) if self.num_classes else None
        return (x, t, y)


# Official configs/DiMR-{XL,G}-2R_imagenet256.py. Their ConvNeXt stage says num_blocks 20 (XL) / 29 (G),
# but the builder makes num_blocks // 2 * 2 + 1 blocks: 21 / 29; depths below are the blocks built.
PAPER_SIZES = {
    "XL": (TransformerStage(dim=960, depth=39, num_heads=16), ConvNeXtStage(dim=480, depth=21)),
    "G": (TransformerStage(dim=1152, depth=57, num_heads=16), ConvNeXtStage(dim=576, depth=29)),
}
# CPU scale: same shape (d₂ = d₁/2, Transformer ≈ 2/3 of the compute), about DiT-mini/2's GMACs.
SMALL_SIZES = {
    "mini": (TransformerStage(dim=96, depth=5, num_heads=4), ConvNeXtStage(dim=48, depth=3)),
}


def _paper_config(name: str, transformer: TransformerStage, convnext: ConvNeXtStage):
    def build(image_size: int | None = 256, input_size: int | None = None, in_channels: int = 4,
              num_classes: int | None = 1000, grad_checkpointing: bool = True, **kwargs) -> DiMR:
        if input_size is None:
            if image_size is None or image_size % VAE_DOWNSAMPLE:
                raise UserError(f"{name}: image_size {image_size} must be a multiple of {VAE_DOWNSAMPLE} (SD-VAE)")
            input_size = image_size // VAE_DOWNSAMPLE
        elif image_size is not None and input_size * VAE_DOWNSAMPLE != image_size:
            raise UserError(f"{name}: image_size {image_size} and input_size {input_size} disagree "
                            f"(latent side = image_size / {VAE_DOWNSAMPLE}); give only one")
        return DiMR(input_size, in_channels, num_classes, transformer, (convnext,),
                    grad_checkpointing=grad_checkpointing, **kwargs)

    build.__doc__ = f"{name}: {transformer} then {convnext}, on SD-VAE latents (gradient checkpointing on, as official)."
    return build


def _small_config(name: str, transformer: TransformerStage, convnext: ConvNeXtStage):
    def build(input_size: int = 8, in_channels: int = 4, num_classes: int | None = 1000,
              image_size: int | None = None, **kwargs) -> DiMR:
        if image_size is not None:
            raise UserError(f"{name} has no fixed autoencoder: give input_size (the side of its input), "
                            f"not image_size")
        return DiMR(input_size, in_channels, num_classes, transformer, (convnext,), **kwargs)

    build.__doc__ = f"{name}: {transformer} then {convnext}, CPU scale."
    return build


for _size, (_transformer, _convnext) in PAPER_SIZES.items():
    _name = f"DiMR-{_size}/2R"
    register(_name)(_paper_config(_name, _transformer, _convnext))
for _size, (_transformer, _convnext) in SMALL_SIZES.items():
    _name = f"DiMR-{_size}/2R"
    register(_name)(_small_config(_name, _transformer, _convnext))
