"""Random weights in the real architectures of files we cannot download here (the real loaders
are exercised on them)."""

from pathlib import Path


def random_fid_inception_state() -> dict:
    """Random weights in the real FID Inception layout (pytorch-fid's fid_inception_v3 structure)."""
    from pytorch_fid import inception as fi

    net = fi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    for name, block in [("Mixed_5b", fi.FIDInceptionA(192, pool_features=32)),
                        ("Mixed_5c", fi.FIDInceptionA(256, pool_features=64)),
                        ("Mixed_5d", fi.FIDInceptionA(288, pool_features=64)),
                        ("Mixed_6b", fi.FIDInceptionC(768, channels_7x7=128)),
                        ("Mixed_6c", fi.FIDInceptionC(768, channels_7x7=160)),
                        ("Mixed_6d", fi.FIDInceptionC(768, channels_7x7=160)),
                        ("Mixed_6e", fi.FIDInceptionC(768, channels_7x7=192)),
                        ("Mixed_7b", fi.FIDInceptionE_1(1280)), ("Mixed_7c", fi.FIDInceptionE_2(2048))]:
        setattr(net, name, block)
    return net.state_dict()


def save_random_lpips_weights(models_dir: Path) -> None:
    """Random weights in the layouts of torchvision's alexnet-owt-7be5be79.pth and lpips v0.1
    alex.pth, at the default `evaluate.alexnet_weights` / `evaluate.lpips_weights` paths."""
    import torch
    import torchvision

    from diffrepro.lpips import TAP_CHANNELS

    torch.save(torchvision.models.alexnet(weights=None).state_dict(), models_dir / "alexnet-owt-7be5be79.pth")
    torch.save({f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(TAP_CHANNELS)},
               models_dir / "lpips-v0.1-alex.pth")
