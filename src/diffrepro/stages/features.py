"""`features` stage: the FID network and the real data's reference statistics.

Default scale: train the judge CNN on the real training images, report its held-out accuracy
(must be ≥ 95 % fine-class to be a trustworthy judge) and its accuracy on the autoencoder's
reconstructions (the ceiling any latent model can reach). Paper scale: pytorch-fid's InceptionV3
loaded from a local weights file. Both write the reference statistics (μ, Σ) of the training
split once, so every run's FID reuses them.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from diffrepro.atomic import atomic_path
from diffrepro.data import shards
from diffrepro.errors import UserError
from diffrepro.features import (FeatureNet, feature_statistics, frechet_distance, heldout_sample, load_inception,
                                reconstruct, split_statistics, train_judge)
from diffrepro.models.autoencoder import load_autoencoder
from diffrepro.paths import AUTOENCODER, FEATURES


def heldout_metrics(net: FeatureNet, params: dict, reference) -> dict:
    """FID of real held-out images against the reference; for the judge, its accuracy on them and
    on their autoencoder reconstructions (the ceiling any latent model can reach)."""
    prepared = Path(params["data"]["prepared_dir"])
    heldout = heldout_sample(prepared / params["data"]["heldout_split"], params["seed"])
    held = net(heldout["images"])
    metrics = {"fid_heldout_vs_train": frechet_distance(feature_statistics(held["features"]), reference),
               "heldout_images_scored": int(len(heldout["labels"]))}
    if net.kind == "judge":
        metrics["heldout_fine_accuracy"] = float((held["fine_pred"] == heldout["labels"]).mean())
        metrics["heldout_super_accuracy"] = float((held["super_pred"] == heldout["super_labels"]).mean())
        if (AUTOENCODER / "config.json").exists():
            vae = load_autoencoder(AUTOENCODER).to(net.device)
            recon = net(reconstruct(vae, heldout["images"]))
            metrics["reconstruction_fine_accuracy"] = float((recon["fine_pred"] == heldout["labels"]).mean())
            metrics["reconstruction_super_accuracy"] = float((recon["super_pred"] == heldout["super_labels"]).mean())
    return metrics


def stage(params: dict) -> None:
    """Every process computes the statistics of its share of the training split on its device;
    the main process adds them up, scores the held-out split and writes."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    cfg, prepared = params["features"], Path(params["data"]["prepared_dir"])
    classes = shards.read_classes(prepared)
    metrics: dict = {"kind": cfg["kind"]}
    with atomic_path(FEATURES, is_dir=True) if main else contextlib.nullcontext() as tmp:
        if cfg["kind"] == "judge":  # tiny and seeded: every process trains the same judge
            start = time.perf_counter()
            train = shards.read_split(prepared / "train")
            judge = train_judge(train["images"], train["labels"], train["super_labels"],
                                len(classes["classes"]), len(classes["super_classes"]), cfg, params["seed"])
            metrics["train_seconds"] = round(time.perf_counter() - start, 1)
            if main:
                save_file(judge.state_dict(), tmp / "judge.safetensors")
                (tmp / "judge_config.json").write_text(json.dumps(judge.config))
            net = FeatureNet("judge", judge=judge, device=accelerator.device)
        elif cfg["kind"] == "inception":
            net = FeatureNet("inception", inception=load_inception(cfg["inception_weights"], cfg["inception_dims"]), device=accelerator.device)
        else:
            raise UserError(f"params.yaml: features.kind must be judge or inception, got {cfg['kind']!r}")
        reference = split_statistics(net, prepared / "train", accelerator=accelerator)
        if main:
            np.savez(tmp / "reference_stats.npz", mu=reference[0], sigma=reference[1])
            metrics.update(heldout_metrics(net, params, reference))
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
    accelerator.end_training()
    if not main:
        return
    if metrics.get("heldout_fine_accuracy", 1.0) < 0.95:
        print(f"warning: the judge reaches only {metrics['heldout_fine_accuracy']:.1%} fine-class accuracy "
              "on held-out images (target ≥ 95 %); raise features.steps")
