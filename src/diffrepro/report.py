"""`report` stage: `<report.dir>/results.md` (the front page of the results) and `results.csv`.

One table per paper in the paper's shape — its rows, its metrics — with the paper's number beside
this scale's, the baseline beside the method, and a claims list saying whether the direction of
each paper's claim held here. Generated with pandas from the metrics of exactly the runs of the
profile in params.yaml (`metrics/<profile>/<run>.json`); the report refuses to be written when one
is missing or was produced under other params (each holds the fingerprint of its params), so it
never shows another profile's or a stale number. The only numbers typed in are the papers'
published ones below (sources: docs/papers/*.md).

Seeds: a run `<run>_seed<k>` is a replicate of `<run>` with another seed. Cells show the mean over
a run's seeds (± half the range when there are several); a claim's verdict is `held` / `not held`
only when both sides have at least two seeds and the difference of the means exceeds the larger
seed-to-seed range of the two — otherwise it is inconclusive at this scale.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from diffrepro import fingerprint
from diffrepro.atomic import atomic_path
from diffrepro.config import PARAMS_FILE, metrics_dir, metrics_file
from diffrepro.data.shards import read_classes
from diffrepro.errors import UserError
from diffrepro.inputs import read_json


@dataclass(frozen=True)
class Table:
    title: str
    paper_note: str              # what the paper compared and found
    default_note: str            # what stands for it in the embedded default (smoke too)
    rows: dict[str, dict]        # run name → the paper's numbers for the row it stands for
    columns: tuple[str, ...]     # metric keys shown


@dataclass(frozen=True)
class SpeedClaim:
    table: str
    text: str
    pair: str                    # `<method>_vs_<baseline>` in metrics/<profile>/speed.json
    measure: str                 # per_step | per_image | to_budget (see speed.py)
    paper_ratio: float           # the paper's speed-up


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
        "Paper: DiT-XL/2 fine-tuned with 1.77 % of its parameters trainable, 1.56× faster per step than "
        "full fine-tuning; FID / LPIPS diversity: iNat21-mini (10,000 classes) 256 px 9.776 / 0.721, "
        "512 px 9.490 / 0.723, VegFru 256 px 12.382 / 0.667; on iNat 256 full fine-tuning 13.034 / 0.651, "
        "BitFit 15.022, DiffFit 15.068. Speed-up = full fine-tuning's step time / this run's.",
        "Here: `DiT-mini/2` pre-trained on the 16 base classes (`pretrain`), fine-tuned on the 64 "
        "fine-grained classes. LPIPS needs the AlexNet/LPIPS weights (paper profiles); `diversity` is the "
        "judge-feature analogue: within-class spread of samples / that of real held-out images.",
        {"finediffusion": {"fid": 9.776, "lpips": 0.721, "trainable_percent": 1.77, "speedup": 1.56},
         "full_finetune": {"fid": 13.034, "lpips": 0.651, "trainable_percent": 100.0, "speedup": 1.0},
         "bitfit": {"fid": 15.022}, "difffit": {"fid": 15.068}},
        ("fid", "fine_accuracy", "super_accuracy", "hue_error_deg", "diversity", "lpips", "trainable_percent",
         "checkpoint_mb", "speedup")),
    "dimr": Table(
        "DiMR — multi-resolution network with time-dependent layer norm",
        "Paper: ImageNet 256, FID-50K: DiMR-XL/2R 1.70 (505 M params, 160 GMACs) and DiMR-G/2R 1.63 "
        "(1,056 M, 331 GMACs) vs DiT-XL/2 2.27 (675 M, 119 GMACs).",
        "Here: both trained from scratch on the default latents, matched GMACs, same steps and sampler.",
        {"dimr": {"fid": 1.70, "params": 505046408, "gmacs": 160.2}, "dit": {"fid": 2.27, "params": 675129632,
                                                                            "gmacs": 118.6}},
        ("params", "gmacs", "fid", "fine_accuracy", "super_accuracy", "hue_error_deg", "diversity")),
    "patch": Table(
        "Patch Diffusion — patch-wise training with coordinate channels (EDM, pixel space)",
        "Paper: CelebA-64 FID 1.77 with p = 0.5 in 24.6 h vs EDM 1.66 in 48.5 h (~2× faster to the same "
        "image budget); on the small AFHQv2-Wild (~5k images) 1.93 vs EDM 2.59. FID as EDM reports it: "
        "the minimum over three 50k sample sets (`fid min`; `fid` is the first set alone).",
        "Here: 16 px default images, same network and image budget; `*_small` use 8 images per class.",
        {"patch": {"fid": 1.77, "train_hours": 24.6}, "edm": {"fid": 1.66, "train_hours": 48.5},
         "patch_small": {"fid": 1.93}, "edm_small": {"fid": 2.59}},
        ("images_seen", "steps", "train_seconds", "step_seconds", "fid", "fid_min", "fine_accuracy",
         "hue_error_deg")),
    "immiscible": Table(
        "Immiscible Diffusion — batch linear assignment of noise to images",
        "Paper: Stable Diffusion on ImageNet, FID (pytorch-fid): from scratch 20k steps 17.92 → 16.43; "
        "fine-tuning SD v1.4 5k steps 11.45 → 10.28.",
        "Here: `DiT-mini/2` on the default latents; scratch arm = `dit` (vanilla) vs `immiscible`, "
        "fine-tune arm (`vanilla_ft` vs `immiscible_ft`) from `pretrain`. The image–noise distance is the "
        "mean L2 distance between each training latent and the noise it is paired with.",
        {"dit": {"fid": 17.92}, "immiscible": {"fid": 16.43}, "vanilla_ft": {"fid": 11.45},
         "immiscible_ft": {"fid": 10.28}},
        ("fid", "fine_accuracy", "hue_error_deg", "mean_image_noise_distance")),
}

# The paper's numbers of the profile's own setting where it is not the tables' default setting
# (None: the paper publishes no number for that row in this setting).
PAPER_ROWS_BY_PROFILE = {
    "finediffusion_inat512": {"finediffusion": {"fid": 9.490, "lpips": 0.723, "trainable_percent": 1.77,
                                                "speedup": 1.56},
                              "full_finetune": {"trainable_percent": 100.0, "speedup": 1.0},
                              "bitfit": {}, "difffit": {}},
    "finediffusion_vegfru256": {"finediffusion": {"fid": 12.382, "lpips": 0.667, "trainable_percent": 1.77,
                                                  "speedup": 1.56},
                                "full_finetune": {"trainable_percent": 100.0, "speedup": 1.0},
                                "bitfit": {}, "difffit": {}},
    "dimr_g2r_imagenet256": {"dimr": {"fid": 1.63, "params": 1056352904, "gmacs": 331.1}},
    "patch_afhqv2wild64": {"patch": {"fid": 1.93}, "edm": {"fid": 2.59}},
    "immiscible_sd_scratch": {"vanilla": {"fid": 17.92}, "immiscible": {"fid": 16.43}},
    "vanilla_sd_scratch": {"vanilla": {"fid": 17.92}},
    "immiscible_sd_finetune": {"vanilla": {"fid": 11.45}, "immiscible": {"fid": 10.28}},
    "vanilla_sd_finetune": {"vanilla": {"fid": 11.45}},
}

CLAIMS = (
    Claim("finediffusion", "FineDiffusion beats full fine-tuning (FID)", "fid", "finediffusion", "full_finetune"),
    Claim("finediffusion", "FineDiffusion beats BitFit (FID)", "fid", "finediffusion", "bitfit"),
    Claim("finediffusion", "FineDiffusion beats DiffFit (FID)", "fid", "finediffusion", "difffit"),
    Claim("dimr", "DiMR beats DiT at matched compute (FID)", "fid", "dimr", "dit"),
    Claim("patch", "Patch Diffusion is better on a small data set (FID)", "fid", "patch_small", "edm_small"),
    Claim("immiscible", "Immiscible beats vanilla from scratch (FID)", "fid", "immiscible", "dit"),
    Claim("immiscible", "Immiscible beats vanilla (FID)", "fid", "immiscible", "vanilla"),
    Claim("immiscible", "Immiscible beats vanilla when fine-tuning (FID)", "fid", "immiscible_ft", "vanilla_ft"),
)

SPEED_CLAIMS = (  # measured by the `speed` stage: method and baseline interleaved in one process
    SpeedClaim("finediffusion", "FineDiffusion trains faster per step than full fine-tuning",
               "finediffusion_vs_full_finetune", "per_step", 1.56),
    SpeedClaim("patch", "Patch Diffusion reaches the image budget faster (wall-clock)", "patch_vs_edm", "to_budget",
               48.5 / 24.6),  # EDM's 48.5 h / patch's 24.6 h on CelebA-64 (the paper's real_p ablation)
)

FIGURES_OF = {  # notebook figures (stage `figures`, reports/plots/) shown under each paper's table
    "finediffusion": (("FineDiffusion: fine-class accuracy per superclass", "finediffusion_superclass_accuracy"),
                      ("Speed-ups vs the papers' 1.56× (FineDiffusion) and ≈2× (Patch Diffusion)", "speedups")),
    "immiscible": (("Immiscible Diffusion: FID and fine accuracy vs training steps", "immiscible_quality_vs_steps"),),
}

TITLES = {"fid": "FID", "fid_min": "FID min of 3", "fine_accuracy": "fine acc", "super_accuracy": "super acc",
          "hue_error_deg": "hue err °", "diversity": "diversity", "lpips": "LPIPS", "trainable_percent": "trainable %",
          "checkpoint_mb": "ckpt MB", "speedup": "speed-up", "params": "params", "gmacs": "GMACs",
          "images_seen": "images", "steps": "steps", "train_seconds": "train s", "step_seconds": "s/step",
          "mean_image_noise_distance": "image–noise dist", "train_hours": "train h"}
DEFAULT_PROFILES = ("default", "smoke")  # the embedded scale: the tables' `default_note` applies
REPLICATE = re.compile(r"^(?P<run>.+)_seed(?P<seed>\d+)$")


def _git_commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "src"],
                               capture_output=True, text=True).stdout.strip()
        return rev + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def paper_rows(paper: str, profile: str) -> dict[str, dict]:
    """The paper's numbers for each row of `paper`'s table in `profile`'s setting."""
    return {**TABLES[paper].rows, **PAPER_ROWS_BY_PROFILE.get(profile, {})}


