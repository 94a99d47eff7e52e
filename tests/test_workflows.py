"""The GPU-runner workflows, linted and with their own step scripts run here; the runner's first check.

`paper-profile.yml` runs a profile on one runner in a chain of jobs that pause and resume;
`paper-profile-fanout.yml` spreads a profile's runs over several runners. Both must keep the
runner's workspace (no clean checkout), keep the DVC cache and checkpoints outside it, and fit
GitHub's limit for a self-hosted job. The fan-out is replayed job by job with a small emulator
(checkout, artifacts, step outputs and env files as GitHub does them), one fresh "runner" per job,
so that its claims are checked on real DVC runs: every stage runs exactly once, the report job
gets every run's numbers. `benchmarks/gpu_check.py`, the workflows' first step, is checked without
a GPU: its driver verdicts, its measurements at toy size, its stand-in harness mode.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from diffrepro.stages.figures import NOTEBOOKS
from pipeline_repo import ROOT, copy_outputs, env, make_repo, run

WORKFLOWS = ROOT / ".github" / "workflows"
CHAIN, FANOUT = WORKFLOWS / "paper-profile.yml", WORKFLOWS / "paper-profile-fanout.yml"
SELF_HOSTED_JOB_MINUTES = 5 * 24 * 60  # GitHub: a self-hosted job runs at most 5 days
HOSTED_JOB_MINUTES = 6 * 60
RUNNER_LABELS = ["gpu"]  # the custom label of the GPU runners


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def dispatch_inputs(workflow: dict) -> dict:
    return workflow[True]["workflow_dispatch"]["inputs"]  # YAML 1.1 reads the key `on` as True


def steps_running(job: dict, text: str) -> list[dict]:
    return [s for s in job["steps"] if text in s.get("run", "")]


@pytest.mark.parametrize("path", [CHAIN, FANOUT], ids=lambda p: p.name)
def test_actionlint_and_shellcheck_find_nothing(path, tmp_path):
    bin_dir = Path(sys.executable).parent
    config = tmp_path / "actionlint.yaml"
    config.write_text(yaml.safe_dump({"self-hosted-runner": {"labels": RUNNER_LABELS}}))
    proc = subprocess.run([str(bin_dir / "actionlint"), "-config-file", str(config),
                           "-shellcheck", str(bin_dir / "shellcheck"), str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", [CHAIN, FANOUT], ids=lambda p: p.name)
def test_jobs_keep_the_workspace_and_fit_the_job_limit(path):
    workflow = load(path)
    for name, job in workflow["jobs"].items():
        labels = job["runs-on"] if isinstance(job["runs-on"], list) else [job["runs-on"]]
        limit = SELF_HOSTED_JOB_MINUTES if "self-hosted" in labels else HOSTED_JOB_MINUTES
        assert 0 < job["timeout-minutes"] <= limit, name  # unset, a self-hosted job stops after 6 h
        for step in job["steps"]:
            if step.get("uses", "").startswith("actions/checkout@"):
                assert step["with"]["clean"] is False, f"{name}: a clean checkout deletes data, weights, checkpoints"
        if "self-hosted" in labels:
            assert steps_running(job, "dvc cache dir --local"), f"{name}: the DVC cache would live in the checkout"


@pytest.mark.parametrize("path", [CHAIN, FANOUT], ids=lambda p: p.name)
def test_the_cache_and_checkpoints_are_set_outside_the_checkout(path, tmp_path):
    """The step's own script, in a DVC repo with a remote: where does it put the cache and checkpoints?"""
    workspace, home = tmp_path / "work" / "repo", tmp_path / "home"
    workspace.mkdir(parents=True)
    home.mkdir()
    run(workspace, "git", "init", "-q")
    run(workspace, "dvc", "init", "-q")
    run(workspace, "dvc", "remote", "add", "-d", "storage", str(tmp_path / "remote"))
    script = steps_running(load(path)["jobs"]["run"], "dvc cache dir --local")[0]["run"]
    github_env = tmp_path / "github_env"
    proc = subprocess.run(["bash", "-e", "-c", script], cwd=workspace, capture_output=True, text=True,
                          env={**env(workspace), "HOME": str(home), "PROFILE": "smoke", "GITHUB_ENV": str(github_env)})
    assert proc.returncode == 0, proc.stderr
    checkpoints = Path(dict(line.split("=", 1) for line in github_env.read_text().split())["DIFFREPRO_CHECKPOINTS"])
    cache = Path(run(workspace, "dvc", "cache", "dir").stdout.strip())
    for where in (checkpoints, cache):
        assert where.is_absolute() and where.is_dir() and workspace not in where.parents, where


