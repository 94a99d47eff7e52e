"""How good are a run's samples? The measures of the `evaluate@RUN` stage:

- FID of the samples against the real training set's cached statistics (judge features by
  default, Inception at paper scale), pytorch-fid's Fréchet distance.
- Fine-class and superclass accuracy of the judge on the samples: does a sample show its class?
- Hue error (default data only): the continuous per-class attribute, in degrees (chance ≈ 90°).
- Diversity: mean within-class pairwise feature distance of the samples relative to that of real
  held-out images (1.0 = as varied as real data). At paper scale (Inception features) also the
  paper's LPIPS diversity (`lpips.py`: mean LPIPS over within-class sample pairs).
- With several seed sets (EDM's protocol): the FID of each and their minimum; `fid` stays set 0's.
- The same FID/accuracy at every training snapshot (quality vs training steps).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from diffrepro.data.synthetic import hue_error, object_hue
from diffrepro.features import FeatureNet, feature_statistics, frechet_distance


def within_class_spread(features: np.ndarray, labels: np.ndarray, pairs: int, seed: int) -> float:
    """Mean distance between random pairs of features that share a label (None: no such pair)."""
    rng = np.random.default_rng(seed)
    dists = []
    for c in np.unique(labels):
        f = features[labels == c]
        if len(f) < 2:
            continue
        a, b = rng.integers(len(f), size=(2, pairs))
        keep = a != b
        dists.append(np.linalg.norm(f[a[keep]] - f[b[keep]], axis=1))
    return float(np.concatenate(dists).mean()) if dists else None


def score_samples(net: FeatureNet, images, labels, supers, reference, classes: dict | None) -> dict:
    out = net(images)
    scores = {"fid": frechet_distance(feature_statistics(out["features"]), reference),
              "num_samples": int(len(images))}
    if "fine_pred" in out:
        scores["fine_accuracy"] = float((out["fine_pred"] == labels).mean())
        scores["super_accuracy"] = float((out["super_pred"] == supers).mean())
    if classes is not None and classes.get("dataset") == "synthetic":
        target = np.asarray([classes["classes"][y]["hue"] for y in labels])
        scores["hue_error_deg"] = float(hue_error(object_hue(images), target).mean())
    return scores, out["features"]


def tree_digest(folder: Path) -> str:
    """sha256 of every file's name and bytes under `folder`: the metrics file then changes whenever
    the samples do, so the figures and report stages depend on `metrics/` alone (`samples/` holds
    DVC's .gitignore and is not restored by `dvc repro --pull --allow-missing`)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()
