"""`report` stage: `<report.dir>/results.md` (the front page of the results) and `results.csv`.

One table per paper in the paper's shape — its rows, its metrics — with the paper's number beside
this scale's, the baseline beside the method, and a claims list saying whether the direction of
each paper's claim held here. Generated with pandas from the metrics of exactly the runs of the
profile in params.yaml (`metrics/<profile>/<run>.json`); the report refuses to be written when one
is missing or was produced under other params (each holds the fingerprint of its params), so it
never shows another profile's or a stale number. What is shown of each paper — its table, the
published numbers (the only numbers typed in; sources: docs/papers/*.md), claims, figures and any
section of its own — is its declaration in papers/; this module only iterates them.

Seeds: a run `<run>_seed<k>` is a replicate of `<run>` with another seed. Cells show the mean over
a run's seeds (± half the range when there are several); a claim's verdict is `held` / `not held`
only when both sides have at least two seeds and the difference of the means exceeds the larger
seed-to-seed range of the two — otherwise it is inconclusive at this scale.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pandas as pd

from diffrepro import fingerprint
from diffrepro.atomic import atomic_path
from diffrepro.config import PARAMS_FILE, run_names
from diffrepro.data.shards import read_classes
from diffrepro.errors import UserError
from diffrepro.inputs import read_json
from diffrepro.papers import FRONT_PAGE_FIGURES, PAPERS, speed_pairs
from diffrepro.papers.base import Claim, Paper, SpeedClaim
from diffrepro.paths import AUTOENCODER, FEATURES, metrics_dir, metrics_file, samples_dir, speed_file
from diffrepro.results import REPLICATE, fmt, fmt_ratio, missing, replicates, verdict

TITLES = {"fid": "FID", "fid_min": "FID min of 3", "fine_accuracy": "fine acc", "super_accuracy": "super acc",
          "hue_error_deg": "hue err °", "diversity": "diversity", "lpips": "LPIPS", "trainable_percent": "trainable %",
          "checkpoint_mb": "ckpt MB", "speedup": "speed-up", "params": "params", "gmacs": "GMACs",
          "images_seen": "images", "steps": "steps", "train_seconds": "train s", "step_seconds": "s/step",
          "mean_image_noise_distance": "image–noise dist", "train_hours": "train h"}
DEFAULT_PROFILES = ("default", "smoke")  # the embedded scale: the tables' `default_note` applies


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


def _with_speedup(metrics: dict[str, dict], speed: dict, baseline: str | None) -> dict[str, dict]:
    """A paper's speed-up column: `baseline`'s seconds per step / the run's, measured interleaved in
    one process (`speed` stage; median over rounds). The baseline itself: 1."""
    ratios = {pair["method"]: pair["per_step"]["median"] for pair in speed.get("pairs", {}).values()
              if pair["baseline"] == baseline}
    if ratios:
        ratios[baseline] = 1.0
    return {name: {**m, "speedup": ratios.get(REPLICATE.sub(r"\g<run>", name))} for name, m in metrics.items()}


def results_frame(metrics: dict[str, dict], profile: str = "default", speed: dict | None = None) -> pd.DataFrame:
    """Long format (paper, run, metric, value = mean over seeds, spread = max − min, seeds,
    paper_value): reports/results.csv. A row's released run (`Table.released`) has rows of its own,
    with the paper's value of the row it stands for."""
    rows = []
    for paper in PAPERS:
        with_speedup = _with_speedup(metrics, speed or {}, paper.speedup_baseline)
        for row, paper_values in paper.rows(profile).items():
            for run in (row, paper.table.released.get(row)):
                reps = replicates(with_speedup, run) if run else []
                if not reps:
                    continue
                for metric in dict.fromkeys(paper.table.columns + tuple(paper_values)):
                    values = [v for v in (flat_metrics(m).get(metric) for m in reps) if v is not None]
                    rows.append({"paper": paper.key, "run": run, "model": reps[0]["model"],
                                 "method": reps[0]["method"], "metric": metric,
                                 "value": sum(values) / len(values) if values else None,
                                 "spread": max(values) - min(values) if len(values) > 1 else None,
                                 "seeds": len(values), "paper_value": paper_values.get(metric)})
    return pd.DataFrame(rows, columns=["paper", "run", "model", "method", "metric", "value", "spread", "seeds",
                                       "paper_value"])


def _cell(r: pd.DataFrame, metric: str) -> str:
    """A run's mean over seeds of `metric`, ± half their range when they differ."""
    here, spread = r["value"].get(metric), r["spread"].get(metric)
    return fmt(here) + ("" if missing(spread) or missing(here) or spread == 0 else f" ±{fmt(spread / 2)}")


