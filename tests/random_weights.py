"""Random weights in the real architectures of files we cannot download here (the real loaders
are exercised on them). The FID Inception's: `diffrepro.device_standin.random_fid_inception_state`."""

from pathlib import Path


def save_random_lpips_weights(models_dir: Path) -> None:
    """Random weights in the layouts of torchvision's alexnet-owt-7be5be79.pth and lpips v0.1
    alex.pth, at the default `evaluate.alexnet_weights` / `evaluate.lpips_weights` paths."""
    import torch
    import torchvision

    from diffrepro.lpips import TAP_CHANNELS

    torch.save(torchvision.models.alexnet(weights=None).state_dict(), models_dir / "alexnet-owt-7be5be79.pth")
    torch.save({f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(TAP_CHANNELS)},
               models_dir / "lpips-v0.1-alex.pth")
