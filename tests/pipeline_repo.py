"""A throw-away git + DVC copy of this repository, for end-to-end pipeline tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("src", "conf", "hydra_plugins", "notebooks", "dvc.yaml", "params.yaml", ".dvcignore", ".gitignore",
          ".dvc/config")


def make_repo(path: Path) -> Path:
    """Copy the pipeline's files (not data, models or caches) into a fresh git repo with one commit."""
    path.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        src, dst = ROOT / name, path / name
        if not src.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dst)
    (path / ".dvc" / ".gitignore").write_text("/config.local\n/tmp\n/cache\n")
    run(path, "git", "init", "-q")
    run(path, "git", "add", "-A")
    run(path, "git", "commit", "-qm", "pipeline copy")
    return path


def copy_repo(repo: Path, dst: Path) -> Path:
    """A copy of a pipeline repo (its git history, outputs, DVC cache and run cache) that a test may
    change; without .dvc/tmp (the original's locks, indexes and experiment queue)."""
    shutil.copytree(repo, dst, symlinks=True,
                    ignore=lambda folder, names: ["tmp"] if Path(folder) == repo / ".dvc" else [])
    return dst


def copy_outputs(repo: Path, dst: Path, *outputs: str) -> Path:
    """A plain folder (no git, no DVC) holding `repo`'s params.yaml and the given outputs: what the
    stage commands that make them leave, for tests that run further stages in this process."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(repo / "params.yaml", dst / "params.yaml")
    for output in outputs:
        shutil.copytree(repo / output, dst / output)
    return dst


def env(path: Path) -> dict:
    e = dict(os.environ)
    e.update({"DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(path.parent / f".site-cache-{path.name}"),
              "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
              "GIT_COMMITTER_EMAIL": "t@t", "PATH": f"{Path(sys.executable).parent}:{e.get('PATH', '')}",
              "MPLBACKEND": "Agg"})
    return e


def run(path: Path, *cmd: str, check: bool = True, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=path, env={**env(path), **(extra_env or {})}, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def stage_in(work: Path, *args: str) -> None:
    """`python -m diffrepro ARGS` run in `work`, in this process (no process start-up per stage)."""
    from diffrepro.cli import main

    cwd = os.getcwd()
    os.chdir(work)
    try:
        main(list(args))
    finally:
        os.chdir(cwd)
