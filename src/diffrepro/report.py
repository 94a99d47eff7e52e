"""`report` stage: reports/results.md (the front page of the results) and reports/results.csv.

One table per paper in the paper's shape — its rows, its metrics — with the paper's number beside
this scale's, the baseline beside the method, and a claims list saying whether the direction of
each paper's claim held here. Generated from `metrics/*.json` with pandas; the only numbers typed
in are the papers' published ones below (sources: shared/seeds, shared/reference).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from diffrepro.atomic import atomic_path

METRICS_DIR = Path("metrics")
OUT_MD, OUT_CSV, FIGURES = Path("reports/results.md"), Path("reports/results.csv"), Path("reports/figures")


@dataclass(frozen=True)
class Table:
    title: str
    note: str
    rows: dict[str, dict]        # run name → the paper's numbers for the row it stands for
    columns: tuple[str, ...]     # metric keys shown


@dataclass(frozen=True)
class Claim:
    table: str
    text: str
    metric: str
    method: str
    baseline: str
    lower_is_better: bool = True


TABLES = {
    "finediffusion": Table(
        "FineDiffusion — parameter-efficient fine-tuning to fine-grained classes",
        "Paper: DiT-XL/2 fine-tuned on iNat21-mini (10,000 classes, 256 px); FID and LPIPS (diversity) "
        "from the paper's comparison. Here: `DiT-mini/2` pre-trained on the 16 base classes "
        "(`pretrain`), fine-tuned on the 64 fine-grained classes. Speed-up = full fine-tuning's step "
        "time / this run's (paper: 1.56×).",
        {"finediffusion": {"fid": 9.776, "diversity": 0.721, "trainable_percent": 1.77, "speedup": 1.56},
         "full_finetune": {"fid": 13.034, "diversity": 0.651, "trainable_percent": 100.0, "speedup": 1.0},
         "bitfit": {"fid": 15.022}, "difffit": {"fid": 15.068}},
        ("fid", "fine_accuracy", "super_accuracy", "hue_error_deg", "diversity", "trainable_percent",
         "checkpoint_mb", "speedup")),
    "dimr": Table(
        "DiMR — multi-resolution network with time-dependent layer norm",
        "Paper: ImageNet 256, FID-50K: DiMR-XL/2R 1.70 (505 M params, 160 GMACs) vs DiT-XL/2 2.27 "
        "(675 M, 119 GMACs). Here: both trained from scratch on the default latents, matched GMACs, "
        "same steps and sampler.",
        {"dimr": {"fid": 1.70, "params": 505046408, "gmacs": 160.2}, "dit": {"fid": 2.27, "params": 675129632,
                                                                            "gmacs": 118.6}},
        ("params", "gmacs", "fid", "fine_accuracy", "super_accuracy", "hue_error_deg", "diversity")),
    "patch": Table(
        "Patch Diffusion — patch-wise training with coordinate channels (EDM, pixel space)",
        "Paper: CelebA-64 FID 1.77 with p = 0.5 in 24.6 h vs EDM 1.66 in 48.5 h (~2× faster to the same "
        "image budget); on the small AFHQv2-Wild (~5k images) 1.93 vs EDM 2.59. Here: 16 px default "
        "images, same network and image budget; `*_small` use 8 images per class.",
        {"patch": {"fid": 1.77, "train_hours": 24.6}, "edm": {"fid": 1.66, "train_hours": 48.5},
         "patch_small": {"fid": 1.93}, "edm_small": {"fid": 2.59}},
        ("images_seen", "steps", "train_seconds", "step_seconds", "fid", "fine_accuracy", "hue_error_deg")),
    "immiscible": Table(
        "Immiscible Diffusion — batch linear assignment of noise to images",
        "Paper: Stable Diffusion on ImageNet, FID (pytorch-fid): from scratch 20k steps 17.92 → 16.43; "
        "fine-tuning SD v1.4 5k steps 11.45 → 10.28. Here: `DiT-mini/2` on the default latents; "
        "scratch arm = `dit` (vanilla) vs `immiscible`, fine-tune arm from `pretrain`.",
        {"dit": {"fid": 17.92}, "immiscible": {"fid": 16.43}, "vanilla_ft": {"fid": 11.45},
         "immiscible_ft": {"fid": 10.28}},
        ("fid", "fine_accuracy", "hue_error_deg", "mean_image_noise_distance")),
}

CLAIMS = (
    Claim("finediffusion", "FineDiffusion beats full fine-tuning (FID)", "fid", "finediffusion", "full_finetune"),
    Claim("finediffusion", "FineDiffusion beats BitFit (FID)", "fid", "finediffusion", "bitfit"),
    Claim("finediffusion", "FineDiffusion beats DiffFit (FID)", "fid", "finediffusion", "difffit"),
    Claim("finediffusion", "FineDiffusion trains faster per step than full fine-tuning", "step_seconds",
          "finediffusion", "full_finetune"),
    Claim("dimr", "DiMR beats DiT at matched compute (FID)", "fid", "dimr", "dit"),
    Claim("patch", "Patch Diffusion reaches the image budget faster (wall-clock)", "train_seconds", "patch", "edm"),
    Claim("patch", "Patch Diffusion is better on a small data set (FID)", "fid", "patch_small", "edm_small"),
    Claim("immiscible", "Immiscible beats vanilla from scratch (FID)", "fid", "immiscible", "dit"),
    Claim("immiscible", "Immiscible beats vanilla when fine-tuning (FID)", "fid", "immiscible_ft", "vanilla_ft"),
)

FIGURES_OF = {  # notebook figures (stage `figures`, reports/plots/) shown under each paper's table
    "finediffusion": (("FineDiffusion: fine-class accuracy per superclass", "finediffusion_superclass_accuracy"),
                      ("Speed-ups vs the papers' 1.56× (FineDiffusion) and ≈2× (Patch Diffusion)", "speedups")),
    "immiscible": (("Immiscible Diffusion: FID and fine accuracy vs training steps", "immiscible_quality_vs_steps"),),
}

TITLES = {"fid": "FID", "fine_accuracy": "fine acc", "super_accuracy": "super acc",
          "hue_error_deg": "hue err °", "diversity": "diversity", "trainable_percent": "trainable %",
          "checkpoint_mb": "ckpt MB", "speedup": "speed-up", "params": "params", "gmacs": "GMACs",
          "images_seen": "images", "steps": "steps", "train_seconds": "train s", "step_seconds": "s/step",
          "mean_image_noise_distance": "image–noise dist", "train_hours": "train h"}


def _git_commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "src"],
                               capture_output=True, text=True).stdout.strip()
        return rev + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def flat_metrics(m: dict) -> dict:
    """The numbers of one run's metrics file, flattened to the report's metric keys."""
    train = m["train"]
    flat = {k: m.get(k) for k in ("fid", "fine_accuracy", "super_accuracy", "hue_error_deg", "diversity", "gmacs")}
    flat.update({k: train.get(k) for k in ("params", "trainable_percent", "steps", "images_seen", "train_seconds",
                                           "step_seconds", "mean_image_noise_distance")})
    flat["checkpoint_mb"] = train["checkpoint_bytes"] / 2**20
    return flat


def results_frame(metrics: dict[str, dict]) -> pd.DataFrame:
    """Long format (paper, run, metric, value, paper_value): reports/results.csv."""
    rows = []
    full_ft = metrics.get("full_finetune")
    for paper, table in TABLES.items():
        for run, paper_values in table.rows.items():
            if run not in metrics:
                continue
            values = flat_metrics(metrics[run])
            if paper == "finediffusion" and full_ft is not None:
                values["speedup"] = full_ft["train"]["step_seconds"] / values["step_seconds"]
            for metric in dict.fromkeys(table.columns + tuple(paper_values)):
                rows.append({"paper": paper, "run": run, "model": metrics[run]["model"],
                             "method": metrics[run]["method"], "metric": metric, "value": values.get(metric),
                             "paper_value": paper_values.get(metric)})
    return pd.DataFrame(rows, columns=["paper", "run", "model", "method", "metric", "value", "paper_value"])


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and pd.isna(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int) and abs(v) >= 1e4:
        return f"{v:,}"
    return str(v)


def paper_table(frame: pd.DataFrame, paper: str) -> str:
    table, sub = TABLES[paper], frame[frame.paper == paper]
    cols = [c for c in table.columns if c in set(sub.metric)]
    header = ["run", "model", "method"] + [f"{TITLES[c]} (paper)" if any(c in r for r in table.rows.values())
                                           else TITLES[c] for c in cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in table.rows:
        r = sub[sub.run == run].set_index("metric")
        if r.empty:
            continue
        cells = [run, r["model"].iloc[0], r["method"].iloc[0]]
        for c in cols:
            here = r["value"].get(c)
            paper_value = r["paper_value"].get(c)
            cells.append(_fmt(here) if paper_value is None or pd.isna(paper_value)
                         else f"{_fmt(here)} ({_fmt(paper_value)})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def claims_table(metrics: dict[str, dict], paper: str) -> str:
    lines = ["| claim | here: method vs baseline | direction | verdict |", "|---|---|---|---|"]
    for claim in CLAIMS:
        if claim.table != paper or claim.method not in metrics or claim.baseline not in metrics:
            continue
        a, b = flat_metrics(metrics[claim.method])[claim.metric], flat_metrics(metrics[claim.baseline])[claim.metric]
        if a is None or b is None:
            continue
        better = a < b if claim.lower_is_better else a > b
        lines.append(f"| {claim.text} | {_fmt(a)} vs {_fmt(b)} ({claim.metric}) | "
                     f"{'as claimed' if better else 'opposite'} | inconclusive at this scale (1 seed) |")
    return "\n".join(lines)


def foundation_section(prepared_dir: str) -> str:
    parts = ["## Shared stages", ""]
    ae, feats = Path("models/autoencoder/metrics.json"), Path("models/features/metrics.json")
    if ae.exists():
        a = json.loads(ae.read_text())
        parts.append(f"- Autoencoder: held-out reconstruction MSE {a['heldout_mse']:.4f} "
                     f"(PSNR {a['heldout_psnr_db']:.1f} dB), latent {a['latent_shape']}, "
                     f"scaling factor {a['scaling_factor']:.4f}, trained {a['train_seconds']} s.")
    if feats.exists():
        f = json.loads(feats.read_text())
        if "heldout_fine_accuracy" in f:
            parts.append(f"- Judge (the FID feature network at this scale): held-out fine-class accuracy "
                         f"{f['heldout_fine_accuracy']:.1%}, superclass {f['heldout_super_accuracy']:.1%}; "
                         f"FID held-out vs train (the real-vs-real floor) {f['fid_heldout_vs_train']:.3f}.")
        if "reconstruction_fine_accuracy" in f:
            parts.append(f"- Judge on autoencoder reconstructions (the ceiling of every latent run): "
                         f"fine {f['reconstruction_fine_accuracy']:.1%}, "
                         f"superclass {f['reconstruction_super_accuracy']:.1%}.")
    classes = json.loads((Path(prepared_dir) / "classes.json").read_text())
    n, k = len(classes["classes"]), len(classes["super_classes"])
    parts.append(f"- Chance levels: fine accuracy 1/{n} = {100 / n:.1f} %, superclass 1/{k} = {100 / k:.1f} %"
                 + (", hue error 90°." if classes.get("dataset") == "synthetic" else "."))
    return "\n".join(parts)


def quality_vs_steps(metrics: dict[str, dict]) -> str:
    lines = ["| run | step | FID | fine acc | hue err ° |", "|---|---|---|---|---|"]
    for run in ("dit", "immiscible", "vanilla_ft", "immiscible_ft"):
        if run not in metrics:
            continue
        points = metrics[run]["quality_vs_steps"] + [{"step": metrics[run]["train"]["steps"], **metrics[run]}]
        for q in points:
            lines.append(f"| {run} | {q['step']} | {_fmt(q['fid'])} | {_fmt(q.get('fine_accuracy'))} | "
                         f"{_fmt(q.get('hue_error_deg'))} |")
    return "\n".join(lines)


def report_stage(params: dict) -> None:
    metrics = {m["run"]: m for m in (json.loads(p.read_text()) for p in sorted(METRICS_DIR.glob("*.json")))}
    frame = results_frame(metrics)
    lines = [f"# Results — {params['report']['title']}", "",
             f"Profile `{params['profile']}`, code at commit {_git_commit()}. Generated by `dvc repro` "
             "(stage `report`) from `metrics/*.json`; do not edit by hand. Each cell: this scale's value "
             "(the paper's value). FID here is measured in the judge's features (see below), so only its "
             "ordering, not its size, compares with the papers'.", "",
             foundation_section(params["data"]["prepared_dir"]), "",
             "![Training loss of every run](plots/loss_curves.png)", "",
             "![Final samples of every run: first classes × samples per class](plots/sample_grids.png)", ""]
    with atomic_path(FIGURES, is_dir=True) as figures:
        for paper, table in TABLES.items():
            if not any(run in metrics for run in table.rows):
                continue
            lines += [f"## {table.title}", "", table.note, "", paper_table(frame, paper), ""]
            claims = claims_table(metrics, paper)
            if claims.count("\n") > 1:
                lines += [claims, ""]
            lines += [f"![{alt}](plots/{name}.png)\n" for alt, name in FIGURES_OF.get(paper, ())]
            if paper == "immiscible":
                lines += ["Quality vs training steps:", "", quality_vs_steps(metrics), ""]
            for run in table.rows:
                grid = Path("samples") / run / "grid.png"
                if run in metrics and grid.exists():
                    shutil.copy(grid, figures / f"samples-{run}.png")
                    lines.append(f"![{run}](figures/samples-{run}.png)")
            lines.append("")
    with atomic_path(OUT_MD) as tmp:
        tmp.write_text("\n".join(lines))
    with atomic_path(OUT_CSV) as tmp:
        frame.to_csv(tmp, index=False)