def test_the_chain_pauses_resumes_and_stops_on_a_real_failure(tmp_path):
    """The repro step with a stand-in `dvc`: finished, paused on the training budget (status 75
    through DVC), or failed. Paused → output paused=true and a green step, so the push and the next
    job follow; failed → a red step and no next job."""
    workflow = load(CHAIN)
    step = next(s for s in workflow["jobs"]["run"]["steps"] if s.get("id") == "repro")
    fake = tmp_path / "bin" / "dvc"
    fake.parent.mkdir()

    def repro(dvc_output: str, status: int):
        fake.write_text(f"#!/bin/sh\necho \"$DIFFREPRO_TRAIN_SECONDS\" > {tmp_path}/budget\n"
                        f"echo '{dvc_output}' >&2\nexit {status}\n")
        fake.chmod(0o755)
        (tmp_path / "out").write_text("")
        proc = subprocess.run(["bash", "-e", "-c", step["run"]], cwd=tmp_path, capture_output=True, text=True,
                              env={**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "HOURS": "2",
                                   "PROFILE": "smoke", "GITHUB_RUN_ID": "7", "GITHUB_RUN_ATTEMPT": "1",
                                   "RUNNER_TEMP": str(tmp_path), "GITHUB_OUTPUT": str(tmp_path / "out"),
                                   "GITHUB_STEP_SUMMARY": str(tmp_path / "summary")})
        return proc.returncode, (tmp_path / "out").read_text().split()

    assert repro("done", 0) == (0, ["paused=false"])
    assert (tmp_path / "budget").read_text().strip() == str(2 * 3600)
    assert repro("paused: dit: the DIFFREPRO_TRAIN_SECONDS budget (7200 s) is spent at step 5000 of 100000; "
                 "run the same command again to resume", 1) == (0, ["paused=true"])
    status, outputs = repro("error: params.yaml: runs.dit.lr must be positive", 1)
    assert status != 0 and outputs == []

    next_job = workflow["jobs"]["next"]
    assert next_job["needs"] == "run" and "needs.run.outputs.paused == 'true'" in next_job["if"]
    assert workflow["jobs"]["run"]["outputs"]["paused"] == "${{ steps.repro.outputs.paused }}"
    dispatch = next_job["steps"][0]["run"]
    assert f"gh workflow run {CHAIN.name}" in dispatch
    for name in dispatch_inputs(workflow):  # the next job runs the same profile, on the same machine
        assert f"-f {name}=" in dispatch, name
    runner_label = dispatch_inputs(workflow)["runner"]
    assert runner_label and workflow["jobs"]["run"]["runs-on"] == ["self-hosted", "${{ inputs.runner }}"]