def paper_table(frame: pd.DataFrame, paper: Paper, profile: str = "default") -> str:
    """The paper's rows with its metrics. Where the profile has a row's released run, each metric with
    a paper value gets a second column, the released checkpoint's; a row without its trained run (a
    `*_released` profile) shows the released run alone."""
    table, sub = paper.table, frame[frame.paper == paper.key]
    rows = paper.rows(profile)
    cols = [c for c in table.columns if c in set(sub.metric)]
    published = {c for c in cols if any(c in r for r in rows.values())}
    released = {row: run for row, run in table.released.items() if run in set(sub.run)}
    header = ["run", "model", "method", "seeds"]
    for c in cols:
        if c in published and released:
            header += [f"{TITLES[c]}: trained here (paper)", f"{TITLES[c]}: released ckpt here"]
        else:
            header.append(f"{TITLES[c]} (paper)" if c in published else TITLES[c])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        trained = sub[sub.run == row].set_index("metric")
        adopted = sub[sub.run == released.get(row)].set_index("metric")
        shown = trained if not trained.empty else adopted
        if shown.empty:
            continue
        name = row if not trained.empty else released[row]
        cells = [name, shown["model"].iloc[0], shown["method"].iloc[0], str(int(shown["seeds"].max()))]
        for c in cols:
            paper_value = shown["paper_value"].get(c)
            if c in published and released:
                text = _cell(trained, c) if not trained.empty else "–"
                cells += [text if missing(paper_value) else f"{text} ({fmt(paper_value)})",
                          _cell(adopted, c) if not adopted.empty else "–"]
            else:
                text = _cell(shown, c)
                cells.append(text if missing(paper_value) else f"{text} ({fmt(paper_value)})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def speed_verdict(ratio: dict) -> str:
    """`held` when every interleaved round was faster, `not held` when every one was slower."""
    if ratio["min"] > 1:
        return "held"
    if ratio["max"] < 1:
        return "not held"
    return f"inconclusive at this scale (rounds span {fmt(ratio['min'])}–{fmt(ratio['max'])}×)"


def speed_rows(speed: dict, claims: tuple[SpeedClaim, ...]) -> list[tuple[SpeedClaim, dict]]:
    """(claim, measured ratio) of each of `claims` that the `speed` stage measured."""
    pairs = speed.get("pairs", {})
    return [(c, pairs[c.pair][c.measure]) for c in claims if c.pair in pairs]


def _claim_seeds(metrics: dict[str, dict], claim: Claim,
                 released: dict[str, str]) -> tuple[list[float], list[float]]:
    """The claim's metric on each seed of its method and of its baseline; a side the profile does not
    train (DiMR's DiT baseline) is its released checkpoint (`released`: the table's row → run)."""
    def side(run: str) -> list[float]:
        return seed_values(metrics, run if run in metrics else released.get(run, run), claim.metric)

    return side(claim.method), side(claim.baseline)


def claims_summary(metrics: dict[str, dict], profile: str, speed: dict | None = None) -> str:
    """The front page: every claim the profile can decide — the paper's numbers, this scale's, the verdict."""
    lines = ["| paper | claim | paper: method vs baseline | here: method vs baseline (seeds) | verdict |",
             "|---|---|---|---|---|"]
    for paper in PAPERS:
        rows = paper.rows(profile)
        for claim in paper.claims:
            a, b = _claim_seeds(metrics, claim, paper.table.released)
            if not a or not b:
                continue
            published = [rows.get(run, {}).get(claim.metric) for run in (claim.method, claim.baseline)]
            numbers = " vs ".join(fmt(v) for v in published) if not any(map(missing, published)) else "–"
            here = f"{fmt(sum(a) / len(a))} vs {fmt(sum(b) / len(b))} ({len(a)}, {len(b)})"
            lines.append(f"| {paper.key} | {claim.text} | {numbers} | {here} | "
                         f"{verdict(a, b, claim.lower_is_better)} |")
    for paper in PAPERS:
        for claim, ratio in speed_rows(speed or {}, paper.speed_claims):
            lines.append(f"| {paper.key} | {claim.text} | {fmt(claim.paper_ratio)}× | {fmt_ratio(ratio)} "
                         f"(median [range] over interleaved rounds) | {speed_verdict(ratio)} |")
    return "\n".join(lines)


def claims_table(metrics: dict[str, dict], paper: Paper, speed: dict | None = None) -> str:
    lines = ["| claim | here: method vs baseline (mean over seeds) | direction | verdict |", "|---|---|---|---|"]
    for claim in paper.claims:
        a, b = _claim_seeds(metrics, claim, paper.table.released)
        if not a or not b:
            continue
        mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
        better = mean_a < mean_b if claim.lower_is_better else mean_a > mean_b
        lines.append(f"| {claim.text} | {fmt(mean_a)} vs {fmt(mean_b)} ({claim.metric}; {claim.method} vs "
                     f"{claim.baseline}) | {'as claimed' if better else 'opposite'} | "
                     f"{verdict(a, b, claim.lower_is_better)} |")
    for claim, ratio in speed_rows(speed or {}, paper.speed_claims):
        lines.append(f"| {claim.text} | {fmt_ratio(ratio)} ({claim.measure.replace('_', ' ')}; "
                     f"{claim.pair.replace('_vs_', ' vs ')}, interleaved rounds) | "
                     f"{'as claimed' if ratio['median'] > 1 else 'opposite'} | {speed_verdict(ratio)} |")
    return "\n".join(lines)


def foundation_section(prepared_dir: str, metrics: dict[str, dict]) -> str:
    parts = ["## Shared stages", ""]
    ae, feats = AUTOENCODER / "metrics.json", FEATURES / "metrics.json"
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
    floor = learning_floor(metrics, 1 / n)
    if floor:
        parts.append(floor)
    return "\n".join(parts)


def learning_floor(metrics: dict[str, dict], chance: float, multiple: float = 10.0) -> str | None:
    """Whether every run learned its classes: its samples' fine accuracy against `multiple` × chance."""
    scored = {run: m["fine_accuracy"] for run, m in metrics.items() if m.get("fine_accuracy") is not None}
    if not scored:
        return None
    weakest = min(scored, key=scored.get)
    below = sorted(run for run, accuracy in scored.items() if accuracy < multiple * chance)
    return (f"- Every run learned its classes (fine accuracy ≥ {multiple:g}× chance = {multiple * chance:.1%}): "
            + (f"no — below it: {', '.join(below)}" if below else "yes")
            + f"; the lowest, {weakest}, at {scored[weakest]:.1%} ({scored[weakest] / chance:.1f}× chance).")


def profile_metrics(params: dict) -> dict[str, dict]:
    """The metrics of every run of the profile, each produced under the params in params.yaml."""
    if not params.get("runs"):
        raise UserError(f"{PARAMS_FILE}: `runs` is empty: profile {params['profile']!r} has no run to report")
    metrics = {}
    for run in run_names(params):  # every seed of every run
        path = metrics_file(params, run)
        metrics[run] = read_json(path, f"dvc repro evaluate@{run}")
        if metrics[run].get("params_sha256") != fingerprint.metrics(params, run):
            raise UserError(f"{path} was produced under other params than {PARAMS_FILE}'s: "
                            f"run `dvc repro evaluate@{run}`")
    return metrics


def profile_speed(params: dict) -> dict:
    """The `speed` stage's measurements, made under the params in params.yaml."""
    path = speed_file(params)
    speed = read_json(path, "dvc repro speed")
    if speed.get("params_sha256") != fingerprint.speed(params, speed_pairs(params)):
        raise UserError(f"{path} was measured under other params than {PARAMS_FILE}'s: run `dvc repro speed`")
    return speed


VERDICT_RULE = ("The rule: a verdict is `held` or `not held` only when both sides ran with at least two seeds "
                "and their means differ by more than the larger of the two seed ranges (max − min over seeds); "
                "otherwise it is inconclusive at this scale. A speed claim is measured with its two runs "
                "interleaved in one process (stage `speed`): `held` when every round was faster, `not held` "
                "when every one was slower.")


def stage(params: dict) -> None:
    metrics, speed = profile_metrics(params), profile_speed(params)
    profile, out = params["profile"], Path(params["report"]["dir"])
    frame = results_frame(metrics, profile, speed)
    lines = [f"# Results — {params['report']['title']}", "",
             "## Claims at a glance", "",
             claims_summary(metrics, profile, speed), "",
             VERDICT_RULE, "",
             f"Profile `{profile}`, code at commit {_git_commit()}. Generated by `dvc repro` "
             f"(stage `report`) from `{metrics_dir(params)}/*.json`; do not edit by hand. Each cell below: this "
             "scale's value, the mean over the run's seeds ± half their range, and (the paper's value). "
             + ("FID here is measured in the judge's features (see below), so only its ordering, not its "
                "size, compares with the papers'." if params["features"]["kind"] == "judge" else
                "FID: pytorch-fid Inception features against the prepared train split's statistics."), "",
             foundation_section(params["data"]["prepared_dir"], metrics), ""]
    lines += [line for f in FRONT_PAGE_FIGURES for line in (f"![{f.caption}](plots/{f.notebook}.png)", "")]
    with atomic_path(out / "figures", is_dir=True) as figures:
        for paper in PAPERS:
            table = paper.table
            shown = [run for row in paper.rows(profile) for run in (row, table.released.get(row)) if run in metrics]
            if not shown:
                continue
            note = table.default_note if profile in DEFAULT_PROFILES else \
                f"Here: profile `{profile}` (settings and their sources: `conf/profile/{profile}.yaml`)."
            if any(run in table.released.values() for run in shown):
                note += (" `released ckpt here`: the authors' released checkpoint (run `<row>_released`), "
                         "adopted as is (no training) and sampled and scored by this pipeline as the trained run is.")
            lines += [f"## {table.title}", "", table.paper_note + " " + note, "", paper_table(frame, paper, profile), ""]
            claims = claims_table(metrics, paper, speed)
            if claims.count("\n") > 1:
                lines += [claims, ""]
            lines += [f"![{f.caption}](plots/{f.notebook}.png)\n" for f in paper.figures]
            if paper.section and (section := paper.section(metrics, speed)):
                lines += [section, ""]
            for run in shown:
                grid = samples_dir(run) / "grid.png"
                if grid.exists():
                    shutil.copy(grid, figures / f"samples-{run}.png")
                    lines.append(f"![{run}](figures/samples-{run}.png)")
            lines.append("")
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text("\n".join(lines))
    with atomic_path(out / "results.csv") as tmp:
        frame.to_csv(tmp, index=False)
