"""DiT: a latent diffusion transformer with adaLN-Zero conditioning (Peebles & Xie, 2023).

Parameter names follow the official facebookresearch/DiT layout (`x_embedder.proj`,
`t_embedder.mlp.0`, `y_embedder.embedding_table`, `blocks.N.adaLN_modulation.1`,
`final_layer.linear`, `pos_embed`) so the released checkpoints load by name.

Options beyond the paper, all off by default:
- `num_super_classes > 0` (FineDiffusion): one tiered table of fine rows then superclass rows,
  and no null row.
- `affine_norms` (FineDiffusion): LayerNorms get γ/β, initialised to the identity.
- `block_scales` (DiffFit): a learnable per-channel γ, initialised to 1, scales each block's
  attention and MLP residual branch.
- `class_embed_init_std`: the paper's 0.02 hides class conditioning for thousands of steps at
  miniature scale, so the CPU default uses a larger value.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from timm.layers import Attention, Mlp, PatchEmbed
from torch.utils.checkpoint import checkpoint

from diffrepro.errors import UserError
from diffrepro.models.registry import register


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: per-sample shift and scale of every token's normalised features."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_frequencies(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal code of (possibly fractional) timesteps: cos half, then sin half."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    code = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        code = torch.cat([code, torch.zeros_like(code[:, :1])], dim=-1)
    return code


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(len(positions), dim): sin half then cos half, frequencies 1/10000^(2i/dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """MAE's fixed 2-D table, tokens in row-major order: first half codes the column, second the row."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols.reshape(-1)), sincos_1d(dim // 2, rows.reshape(-1))], dim=1)


class TimestepEmbedder(nn.Module):
    """Timestep → frequency code → MLP → conditioning vector."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_frequencies(t, self.frequency_size))


class LabelEmbedder(nn.Module):
    """Class label → vector. Class dropout happens in the method (labels arrive already dropped)."""

    def __init__(self, num_rows: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_rows, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class DiTBlock(nn.Module):
    """Transformer block whose LayerNorms are modulated by c and whose residuals are gated (adaLN-Zero)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0,
                 affine_norms: bool = False, block_scales: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=affine_norms, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=affine_norms, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        if block_scales:
            self.gamma_msa = nn.Parameter(torch.ones(hidden_size))
            self.gamma_mlp = nn.Parameter(torch.ones(hidden_size))
        else:
            self.gamma_msa = self.gamma_mlp = None

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        attn = self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.gamma_msa is not None:
            attn = attn * self.gamma_msa
        x = x + gate_msa.unsqueeze(1) * attn
        mlp = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        if self.gamma_mlp is not None:
            mlp = mlp * self.gamma_mlp
        return x + gate_mlp.unsqueeze(1) * mlp