def test_the_fanout_matrix_is_exactly_the_runs_of_each_profile(tmp_path):
    from diffrepro.profiles import compose, profile_names

    workflow = load(FANOUT)
    plan = next(s for s in workflow["jobs"]["shared"]["steps"] if s.get("id") == "plan")
    assert workflow["jobs"]["run"]["strategy"]["matrix"]["run"] == "${{ fromJSON(needs.shared.outputs.runs) }}"
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    for profile in profile_names(ROOT / "conf"):
        out = tmp_path / f"out-{profile}"
        proc = subprocess.run(["bash", "-e", "-c", plan["run"]], cwd=tmp_path, capture_output=True, text=True,
                              env={**env(tmp_path), "PROFILE": profile, "GITHUB_OUTPUT": str(out),
                                   "PYTHONPATH": str(ROOT / "src")})
        assert proc.returncode == 0, proc.stderr
        key, value = out.read_text().strip().split("=", 1)
        assert key == "runs" and json.loads(value) == list(compose(profile, conf_dir=ROOT / "conf")["train_runs"]), profile


def test_the_report_job_waits_for_every_run():
    jobs = load(FANOUT)["jobs"]
    assert set(jobs["report"]["needs"]) == {"shared", "run"} and "if" not in jobs["report"]
    assert jobs["run"]["strategy"]["fail-fast"] is False
    for name in ("shared", "run", "report"):
        pushes = steps_running(jobs[name], "dvc push")
        assert pushes and all("--run-cache" in s["run"] for s in pushes), name


# ---- the fan-out, replayed on the smoke profile ---------------------------------------------------

EXPRESSION = re.compile(r"\$\{\{\s*([\w.-]+)\s*\}\}")


class Runner:
    """A self-hosted runner: its own workspace (kept between jobs), HOME and DIFFREPRO_STATE."""

    def __init__(self, root: Path, origin: Path, artifacts: Path):
        self.root, self.origin, self.artifacts = root, origin, artifacts
        self.workspace, self.home, self.temp = root / "work", root / "home", root / "temp"
        self.home.mkdir(parents=True)
        venv_name = f"venv-{hashlib.sha256((ROOT / 'requirements.txt').read_bytes()).hexdigest()[:12]}"
        (self.home / ".cache" / "diffrepro").mkdir(parents=True)
        (self.home / ".cache" / "diffrepro" / venv_name).symlink_to(sys.prefix)  # run.sh's venv: this one
        self.log = ""

    def job(self, workflow: dict, name: str, context: dict) -> dict:
        """Run one job's steps as GitHub does; returns the job's outputs."""
        job, context = workflow["jobs"][name], dict(context, **{"runner.temp": str(self.temp)})
        shutil.rmtree(self.temp, ignore_errors=True)
        self.temp.mkdir()
        files = {k: self.temp / k.lower()
                 for k in ("GITHUB_ENV", "GITHUB_PATH", "GITHUB_OUTPUT", "GITHUB_STEP_SUMMARY")}
        for f in files.values():
            f.touch()
        base = {**env(self.workspace), "HOME": str(self.home), "RUNNER_TEMP": str(self.temp),
                "DIFFREPRO_STATE": str(self.root / "state")}
        for scope in (workflow.get("env", {}), job.get("env", {})):
            base.update({k: self.expand(v, context) for k, v in scope.items()})
        for step in job["steps"]:
            if "uses" in step:
                inputs = {k: self.expand(v, context) for k, v in step.get("with", {}).items()}
                self.action(step["uses"].split("@")[0], inputs)
                continue
            if "gpu_check.py" in step["run"]:  # no GPU here
                continue
            assert step.get("if", "${{ !cancelled() }}") == "${{ !cancelled() }}", step
            step_env = dict(base, **{k: self.expand(v, context) for k, v in step.get("env", {}).items()})
            step_env.update(line.split("=", 1) for line in files["GITHUB_ENV"].read_text().splitlines())
            step_env["PATH"] = ":".join(files["GITHUB_PATH"].read_text().split() + [step_env["PATH"]])
            files["GITHUB_OUTPUT"].write_text("")
            proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", step["run"]], cwd=self.workspace,
                                  env={**step_env, **{k: str(f) for k, f in files.items()}},
                                  capture_output=True, text=True)
            self.log += proc.stdout + proc.stderr
            assert proc.returncode == 0, f"{name}: {step.get('name')}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            if "id" in step:
                outputs = dict(line.split("=", 1) for line in files["GITHUB_OUTPUT"].read_text().splitlines())
                context.update({f"steps.{step['id']}.outputs.{k}": v for k, v in outputs.items()})
        return {k: self.expand(v, context) for k, v in job.get("outputs", {}).items()}

    @staticmethod
    def expand(value, context: dict) -> str:
        return EXPRESSION.sub(lambda m: context[m.group(1)], str(value))

    def action(self, action: str, inputs: dict) -> None:
        if action == "actions/checkout":
            assert inputs["clean"] == "False"
            if not self.workspace.exists():
                run(self.root, "git", "clone", "-q", str(self.origin), str(self.workspace))
            run(self.workspace, "git", "fetch", "-q", "origin")
            run(self.workspace, "git", "checkout", "-q", "--force", "origin/HEAD")
        elif action == "actions/upload-artifact":
            target = self.artifacts / inputs["name"]
            for rel in inputs["path"].split():
                source = self.workspace / rel
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                (shutil.copytree if source.is_dir() else shutil.copy2)(source, target / rel)
        elif action == "actions/download-artifact":
            into = Path(inputs.get("path", self.workspace))
            if "name" in inputs:
                shutil.copytree(self.artifacts / inputs["name"], into, dirs_exist_ok=True)
            for found in self.artifacts.glob(inputs.get("pattern", "\0")):
                shutil.copytree(found, into / found.name, dirs_exist_ok=True)
        else:
            raise NotImplementedError(action)