def replicates(metrics: dict[str, dict], run: str) -> list[dict]:
    """`run`'s metrics and those of its seed replicates `<run>_seed<k>` (empty if `run` is absent)."""
    if run not in metrics:
        return []
    extra = sorted((int(m["seed"]), name) for name in metrics
                   if (m := REPLICATE.match(name)) and m["run"] == run)
    return [metrics[run]] + [metrics[name] for _, name in extra]


def flat_metrics(m: dict) -> dict:
    """The numbers of one run's metrics file, flattened to the report's metric keys."""
    train = m["train"]
    flat = {k: m.get(k) for k in ("fid", "fid_min", "fine_accuracy", "super_accuracy", "hue_error_deg",
                                  "diversity", "lpips", "gmacs")}
    flat.update({k: train.get(k) for k in ("params", "trainable_percent", "steps", "images_seen", "train_seconds",
                                           "step_seconds", "mean_image_noise_distance")})
    flat["checkpoint_mb"] = train["checkpoint_bytes"] / 2**20
    flat["speedup"] = m.get("speedup")  # added by _with_speedup
    return flat


def seed_values(metrics: dict[str, dict], run: str, metric: str) -> list[float]:
    """`metric` of `run` on each of its seeds (runs where it is not measured are left out)."""
    values = [flat_metrics(m).get(metric) for m in replicates(metrics, run)]
    return [float(v) for v in values if v is not None]


