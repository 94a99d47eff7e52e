"""The one training loop: exact resume after SIGKILL, and 2-process DDP equal to 1 process."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from diffrepro.replicates import expand

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1"}


def _cli(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "diffrepro", *args], cwd=workdir, env=_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, smoke_repo) -> Path:
    """Smoke-profile data, autoencoder and latents, as the session's smoke pipeline made them."""
    from pipeline_repo import copy_outputs

    work = copy_outputs(smoke_repo, tmp_path_factory.mktemp("loop"), "data", "models/autoencoder")
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["train"]["log_every"] = 1
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    return work


def _with_run(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("models", "checkpoints", "logs"), dirs_exist_ok=True)
    shutil.copytree(src / "models" / "autoencoder", dst / "models" / "autoencoder", dirs_exist_ok=True)
    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["runs"]["dit"].update(changes)
    params["train_runs"], params["sample_runs"] = expand(params["runs"])  # as the composition does
    (dst / "params.yaml").write_text(yaml.safe_dump(params))
    return dst


def _weights(workdir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(workdir / "models" / "dit" / "ema.safetensors"))


def test_sigkill_then_resume_ends_bit_identical(workspace, tmp_path):
    """The uninterrupted run in this process (one thread, as the stage processes here), the killed
    and resumed one in stage processes: the kill lands between two checkpoints."""
    from pipeline_repo import stage_in

    changes = {"steps": 200, "checkpoint_every": 10, "eval_at": []}
    straight = _with_run(workspace, tmp_path / "straight", **changes)
    stage_in(straight, "train", "dit")

    killed = _with_run(workspace, tmp_path / "killed", **changes)
    proc = subprocess.Popen([sys.executable, "-m", "diffrepro", "train", "dit"], cwd=killed, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "checkpoints" / "dit" / "last.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "models" / "dit").exists(), "the run finished before it could be killed"
    resumed_from = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < resumed_from < 200
    _cli(killed, "train", "dit")
    a, b = _weights(straight), _weights(killed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_follow_the_one_process_loss_trajectory(workspace, tmp_path):
    changes = {"steps": 6, "batch_size": 8, "eval_at": []}
    one = _with_run(workspace, tmp_path / "one", **changes)
    _cli(one, "train", "dit")
    two = _with_run(workspace, tmp_path / "two", **changes)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "diffrepro", "train", "dit"]
    proc = subprocess.run(launch, cwd=two, env={**_env(), "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def losses(workdir):
        tsv = workdir / "logs" / "smoke" / "dit" / "plots" / "metrics" / "train" / "loss.tsv"
        return [float(row["loss"]) for row in csv.DictReader(tsv.open(), delimiter="\t")]

    l1, l2 = losses(one), losses(two)
    assert len(l1) == len(l2) == 6
    # same global batch, noise and timesteps: only the order of floating-point reductions differs
    assert l1 == pytest.approx(l2, rel=1e-4)
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def _train_in_process(workdir: Path, monkeypatch, run: str = "dit", **env) -> int:
    """`python -m diffrepro.launch train RUN` in this process (one process: the launcher runs it here)."""
    from diffrepro.launch import main as launch

    monkeypatch.chdir(workdir)
    for key, value in {"DIFFREPRO_NUM_PROCESSES": "1", **env}.items():
        monkeypatch.setenv(key, value)
    try:
        launch(["train", run])
    except SystemExit as stop:
        return stop.code
    return 0


def _losses(workdir: Path) -> list[float]:
    tsv = workdir / "logs" / "smoke" / "dit" / "plots" / "metrics" / "train" / "loss.tsv"
    return [float(row["loss"]) for row in csv.DictReader(tsv.open(), delimiter="\t")]


def test_micro_batches_with_accumulation_give_the_whole_batch_update(workspace, tmp_path, monkeypatch):
    changes = {"steps": 6, "batch_size": 8, "eval_at": []}
    whole = _with_run(workspace, tmp_path / "whole", **changes)
    assert _train_in_process(whole, monkeypatch) == 0
    micro = _with_run(workspace, tmp_path / "micro", **changes)
    assert _train_in_process(micro, monkeypatch, DIFFREPRO_BATCH_PER_DEVICE="2") == 0  # 4 micro-batches
    assert _losses(whole) == pytest.approx(_losses(micro), rel=1e-5)
    a, b = _weights(whole), _weights(micro)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert not all(torch.equal(a[k], b[k]) for k in a), "4 partial sums should round differently somewhere"


def test_a_spent_time_budget_pauses_with_status_75_and_the_next_run_resumes_exactly(workspace, tmp_path,
                                                                                     monkeypatch):
    changes = {"steps": 12, "checkpoint_every": 4, "eval_at": []}
    straight = _with_run(workspace, tmp_path / "straight", **changes)
    assert _train_in_process(straight, monkeypatch) == 0
    paused = _with_run(workspace, tmp_path / "paused", **changes)
    assert _train_in_process(paused, monkeypatch, DIFFREPRO_TRAIN_SECONDS="0.001") == 75
    assert not (paused / "models" / "dit").exists()
    assert torch.load(paused / "checkpoints" / "dit" / "last.pt", weights_only=True)["step"] == 4
    monkeypatch.delenv("DIFFREPRO_TRAIN_SECONDS")
    assert _train_in_process(paused, monkeypatch) == 0
    a, b = _weights(straight), _weights(paused)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_speed_pairs_are_timed_interleaved_and_their_ratios_agree_with_each_other(workspace, monkeypatch):
    """One speed pair on the smoke data: every round yields the three ratios, and they obey the
    identities that link them (same batch: per image = per step; to the budget = per step × the
    runs' step counts)."""
    from diffrepro import fingerprint
    from diffrepro.stages import speed
    from diffrepro.paths import speed_file
    from diffrepro.papers import speed_pairs

    params = yaml.safe_load((workspace / "params.yaml").read_text())
    base = {**params["runs"]["dit"], "init_from": "data/latents", "eval_at": []}
    params["runs"] = {"finediffusion": {**base, "method": "finediffusion", "steps": 30},
                      "full_finetune": {**base, "method": "full_finetune", "steps": 60}}
    params["train_runs"], params["sample_runs"] = expand(params["runs"])
    params["speed"] = {"rounds": 3, "steps": 2, "warmup": 1}
    monkeypatch.chdir(workspace)
    order = []
    real_round = speed.timed_round
    monkeypatch.setattr(speed, "timed_round", lambda t, first, steps: order.append((t.run, first)) or
                        real_round(t, first, steps))
    speed.stage(params)
    result = json.loads(speed_file(params).read_text())
    assert result["params_sha256"] == fingerprint.speed(params, speed_pairs(params))
    pair = result["pairs"]["finediffusion_vs_full_finetune"]
    assert (pair["method"], pair["baseline"]) == ("finediffusion", "full_finetune")
    assert list(result["pairs"]) == ["finediffusion_vs_full_finetune"]  # the declared pairs the profile has
    for k in range(3):
        per_step = pair["per_step"]["rounds"][k]
        assert pair["per_image"]["rounds"][k] == pytest.approx(per_step)
        assert pair["to_budget"]["rounds"][k] == pytest.approx(per_step * 60 / 30)
    assert pair["per_step"]["min"] <= pair["per_step"]["median"] <= pair["per_step"]["max"]
    assert order == [("finediffusion", 0), ("full_finetune", 0),  # warm-up, then alternating rounds
                     ("finediffusion", 1), ("full_finetune", 1), ("full_finetune", 3), ("finediffusion", 3),
                     ("finediffusion", 5), ("full_finetune", 5)]


def test_the_loop_and_the_sampler_call_only_hooks_the_base_method_declares():
    """Every hook train/sample/runs call is declared on `Method`, and each method's override takes
    the base's parameters, so the stages can call each hook on every run without asking."""
    import inspect
    import re

    from diffrepro.methods import METHODS, get_method
    from diffrepro.methods.base import Method

    get_method("dit")  # imports every method module
    sources = [(ROOT / "src" / "diffrepro" / f).read_text() for f in ("training.py", "sampling.py", "runs.py",
                                                                    "stages/train.py", "stages/sample.py")]
    called = {name for text in sources for name in re.findall(r"\bmethod\.(\w+)", text)}
    assert {"plan_step", "transform_batch", "sampling_kwargs", "eps_loss", "coordinate_channels"} <= called
    assert called <= set(dir(Method))
    assert not any(re.search(r"(has|get)attr\([^,]*method\b", text) for text in sources)
    for cls in METHODS.values():
        for name in called:
            base, own = getattr(Method, name), getattr(cls, name)
            if inspect.isfunction(base):
                assert list(inspect.signature(own).parameters) == list(inspect.signature(base).parameters), \
                    f"{cls.__name__}.{name}"
