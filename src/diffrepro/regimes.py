"""`python -m diffrepro regimes`: where each claim holds, from a `dvc exp` sweep of its regime variable.

A paper's `Regime` (papers/<paper>.py) names a variable under `regime:` in params.yaml that the
runs of one claim read (FineDiffusion: fine-tuning images per class; Patch Diffusion: training
images per class). A sweep trains and scores the claim's two runs, two seeds or more, at other values:

    dvc exp run --queue -S 'regime.finetune_images_per_class=8,120' \\
        evaluate@finediffusion evaluate@finediffusion_seed1 evaluate@full_finetune evaluate@full_finetune_seed1
    dvc queue start   # then wait for `dvc queue status`

This command reads the workspace and every experiment DVC committed (git refs under refs/exps/:
each holds its params.yaml and metrics), keeps a run's metrics only where they were produced under
the workspace's recipe (conf/) with the regime variable at the experiment's value — so neither the
stale copies of runs a sweep did not target nor a sweep run before the recipe changed can enter —
and writes `<report.dir>/regimes.md` with `regime_plots/<paper>.png`: the claim's metric over the
variable, each value's verdict by the report's rule.
"""

from __future__ import annotations

import functools
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from diffrepro import fingerprint
from diffrepro.atomic import atomic_path
from diffrepro.config import run_names
from diffrepro.papers import PAPERS
from diffrepro.papers.base import Paper
from diffrepro.paths import metrics_file
from diffrepro.profiles import compose, profile_names
from diffrepro.results import fmt, replicates, verdict

PARAMS_FILE = "params.yaml"
REGIME_PLOTS = "regime_plots"  # beside plots/, not in it: the report stage depends on plots/ (the notebooks' figures)


@dataclass(frozen=True)
class Point:
    value: object               # the regime variable's value
    method: list[float]         # the claim's metric, one per seed
    baseline: list[float]
    source: str                 # "workspace" or the experiment's name


