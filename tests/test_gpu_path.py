"""The GPU path's guards, checked on the CPU: process count, launch command, fail-fast preflight."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from diffrepro import launch
from diffrepro.cli import main as cli
from diffrepro.profiles import compose

ROOT = Path(__file__).resolve().parents[1]


def test_process_count_comes_from_the_environment_then_accelerates_config_then_the_gpus(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFREPRO_NUM_PROCESSES", "3")
    assert launch.process_count() == 3
    monkeypatch.delenv("DIFFREPRO_NUM_PROCESSES")
    monkeypatch.setenv("ACCELERATE_CONFIG_FILE", str(tmp_path / "multinode.yaml"))
    assert launch.process_count() is None  # accelerate launch reads machine rank, main address, ...
    monkeypatch.delenv("ACCELERATE_CONFIG_FILE")
    monkeypatch.setattr(launch, "accelerate_config_file", lambda: None)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 8)
    assert launch.process_count() == 8
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    assert launch.process_count() == 1


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_process_count_is_one_line(monkeypatch, capsys, value):
    monkeypatch.setenv("DIFFREPRO_NUM_PROCESSES", value)
    with pytest.raises(SystemExit) as stop:
        launch.main(["train", "dit"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_launch_command_starts_n_local_processes_or_defers_to_the_config():
    local = launch.launch_command(["sample", "dit"], 4)
    assert local[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert local[local.index("--num_processes") + 1] == "4" and local[-4:] == ["-m", "diffrepro", "sample", "dit"]
    from_config = launch.launch_command(["train", "dit"], None)
    assert "--num_processes" not in from_config and from_config[-4:] == ["-m", "diffrepro", "train", "dit"]


def _paper_workspace(tmp_path: Path, monkeypatch, profile: str = "finediffusion_inat256") -> Path:
    params = compose(profile, conf_dir=ROOT / "conf")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_paper_profile_without_cuda_stops_in_its_first_stage_with_one_line(tmp_path, monkeypatch, capsys):
    work = _paper_workspace(tmp_path, monkeypatch)
    monkeypatch.delenv("DIFFREPRO_ALLOW_CPU", raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit) as stop:
        cli(["download"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert "finediffusion_inat256 needs CUDA" in err and "DIFFREPRO_ALLOW_CPU=1" in err
    assert sorted(p.name for p in work.iterdir()) == ["params.yaml"]  # nothing downloaded, nothing recorded


def test_missing_weights_are_all_listed_before_the_first_stage_works(tmp_path, monkeypatch, capsys):
    work = _paper_workspace(tmp_path, monkeypatch)
    (work / "models").mkdir()
    (work / "models" / "pt_inception-2015-12-05-6726825d.pth").write_bytes(b"")  # one of five is there
    with pytest.raises(SystemExit) as stop:
        cli(["download"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert "needs 4 file(s)" in err
    for name in ("DiT-XL-2-256x256.pt", "sd-vae-ft-mse/config.json", "alexnet-owt-7be5be79.pth",
                 "FineDiffusion-iNat.pt (the official finediffusion release: https://drive.google.com/"):
        assert name in err
    assert "pt_inception" not in err
    assert not (work / "data").exists()
