"""`evaluate@RUN` stage: how good are a run's samples? (the measures: `diffrepro.scoring`)

Writes `metrics/<profile>/<run>.json` with the fingerprint of the params it was produced under
(`params_sha256`), which the report checks against params.yaml.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffrepro import fingerprint
from diffrepro.atomic import atomic_path
from diffrepro.config import run_params
from diffrepro.data import shards
from diffrepro.features import FeatureNet, feature_statistics, frechet_distance, heldout_sample
from diffrepro.inputs import read_json, read_npz
from diffrepro.models.info import count_gmacs
from diffrepro.paths import FEATURES, final_set_name, metrics_file, model_dir, samples_dir
from diffrepro.runs import load_trained, train_command
from diffrepro.scoring import score_samples, tree_digest, within_class_spread


def stage(params: dict, run: str) -> None:
    cfg = run_params(params, run)
    sample_dir, resample = samples_dir(run), f"dvc repro sample@{run}"
    prepared = Path(params["data"]["prepared_dir"])
    classes = shards.read_classes(prepared) if cfg["split"] != "base" else None
    ref = read_npz(FEATURES / "reference_stats.npz", "dvc repro features")
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
    if params["evaluate"]["reference_batch"]:  # ImageNet: the ADM evaluator's protocol (reference_batch.py)
        from diffrepro.reference_batch import adm_scores

        metrics.update(adm_scores(params["features"]["inception_weights"], params["evaluate"]["reference_batch"],
                                  images, net.device))
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
    metrics["train"] = read_json(model_dir(run) / "train_metrics.json", train_command(run))
    metrics["sampling"] = sampling
    metrics["samples_sha256"] = tree_digest(sample_dir)
    metrics["gmacs"] = _run_gmacs(run)
    metrics["params_sha256"] = fingerprint.metrics(params, run)
    with atomic_path(metrics_file(params, run)) as tmp:
        tmp.write_text(json.dumps(metrics, indent=1))


def _set_fid(net: FeatureNet, path: Path, reference) -> float:
    images = read_npz(path, f"dvc repro sample@{path.parent.name}")["images"]
    return frechet_distance(feature_statistics(net(images)["features"]), reference)


def _run_gmacs(run: str) -> float:
    model, _ = load_trained(model_dir(run))
    net = getattr(model, "net", model)
    with torch.no_grad():
        return round(count_gmacs(net, net.example_inputs(1, torch.device("cpu"))), 5)
