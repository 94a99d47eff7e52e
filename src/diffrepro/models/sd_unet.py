"""Stable Diffusion v1.4's UNet and the SD pieces around it (Immiscible Diffusion's SD experiments).

- `sd-v1.4-unet`: diffusers' `UNet2DConditionModel` with SD v1.4's config written out here (859,520,964
  parameters), randomly initialised (the "scratch" runs) or loaded from a local SD v1.4 folder
  (`pretrained`: the fine-tune runs). The official fine-tune script overwrote the loaded weights
  with a random init; here nothing re-initialises them.
- `SDUNet` puts it behind the repo's backbone interface `forward(x, t, y)`: a class label is mapped
  to its prompt's frozen CLIP embedding, and the null class to the empty prompt (the "" branch of
  classifier-free guidance), so the generic training loop and sampler drive it like any backbone.
  The prompts are the prepared data's class names (ImageNet wnids → their synonym lines), encoded
  once with the SD folder's text encoder.

diffusers/transformers are imported inside functions: the registry imports every backbone module,
and these imports cost seconds.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch
from torch import nn

from diffrepro.data import shards
from diffrepro.errors import UserError
from diffrepro.models.registry import register
from diffrepro.sources import SD_V14_REPO


# unet/config.json of CompVis/stable-diffusion-v1-4, every field written out (most equal diffusers'
# defaults, which the official scratch run relied on: it set only cross_attention_dim=768)
SD_V14_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    downsample_padding=1, mid_block_scale_factor=1, center_input_sample=False,
    flip_sin_to_cos=True, freq_shift=0,
)
# scheduler/scheduler_config.json of SD v1.4: PNDM for sampling; training uses DDPM on the same betas
SD_V14_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, clip_sample=False,
    prediction_type="epsilon",
)
SD_CONTEXT_LENGTH = 77  # CLIP's token positions
WNID = re.compile(r"n\d{8}")  # an ImageNet class named by its WordNet id (the prepared data's names)


class SDUNet(nn.Module):
    """SD's UNet as a backbone: `forward(x, t, y=None, encoder_hidden_states=None)` → ε (B, 4, H, W)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        self.in_channels = unet.config.in_channels
        self.out_channels = unet.config.out_channels
        self.input_size = unet.config.sample_size
        self.num_classes = None  # text-conditioned until a class context is set
        self.class_context = None

    def set_class_prompts(self, text_encoder, tokenizer, prompts: list[str]) -> None:
        """Condition on class labels: row y of the context is prompt y's CLIP embedding, row
        `num_classes` (the null class) the empty prompt's. The text encoder is frozen, so this
        equals encoding the prompt at every step, as the official script does."""
        self.set_class_context(encode_prompts(text_encoder, tokenizer, [*prompts, ""]))

    def set_class_context(self, context: torch.Tensor) -> None:
        """`context`: (classes + 1, tokens, width), the null class last. A plain tensor, not a
        buffer: not saved with the weights (it is rebuilt from the text encoder) and not broadcast
        by DDP at every step (1001 × 77 × 768 floats at paper scale); `forward` moves it once."""
        self.class_context = context
        self.num_classes = len(context) - 1

    def forward(self, x, t, y=None, encoder_hidden_states=None):
        if encoder_hidden_states is None:
            if y is None or self.class_context is None:
                raise UserError("SD UNet needs encoder_hidden_states, "
                                "or labels y after set_class_prompts(...)")
            if self.class_context.device != x.device:
                self.class_context = self.class_context.to(x.device)
            encoder_hidden_states = self.class_context[y.to(x.device)]
        return self.unet(x, t, encoder_hidden_states, return_dict=False)[0]

    def example_inputs(self, batch_size: int, device) -> tuple:
        """One latent, a timestep and a 77-token text context (SD v1.4 at 512 px: 64×64 latents)."""
        c = self.unet.config
        x = torch.randn(batch_size, c.in_channels, c.sample_size, c.sample_size, device=device)
        t = torch.full((batch_size,), 999, device=device)
        context = torch.randn(batch_size, SD_CONTEXT_LENGTH, c.cross_attention_dim, device=device)
        return x, t, None, context


