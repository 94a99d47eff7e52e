"""`evaluate@RUN` stage: how good are a run's samples?

- FID of the samples against the real training set's cached statistics (judge features by
  default, Inception at paper scale), pytorch-fid's Fréchet distance.
- Fine-class and superclass accuracy of the judge on the samples: does a sample show its class?
- Hue error (default data only): the continuous per-class attribute, in degrees (chance ≈ 90°).
- Diversity: mean within-class pairwise feature distance of the samples relative to that of real
  held-out images (1.0 = as varied as real data). At paper scale (Inception features) also the
  paper's LPIPS diversity (`lpips.py`: mean LPIPS over within-class sample pairs).
- With several seed sets (EDM's protocol): the FID of each and their minimum; `fid` stays set 0's.
- The same FID/accuracy at every training snapshot (quality vs training steps).
Writes `metrics/<profile>/<run>.json` with the fingerprint of the params it was produced under
(`params_sha256`), which the report checks against params.yaml.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from diffrepro import fingerprint
from diffrepro.atomic import atomic_path
from diffrepro.config import metrics_file, run_params
from diffrepro.data import shards
from diffrepro.data.synthetic import hue_error, object_hue
from diffrepro.features import FeatureNet, feature_statistics, frechet_distance, heldout_sample
from diffrepro.inputs import read_json, read_npz
from diffrepro.models.info import count_gmacs
from diffrepro.runs import train_command
from diffrepro.sample import final_set_name

FEATURES_DIR = Path("models/features")


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


def evaluate_stage(params: dict, run: str) -> None:
    cfg = run_params(params, run)
    sample_dir, resample = Path("samples") / run, f"dvc repro sample@{run}"
    prepared = Path(params["data"]["prepared_dir"])
    classes = shards.read_classes(prepared) if cfg["split"] != "base" else None
    ref = read_npz(FEATURES_DIR / "reference_stats.npz", "dvc repro features")
    reference = (ref["mu"], ref["sigma"])
    net = FeatureNet.load(params, device="cuda" if torch.cuda.is_available() else "cpu")  # 50k Inception passes
    final = read_npz(sample_dir / "final.npz", resample)
    images, labels, supers = final["images"], final["labels"], final["super_labels"]
    metrics = {"run": run, "model": cfg["model"], "method": cfg["method"], "assignment": cfg["assignment"],
               "init_from": cfg["init_from"], "split": cfg["split"]}
    scores, features = score_samples(net, images, labels, supers, reference, classes)
    metrics.update(scores)
    sampling = read_json(sample_dir / "sampling.json", resample)
    if sampling["seed_sets"] > 1:
        metrics["fid_seed_sets"] = [scores["fid"]] + [
            _set_fid(net, sample_dir / f"{final_set_name(k)}.npz", reference) for k in range(1, sampling["seed_sets"])]
        metrics["fid_min"] = min(metrics["fid_seed_sets"])
    if params["features"]["kind"] == "inception":
        from diffrepro.lpips import load_lpips, lpips_diversity

        ev = params["evaluate"]
        metrics["lpips"] = lpips_diversity(load_lpips(ev["alexnet_weights"]), images, labels,
                                           ev["diversity_pairs"], params["seed"])
    if cfg["split"] != "base":
        heldout = heldout_sample(prepared / params["data"]["heldout_split"], params["seed"])
        real_spread = within_class_spread(net(heldout["images"])["features"], heldout["labels"],
                                          params["evaluate"]["diversity_pairs"], params["seed"])
        spread = within_class_spread(features, labels, params["evaluate"]["diversity_pairs"], params["seed"])
        metrics["diversity"] = spread / real_spread if spread is not None and real_spread else None
    metrics["quality_vs_steps"] = []
    for snap in sorted(sample_dir.glob("step-*.npz")):
        npz = read_npz(snap, resample)
        s, _ = score_samples(net, npz["images"], npz["labels"], npz["super_labels"], reference, classes)
        metrics["quality_vs_steps"].append({"step": int(snap.stem.split("-")[1]), **s})
    metrics["train"] = read_json(Path("models") / run / "train_metrics.json", train_command(run))
    metrics["sampling"] = sampling
    metrics["samples_sha256"] = tree_digest(sample_dir)
    metrics["gmacs"] = _run_gmacs(run)
    metrics["params_sha256"] = fingerprint.metrics(params, run)
    with atomic_path(metrics_file(params, run)) as tmp:
        tmp.write_text(json.dumps(metrics, indent=1))


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


def _set_fid(net: FeatureNet, path: Path, reference) -> float:
    images = read_npz(path, f"dvc repro sample@{path.parent.name}")["images"]
    return frechet_distance(feature_statistics(net(images)["features"]), reference)


def _run_gmacs(run: str) -> float:
    from diffrepro.runs import load_trained

    model, _ = load_trained(Path("models") / run)
    net = getattr(model, "net", model)
    with torch.no_grad():
        return round(count_gmacs(net, net.example_inputs(1, torch.device("cpu"))), 5)
