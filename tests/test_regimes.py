"""`python -m diffrepro regimes`: a claim's verdict at each value of its regime variable, read from the
workspace and from the experiments DVC committed (git refs under refs/exps/), stale copies and
sweeps of another recipe skipped."""

import json
import shutil
import subprocess
from pathlib import Path

import yaml

from diffrepro import fingerprint, regimes
from diffrepro.paths import metrics_file
from diffrepro.profiles import compose

FD, FULL = "finediffusion", "full_finetune"


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def _write(repo, params: dict, fids: dict[str, list[float]], stale: tuple[str, ...] = ()) -> None:
    """params.yaml and the metrics of `fids`' runs (one per seed); `stale` runs (or seeds) carry
    another params' fingerprint, as those a sweep did not target do in an experiment."""
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    for run, values in fids.items():
        seeds = params["runs"][run]["seeds"]
        for seed, fid in zip(seeds, values):
            name = run if seed == seeds[0] else f"{run}_seed{seed}"
            sha = "0" * 64 if run in stale or name in stale else fingerprint.metrics(params, name)
            path = repo / metrics_file(params, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"fid": fid, "params_sha256": sha}))


def _experiment(repo, name: str, params: dict, fids: dict, stale: tuple[str, ...] = ()) -> None:
    """Commit params + metrics as DVC does an experiment: a commit only a refs/exps/ ref points at."""
    _git(repo, "checkout", "-q", "--detach")
    _write(repo, params, fids, stale)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", name)
    _git(repo, "update-ref", f"refs/exps/ab/cdef/{name}", "HEAD")
    _git(repo, "checkout", "-q", "main")


def test_sweep_points_verdicts_and_the_stale_copies_skipped(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "config", "user.email", "t@t")
    _git(repo, "config", "user.name", "t")
    default = compose("default")
    assert default["regime"]["finetune_images_per_class"] == 24 and len(default["runs"][FD]["seeds"]) == 3
    _write(repo, default, {FD: [20.0, 20.5, 21.0], FULL: [12.0, 12.5, 13.0]})  # 24 per class: not held
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "default")
    few = compose("default", ("regime.finetune_images_per_class=8",))
    assert few["runs"][FD]["images_per_class"] == few["runs"]["bitfit"]["images_per_class"] == 8
    _experiment(repo, "few", few, {FD: [15.0, 15.2, 15.1], FULL: [18.0, 18.4, 18.2]},
                stale=(f"{FD}_seed2", f"{FULL}_seed2"))  # held; the sweep ran two seeds a side
    some = compose("default", ("regime.finetune_images_per_class=12",))
    _experiment(repo, "some", some, {FD: [16.0, 17.0, 16.5], FULL: [16.2, 16.8, 16.4]})  # inside the spread
    many = compose("default", ("regime.finetune_images_per_class=120",))
    _experiment(repo, "many", many, {FD: [10.0, 10.1, 10.2], FULL: [30.0, 30.0, 30.0]}, stale=(FULL,))
    # fresh under its own params, but swept before the recipe changed (another fine-tuning length)
    older = compose("default", ("regime.finetune_images_per_class=60", "runs.full_finetune.steps=999"))
    _experiment(repo, "older", older, {FD: [11.0, 11.1, 11.2], FULL: [19.0, 19.1, 19.2]})
    _git(repo, "update-ref", "refs/exps/celery/stash", "HEAD")  # DVC's queue: not an experiment
    shutil.copytree(Path("conf"), repo / "conf")  # the workspace's recipe
    monkeypatch.chdir(repo)

    found = regimes.snapshots()
    assert {source for source, _, _ in found} == {"workspace", "few", "some", "many", "older"}
    from diffrepro.papers import finediffusion

    points = regimes.claim_points(finediffusion.PAPER, found)
    assert [(p.value, p.source) for p in points] == [(8, "few"), (12, "some"), (24, "workspace")]  # 120: stale
    # baseline; 60: another recipe
    assert points[0].method == [15.0, 15.2] and points[0].baseline == [18.0, 18.4]

    text = regimes.write(repo / "reports", found)
    assert ("held at fine-tuning images per class = 8; inconclusive at fine-tuning images per "
            "class = 12; not held at fine-tuning images per class = 24.") in text
    assert "| 8 | 15.1 (2 seeds) | 18.2 (2 seeds) | held | few |" in text
    assert "No sweep of `regime.small_images_per_class` found." in text  # Patch: no metrics anywhere
    assert (repo / "reports" / "regime_plots" / "finediffusion.png").read_bytes()[:4] == b"\x89PNG"
    assert not (repo / "reports" / "regime_plots" / "patch.png").exists()
    assert not (repo / "reports" / "plots").exists()  # the report stage's dependency stays the notebooks' alone
