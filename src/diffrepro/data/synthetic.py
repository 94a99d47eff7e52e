"""The embedded default data set: a deterministic, locally generated fine-grained image set.

It stands in for iNaturalist-style data: 8 superclasses (shape families) × 8 fine classes each
(the same shape in 8 hues, 45° apart on the hue circle), so two fine classes of one superclass
differ only in the colour of a small, rotated, scaled object on a random background with noise —
at 16 px a user needs a close look. A disjoint set of "base" classes (the same families at hues
half-way between the fine ones) is the pretraining set that fine-tuning starts from, as ImageNet
is for iNat in FineDiffusion.

Same seed ⇒ same bytes: every image is drawn from its own `numpy.random.Generator` seeded by
(seed, split, class, index), so the set does not depend on the order of generation.
"""

from __future__ import annotations

import numpy as np

SHAPE_FAMILIES = ("disc", "ring", "square", "triangle", "cross", "star", "stripes", "checker")
HUES_PER_FAMILY = 8
SUPERSAMPLE = 4
SPLIT_CODES = {"train": 0, "heldout": 1, "base": 2, "base_heldout": 3}


def fine_hue(fine_index: int) -> float:
    """Hue in degrees of fine class `fine_index` within its family."""
    return 360.0 * fine_index / HUES_PER_FAMILY


def base_hue(base_index: int, base_per_family: int) -> float:
    """Base-class hues sit half-way between fine hues, so base and fine classes are disjoint."""
    step = HUES_PER_FAMILY // base_per_family
    return 360.0 * (base_index * step + 0.5) / HUES_PER_FAMILY


def class_table(num_super: int, base_per_family: int) -> dict:
    """`classes.json` content: fine classes, superclasses, base classes, with their hues."""
    if not 1 <= num_super <= len(SHAPE_FAMILIES):
        raise ValueError(f"num_super must be in 1..{len(SHAPE_FAMILIES)}, got {num_super}")
    families = SHAPE_FAMILIES[:num_super]
    classes = [{"name": f"{fam}_hue{int(fine_hue(k)):03d}", "super": s, "hue": fine_hue(k)}
               for s, fam in enumerate(families) for k in range(HUES_PER_FAMILY)]
    base = [{"name": f"{fam}_hue{base_hue(k, base_per_family):05.1f}", "super": s,
             "hue": base_hue(k, base_per_family)}
            for s, fam in enumerate(families) for k in range(base_per_family)]
    return {"dataset": "synthetic", "classes": classes, "super_classes": list(families),
            "base_classes": base}


