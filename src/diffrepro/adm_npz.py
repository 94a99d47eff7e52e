"""A run's samples as the sample batch of the ADM evaluator, which gives the papers' FID numbers.

DiT, U-ViT and DiMR report FID / sFID / IS / precision / recall from openai/guided-diffusion's
`evaluations/evaluator.py` (TensorFlow Inception). It reads `arr_0` of an .npz: uint8 images
(N, H, W, 3). ADM's `image_sample.py` stores the class labels beside them as `arr_1`; DiT's
`create_npz_from_sample_folder` writes `arr_0` only; the evaluator ignores everything but `arr_0`.
DiMR's README runs an `img2npz.py` that no commit contains: this replaces it, reading the sample
stage's `final.npz` directly (its images are the uint8 pixels a PNG round trip would give back).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffrepro.atomic import atomic_path
from diffrepro.errors import UserError
from diffrepro.inputs import read_npz


def read_samples(samples_npz: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of a sample stage's npz, checked to be uint8 (N, H, W, 3) with N labels."""
    samples_npz = Path(samples_npz)
    npz = read_npz(samples_npz, f"dvc repro sample@{samples_npz.parent.name}")
    if "images" not in npz or "labels" not in npz:
        raise UserError(f"{samples_npz} has keys {sorted(npz)}, not images/labels: it was not "
                        f"written by the sample stage; re-run it")
    images, labels = npz["images"], npz["labels"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(labels) != len(images):
        raise UserError(f"{samples_npz}: images are {images.dtype} {images.shape} with {len(labels)} labels; "
                        f"the ADM evaluator needs uint8 (N, H, W, 3) RGB: re-run the sample stage")
    return images, labels


def evaluator_order(n: int) -> np.ndarray:
    """A fixed shuffle of n class-sorted samples. The evaluator's Inception Score averages over
    consecutive 5,000-image splits of the file, and DiT's `sample_ddp.py` files hold randomly drawn
    labels: in class order each split would see 100 of the 1,000 classes and the score would drop."""
    return np.random.default_rng(0).permutation(n)


def write_adm_npz(samples_npz: str | Path, out_path: str | Path) -> Path:
    """Write `arr_0` (uint8 N×H×W×3) and `arr_1` (int64 labels) to `out_path`, atomically, in
    `evaluator_order`. Uncompressed, as `np.savez` in ADM and DiT: the evaluator streams `arr_0`.
    """
    images, labels = read_samples(samples_npz)
    order = evaluator_order(len(images))
    images, labels = images[order], labels[order]
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to the temporary name
            np.savez(f, arr_0=images, arr_1=labels.astype(np.int64))
    return out_path