class FinalLayer(nn.Module):
    """Modulated LayerNorm then a linear map from each token to its p×p×C_out patch."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, affine_norms: bool = False):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=affine_norms, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Patchify → add sin-cos positions → N adaLN-Zero blocks conditioned on t (+ y) → unpatchify.

    Output: (B, out_channels, H, W); with `learn_sigma` the first `in_channels` are ε and the rest
    the interpolation coefficient of the learned variance.
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0,
                 num_classes: int | None = 1000, learn_sigma: bool = True,
                 class_embed_init_std: float = 0.02, affine_norms: bool = False,
                 num_super_classes: int = 0, block_scales: bool = False,
                 grad_checkpointing: bool = False):
        super().__init__()
        if input_size % patch_size:
            raise UserError(f"DiT input_size {input_size} is not a multiple of patch_size {patch_size}")
        if num_super_classes and not num_classes:
            raise UserError("DiT num_super_classes needs num_classes (the fine classes) to be set")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes = num_classes or None
        self.num_super_classes = num_super_classes
        self.class_embed_init_std = class_embed_init_std
        self.grad_checkpointing = grad_checkpointing

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if self.num_classes:
            # FineDiffusion's tiered table has no null row: its "unconditional" branch is the superclass.
            rows = num_classes + (num_super_classes if num_super_classes else 1)
            self.y_embedder = LabelEmbedder(rows, hidden_size)
        else:
            self.y_embedder = None
        num_patches = (input_size // patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, affine_norms, block_scales) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, affine_norms)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: xavier Linears, N(0, .02) t-MLP, zero adaLN and output ⇒ blocks start as identity."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        grid = int(self.x_embedder.num_patches ** 0.5)
        self.pos_embed.data.copy_(sincos_2d(self.pos_embed.shape[-1], grid).float()[None])
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=self.class_embed_init_std)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, T, p·p·C) in the token order and channel layout that `unpatchify` reads."""
        b, c, h, w = x.shape
        p = self.patch_size
        x = x.reshape(b, c, h // p, p, w // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p·p·C_out) → (B, C_out, H, W), tokens in row-major order."""
        b, t, _ = x.shape
        p, c = self.patch_size, self.out_channels
        side = int(round(t ** 0.5))
        x = x.reshape(b, side, side, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(b, c, side * p, side * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, **unused) -> torch.Tensor:
        """x: (B, C, H, W) latents; t: (B,) timestep indices (int or float); y: (B,) class rows."""
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            if y is None:
                raise ValueError("this DiT is class-conditional: forward needs labels y")
            c = c + self.y_embedder(y)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, c, use_reentrant=False)
            else:
                tokens = block(tokens, c)
        return self.unpatchify(self.final_layer(tokens, c))

    def example_inputs(self, batch_size: int, device: torch.device) -> tuple:
        x = torch.randn(batch_size, self.in_channels, self.input_size, self.input_size, device=device)
        t = torch.full((batch_size,), 500, dtype=torch.long, device=device)
        y = torch.zeros(batch_size, dtype=torch.long, device=device) if self.y_embedder is not None else None
        return (x, t, y)


# (depth, hidden size, heads) of the paper's four sizes, and two CPU-scale sizes.
PAPER_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
SMALL_SIZES = {"mini": (4, 128, 4), "tiny": (2, 64, 2)}
VAE_DOWNSAMPLE = 8  # SD-VAE: 256 px → 32×32×4 latent


def _paper_config(name: str, depth: int, hidden: int, heads: int, patch: int):
    def build(image_size: int | None = None, input_size: int | None = None, in_channels: int = 4,
              num_classes: int | None = 1000, **kwargs) -> DiT:
        if image_size is not None:
            if image_size % VAE_DOWNSAMPLE:
                raise UserError(f"{name}: image_size {image_size} must be a multiple of {VAE_DOWNSAMPLE} (SD-VAE)")
            if input_size is not None and input_size != image_size // VAE_DOWNSAMPLE:
                raise UserError(f"{name}: image_size {image_size} and input_size {input_size} disagree "
                                f"(latent side = image_size / {VAE_DOWNSAMPLE}); give only one")
            input_size = image_size // VAE_DOWNSAMPLE
        return DiT(input_size=input_size or 32, patch_size=patch, in_channels=in_channels, hidden_size=hidden,
                   depth=depth, num_heads=heads, num_classes=num_classes, **kwargs)

    build.__doc__ = f"{name}: depth {depth}, hidden {hidden}, {heads} heads, patch {patch}, on SD-VAE latents."
    return build


def _small_config(name: str, depth: int, hidden: int, heads: int, patch: int):
    def build(input_size: int = 8, in_channels: int = 4, num_classes: int | None = 1000,
              image_size: int | None = None, **kwargs) -> DiT:
        if image_size is not None:
            raise UserError(f"{name} has no fixed autoencoder: give input_size (the side of its input), "
                            f"not image_size")
        return DiT(input_size=input_size, patch_size=patch, in_channels=in_channels, hidden_size=hidden,
                   depth=depth, num_heads=heads, num_classes=num_classes, **kwargs)

    build.__doc__ = f"{name}: depth {depth}, hidden {hidden}, {heads} heads, patch {patch}, CPU scale."
    return build


for _size, (_depth, _hidden, _heads) in PAPER_SIZES.items():
    for _patch in (2, 4, 8):
        _name = f"DiT-{_size}/{_patch}"
        register(_name)(_paper_config(_name, _depth, _hidden, _heads, _patch))
for _size, (_depth, _hidden, _heads) in SMALL_SIZES.items():
    _name = f"DiT-{_size}/2"
    register(_name)(_small_config(_name, _depth, _hidden, _heads, 2))