@register("sd-v1.4-unet")
def sd_v14_unet(sd_dir: str | None = None, pretrained: bool = False, input_size: int | None = None,
                in_channels: int = 4, num_classes: int | None = None, classes_dir: str | None = None,
                synset_words: str | None = None, gradient_checkpointing: bool = False,
                image_size: int | None = None, **overrides) -> SDUNet:
    """The SD UNet of a run (kwargs from the run's `model_kwargs` and the data).

    Scratch: SD v1.4's architecture with diffusers' default init (`overrides` change the config,
    e.g. for a toy size). `pretrained`: the weights of `sd_dir`/unet (fine-tuning). `input_size`
    = latent side (32 for the paper's 256 px runs; it does not change the weights), or `image_size`
    in pixels (`info --image-size`: the SD VAE downsamples 8×). With
    `num_classes`, labels are conditioned on the class prompts of the prepared data in
    `classes_dir` (see `class_prompts`), encoded by `sd_dir`'s text encoder.
    """
    from diffusers import UNet2DConditionModel

    if image_size is not None:
        if image_size % 8 or (input_size is not None and input_size != image_size // 8):
            raise UserError(f"sd-v1.4-unet: image_size {image_size} must be 8 × the latent side (input_size)")
        input_size = image_size // 8
    if pretrained:
        if overrides:
            raise UserError(f"sd-v1.4-unet: config overrides {sorted(overrides)} "
                            "cannot change a pretrained UNet")
        unet = _load(UNet2DConditionModel, _checked_folder(_required(sd_dir, "sd_dir"), ("unet",))["unet"])
        if unet.config.in_channels != in_channels:
            raise UserError(f"{sd_dir}/unet takes {unet.config.in_channels} latent channels, the run's "
                            f"latents have {in_channels}: use the SD VAE (autoencoder.kind sd_vae)")
    else:
        unet = UNet2DConditionModel(**{**SD_V14_UNET_CONFIG, "in_channels": in_channels,
                                       "out_channels": in_channels, **overrides})
    if input_size is not None:
        unet.register_to_config(sample_size=input_size)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    model = SDUNet(unet)
    if num_classes is not None:
        prompts = class_prompts(_required(classes_dir, "classes_dir"), synset_words)
        if len(prompts) != num_classes:
            raise UserError(f"{classes_dir}/classes.json names {len(prompts)} classes, the run has "
                            f"{num_classes}: re-run `dvc repro prepare`")
        sd_dir = str(Path(_required(sd_dir, "sd_dir")).resolve())
        model.set_class_context(prompt_table(sd_dir, tuple(prompts)))
    return model


def _required(value, key: str):
    if value is None:
        raise UserError(f"params.yaml: the run's model_kwargs.{key} is needed by sd-v1.4-unet "
                        "(sd_dir: the local SD v1.4 folder; classes_dir: the prepared data)")
    return value


def _checked_folder(sd_dir: str | Path, names: tuple[str, ...]) -> dict[str, Path]:
    """The component folders of a local SD v1.4 copy, all checked before any is loaded."""
    paths = {name: Path(sd_dir) / name for name in names}
    for path in paths.values():
        if not path.is_dir():
            raise UserError(f"{path} is missing: sd_dir must be a local copy of the Hugging Face repo "
                            f"{SD_V14_REPO} (e.g. `hf download {SD_V14_REPO} --local-dir {sd_dir}`)")
    return paths


def _load(cls, path: Path):
    try:
        return cls.from_pretrained(path)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load {path} ({first_line}); re-download it from {SD_V14_REPO}") from err


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids padded/truncated to the tokenizer's context length, as the official script does."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
    """(len(prompts), context length, width) CLIP last hidden states, the UNet's cross-attention input."""
    device = text_encoder.device
    return torch.cat([text_encoder(tokenize(tokenizer, prompts[i:i + batch_size]).to(device))[0]
                      for i in range(0, len(prompts), batch_size)])


def imagenet_prompts(class_names: list[str], unique: bool = True) -> list[str]:
    """Prompt of each class: its line of the class list (e.g. "tench, Tinca tinca").

    The official list holds "crane" twice (lines 135 and 518: the bird and the machine), so two
    classes share a prompt and, in the official sampler, overwrite each other's image files. With
    `unique`, every name that occurs more than once gets its 0-based class index appended,
    "crane (class 134)" and "crane (class 517)"; `unique=False` keeps the official prompts.
    """
    names = [name.strip() for name in class_names]
    if not unique:
        return names
    repeated = {name for name in names if names.count(name) > 1}
    return [f"{name} (class {i})" if name in repeated else name for i, name in enumerate(names)]


def class_prompts(classes_dir: str | Path, synset_words: str | Path | None = None) -> list[str]:
    """The prompt of each class of the prepared data in `classes_dir`, for `imagenet_prompts`.

    A class named by an ImageNet wnid (the prepare stage's names) is given its synonym line from
    `synset_words`, a `<wnid> <names>` file (ImageNet's LOC_synset_mapping.txt, = Caffe's
    synset_words.txt): "n01440764" → "tench, Tinca tinca". Other names are used as they are.
    """
    names = [c["name"] for c in shards.read_classes(classes_dir)["classes"]]
    if any(WNID.fullmatch(name) for name in names):
        lines = _synset_lines(synset_words)
        missing = [name for name in names if WNID.fullmatch(name) and name not in lines]
        if missing:
            raise UserError(f"{synset_words} has no line for {missing[0]} ({len(missing)} classes missing)")
        names = [lines.get(name, name) for name in names]
    return imagenet_prompts(names)


def _synset_lines(path: str | Path | None) -> dict[str, str]:
    if path is None or not Path(path).is_file():
        raise UserError(f"{path} is missing: the SD prompts need ImageNet's class names; put the "
                        "`<wnid> <names>` list there (LOC_synset_mapping.txt of ImageNet's Kaggle release, "
                        "or Caffe's synset_words.txt) and set model_kwargs.synset_words to it")
    pairs = (line.strip().split(maxsplit=1) for line in Path(path).read_text().splitlines())
    return {pair[0]: pair[1] for pair in pairs if len(pair) == 2}


@functools.lru_cache(maxsize=1)
def prompt_table(sd_dir: str, prompts: tuple[str, ...]) -> torch.Tensor:
    """(len(prompts) + 1, tokens, width) CLIP embeddings of the prompts and of "" (the null class),
    by the frozen text encoder of the local SD folder (on the GPU when there is one). Cached: the
    sample stage rebuilds the network once per training snapshot."""
    from transformers import CLIPTextModel, CLIPTokenizer

    paths = _checked_folder(sd_dir, ("text_encoder", "tokenizer"))
    text_encoder = _load(CLIPTextModel, paths["text_encoder"]).requires_grad_(False).eval()
    tokenizer = _load(CLIPTokenizer, paths["tokenizer"])
    if torch.cuda.is_available():
        text_encoder.cuda()
    return encode_prompts(text_encoder, tokenizer, [*prompts, ""]).cpu()