def test_the_fanout_runs_every_stage_once_and_reports_every_run(tmp_path, monkeypatch, request):
    """On runners with two processes per computing stage (gloo, as two GPUs would): besides what the
    fan-out promises, the numbers equal those of the one-process `dvc exp run` (the session's smoke
    repo, asked for only at the end: the fan-out does not wait for it to be built) up to the order of
    floating-point reductions: same global batches, samples split across the processes."""
    monkeypatch.setenv("DIFFREPRO_NUM_PROCESSES", "2")  # every runner's environment
    origin = make_repo(tmp_path / "origin")
    for name in ("requirements.txt", "run.sh"):  # what the jobs' environment step reads
        shutil.copy2(ROOT / name, origin / name)
    run(origin, "dvc", "remote", "add", "-d", "storage", str(tmp_path / "dvc-remote"))
    run(origin, "git", "add", "-A")
    run(origin, "git", "commit", "-qm", "a DVC remote")
    workflow, artifacts = load(FANOUT), tmp_path / "artifacts"
    context = {"inputs.profile": "smoke", "inputs.hours": "1"}

    def runner(name: str) -> Runner:
        return Runner(tmp_path / name, origin, artifacts)

    shared = runner("runner-shared")
    runs = json.loads(shared.job(workflow, "shared", context)["runs"])
    assert runs == ["dit", "finediffusion"]
    matrix = {r: runner(f"runner-{r}") for r in runs}
    for r, machine in matrix.items():
        machine.job(workflow, "run", {**context, "matrix.run": r})
    report = runner("runner-report")
    report.job(workflow, "report", context)

    logs = {"shared": shared.log, **{r: m.log for r, m in matrix.items()}, "report": report.log}
    ran = [stage for log in logs.values() for stage in re.findall(r"Running stage '([^']+)'", log)]
    expected = ["download", "prepare", "autoencoder", "extract_latents", "features", "pretrain",
                *[f"{s}@{r}" for r in runs for s in ("train", "sample", "evaluate")], "speed",
                *[f"figures@{n}" for n in NOTEBOOKS], "report"]
    assert sorted(ran) == sorted(expected), logs
    assert set(re.findall(r"Running stage '([^']+)'", logs["dit"])) == {"train@dit", "sample@dit", "evaluate@dit"}

    results = (report.workspace / "reports" / "smoke" / "results.md").read_text()
    for r in runs:
        assert (report.workspace / "metrics" / "smoke" / f"{r}.json").exists()
    assert results == (artifacts / "results-smoke" / "reports" / "smoke" / "results.md").read_text()
    for machine in [shared, *matrix.values(), report]:  # checkpoints, sample chunks, DVC cache: outside
        assert not (machine.workspace / "checkpoints").exists(), machine.root.name
        assert not (machine.workspace / ".dvc" / "cache").exists()
        assert any((machine.root / "state" / "dvc-cache").iterdir())

    assert "diffrepro.launch train dit" in logs["dit"]
    smoke_repo = request.getfixturevalue("smoke_repo")
    for r in runs:
        one = json.loads((smoke_repo / "metrics" / "smoke" / f"{r}.json").read_text())
        both = json.loads((report.workspace / "metrics" / "smoke" / f"{r}.json").read_text())
        assert both["num_samples"] == one["num_samples"]
        assert both["train"]["images_seen"] == one["train"]["images_seen"]
        assert both["train"]["final_loss"] == pytest.approx(one["train"]["final_loss"], rel=1e-4)
        for metric in ("fid", "fine_accuracy", "super_accuracy"):
            assert both[metric] == pytest.approx(one[metric], rel=0.02, abs=0.02), metric


