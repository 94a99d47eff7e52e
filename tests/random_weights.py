"""Random weights in the real architectures of files we cannot download here (the real loaders
are exercised on them). The FID Inception's: `diffrepro.device_standin.random_fid_inception_state`."""

from pathlib import Path


def save_random_lpips_weights(models_dir: Path) -> None:
    """Random weights in the layout of torchvision's alexnet-owt-7be5be79.pth (LPIPS's trunk), at
    the default `evaluate.alexnet_weights` path; LPIPS's linear layers come with the lpips package."""
    import torch
    import torchvision

    torch.save(torchvision.models.alexnet(weights=None).state_dict(), models_dir / "alexnet-owt-7be5be79.pth")