def _with_speedup(metrics: dict[str, dict], speed: dict) -> dict[str, dict]:
    """FineDiffusion's speed-up column: full fine-tuning's seconds per step / the run's, measured
    interleaved in one process (`speed` stage; median over rounds). Full fine-tuning itself: 1."""
    ratios = {pair["method"]: pair["per_step"]["median"] for pair in speed.get("pairs", {}).values()
              if pair["baseline"] == "full_finetune"}
    if ratios:
        ratios["full_finetune"] = 1.0
    return {name: {**m, "speedup": ratios.get(REPLICATE.sub(r"\g<run>", name))} for name, m in metrics.items()}


def results_frame(metrics: dict[str, dict], profile: str = "default", speed: dict | None = None) -> pd.DataFrame:
    """Long format (paper, run, metric, value = mean over seeds, spread = max − min, seeds,
    paper_value): reports/results.csv."""
    metrics = _with_speedup(metrics, speed or {})
    rows = []
    for paper, table in TABLES.items():
        for run, paper_values in paper_rows(paper, profile).items():
            reps = replicates(metrics, run)
            if not reps:
                continue
            for metric in dict.fromkeys(table.columns + tuple(paper_values)):
                values = [v for v in (flat_metrics(m).get(metric) for m in reps) if v is not None]
                rows.append({"paper": paper, "run": run, "model": reps[0]["model"], "method": reps[0]["method"],
                             "metric": metric, "value": sum(values) / len(values) if values else None,
                             "spread": max(values) - min(values) if len(values) > 1 else None,
                             "seeds": len(values), "paper_value": paper_values.get(metric)})
    return pd.DataFrame(rows, columns=["paper", "run", "model", "method", "metric", "value", "spread", "seeds",
                                       "paper_value"])


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and pd.isna(v)):
        return "–"
    if isinstance(v, float) and v.is_integer() and abs(v) >= 1e3:
        v = int(v)
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int) and abs(v) >= 1e3:
        return f"{v:,}"
    return str(v)


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and pd.isna(v))


