"""A profile's results as the report reads them: a run's seed replicates, its quality-vs-steps curve
over seeds, and how a number prints. Shared by report.py and the papers' own sections (papers/).

A run `<run>_seed<k>` is a replicate of `<run>` with another seed.
"""

from __future__ import annotations

import re

import pandas as pd

REPLICATE = re.compile(r"^(?P<run>.+)_seed(?P<seed>\d+)$")


def replicates(metrics: dict[str, dict], run: str) -> list[dict]:
    """`run`'s metrics and those of its seed replicates `<run>_seed<k>` (empty if `run` is absent)."""
    if run not in metrics:
        return []
    extra = sorted((int(m["seed"]), name) for name in metrics
                   if (m := REPLICATE.match(name)) and m["run"] == run)
    return [metrics[run]] + [metrics[name] for _, name in extra]


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


def verdict(method: list[float], baseline: list[float], lower_is_better: bool) -> str:
    """`held` / `not held` when the means differ by more than the larger seed range, else inconclusive."""
    if len(method) < 2 or len(baseline) < 2:
        return f"inconclusive at this scale ({min(len(method), len(baseline))} seed)"
    a, b = sum(method) / len(method), sum(baseline) / len(baseline)
    spread = max(max(method) - min(method), max(baseline) - min(baseline))
    if abs(a - b) <= spread:
        return f"inconclusive at this scale (|difference| {fmt(abs(a - b))} ≤ seed range {fmt(spread)})"
    return "held" if (a < b) == lower_is_better else "not held"


def missing(v) -> bool:
    return v is None or (isinstance(v, float) and pd.isna(v))


def fmt(v) -> str:
    if missing(v):
        return "–"
    if isinstance(v, float) and v.is_integer() and abs(v) >= 1e3:
        v = int(v)
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int) and abs(v) >= 1e3:
        return f"{v:,}"
    return str(v)


def fmt_ratio(r: dict) -> str:
    """A speed ratio of the `speed` stage: median [min–max] over its interleaved rounds."""
    return f"{fmt(r['median'])}× [{fmt(r['min'])}–{fmt(r['max'])}]"
