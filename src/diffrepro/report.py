"""`report` stage: reports/results.md (front page of the results) and reports/results.csv.

One table per paper in the paper's shape: each run's numbers at this scale beside the paper's
number for the same row, and the baseline it is compared with. Generated from the metrics files
with pandas; nothing is typed in by hand except the papers' published numbers below.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd

from diffrepro.atomic import atomic_path

METRICS_DIR = Path("metrics")
OUT_MD, OUT_CSV = Path("reports/results.md"), Path("reports/results.csv")

# Published numbers, per paper and run role (sources: shared/seeds and shared/reference).
PAPER_VALUES = {
    "dit": {"title": "DiT (the backbone every latent run builds on)",
            "note": "DiT-XL/2 ImageNet 256: FID-50K 2.27 (cfg 1.5, 250 DDPM steps).",
            "paper": {"baseline": {"fid": 2.27}}},
}

COLUMNS = {  # metric key → column title
    "fid": "FID", "fine_accuracy": "fine acc", "super_accuracy": "super acc",
    "hue_error_deg": "hue err (°)", "diversity": "diversity",
}


def _git_commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "src"],
                               capture_output=True, text=True).stdout.strip()
        return rev + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def load_metrics() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(METRICS_DIR.glob("*.json"))]


def results_frame(runs: list[dict]) -> pd.DataFrame:
    """One row per (run, metric): the long format of reports/results.csv."""
    rows = []
    for m in runs:
        paper = PAPER_VALUES.get(m["paper"], {}).get("paper", {}).get(m["role"], {})
        values = {k: m.get(k) for k in COLUMNS}
        values["trainable_percent"] = m["train"]["trainable_percent"]
        values["step_seconds"] = m["train"]["step_seconds"]
        values["checkpoint_mb"] = m["train"]["checkpoint_bytes"] / 2**20
        values["gmacs"] = m.get("gmacs")
        for metric, value in values.items():
            if value is None:
                continue
            rows.append({"paper": m["paper"], "compare": m["compare"], "run": m["run"], "role": m["role"],
                         "model": m["model"], "method": m["method"], "metric": metric, "value": value,
                         "paper_value": paper.get(metric)})
    return pd.DataFrame(rows)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and pd.isna(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def paper_table(frame: pd.DataFrame, paper: str) -> str:
    sub = frame[frame.paper == paper]
    wide = sub.pivot_table(index=["compare", "role", "run", "model", "method"], columns="metric",
                           values="value", aggfunc="first").reset_index()
    cols = ["compare", "role", "run", "model", "method"] + [c for c in list(COLUMNS) + [
        "trainable_percent", "step_seconds", "checkpoint_mb", "gmacs"] if c in wide.columns]
    titles = {**COLUMNS, "trainable_percent": "trainable %", "step_seconds": "s/step",
              "checkpoint_mb": "ckpt MB", "gmacs": "GMACs"}
    header = "| " + " | ".join(titles.get(c, c) for c in cols) + " |"
    lines = [header, "|" + "---|" * len(cols)]
    for _, row in wide[cols].iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def foundation_section() -> str:
    parts = ["## Shared stages", ""]
    ae = Path("models/autoencoder/metrics.json")
    feats = Path("models/features/metrics.json")
    if ae.exists():
        a = json.loads(ae.read_text())
        parts.append(f"- Autoencoder: held-out reconstruction MSE {a['heldout_mse']:.4f} "
                     f"(PSNR {a['heldout_psnr_db']:.1f} dB), latent {a['latent_shape']}, "
                     f"scaling factor {a['scaling_factor']:.4f}, trained {a['train_seconds']} s.")
    if feats.exists():
        f = json.loads(feats.read_text())
        if "heldout_fine_accuracy" in f:
            parts.append(f"- Judge (FID feature network at this scale): held-out fine-class accuracy "
                         f"{f['heldout_fine_accuracy']:.1%}, superclass {f['heldout_super_accuracy']:.1%}; "
                         f"FID held-out vs train (the real-vs-real floor) {f['fid_heldout_vs_train']:.3f}.")
        if "reconstruction_fine_accuracy" in f:
            parts.append(f"- Judge on autoencoder reconstructions (the ceiling of every latent run): "
                         f"fine {f['reconstruction_fine_accuracy']:.1%}, "
                         f"superclass {f['reconstruction_super_accuracy']:.1%}.")
    return "\n".join(parts)


def report_stage(params: dict) -> None:
    runs = load_metrics()
    frame = results_frame(runs)
    lines = [f"# Results — {params['report']['title']}", "",
             f"Profile `{params['profile']}`, code at commit {_git_commit()}. "
             "Generated by `dvc repro` (stage `report`) from `metrics/*.json`; do not edit by hand.", "",
             foundation_section(), ""]
    for paper in dict.fromkeys(frame.paper) if len(frame) else []:
        info = PAPER_VALUES.get(paper, {"title": paper, "note": ""})
        lines += [f"## {info['title']}", "", info["note"], "", paper_table(frame, paper), ""]
        for m in runs:
            if m["paper"] == paper:
                lines.append(f"![{m['run']} samples](../samples/{m['run']}/grid.png)")
        lines.append("")
    with atomic_path(OUT_MD) as tmp:
        tmp.write_text("\n".join(lines))
    with atomic_path(OUT_CSV) as tmp:
        frame.to_csv(tmp, index=False)
