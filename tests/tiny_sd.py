"""Stable Diffusion v1.4's components at toy size, built offline with the real classes, for the
tests that need an SD folder (`save_pretrained` each part) or the pieces themselves."""

from typing import NamedTuple

import torch
from torch import nn

from diffrepro.models.sd_unet import SD_V14_UNET_CONFIG


class TinySD(NamedTuple):
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    unet: nn.Module  # a raw diffusers UNet2DConditionModel


def tiny_sd_components(seed: int = 0) -> TinySD:
    """SD's structure at toy size: 4-level UNet with the same block types, a 2-level VAE
    (16 px ↔ 8×8×4 latents), a 2-layer CLIP text encoder and a real CLIPTokenizer whose vocabulary
    is the byte-level alphabet with no merges (so it tokenizes character by character)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    context_length, width = 16, 16
    chars = ByteLevel.alphabet()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [*chars, *(c + "</w>" for c in chars)]:
        vocab.setdefault(token, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=context_length)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**{
            **SD_V14_UNET_CONFIG, "sample_size": 8, "block_out_channels": (8, 16, 32, 32),
            "norm_num_groups": 4, "attention_head_dim": 2, "cross_attention_dim": width})
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1, norm_num_groups=4, sample_size=16, scaling_factor=0.18215)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=context_length,
            bos_token_id=0, eos_token_id=1, pad_token_id=1))
    for frozen in (vae, text_encoder):
        frozen.requires_grad_(False).eval()
    return TinySD(vae, text_encoder, tokenizer, unet)
