"""LPIPS diversity of a run's samples: FineDiffusion reports it next to FID (0.721 on iNat 256,
higher = more varied samples).

The distance is the `lpips` package's LPIPS v0.1 with the AlexNet trunk (its default, net='alex').
Its linear layers are the v0.1 weights inside the package's wheel (lpips/weights/v0.1/alex.pth).
The package would download the trunk from torchvision's URL; instead it is built random
(`pnet_rand=True`) and given torchvision's AlexNet from the local file `evaluate.alexnet_weights`,
so nothing is downloaded.

Diversity protocol (the paper publishes none; chosen here): within each class, the LPIPS of
distinct unordered pairs of that class's samples, every pair when a class has at most
`evaluate.diversity_pairs` of them, else that many pairs drawn without replacement (seeded);
the score is the mean over all pairs of all classes. Within-class pairs because a
class-conditional model's diversity is the spread of one class's samples (pairs across classes
would mostly measure how different the classes are); every pair because at paper scale a class
has only 5 samples (10 pairs), so sampling pairs would add noise and repeat pairs.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from diffrepro.errors import UserError
from diffrepro.models.autoencoder import to_unit_range
from diffrepro.sources import ALEXNET_HELP



def load_lpips(alexnet_weights: str) -> torch.nn.Module:
    """The package's LPIPS (v0.1, AlexNet) in eval mode, trunk from the LOCAL torchvision file."""
    import lpips

    path = Path(alexnet_weights)
    if not path.exists():
        raise UserError(f"LPIPS weights {path} not found: {ALEXNET_HELP}")
    with warnings.catch_warnings():  # lpips 0.1.4 calls torchvision's deprecated `pretrained=False`
        warnings.filterwarnings("ignore", "The parameter 'pretrained'|Arguments other than a weight enum")
        model = lpips.LPIPS(net="alex", version="0.1", pnet_rand=True, verbose=False)
    alexnet = torch.load(path, map_location="cpu", weights_only=True)
    # the trunk's slices keep AlexNet's layer numbers: slice2.3.weight is features.3.weight
    wanted = {name: f"features.{name.split('.', 1)[1]}" for name in model.net.state_dict()}
    if not isinstance(alexnet, dict) or any(key not in alexnet for key in wanted.values()):
        raise UserError(f"{path} is not torchvision's AlexNet state dict (no `features.*` weights): {ALEXNET_HELP}")
    model.net.load_state_dict({name: alexnet[key] for name, key in wanted.items()})
    return model.eval().requires_grad_(False)


def class_pairs(labels: np.ndarray, max_pairs: int, seed: int) -> np.ndarray:
    """(P, 2) indices of distinct same-class sample pairs: all of a class's pairs, or `max_pairs`
    of them drawn without replacement when it has more."""
    rng = np.random.default_rng(seed)
    pairs = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = len(members)
        total = n * (n - 1) // 2
        # the k-th pair in `combinations` order, without listing them all (a 50k-sample class has 1.25e9)
        k = np.arange(total) if total <= max_pairs else np.sort(rng.choice(total, max_pairs, replace=False))
        i = n - 2 - np.floor(np.sqrt(-8.0 * k + 4.0 * n * (n - 1) - 7) / 2 - 0.5).astype(np.int64)
        j = k + i + 1 - total + (n - i) * (n - i - 1) // 2
        pairs.append(np.stack([members[i], members[j]], axis=1).astype(np.int64).reshape(-1, 2))
    return np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)


@torch.no_grad()
def lpips_diversity(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, max_pairs: int, seed: int,
                    batch_size: int = 64) -> float | None:
    """Mean LPIPS over `class_pairs` of uint8 NHWC images (None: no class has two samples)."""
    pairs = class_pairs(labels, max_pairs, seed)
    if len(pairs) == 0:
        return None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    total = 0.0
    for start in range(0, len(pairs), batch_size):
        first, second = pairs[start:start + batch_size].T
        distances = model(to_unit_range(images[first]).to(device), to_unit_range(images[second]).to(device))
        total += float(distances.double().sum())
    return total / len(pairs)
