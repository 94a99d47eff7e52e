"""LPIPS diversity of a run's samples: FineDiffusion reports it next to FID (0.721 on iNat 256,
higher = more varied samples).

The distance is LPIPS v0.1 with the AlexNet trunk (the `lpips` package's default, net='alex'):
inputs in [-1, 1] are shifted and scaled per channel (the package's ScalingLayer), run through
torchvision's AlexNet `features`, and tapped after each of its 5 ReLUs. At every tap the feature
vector of each position is divided by its L2 norm (+1e-10), the two images' vectors are
subtracted and squared, a 1x1 linear layer with non-negative weights and no bias sums the
channels, and the spatial mean is taken; the 5 taps are summed.

Diversity protocol (the paper publishes none; chosen here): within each class, the LPIPS of
distinct unordered pairs of that class's samples, every pair when a class has at most
`evaluate.diversity_pairs` of them, else that many pairs drawn without replacement (seeded);
the score is the mean over all pairs of all classes. Within-class pairs because a
class-conditional model's diversity is the spread of one class's samples (pairs across classes
would mostly measure how different the classes are); every pair because at paper scale a class
has only 5 samples (10 pairs), so sampling pairs would add noise and repeat pairs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from diffrepro.errors import UserError
from diffrepro.models.autoencoder import to_unit_range

# lpips ScalingLayer (richzhang/PerceptualSimilarity lpips/lpips.py), per RGB channel.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
TAP_ENDS = (2, 5, 8, 10, 12)  # AlexNet `features[:k]` ends just after relu1 ... relu5
TAP_CHANNELS = (64, 192, 384, 256, 256)
EPS = 1e-10
LPIPS_HELP = ("take lpips/weights/v0.1/alex.pth from the pip package lpips 0.1.4 (or "
              "richzhang/PerceptualSimilarity on GitHub; sha256 "
              "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0) and set evaluate.lpips_weights")
ALEXNET_HELP = ("download https://download.pytorch.org/models/alexnet-owt-7be5be79.pth (torchvision "
                "AlexNet_Weights.IMAGENET1K_V1; sha256 UNKNOWN, only its prefix 7be5be79 is in the name) "
                "and set evaluate.alexnet_weights")


class LPIPS(nn.Module):
    """LPIPS v0.1, AlexNet trunk: `features` once per image, `distance` per pair."""

    def __init__(self):
        import torchvision

        super().__init__()
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.trunk = torchvision.models.alexnet(weights=None).features[:TAP_ENDS[-1]]
        self.linear = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in TAP_CHANNELS)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Unit-normalised activations at the 5 taps of images in [-1, 1] (NCHW)."""
        h, taps, start = (x - self.shift) / self.scale, [], 0
        for end in TAP_ENDS:
            h = self.trunk[start:end](h)
            taps.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + EPS))
            start = end
        return taps

    def distance(self, a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
        """(B,) LPIPS between two batches of tap features."""
        return sum(lin((fa - fb) ** 2).mean((1, 2, 3)) for lin, fa, fb in zip(self.linear, a, b))

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        return self.distance(self.features(x0), self.features(x1))


def load_lpips(lpips_weights: str, alexnet_weights: str) -> LPIPS:
    """LPIPS with the trunk from torchvision's AlexNet file and the linear layers from lpips's
    v0.1 alex.pth, both LOCAL files."""
    for path, help_text in ((Path(alexnet_weights), ALEXNET_HELP), (Path(lpips_weights), LPIPS_HELP)):
        if not path.exists():
            raise UserError(f"LPIPS weights {path} not found: {help_text}")
    model = LPIPS()
    alexnet = torch.load(alexnet_weights, map_location="cpu", weights_only=True)
    model.trunk.load_state_dict({k[len("features."):]: v for k, v in alexnet.items()
                                 if k.startswith("features.") and int(k.split(".")[1]) < TAP_ENDS[-1]})
    linear = torch.load(lpips_weights, map_location="cpu", weights_only=True)
    for k, lin in enumerate(model.linear):
        key = f"lin{k}.model.1.weight"  # lpips's NetLinLayer: Sequential(Dropout, Conv2d)
        if key not in linear or bool((linear[key] < 0).any()):
            raise UserError(f"{lpips_weights} is not lpips v0.1 alex.pth (no non-negative `{key}`): {LPIPS_HELP}")
        lin.weight.data.copy_(linear[key])
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
def lpips_diversity(model: LPIPS, images: np.ndarray, labels: np.ndarray, max_pairs: int, seed: int,
                    batch_size: int = 64) -> float | None:
    """Mean LPIPS over `class_pairs` of uint8 NHWC images (None: no class has two samples).
    Each image goes through the trunk once; its class's pairs reuse its features."""
    pairs = class_pairs(labels, max_pairs, seed)
    if len(pairs) == 0:
        return None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    total = 0.0
    for start in range(0, len(pairs), batch_size):  # pairs are grouped by class: few images per batch
        batch = pairs[start:start + batch_size]
        used, where = np.unique(batch, return_inverse=True)
        taps = model.features(to_unit_range(images[used]).to(device))
        where = torch.from_numpy(where.reshape(batch.shape)).to(device)
        a, b = [t[where[:, 0]] for t in taps], [t[where[:, 1]] for t in taps]
        total += float(model.distance(a, b).double().sum())
    return total / len(pairs)
