"""The default scale's feature network: a small CNN classifier trained on the default data.

Inception FID is a GPU-runner metric (7 images/s here); at the default scale this judge plays
Inception's role — its penultimate features feed FID — and also scores whether a sample shows
its class (fine and superclass heads), which at this scale separates methods far better than FID.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.SiLU())


class Judge(nn.Module):
    """conv ×5 (two 2× poolings) → global average → `width`-d features → fine and super heads."""

    def __init__(self, num_classes: int, num_super_classes: int, width: int = 128):
        super().__init__()
        w = width // 4
        self.body = nn.Sequential(_conv(3, w), _conv(w, w), nn.MaxPool2d(2), _conv(w, 2 * w),
                                  _conv(2 * w, 2 * w), nn.MaxPool2d(2), _conv(2 * w, width))
        self.fine_head = nn.Linear(width, num_classes)
        self.super_head = nn.Linear(width, num_super_classes)
        self.config = {"num_classes": num_classes, "num_super_classes": num_super_classes, "width": width}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features of images in [-1, 1] (NCHW): the FID embedding."""
        return F.adaptive_avg_pool2d(self.body(x), 1).flatten(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return self.fine_head(h), self.super_head(h)
