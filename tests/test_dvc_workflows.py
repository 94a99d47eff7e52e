"""What users do with the pipeline beyond `dvc repro`: remotes, queued ablations, the GPU workflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline_repo import ROOT, copy_repo, run


@pytest.fixture(scope="module")
def pushed(tmp_path_factory, smoke_repo):
    """The session's smoke run (a copy) committed and pushed (outputs + run-cache) to a local-folder remote."""
    base = tmp_path_factory.mktemp("remote")
    remote, origin = base / "dvc-remote", copy_repo(smoke_repo, base / "origin")
    run(origin, "dvc", "remote", "add", "-d", "shared", str(remote))
    run(origin, "git", "add", "-A")
    run(origin, "git", "commit", "-qm", "smoke results")
    run(origin, "dvc", "push", "--run-cache")
    return origin, remote


def test_a_second_clone_pulls_every_result_and_reruns_nothing(pushed, tmp_path):
    origin, _ = pushed
    clone = tmp_path / "clone"
    run(tmp_path, "git", "clone", "-q", str(origin), str(clone))
    run(clone, "dvc", "pull")
    out = run(clone, "dvc", "repro").stdout
    assert "Running stage" not in out, out
    assert (json.loads((clone / "metrics" / "smoke" / "dit.json").read_text()) ==
            json.loads((origin / "metrics" / "smoke" / "dit.json").read_text()))
    assert (clone / "models" / "dit" / "ema.safetensors").read_bytes() == \
        (origin / "models" / "dit" / "ema.safetensors").read_bytes()


def test_a_laptop_gets_every_number_without_pulling_or_rerunning(pushed, tmp_path):
    """`dvc repro --pull --allow-missing` in a fresh clone: nothing re-runs, nothing big is fetched."""
    origin, _ = pushed
    clone = tmp_path / "laptop"
    run(tmp_path, "git", "clone", "-q", str(origin), str(clone))
    out = run(clone, "dvc", "repro", "--pull", "--allow-missing").stdout
    assert "Running stage" not in out, out
    report = Path("reports") / "smoke" / "results.md"
    assert (clone / report).read_text() == (origin / report).read_text()
    assert not (clone / "models" / "dit").exists()  # the weights stay on the remote


def test_queued_guidance_sweep_runs_and_exp_show_lists_the_metrics(pushed):
    """Each queued experiment reproduces what the sweep is about, the run's samples and metrics
    (`evaluate@finediffusion` as the target), in its own temporary copy of the workspace."""
    origin, _ = pushed
    run(origin, "dvc", "exp", "run", "--queue", "-S", "profile=smoke", "-S", "runs.finediffusion.guidance_scale=1.0,4.0",
        "evaluate@finediffusion")
    run(origin, "dvc", "queue", "start", "-j", "1")
    run(origin, "dvc", "queue", "status")
    import time

    for _ in range(300):
        status = run(origin, "dvc", "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(2)
    assert "Failed" not in status, status
    shown = json.loads(run(origin, "dvc", "exp", "show", "--json").stdout)
    text = json.dumps(shown)
    assert "guidance_scale" in text and "fine_accuracy" in text
    scales = {1.0, 4.0}
    found = {float(v) for v in __import__("re").findall(r'"guidance_scale": ([0-9.]+)', text)}
    assert scales <= found, found


def test_gpu_runner_workflow_is_valid_and_pushes_the_run_cache():
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "paper-profile.yml").read_text())
    steps = workflow["jobs"]["run"]["steps"]
    commands = "\n".join(step.get("run", "") for step in steps)
    assert workflow["jobs"]["run"]["runs-on"][0] == "self-hosted"  # more: tests/test_workflows.py
    assert 'dvc exp run --pull --allow-missing -S "profile=$PROFILE"' in commands
    assert "dvc push --run-cache" in commands
    profile = workflow[True]["workflow_dispatch"]["inputs"]["profile"]["default"]  # YAML 1.1: `on` → True
    assert (ROOT / "conf" / "profile" / f"{profile}.yaml").exists()
