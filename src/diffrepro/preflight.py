"""Stop a paper profile at the start of its first stage, not hours in: no GPU, or weights missing.

A paper profile declares `needs_gpu: true`; on a machine where torch sees no CUDA device every
stage refuses to start (set `DIFFREPRO_ALLOW_CPU=1` to run a tiny-size copy on the CPU, as the
tests do). Every pretrained file the profile reads, at any stage, is looked for before any stage
works, and all the missing ones are named in one line with where each comes from.
"""

from __future__ import annotations

import os
from pathlib import Path

from diffrepro.errors import UserError
from diffrepro.sources import (ALEXNET_HELP, INCEPTION_HELP, REFERENCE_URLS, SD_SUBFOLDERS, SD_V14_REPO, SD_VAE_HELP,
                               release_url)


def require_gpu(params: dict) -> None:
    if not params.get("needs_gpu") or os.environ.get("DIFFREPRO_ALLOW_CPU", "") not in ("", "0"):
        return
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"profile {params['profile']} needs CUDA GPUs (`needs_gpu: true`) and torch "
                        f"{torch.__version__} sees none here: run it on a GPU runner (README, Running on GPUs), "
                        "or set DIFFREPRO_ALLOW_CPU=1 for a tiny-size copy on the CPU")


def required_weights(params: dict) -> list[tuple[Path, str]]:
    """(file or folder, where it comes from) of every pretrained file the profile's stages read."""
    needed = []
    if params["autoencoder"]["kind"] == "sd_vae":
        needed.append((Path(params["autoencoder"]["path"]) / "config.json", SD_VAE_HELP))
    if params["features"]["kind"] == "inception":  # LPIPS is scored whenever features are Inception
        needed += [(Path(params["features"]["inception_weights"]), INCEPTION_HELP),
                   (Path(params["evaluate"]["alexnet_weights"]), ALEXNET_HELP)]
    if params["evaluate"]["reference_batch"]:
        path = Path(params["evaluate"]["reference_batch"])
        needed.append((path, REFERENCE_URLS.get(path.name, "openai/guided-diffusion evaluations/README.md")))
    for run in [params["pretrain"], *params["runs"].values()]:
        if run["release"]:
            needed.append((Path(run["init_from"]), f"the official {run['release']} release: "
                                                   f"{release_url(run['release'], run['init_from'])}"))
        if run["model_kwargs"].get("sd_dir"):
            needed += [(Path(run["model_kwargs"]["sd_dir"]) / part, f"a local copy of the Hugging Face repo {SD_V14_REPO}")
                       for part in SD_SUBFOLDERS]
        if run["model_kwargs"].get("synset_words"):
            needed.append((Path(run["model_kwargs"]["synset_words"]),
                           "ImageNet's class names: LOC_synset_mapping.txt of its Kaggle release"))
    unique = {path: source for path, source in needed}
    return list(unique.items())


def require_weights(params: dict) -> None:
    missing = [(path, source) for path, source in required_weights(params) if not path.exists()]
    if missing:
        listed = "; ".join(f"{path} ({source})" for path, source in missing)
        raise UserError(f"profile {params['profile']} needs {len(missing)} file(s) not found here: {listed}")


def preflight(params: dict) -> None:
    require_gpu(params)
    require_weights(params)
