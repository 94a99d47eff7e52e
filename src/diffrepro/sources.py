"""Where every pretrained file comes from: the URLs and one-line hints that loaders and preflight print.

Kept apart from the loaders so that naming a missing file (preflight, before any stage works) costs
no torch import. Checksums: "UNKNOWN" wherever neither the authors nor their code publish one
(docs/data_and_weights.md, docs/official_weights.md).
"""

from __future__ import annotations

from pathlib import Path

INCEPTION_HELP = ("download pt_inception-2015-12-05-6726825d.pth from "
                  "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/ "
                  "(sha256 UNKNOWN: not published) and set features.inception_weights to its path")
ALEXNET_HELP = ("download https://download.pytorch.org/models/alexnet-owt-7be5be79.pth (torchvision "
                "AlexNet_Weights.IMAGENET1K_V1; sha256 UNKNOWN, only its prefix 7be5be79 is in the name) "
                "and set evaluate.alexnet_weights")
SD_VAE_HELP = ("download the SD VAE (huggingface.co/stabilityai/sd-vae-ft-ema or -ft-mse: "
               "config.json + diffusion_pytorch_model.safetensors) into that folder")
SD_V14_REPO = "CompVis/stable-diffusion-v1-4"
SD_SUBFOLDERS = ("vae", "text_encoder", "tokenizer", "unet")

REFERENCE_BATCH_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/"
REFERENCE_URLS = {"VIRTUAL_imagenet256_labeled.npz": REFERENCE_BATCH_URL + "256/VIRTUAL_imagenet256_labeled.npz",
                  "VIRTUAL_imagenet512.npz": REFERENCE_BATCH_URL + "512/VIRTUAL_imagenet512.npz"}

OFFICIAL_URLS = {
    "DiT-XL/2-256": "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt",
    "DiT-XL/2-512": "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt",
    "DiMR-XL/2R": "https://huggingface.co/QHL067/DiMR/resolve/main/DiMR-XL_2R_800epochs.pth",
    "DiMR-G/2R": "https://huggingface.co/QHL067/DiMR/resolve/main/DiMR-G_2R_800epochs.pth",
    "FineDiffusion-iNat": "https://drive.google.com/file/d/1BdwaIgSrAhI6qSuJkkSOtVrVNh-puNwC/view",
    "FineDiffusion-iNat-512": "https://drive.google.com/file/d/1EjMxlp3GbBkiNf9ObtTzT7aiAwc3qoDf/view",
    "FineDiffusion-VegFru": "https://drive.google.com/file/d/1YZm83UnNbYdM-sw1vBcacc8DUa7r7uD_/view",
    "Patch-Diffusion": "https://huggingface.co/zhendongw/patch-diffusion/tree/main",
}
RELEASE_DEFAULT = {  # release → the OFFICIAL_URLS entry of a file whose name is not in RELEASE_FILES
    "dit": "DiT-XL/2-256", "finediffusion": "FineDiffusion-iNat", "dimr": "DiMR-XL/2R",
    "patch_diffusion": "Patch-Diffusion",
}
RELEASE_FILES = {  # the file names the profiles put in models/ → their OFFICIAL_URLS entry. The official
    # names of the FineDiffusion 512 and VegFru files are UNKNOWN: those two names are chosen here.
    "DiT-XL-2-256x256.pt": "DiT-XL/2-256", "DiT-XL-2-512x512.pt": "DiT-XL/2-512",
    "FineDiffusion-iNat.pt": "FineDiffusion-iNat", "FineDiffusion-iNat-512.pt": "FineDiffusion-iNat-512",
    "FineDiffusion-VegFru.pt": "FineDiffusion-VegFru",
    "DiMR-XL_2R_800epochs.pth": "DiMR-XL/2R", "DiMR-G_2R_800epochs.pth": "DiMR-G/2R",
}


def release_url(release: str, path: str | Path) -> str:
    """Where `path`, a file of `release`, is downloaded from."""
    return OFFICIAL_URLS[RELEASE_FILES.get(Path(path).name, RELEASE_DEFAULT[release])]