def _shape_mask(family: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Indicator of the shape in its own frame (object radius ≈ 1)."""
    r = np.hypot(u, v)
    if family == "disc":
        return r < 1.0
    if family == "ring":
        return (r < 1.0) & (r > 0.55)
    if family == "square":
        return np.maximum(np.abs(u), np.abs(v)) < 0.8
    if family == "triangle":
        return (v > -0.5) & (np.sqrt(3) * u + v < 1.0) & (-np.sqrt(3) * u + v < 1.0)
    if family == "cross":
        return ((np.abs(u) < 0.3) & (np.abs(v) < 1.0)) | ((np.abs(v) < 0.3) & (np.abs(u) < 1.0))
    if family == "star":
        theta = np.arctan2(v, u)
        return r < 0.45 + 0.55 * np.abs(np.cos(2.5 * theta))
    if family == "stripes":
        return (np.maximum(np.abs(u), np.abs(v)) < 0.9) & (np.sin(v * np.pi * 1.75) > 0)
    if family == "checker":
        return (np.maximum(np.abs(u), np.abs(v)) < 0.9) & (np.sin(u * np.pi * 1.2) * np.sin(v * np.pi * 1.2) > 0)
    raise ValueError(f"unknown shape family {family!r}")


def hsv_to_rgb(h_deg: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV → RGB in [0, 1]; last axis is RGB."""
    h = (np.asarray(h_deg) % 360.0) / 60.0
    c = v * s
    x = c * (1 - np.abs(h % 2 - 1))
    m = v - c
    zero = np.zeros_like(c)
    sector = np.floor(h).astype(int) % 6
    rgb = np.select(
        [sector[..., None] == i for i in range(6)],
        [np.stack(t, -1) for t in ((c, x, zero), (x, c, zero), (zero, c, x), (zero, x, c), (x, zero, c), (c, zero, x))],
    )
    return rgb + m[..., None]


def render_image(family: str, hue: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """One uint8 (size, size, 3) image of `family` in `hue`, with random pose, background, noise."""
    n = size * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / n * 2 - 1  # pixel centres in [-1, 1]
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    scale = rng.uniform(0.45, 0.75)
    cx, cy = rng.uniform(-1 + scale, 1 - scale, size=2) * 0.8
    angle = rng.uniform(0, 2 * np.pi)
    dx, dy = (xx - cx) / scale, (yy - cy) / scale
    u = np.cos(angle) * dx + np.sin(angle) * dy
    v = -np.sin(angle) * dx + np.cos(angle) * dy
    mask = _shape_mask(family, u, v).astype(np.float64)
    # Background: a dull colour with a linear gradient, never saturated enough to look like a class.
    bg_hue = rng.uniform(0, 360)
    bg = hsv_to_rgb(np.array(bg_hue), np.array(rng.uniform(0.0, 0.3)), np.array(rng.uniform(0.15, 0.45)))
    grad_dir = rng.uniform(0, 2 * np.pi)
    gradient = 0.12 * (np.cos(grad_dir) * xx + np.sin(grad_dir) * yy)
    background = np.clip(bg[None, None, :] + gradient[..., None], 0, 1)
    fg = hsv_to_rgb(np.array(hue + rng.normal(0, 4.0)), np.array(rng.uniform(0.75, 1.0)),
                    np.array(rng.uniform(0.8, 1.0)))
    image = mask[..., None] * fg[None, None, :] + (1 - mask[..., None]) * background
    image = image.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))  # anti-aliasing
    image = image + rng.normal(0, 0.03, size=image.shape)
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


def generate_split(table: list[dict], families: list[str], images_per_class: int, size: int,
                   seed: int, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All images of one split: (images uint8 (N,H,W,3), labels, super_labels), class-major order."""
    images, labels, supers = [], [], []
    for label, cls in enumerate(table):
        for index in range(images_per_class):
            rng = np.random.default_rng([seed, SPLIT_CODES[split], label, index])
            images.append(render_image(families[cls["super"]], cls["hue"], size, rng))
            labels.append(label)
            supers.append(cls["super"])
    return np.stack(images), np.asarray(labels, np.int64), np.asarray(supers, np.int64)


def object_hue(images: np.ndarray, min_saturation: float = 0.45, min_value: float = 0.45) -> np.ndarray:
    """Estimated hue (degrees) of the object in each uint8 image: the saturation-weighted circular
    mean hue of its saturated, bright pixels (backgrounds are dull by construction). NaN when an
    image has no such pixel. Used to score samples by a continuous per-class attribute error."""
    rgb = images.astype(np.float64) / 255.0
    value = rgb.max(-1)
    chroma = value - rgb.min(-1)
    saturation = np.where(value > 0, chroma / np.maximum(value, 1e-8), 0.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.maximum(chroma, 1e-8)
    hue = np.select([value == r, value == g], [((g - b) / safe) % 6, (b - r) / safe + 2], (r - g) / safe + 4) * 60
    weight = saturation * ((saturation > min_saturation) & (value > min_value))
    angle = np.deg2rad(hue)
    x, y = (weight * np.cos(angle)).sum((1, 2)), (weight * np.sin(angle)).sum((1, 2))
    out = np.rad2deg(np.arctan2(y, x)) % 360
    return np.where(weight.sum((1, 2)) > 0, out, np.nan)


def hue_error(estimated: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Circular distance in degrees (0..180); NaN estimates count as 90° (chance level)."""
    diff = np.abs((estimated - target + 180) % 360 - 180)
    return np.where(np.isnan(diff), 90.0, diff)