def paper_table(frame: pd.DataFrame, paper: str, profile: str = "default") -> str:
    table, sub = TABLES[paper], frame[frame.paper == paper]
    rows = paper_rows(paper, profile)
    cols = [c for c in table.columns if c in set(sub.metric)]
    header = ["run", "model", "method", "seeds"] + [
        f"{TITLES[c]} (paper)" if any(c in r for r in rows.values()) else TITLES[c] for c in cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in rows:
        r = sub[sub.run == run].set_index("metric")
        if r.empty:
            continue
        cells = [run, r["model"].iloc[0], r["method"].iloc[0], str(int(r["seeds"].max()))]
        for c in cols:
            here, spread, paper_value = r["value"].get(c), r["spread"].get(c), r["paper_value"].get(c)
            text = _fmt(here) + ("" if _missing(spread) or _missing(here) or spread == 0 else f" ±{_fmt(spread / 2)}")
            cells.append(text if _missing(paper_value) else f"{text} ({_fmt(paper_value)})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(method: list[float], baseline: list[float], lower_is_better: bool) -> str:
    """`held` / `not held` when the means differ by more than the larger seed range, else inconclusive."""
    if len(method) < 2 or len(baseline) < 2:
        return f"inconclusive at this scale ({min(len(method), len(baseline))} seed)"
    a, b = sum(method) / len(method), sum(baseline) / len(baseline)
    spread = max(max(method) - min(method), max(baseline) - min(baseline))
    if abs(a - b) <= spread:
        return f"inconclusive at this scale (|difference| {_fmt(abs(a - b))} ≤ seed range {_fmt(spread)})"
    return "held" if (a < b) == lower_is_better else "not held"


def speed_verdict(ratio: dict) -> str:
    """`held` when every interleaved round was faster, `not held` when every one was slower."""
    if ratio["min"] > 1:
        return "held"
    if ratio["max"] < 1:
        return "not held"
    return f"inconclusive at this scale (rounds span {_fmt(ratio['min'])}–{_fmt(ratio['max'])}×)"


def speed_rows(speed: dict, paper: str | None = None) -> list[tuple[SpeedClaim, dict]]:
    """(claim, measured ratio) of every speed claim the `speed` stage measured (of `paper`)."""
    pairs = speed.get("pairs", {})
    return [(c, pairs[c.pair][c.measure]) for c in SPEED_CLAIMS
            if c.pair in pairs and paper in (None, c.table)]


def _ratio(r: dict) -> str:
    return f"{_fmt(r['median'])}× [{_fmt(r['min'])}–{_fmt(r['max'])}]"


def claims_summary(metrics: dict[str, dict], profile: str, speed: dict | None = None) -> str:
    """The front page: every claim the profile can decide — the paper's numbers, this scale's, the verdict."""
    lines = ["| paper | claim | paper: method vs baseline | here: method vs baseline (seeds) | verdict |",
             "|---|---|---|---|---|"]
    for claim in CLAIMS:
        a, b = seed_values(metrics, claim.method, claim.metric), seed_values(metrics, claim.baseline, claim.metric)
        if not a or not b:
            continue
        rows = paper_rows(claim.table, profile)
        published = [rows.get(run, {}).get(claim.metric) for run in (claim.method, claim.baseline)]
        paper = " vs ".join(_fmt(v) for v in published) if not any(map(_missing, published)) else "–"
        here = f"{_fmt(sum(a) / len(a))} vs {_fmt(sum(b) / len(b))} ({len(a)}, {len(b)})"
        lines.append(f"| {claim.table} | {claim.text} | {paper} | {here} | {verdict(a, b, claim.lower_is_better)} |")
    for claim, ratio in speed_rows(speed or {}):
        lines.append(f"| {claim.table} | {claim.text} | {_fmt(claim.paper_ratio)}× | {_ratio(ratio)} "
                     f"(median [range] over interleaved rounds) | {speed_verdict(ratio)} |")
    return "\n".join(lines)


def claims_table(metrics: dict[str, dict], paper: str, speed: dict | None = None) -> str:
    lines = ["| claim | here: method vs baseline (mean over seeds) | direction | verdict |", "|---|---|---|---|"]
    for claim in CLAIMS:
        if claim.table != paper:
            continue
        a, b = seed_values(metrics, claim.method, claim.metric), seed_values(metrics, claim.baseline, claim.metric)
        if not a or not b:
            continue
        mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
        better = mean_a < mean_b if claim.lower_is_better else mean_a > mean_b
        lines.append(f"| {claim.text} | {_fmt(mean_a)} vs {_fmt(mean_b)} ({claim.metric}; {claim.method} vs "
                     f"{claim.baseline}) | {'as claimed' if better else 'opposite'} | "
                     f"{verdict(a, b, claim.lower_is_better)} |")
    for claim, ratio in speed_rows(speed or {}, paper):
        lines.append(f"| {claim.text} | {_ratio(ratio)} ({claim.measure.replace('_', ' ')}; {claim.pair.replace('_vs_', ' vs ')}, "
                     f"interleaved rounds) | {'as claimed' if ratio['median'] > 1 else 'opposite'} | "
                     f"{speed_verdict(ratio)} |")
    return "\n".join(lines)


def quality_curve(metrics: dict[str, dict], run: str) -> list[tuple[int, float, dict]]:
    """(step, mean FID over seeds, seed-0 point) at every evaluated step, the final one included."""
    curves = [{q["step"]: q for q in m["quality_vs_steps"] + [{"step": m["train"]["steps"], **m}]}
              for m in replicates(metrics, run)]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return [(s, sum(c[s]["fid"] for c in curves) / len(curves), curves[0][s]) for s in steps]


def steps_to_equal_fid(metrics: dict[str, dict], method: str, baseline: str) -> tuple[int, int] | None:
    """(first evaluated step where `method`'s mean FID ≤ `baseline`'s final mean FID, baseline's
    steps), or None when it is never reached."""
    base, ours = quality_curve(metrics, baseline), quality_curve(metrics, method)
    if not base or not ours:
        return None
    target = base[-1][1]
    reached = [s for s, fid, _ in ours if fid <= target]
    return (reached[0], base[-1][0]) if reached else None


def patch_speedups(metrics: dict[str, dict], speed: dict) -> str:
    """Patch vs EDM three ways: per step and per image (interleaved rounds, `speed` stage), and
    wall-clock to EDM's final FID (each run's quality-vs-steps curve at its measured step time)."""
    lines = ["| patch vs EDM | per step | per image | to the image budget | to equal FID |", "|---|---|---|---|---|"]
    for method, baseline in (("patch", "edm"), ("patch_small", "edm_small")):
        pair = speed.get("pairs", {}).get(f"{method}_vs_{baseline}")
        if pair is None or not replicates(metrics, method) or not replicates(metrics, baseline):
            continue
        equal = steps_to_equal_fid(metrics, method, baseline)
        if equal is None:
            to_fid = "not reached"
        else:  # baseline's steps at its step time / the method's steps to that FID at its step time
            to_fid = f"{pair['per_step']['median'] * equal[1] / equal[0]:.2f}× (step {equal[0]})"
        lines.append(f"| {method} vs {baseline} | {_ratio(pair['per_step'])} | {_ratio(pair['per_image'])} | "
                     f"{_ratio(pair['to_budget'])} | {to_fid} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def foundation_section(prepared_dir: str) -> str:
    parts = ["## Shared stages", ""]
    ae, feats = Path("models/autoencoder/metrics.json"), Path("models/features/metrics.json")
    if ae.exists():
        a = read_json(ae, "dvc repro autoencoder")
        parts.append(f"- Autoencoder: held-out reconstruction MSE {a['heldout_mse']:.4f} "
                     f"(PSNR {a['heldout_psnr_db']:.1f} dB), latent {a['latent_shape']}, "
                     f"scaling factor {a['scaling_factor']:.4f}, trained {a['train_seconds']} s.")
    if feats.exists():
        f = read_json(feats, "dvc repro features")
        if "heldout_fine_accuracy" in f:
            parts.append(f"- Judge (the FID feature network at this scale): held-out fine-class accuracy "
                         f"{f['heldout_fine_accuracy']:.1%}, superclass {f['heldout_super_accuracy']:.1%}; "
                         f"FID held-out vs train (the real-vs-real floor) {f['fid_heldout_vs_train']:.3f}.")
        if "reconstruction_fine_accuracy" in f:
            parts.append(f"- Judge on autoencoder reconstructions (the ceiling of every latent run): "
                         f"fine {f['reconstruction_fine_accuracy']:.1%}, "
                         f"superclass {f['reconstruction_super_accuracy']:.1%}.")
    classes = read_classes(prepared_dir)
    n, k = len(classes["classes"]), len(classes["super_classes"])
    parts.append(f"- Chance levels: fine accuracy 1/{n} = {100 / n:.1f} %, superclass 1/{k} = {100 / k:.1f} %"
                 + (", hue error 90°." if classes.get("dataset") == "synthetic" else "."))
    return "\n".join(parts)


IMMISCIBLE_ARMS = (("immiscible", "dit"), ("immiscible", "vanilla"), ("immiscible_ft", "vanilla_ft"))


def quality_vs_steps(metrics: dict[str, dict]) -> str:
    lines = ["| run | step | FID (mean over seeds) | fine acc (seed 0) | hue err ° (seed 0) |", "|---|---|---|---|---|"]
    runs = dict.fromkeys(run for pair in IMMISCIBLE_ARMS for run in reversed(pair))
    for run in runs:
        for step, fid, q in quality_curve(metrics, run):
            lines.append(f"| {run} | {step} | {_fmt(fid)} | {_fmt(q.get('fine_accuracy'))} | "
                         f"{_fmt(q.get('hue_error_deg'))} |")
    ratios = []
    for method, baseline in IMMISCIBLE_ARMS:
        if replicates(metrics, method) and replicates(metrics, baseline):
            equal = steps_to_equal_fid(metrics, method, baseline)
            ratios.append(f"- Steps to {baseline}'s final FID: {method} "
                          + (f"reaches it at step {equal[0]} of {equal[1]}: {equal[1] / equal[0]:.2f}× fewer steps."
                             if equal else "does not reach it within its steps."))
    return "\n".join(lines + ([""] + ratios if ratios else []))


def profile_metrics(params: dict) -> dict[str, dict]:
    """The metrics of every run of the profile, each produced under the params in params.yaml."""
    if not params.get("runs"):
        raise UserError(f"{PARAMS_FILE}: `runs` is empty: profile {params['profile']!r} has no run to report")
    metrics = {}
    for run in params["runs"]:
        path = metrics_file(params, run)
        metrics[run] = read_json(path, f"dvc repro evaluate@{run}")
        if metrics[run].get("params_sha256") != fingerprint.metrics(params, run):
            raise UserError(f"{path} was produced under other params than {PARAMS_FILE}'s: "
                            f"run `dvc repro evaluate@{run}`")
    return metrics


def profile_speed(params: dict) -> dict:
    """The `speed` stage's measurements, made under the params in params.yaml."""
    from diffrepro.speed import speed_file, speed_fingerprint

    path = speed_file(params)
    speed = read_json(path, "dvc repro speed")
    if speed.get("params_sha256") != speed_fingerprint(params):
        raise UserError(f"{path} was measured under other params than {PARAMS_FILE}'s: run `dvc repro speed`")
    return speed


def report_stage(params: dict) -> None:
    metrics, speed = profile_metrics(params), profile_speed(params)
    profile, out = params["profile"], Path(params["report"]["dir"])
    frame = results_frame(metrics, profile, speed)
    lines = [f"# Results — {params['report']['title']}", "",
             f"Profile `{profile}`, code at commit {_git_commit()}. Generated by `dvc repro` "
             f"(stage `report`) from `{metrics_dir(params)}/*.json`; do not edit by hand. Each cell: this "
             "scale's value, the mean over the run's seeds ± half their range, and (the paper's value). "
             + ("FID here is measured in the judge's features (see below), so only its ordering, not its "
                "size, compares with the papers'." if params["features"]["kind"] == "judge" else
                "FID: pytorch-fid Inception features against the prepared train split's statistics."), "",
             "## Claims at a glance", "",
             "A verdict is `held` or `not held` only when both sides ran with at least two seeds and their means "
             "differ by more than the larger of the two seed ranges (max − min over seeds); otherwise it is "
             "inconclusive at this scale. A speed claim is measured with its two runs interleaved in one "
             "process (stage `speed`): `held` when every round was faster, `not held` when every one was slower.", "",
             claims_summary(metrics, profile, speed), "",
             foundation_section(params["data"]["prepared_dir"]), "",
             "![Training loss of every run](plots/loss_curves.png)", "",
             "![Final samples of every run: first classes × samples per class](plots/sample_grids.png)", ""]
    with atomic_path(out / "figures", is_dir=True) as figures:
        for paper, table in TABLES.items():
            rows = paper_rows(paper, profile)
            if not any(run in metrics for run in rows):
                continue
            note = table.default_note if profile in DEFAULT_PROFILES else \
                f"Here: profile `{profile}` (settings and their sources: `conf/profile/{profile}.yaml`)."
            lines += [f"## {table.title}", "", table.paper_note + " " + note, "", paper_table(frame, paper, profile), ""]
            claims = claims_table(metrics, paper, speed)
            if claims.count("\n") > 1:
                lines += [claims, ""]
            if paper == "patch" and (speedups := patch_speedups(metrics, speed)):
                lines += ["Speed-up of patch-wise training (median [range] over interleaved rounds; paper ≈2× "
                          "wall-clock):", "", speedups, ""]
            lines += [f"![{alt}](plots/{name}.png)\n" for alt, name in FIGURES_OF.get(paper, ())]
            if paper == "immiscible":
                lines += ["Quality vs training steps:", "", quality_vs_steps(metrics), ""]
            for run in rows:
                grid = Path("samples") / run / "grid.png"
                if run in metrics and grid.exists():
                    shutil.copy(grid, figures / f"samples-{run}.png")
                    lines.append(f"![{run}](figures/samples-{run}.png)")
            lines.append("")
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text("\n".join(lines))
    with atomic_path(out / "results.csv") as tmp:
        frame.to_csv(tmp, index=False)
