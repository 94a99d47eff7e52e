"""The one training loop: exact resume after SIGKILL, and 2-process DDP equal to 1 process."""

from __future__ import annotations

import csv
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

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1"}


def _cli(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "diffrepro", *args], cwd=workdir, env=_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Smoke-profile data, autoencoder and latents, built by the stage commands themselves."""
    from diffrepro.profiles import compose

    work = tmp_path_factory.mktemp("loop")
    params = compose("smoke", conf_dir=ROOT / "conf")
    params["train"]["log_every"] = 1
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("download", "prepare", "autoencoder", "extract-latents"):
        _cli(work, stage)
    return work


def _with_run(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("models", "checkpoints", "logs"), dirs_exist_ok=True)
    shutil.copytree(src / "models" / "autoencoder", dst / "models" / "autoencoder", dirs_exist_ok=True)
    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["runs"]["dit"].update(changes)
    (dst / "params.yaml").write_text(yaml.safe_dump(params))
    return dst


def _weights(workdir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(workdir / "models" / "dit" / "ema.safetensors"))


def test_sigkill_then_resume_ends_bit_identical(workspace, tmp_path):
    changes = {"steps": 400, "checkpoint_every": 20, "eval_at": []}
    straight = _with_run(workspace, tmp_path / "straight", **changes)
    _cli(straight, "train", "dit")

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
    assert 0 < resumed_from < 400
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
        tsv = workdir / "logs" / "dit" / "plots" / "metrics" / "train" / "loss.tsv"
        return [float(row["loss"]) for row in csv.DictReader(tsv.open(), delimiter="\t")]

    l1, l2 = losses(one), losses(two)
    assert len(l1) == len(l2) == 6
    # same global batch, noise and timesteps: only the order of floating-point reductions differs
    assert l1 == pytest.approx(l2, rel=1e-4)
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
