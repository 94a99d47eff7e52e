"""What the notebooks in `notebooks/` (stage `figures`) compute and draw, so each notebook stays a
few readable lines and its numbers can be tested.

Everything here reads files other stages already wrote — `metrics/<profile>/<run>.json`,
`samples/<run>/final.npz`, dvclive's `logs/<run>/plots/metrics/train/loss.tsv` — for the runs of
the profile in params.yaml only (never another profile's leftovers), and skips runs that are
absent. A figure with nothing to show still gets a PNG (saying so), because the stage's outputs
must always exist.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from diffrepro.atomic import atomic_path
from diffrepro.config import run_names, training_params
from diffrepro.inputs import read_json
from diffrepro.papers import finediffusion, immiscible, patch_diffusion

matplotlib.use("Agg")  # figures are files, never windows (also inside a Jupyter kernel)

LOSS_TSV = Path("plots/metrics/train/loss.tsv")  # where dvclive puts `train/loss` inside logs/<run>/
QUALITY_KEYS = ("fid", "fine_accuracy", "super_accuracy", "hue_error_deg")


# ---- reading the pipeline's outputs -------------------------------------------------------------

def profile_runs(params: dict, runs: list[str] | None = None, with_pretrain: bool = False) -> list[str]:
    """The runs to draw: `runs` as given, else the profile's declared runs at their first seed (and
    `pretrain` if asked), sorted — figures show one seed, the report all seeds."""
    if runs is not None:
        return list(runs)
    names = list(params["runs"]) + (["pretrain"] if with_pretrain else [])
    return sorted(names)


def select(found, runs: list[str]) -> list[str]:
    """`runs` in their own order, minus the absent ones."""
    found = set(found)
    return [r for r in runs if r in found]


def load_metrics(metrics_dir: str | Path, runs: list[str]) -> dict[str, dict]:
    paths = {p.stem: p for p in Path(metrics_dir).glob("*.json")}
    return {r: read_json(paths[r], f"dvc repro evaluate@{r}") for r in select(paths, runs)}


def npz_memmap(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz as copy-on-write memory maps where stored uncompressed (as np.savez
    writes them): a grid of 32 out of a paper-scale run's 50,000 samples (10 GB) reads 32."""
    out = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        for info in archive.infolist():
            key = info.filename.removesuffix(".npy")
            if info.compress_type != zipfile.ZIP_STORED:
                with archive.open(info) as member:
                    out[key] = np.lib.format.read_array(member)
                continue
            raw.seek(info.header_offset + 26)  # local file header: name and extra-field lengths
            name_len, extra_len = struct.unpack("<HH", raw.read(4))
            raw.seek(info.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(raw)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(raw)
            out[key] = np.memmap(path, dtype, "c", offset=raw.tell(), shape=shape, order="F" if fortran else "C")
    return out


def load_samples(samples_dir: str | Path, runs: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """{run: {images (uint8 NHWC), labels, super_labels}} of each run's final.npz, memory-mapped."""
    found = [p.parent.name for p in Path(samples_dir).glob("*/final.npz")]
    return {run: npz_memmap(Path(samples_dir) / run / "final.npz") for run in select(found, runs)}


def load_losses(logs_dir: str | Path, runs: list[str]) -> dict[str, pd.DataFrame]:
    """{run: frame(step, loss)} from the dvclive log of every run that has one."""
    found = [p.relative_to(logs_dir).parts[0] for p in Path(logs_dir).glob(f"*/{LOSS_TSV}")]
    return {r: pd.read_csv(Path(logs_dir) / r / LOSS_TSV, sep="\t")[["step", "loss"]] for r in select(found, runs)}


def fine_tuning_runs(params: dict, runs) -> list[str]:
    """The runs that start from a trained model (`init_from` is not their data folder)."""
    return [r for r in runs if r in run_names(params)
            and training_params(params, r)["init_from"] != training_params(params, r)["data"]]


# ---- what the figures show ----------------------------------------------------------------------

def sample_mosaic(images: np.ndarray, labels: np.ndarray, num_classes: int, per_class: int,
                  gap: int = 1) -> np.ndarray:
    """One uint8 image: row c holds the first `per_class` samples of class c; white where a class has fewer."""
    h, w, ch = images.shape[1:]
    mosaic = np.full((num_classes * (h + gap) - gap, per_class * (w + gap) - gap, ch), 255, np.uint8)
    for c in range(num_classes):
        for k, image in enumerate(images[np.flatnonzero(labels == c)[:per_class]]):
            mosaic[c * (h + gap):c * (h + gap) + h, k * (w + gap):k * (w + gap) + w] = image
    return mosaic


def quality_curve(metrics: dict) -> pd.DataFrame:
    """FID and accuracies by training step: every scored snapshot, then the final model."""
    final = {"step": metrics["train"]["steps"], **{k: metrics.get(k) for k in QUALITY_KEYS}}
    points = [q for q in metrics["quality_vs_steps"] if q["step"] != final["step"]] + [final]
    frame = pd.DataFrame(points, columns=["step", *QUALITY_KEYS]).sort_values("step", ignore_index=True)
    return frame.astype({k: float for k in QUALITY_KEYS})


def load_speed(metrics_dir: str | Path) -> dict:
    """The `speed` stage's interleaved measurements ({} before it has run)."""
    path = Path(metrics_dir) / "speed.json"
    return read_json(path, "dvc repro speed") if path.exists() else {}


def speedups(speed: dict) -> dict[str, dict[str, dict]]:
    """The speed stage's ratios (median, min, max over interleaved rounds; > 1: the method is
    faster), grouped as the two papers claim them: each PEFT run per step vs full fine-tuning;
    patch-wise training vs EDM to the image budget and per image. Not the stages' own wall times:
    those are taken at different moments, so the machine's load can flip them."""
    pairs = speed.get("pairs", {})
    out: dict[str, dict[str, dict]] = {"finediffusion": {}, "patch": {}}
    for run in finediffusion.PEFT_RUNS:
        pair = pairs.get(f"{run}_vs_{finediffusion.BASELINE}")
        if pair is not None:
            out["finediffusion"][run] = pair["per_step"]
    for method, baseline in patch_diffusion.PAIRS:
        pair = pairs.get(f"{method}_vs_{baseline}")
        if pair is not None:
            out["patch"].update({f"{method}: to the image budget": pair["to_budget"],
                                 f"{method}: per image": pair["per_image"]})
    return out


def load_judge(params: dict):
    """The judge CNN of `models/features` (None where the profile's FID network is Inception,
    which has no class heads to ask)."""
    if params["features"]["kind"] != "judge":
        return None
    from diffrepro.features import FeatureNet

    return FeatureNet.load(params)


def superclass_accuracy(fine_pred: np.ndarray, labels: np.ndarray, super_labels: np.ndarray,
                        num_super: int) -> np.ndarray:
    """Fine-class accuracy among the samples of each superclass (NaN for one without samples)."""
    hits = np.bincount(super_labels, weights=(fine_pred == labels).astype(float), minlength=num_super)
    counts = np.bincount(super_labels, minlength=num_super)
    return np.divide(hits, counts, out=np.full(num_super, np.nan), where=counts > 0)


# ---- drawing ------------------------------------------------------------------------------------

def _nothing(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_sample_grids(samples: dict[str, dict], num_classes: int, per_class: int):
    """Runs side by side; in each, the first `num_classes` classes (rows) × `per_class` samples."""
    fig, axes = plt.subplots(1, max(1, len(samples)), figsize=(0.35 * per_class * max(1, len(samples)) + 1.5,
                                                               0.35 * num_classes + 1.2), squeeze=False)
    for ax, (run, s) in zip(axes[0], samples.items()):
        labels = np.asarray(s["labels"])
        shown = min(num_classes, int(labels.max()) + 1)
        mosaic = sample_mosaic(s["images"], labels, shown, min(per_class, int(np.bincount(labels).max())))
        ax.imshow(mosaic, interpolation="nearest")
        ax.set_title(run, fontsize=9)
        ax.set_xticks([])
        row = mosaic.shape[0] / shown
        ax.set_yticks((np.arange(shown) + 0.5) * row, [str(c) for c in range(shown)], fontsize=6)
    if not samples:
        _nothing(axes[0][0], "no samples/<run>/final.npz found")
    axes[0][0].set_ylabel("class")
    fig.suptitle("Final samples: first classes × samples per class", fontsize=10)
    return fig


def plot_loss_curves(losses: dict[str, pd.DataFrame]):
    fig, ax = plt.subplots(figsize=(6, 4))
    for run, frame in losses.items():
        ax.plot(frame["step"], frame["loss"], marker="." if len(frame) < 10 else None, label=run)
    if not losses:
        _nothing(ax, "no logs/<run>/plots/metrics/train/loss.tsv found")
    else:
        low, high = min(f["loss"].min() for f in losses.values()), max(f["loss"].max() for f in losses.values())
        if low > 0 and high / low > 10:
            ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("train loss (mean over the logging interval)")
        ax.legend(fontsize=7, ncol=2)
    ax.set_title("Training loss")
    return fig


def plot_quality_vs_steps(metrics: dict[str, dict]):
    """FID (top) and fine-class accuracy (bottom) vs step, vanilla beside Immiscible, per arm."""
    fig, axes = plt.subplots(2, len(immiscible.PLOTTED_ARMS), figsize=(9, 6), squeeze=False)
    for col, (arm, pair) in enumerate(immiscible.PLOTTED_ARMS.items()):
        present = [r for r in pair if r in metrics]
        for row, (key, label) in enumerate((("fid", "FID"), ("fine_accuracy", "fine-class accuracy"))):
            ax = axes[row][col]
            if not present:
                _nothing(ax, f"no metrics for {' or '.join(pair)}")
                continue
            for run, style in zip(pair, ("--", "-")):
                if run in metrics:
                    curve = quality_curve(metrics[run])
                    ax.plot(curve["step"], curve[key], style, marker="o", label=run)
            ax.set_ylabel(label)
            ax.set_xlabel("training step")
            ax.legend(fontsize=8)
        axes[0][col].set_title(f"{arm}: {pair[0]} vs {pair[1]}", fontsize=10)
    fig.suptitle("Immiscible Diffusion: quality vs training steps")
    fig.tight_layout()
    return fig


def plot_speedups(bars: dict[str, dict[str, dict]]):
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    fd_speedup, patch_speedup = finediffusion.SPEEDUP, patch_diffusion.WALL_CLOCK_SPEEDUP  # the papers'
    panels = (("finediffusion", f"FineDiffusion & PEFT vs {finediffusion.BASELINE} (s/step)", fd_speedup,
               f"paper: {fd_speedup:.2f}×", f"needs {finediffusion.BASELINE} and a PEFT run"),
              ("patch", "Patch Diffusion vs EDM", patch_speedup,
               f"paper: ≈{patch_speedup:.2f}× ({patch_diffusion.EDM_HOURS} h / {patch_diffusion.PATCH_HOURS} h)",
               "needs a patch run and its EDM baseline"))
    for ax, (group, title, paper, paper_label, missing) in zip(axes, panels):
        values = bars.get(group, {})
        ax.set_title(title, fontsize=10)
        if not values:
            _nothing(ax, f"no data: {missing}")
            continue
        medians = [v["median"] for v in values.values()]
        spread = [[m - v["min"] for m, v in zip(medians, values.values())],
                  [v["max"] - m for m, v in zip(medians, values.values())]]
        drawn = ax.bar(list(values), medians, yerr=spread, capsize=3, color="tab:blue")
        ax.bar_label(drawn, fmt="%.2f×", fontsize=8, label_type="center", color="white")
        ax.axhline(paper, color="tab:red", linestyle="--", label=paper_label)
        ax.axhline(1.0, color="grey", linewidth=0.8, label="parity")
        ax.set_ylim(0, 1.2 * max(paper, *(v["max"] for v in values.values())))
        ax.set_ylabel("speed-up (baseline time / method time)")
        ax.tick_params(axis="x", labelsize=8)
        ax.legend(fontsize=8)
    fig.suptitle("Speed-ups at this scale vs the papers'")
    fig.tight_layout()
    return fig


def plot_superclass_accuracy(accuracy: dict[str, np.ndarray], super_names: list[str], chance: float,
                             note: str = "no fine-tuning run with samples found"):
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(super_names) + 2), 4))
    if not accuracy:
        _nothing(ax, note)
    else:
        x, width = np.arange(len(super_names)), 0.8 / len(accuracy)
        for i, (run, acc) in enumerate(accuracy.items()):
            ax.bar(x + (i - (len(accuracy) - 1) / 2) * width, acc, width, label=run)
        ax.axhline(chance, color="grey", linestyle="--", label=f"chance (1/{round(1 / chance)})")
        ax.set_xticks(x, super_names, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_xlabel("superclass")
        ax.set_ylabel("judge's fine-class accuracy")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title("Fine-class accuracy of the samples, per superclass")
    return fig


def save(fig, out_dir: str | Path, name: str) -> Path:
    """Write `fig` as `out_dir/name` (atomically: a killed notebook leaves no half PNG) and close it."""
    path = Path(out_dir) / name
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