# ---- the runner's first check: benchmarks/gpu_check.py ---------------------------------------------

@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    return gpu_check


def test_the_gpu_check_stops_with_one_line_on_a_driver_too_old_for_the_torch_build(gpu_check, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check.torch.version, "cuda", "13.0")
    with pytest.raises(gpu_check.DriverError, match=r"driver 550\.54\.15 is older than 580.*CUDA 12"):
        gpu_check.check_driver("550.54.15")
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    with pytest.raises(gpu_check.DriverError, match="new enough for CUDA 13.0, yet torch sees no GPU"):
        gpu_check.check_driver("580.65.06")
    monkeypatch.setattr(gpu_check, "driver_version", lambda: None)
    assert gpu_check.main(["--driver"]) == 2  # the workflows' first step: no GPU, no job
    err = capsys.readouterr().err
    assert err.startswith("error: no NVIDIA driver") and err.count("\n") == 1


def test_the_gpu_measurements_run_on_a_tiny_model(gpu_check):
    """The CUDA mode's code paths (model, optimizer, EMA, latents), on the CPU at toy size."""
    cpu, tiny = torch.device("cpu"), {"num_classes": 10, "input_size": 8}
    for precision in ("bf16", "tf32", "fp32"):
        result = gpu_check.train_throughput(precision, cpu, "DiT-tiny/2", tiny, batch=2, repeats=1, warmup=1)
        assert result["steps_per_s"] > 0
    assert gpu_check.train_throughput("fp32", cpu, "ddpmpp-mini", {"input_size": 16, "num_classes": None},
                                      batch=2, repeats=1, warmup=1)["steps_per_s"] > 0
    assert gpu_check.sampling_throughput(cpu, "DiT-tiny/2", tiny, batch=2, repeats=1, warmup=1) > 0
    vae = gpu_check.sd_vae((32, 32), layers_per_block=1)
    assert gpu_check.vae_encoder_throughput(cpu, vae, images=4, batch=2, size=32, repeats=1) > 0


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="with a GPU driver the check runs on CUDA")
def test_the_gpu_check_runs_the_stand_in_harness_without_cuda(gpu_check, smoke_repo, tmp_path, monkeypatch, capsys):
    """The script's CPU mode, in this process; its harness works on a copy of the session's smoke
    data, autoencoder and FID network instead of building them in a temporary folder first."""
    from diffrepro import device_standin

    workspace = copy_outputs(smoke_repo, tmp_path / "standin", "data", "models/autoencoder", "models/features")
    harness = device_standin.run_harness
    monkeypatch.setattr(device_standin, "run_harness", lambda: harness(workspace))
    code = gpu_check.main([])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert "| train step: dit | ok |" in out and "| feature batch: inception | ok |" in out
