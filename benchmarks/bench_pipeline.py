"""Wall time and peak memory of every stage of the default `dvc repro`, each stage's start-up, and a
no-change repro.

Each `python -m diffrepro` stage records itself in logs/stages/<stage>.json when it succeeds
(src/diffrepro/cli.py); this section tabulates the records of the stages in dvc.lock, times each
stage's start-up (a fresh interpreter importing what the stage imports before it reads a param)
and `dvc status` and, only when that says nothing changed, a `dvc repro` (target ≤ 2 s each).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

RECORDS = Path("logs/stages/default")
NO_CHANGE_TARGET_S = 2.0
STARTUP_TARGET_S = 2.0
REPRO_TARGET_MIN, REPRO_LIMIT_MIN = 45, 60


def stage_names(lock: Path = Path("dvc.lock")) -> list[str]:
    return list(yaml.safe_load(lock.read_text())["stages"])


def _dvc(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    """Wall seconds and result of one `dvc` command in the repository root (this interpreter's
    DVC, so the benchmark needs no activated environment)."""
    tic = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    return time.perf_counter() - tic, proc


def no_change_timings() -> list[str]:
    status_s, status = _dvc("status")
    up_to_date = status.returncode == 0 and "up to date" in status.stdout
    rows = [f"| `dvc status` | {status_s:.2f} s | ≤ {NO_CHANGE_TARGET_S:.0f} s |"]
    if up_to_date:
        repro_s, repro = _dvc("repro")
        ran = [line for line in repro.stdout.splitlines() if line.startswith("Running stage")]
        note = "" if repro.returncode == 0 and not ran else f" (NOT a no-change run: {len(ran)} stages ran)"
        rows.append(f"| no-change `dvc repro` | {repro_s:.2f} s{note} | ≤ {NO_CHANGE_TARGET_S:.0f} s |")
    else:
        rows.append("| no-change `dvc repro` | not measured: `dvc status` reports changes, run `dvc repro` first "
                    f"| ≤ {NO_CHANGE_TARGET_S:.0f} s |")
    return rows


def startup_seconds(module: str, repeats: int = 3) -> float:
    """Median wall time of a fresh interpreter importing the CLI, preflight and the stage's module:
    what every stage process pays before its first useful line."""
    code = f"import diffrepro.cli, diffrepro.preflight, diffrepro.stages.{module}"
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": "src"})
        times.append(time.perf_counter() - tic)
    return sorted(times)[len(times) // 2]


def startup_timings() -> list[str]:
    from diffrepro.cli import STAGES

    rows = ["| stage | start-up (median of 3) | target |", "|---|---|---|"]
    for command, (module, _, _) in STAGES.items():
        seconds = startup_seconds(module)
        rows.append(f"| {command} | {seconds:.2f} s{'' if seconds <= STARTUP_TARGET_S else ' (over)'} | "
                    f"≤ {STARTUP_TARGET_S:.0f} s |")
    return rows


def section() -> list[str]:
    lines = ["## Stages of the default `dvc repro`", "",
             "Wall time and peak resident memory (the largest process: the stage or a child it waited for) "
             f"as each stage recorded them in {RECORDS}/ when it last succeeded; “by hand” marks a record "
             "not written under `dvc repro`.", "",
             "| stage | wall time | peak memory | recorded |", "|---|---|---|---|"]
    total, missing = 0.0, []
    for name in stage_names():
        record_file = RECORDS / f"{name}.json"
        if not record_file.exists():
            missing.append(name)
            lines.append(f"| {name} | no record | | |")
            continue
        record = json.loads(record_file.read_text())
        total += record["wall_seconds"]
        lines.append(f"| {name} | {record['wall_seconds']:.1f} s | {record['peak_rss_bytes'] / 2**30:.2f} GiB | "
                     f"{'dvc repro' if record['via_dvc'] else 'by hand'}, {record['cpus']} CPUs |")
    lines += ["", f"Whole default `dvc repro`, sum of the recorded stages: **{total / 60:.1f} min** "
              f"(limit {REPRO_LIMIT_MIN} min, target ≤ {REPRO_TARGET_MIN} min; DVC's own hashing and process "
              "start-up not included)."]
    if missing:
        lines.append(f"No record for {', '.join(missing)}: not run through `python -m diffrepro` (the figures "
                     "stage runs papermill) or not run since stage records were added; the sum leaves them out.")
    lines += ["", "Start-up of each stage process: a fresh interpreter importing the CLI, preflight and the "
              "stage's module (torch, and through timm and pytorch-fid torchvision, dominate the ones that "
              "compute).", "", *startup_timings()]
    lines += ["", "| no-change check (in the repository root) | wall time | target |", "|---|---|---|",
              *no_change_timings()]
    return lines