def _git_show(ref: str, path: str) -> str | None:
    done = subprocess.run(["git", "show", f"{ref}:{path}"], capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else None


def experiment_refs() -> list[str]:
    """Every experiment DVC has committed in this repository (newest first)."""
    done = subprocess.run(["git", "for-each-ref", "--sort=-committerdate", "--format=%(refname)", "refs/exps/"],
                          capture_output=True, text=True, check=True)
    # refs/exps/<2 hex>/<38 hex of the baseline>/<name>; the queue's own refs (celery, stash) are not experiments
    return [ref for ref in done.stdout.splitlines() if len(ref.split("/")) == 5 and ref.split("/")[2] != "celery"]


def snapshots() -> list[tuple[str, dict, dict[str, dict]]]:
    """(source, params, {run: metrics}) of the workspace and of every experiment."""
    def read(source: str, show) -> tuple[str, dict, dict[str, dict]] | None:
        text = show(PARAMS_FILE)
        if text is None:
            return None
        params = yaml.safe_load(text)
        metrics = {}
        for run in run_names(params):
            raw = show(str(metrics_file(params, run)))
            if raw is not None:
                metrics[run] = json.loads(raw)
        return source, params, metrics

    def workspace(path: str) -> str | None:
        return Path(path).read_text() if Path(path).exists() else None

    found = [read("workspace", workspace)]
    found += [read(ref.rsplit("/", 1)[-1], lambda path, ref=ref: _git_show(ref, path)) for ref in experiment_refs()]
    return [s for s in found if s is not None]


@functools.cache
def _recipe(profile: str, regime_values: tuple[tuple[str, object], ...]) -> dict | None:
    """The params conf/ composes for `profile` with its regime variables at these values (None:
    the profile is gone from conf/)."""
    if profile not in profile_names():
        return None
    return compose(profile, tuple(f"regime.{key}={value}" for key, value in regime_values))


def recipe_at(params: dict) -> dict | None:
    """The workspace's recipe at the regime values of `params` (an experiment's params.yaml)."""
    return _recipe(params["profile"], tuple(sorted(params.get("regime", {}).items())))


def claim_points(paper: Paper, found: list[tuple[str, dict, dict[str, dict]]]) -> list[Point]:
    """One point per value of the paper's regime variable: the first source (workspace, then the
    newest experiment) with at least two seeds of each of the claim's runs produced under the
    workspace's recipe at that value (a sweep may target fewer seeds than the profile declares)."""
    regime, points = paper.regime, {}
    for source, params, metrics in found:
        value = params.get("regime", {}).get(regime.variable)
        if value is None or value in points:
            continue
        recipe = recipe_at(params)
        if recipe is None:
            continue
        fresh = {run: m for run, m in metrics.items()
                 if run in recipe["sample_runs"] and m.get("params_sha256") == fingerprint.metrics(recipe, run)}
        claim = regime.claim
        method = [m[claim.metric] for m in replicates(fresh, claim.method)]
        baseline = [m[claim.metric] for m in replicates(fresh, claim.baseline)]
        if len(method) >= 2 and len(baseline) >= 2:  # a verdict needs two seeds a side
            points[value] = Point(value, method, baseline, source)
    return [points[v] for v in sorted(points)]


def sentence(paper: Paper, points: list[Point]) -> str:
    """Where the claim holds and where it breaks, in words."""
    regime, claim = paper.regime, paper.regime.claim
    groups: dict[str, list[str]] = {}
    for p in points:
        said = verdict(p.method, p.baseline, claim.lower_is_better).split(" (")[0].replace(" at this scale", "")
        groups.setdefault(said, []).append(str(p.value))
    parts = [f"{name} at {regime.label} = {', '.join(values)}" for name, values in groups.items()]
    return (f"“{claim.text}” (the paper's regime: {regime.papers_side}): " + "; ".join(parts) + "."
            if parts else f"No sweep of `regime.{regime.variable}` found.")


def plot(paper: Paper, points: list[Point], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    claim = paper.regime.claim
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [float(p.value) for p in points]
    for values, name, style in ((lambda p: p.method, claim.method, "-o"), (lambda p: p.baseline, claim.baseline, "--s")):
        means = [sum(values(p)) / len(values(p)) for p in points]
        low = [m - min(values(p)) for m, p in zip(means, points)]
        high = [max(values(p)) - m for m, p in zip(means, points)]
        ax.errorbar(x, means, yerr=[low, high], fmt=style, capsize=3, label=f"{name} (mean, seed range)")
    ax.set_xscale("log")
    ax.set_xticks(x, [str(p.value) for p in points])
    ax.set_xlabel(f"{paper.regime.label} (regime.{paper.regime.variable})")
    ax.set_ylabel(claim.metric.upper() + (" (lower is better)" if claim.lower_is_better else ""))
    ax.set_title(claim.text, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write(report_dir: Path, found) -> str:
    lines = ["# Where each claim holds (generated: `python -m diffrepro regimes`)", "",
             "Each claim below depends on a regime variable (`regime:` in params.yaml). A `dvc exp` sweep "
             "retrains the claim's two runs, every seed, at other values (README, “Where each claim holds”); "
             "each value's verdict follows the report's rule (means apart by more than the larger seed range).", ""]
    for paper in PAPERS:
        if paper.regime is None:
            continue
        points = claim_points(paper, found)
        claim = paper.regime.claim
        lines += [f"## {paper.table.title.split(' — ')[0]}: {claim.text}", "", sentence(paper, points), ""]
        if not points:
            continue
        lines += [f"| {paper.regime.label} | {claim.method} | {claim.baseline} | verdict | from |", "|---|---|---|---|---|"]
        for p in points:
            mean = lambda v: sum(v) / len(v)  # noqa: E731
            lines.append(f"| {p.value} | {fmt(mean(p.method))} ({len(p.method)} seeds) | "
                         f"{fmt(mean(p.baseline))} ({len(p.baseline)} seeds) | "
                         f"{verdict(p.method, p.baseline, claim.lower_is_better)} | {p.source} |")
        name = f"{paper.key}.png"
        plot(paper, points, report_dir / REGIME_PLOTS / name)
        lines += ["", f"![{claim.text} vs {paper.regime.label}]({REGIME_PLOTS}/{name})", ""]
    text = "\n".join(lines)
    with atomic_path(report_dir / "regimes.md") as tmp:
        tmp.write_text(text)
    return text


def main(params: dict) -> None:
    print(write(Path(params["report"]["dir"]), snapshots()))
