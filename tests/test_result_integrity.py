"""Results are never mixed, never stale, and every failure is one line.

1. The report reads exactly the runs of the profile in params.yaml, from `metrics/<profile>/`, and
   refuses a missing metrics file, one produced under other params, or a profile without runs.
2. What a stage resumes from carries the fingerprint of everything that determines it: a killed
   sample stage resumed under other params starts over instead of reusing stale chunks.
3. Every param that divides, indexes or loops is range-checked before any work, and a damaged file
   a stage reads is one line naming it and the command that rebuilds it.
4. `dvc_plots/` is git-ignored; the figures stage shuts its kernels down without an interrupt.
"""

from __future__ import annotations

import copy
import json
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from diffrepro import fingerprint
from diffrepro.config import validate
from diffrepro.data.shards import write_classes
from diffrepro.data.synthetic import class_table
from diffrepro.errors import UserError
from diffrepro.papers import speed_pairs
from diffrepro.paths import metrics_file, speed_file
from diffrepro.profiles import compose
from diffrepro.sampling import RunSampler
from pipeline_repo import copy_outputs, stage_in

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def _smoke() -> dict:
    return compose("smoke", conf_dir=CONF)


def _write_params(work: Path, params: dict) -> None:
    (work / "params.yaml").write_text(yaml.safe_dump(params))


def _one_error_line(capsys, work: Path, *args: str) -> str:
    """The stage must exit with status 2 after printing exactly one line, `error: ...`."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        stage_in(work, *args)
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# --- 1. the report: one profile's runs, produced under params.yaml ------------------------------

DEFAULT_ONLY = ("full_finetune", "bitfit", "difffit", "dimr", "edm_small", "patch_small", "immiscible",
                "immiscible_ft")


@pytest.fixture
def smoke_after_default(tmp_path) -> dict:
    """A checkout with the default profile's results committed (metrics/default/, reports/results.md)
    in which the smoke profile's runs were then evaluated (params.yaml is the smoke profile's)."""
    params = _smoke()
    _write_params(tmp_path, params)
    synthetic = params["data"]["synthetic"]
    write_classes(tmp_path / params["data"]["prepared_dir"],
                  class_table(synthetic["num_super"], synthetic["base_per_family"]))
    shutil.copytree(ROOT / "metrics" / "default", tmp_path / "metrics" / "default")
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "results.md").write_text("the default profile's report\n")
    for k, run in enumerate(params["runs"]):
        metrics = json.loads((ROOT / "metrics" / "default" / f"{run}.json").read_text())  # a real file's shape
        metrics.update(run=run, model=params["runs"][run]["model"], fid=100.0 + k,
                       params_sha256=fingerprint.metrics(params, run))
        path = tmp_path / metrics_file(params, run)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics))
    speed = {"pairs": {}, "params_sha256": fingerprint.speed(params, speed_pairs(params))}
    (tmp_path / speed_file(params)).write_text(json.dumps(speed))
    return params


def test_a_smoke_report_after_a_default_report_contains_only_smoke_runs(smoke_after_default, tmp_path):
    import pandas as pd

    stage_in(tmp_path, "report")
    frame = pd.read_csv(tmp_path / "reports" / "smoke" / "results.csv")
    assert set(frame.run) == {"dit", "finediffusion"} and frame.seeds.max() == 1
    report = (tmp_path / "reports" / "smoke" / "results.md").read_text()
    assert "| finediffusion | DiT-tiny/2 | finediffusion | 1 | 101 (9.78) |" in report  # its own FID, one seed
    for run in DEFAULT_ONLY + ("finediffusion_seed1",):
        assert f"| {run} |" not in report, run
    assert (tmp_path / "reports" / "results.md").read_text() == "the default profile's report\n"


@pytest.mark.parametrize("change, message", [
    (lambda p, work: (work / "metrics" / "smoke" / "finediffusion.json").unlink(),
     "metrics/smoke/finediffusion.json is missing: run `dvc repro evaluate@finediffusion`"),
    (lambda p, work: p["sample"].update(per_class=1),
     "metrics/smoke/dit.json was produced under other params than params.yaml's: run `dvc repro evaluate@dit`"),
    (lambda p, work: p["pretrain"].update(steps=3),  # what finediffusion was fine-tuned from
     "metrics/smoke/finediffusion.json was produced under other params than params.yaml's: "
     "run `dvc repro evaluate@finediffusion`"),
    (lambda p, work: p.update(runs={}, train_runs={}, sample_runs={}),
     "params.yaml: `runs` is empty: profile 'smoke' has no run to report"),
    (lambda p, work: p["speed"].update(rounds=2),
     "metrics/smoke/speed.json was measured under other params than params.yaml's: run `dvc repro speed`"),
])
def test_the_report_refuses_missing_or_stale_metrics_and_an_empty_profile(smoke_after_default, tmp_path, capsys,
                                                                          change, message):
    params = copy.deepcopy(smoke_after_default)
    change(params, tmp_path)
    _write_params(tmp_path, params)
    assert _one_error_line(capsys, tmp_path, "report") == f"error: {message}"
    assert not (tmp_path / "reports" / "smoke").exists()


def test_fingerprints_follow_the_runs_lineage_and_what_they_depend_on():
    params = _smoke()

    def changed(edit) -> dict:
        out = copy.deepcopy(params)
        edit(out)
        return {(kind, run): getattr(fingerprint, kind)(out, run)
                for kind in ("training", "metrics") for run in ("dit", "finediffusion")}

    base = changed(lambda p: None)
    pretrain = changed(lambda p: p["pretrain"].update(lr=0.5))
    assert {key for key in base if base[key] != pretrain[key]} == {("training", "finediffusion"),
                                                                   ("metrics", "finediffusion")}
    data = changed(lambda p: p["data"]["synthetic"].update(images_per_class=3))
    assert all(base[key] != data[key] for key in base)
    autoencoder = changed(lambda p: p["autoencoder"].update(steps=p["autoencoder"]["steps"] + 1))
    assert all(base[key] != autoencoder[key] for key in base)  # every latent run's samples come from it
    sample = changed(lambda p: p["sample"].update(per_class=3))
    assert {key for key in base if base[key] != sample[key]} == {("metrics", "dit"), ("metrics", "finediffusion")}


# --- 2. sample chunks of other params are not reused -------------------------------------------

@pytest.fixture(scope="module")
def trained(smoke_repo, tmp_path_factory) -> Path:
    """The smoke chain up to a trained `dit` (with its step-2 snapshot) and the FID network, taken
    from the session's smoke pipeline; sampling in chunks of 4 images."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # toy layers: faster on one thread of a busy machine
    work = copy_outputs(smoke_repo, tmp_path_factory.mktemp("integrity"), "data", "models/autoencoder",
                        "models/features", "models/dit")
    params = yaml.safe_load((work / "params.yaml").read_text())
    assert params == _smoke()
    params["sample"].update(per_class=2, batch_size=4)
    _write_params(work, params)
    yield work
    torch.set_num_threads(threads)


def _copy(trained: Path, dst: Path, **sample) -> Path:
    shutil.copytree(trained, dst)
    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["sample"].update(sample)
    _write_params(dst, params)
    return dst


def test_a_killed_sample_stage_resumed_under_other_params_starts_over(trained, tmp_path, monkeypatch, capsys):
    killed = _copy(trained, tmp_path / "killed")
    draw, drawn = RunSampler.__call__, []

    def killed_at_the_third_chunk(self, *args):
        if len(drawn) == 2:
            raise RuntimeError("killed")
        drawn.append(args)
        return draw(self, *args)

    with monkeypatch.context() as patch:
        patch.setattr(RunSampler, "__call__", killed_at_the_third_chunk)
        with pytest.raises(RuntimeError, match="killed"):
            stage_in(killed, "sample", "dit")
    assert len(list((killed / "checkpoints" / "dit" / "samples").glob("*/chunk-*.npy"))) == 2

    for work in (killed, clean := _copy(trained, tmp_path / "clean")):  # per_class 2 → 1
        params = yaml.safe_load((work / "params.yaml").read_text())
        params["sample"]["per_class"] = 1
        _write_params(work, params)
    capsys.readouterr()
    stage_in(killed, "sample", "dit")
    printed = capsys.readouterr().out
    stage_in(clean, "sample", "dit")
    for name in ("step-0000002.npz", "final.npz"):
        with np.load(killed / "samples" / "dit" / name) as a, np.load(clean / "samples" / "dit" / name) as b:
            assert a["labels"].tolist() == b["labels"].tolist() == list(range(16))
            assert a["images"].tobytes() == b["images"].tobytes(), name
    assert "checkpoints/dit/samples/step-0000002 was sampled with other params; starting over\n" in printed


def test_evaluate_records_the_fingerprint_the_report_checks(trained, tmp_path):
    work = _copy(trained, tmp_path / "work")
    stage_in(work, "sample", "dit")
    stage_in(work, "evaluate", "dit")
    params = yaml.safe_load((work / "params.yaml").read_text())
    metrics = json.loads((work / "metrics" / "smoke" / "dit.json").read_text())
    assert metrics["params_sha256"] == fingerprint.metrics(params, "dit")
    assert not (work / "metrics" / "dit.json").exists()


# --- 3. one line for a bad param or a damaged file ---------------------------------------------

@pytest.mark.parametrize("section, key", [("runs.dit", "checkpoint_every"), ("train", "log_every")])
def test_a_zero_period_is_one_line_before_any_work(tmp_path, capsys, section, key):
    """Each divides the step counter; nothing is there to train on, so any work would fail otherwise."""
    params = _smoke()
    target = params["runs"]["dit"] if section == "runs.dit" else params[section]
    target[key] = 0
    _write_params(tmp_path, params)
    assert _one_error_line(capsys, tmp_path, "train", "dit") == \
        f"error: params.yaml: `{section}.{key}` must be a positive integer, got 0"


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["runs"]["dit"].update(eval_at=[0]), "`runs.dit.eval_at` entries must be steps in 1..runs.dit.steps"),
    (lambda p: p["runs"]["dit"].update(eval_at=[5]), "`runs.dit.eval_at` entries must be steps in 1..runs.dit.steps "
                                                     "(4), got 5"),
    (lambda p: p["pretrain"].update(eval_at=["2"]), "`pretrain.eval_at` entries must be steps"),
    (lambda p: p["runs"]["dit"].update(betas=[0.9]), "`runs.dit.betas` must be two numbers in [0, 1)"),
    (lambda p: p["runs"]["dit"].update(ema_decay=1.5), "`runs.dit.ema_decay` must be between 0 and 1"),
    (lambda p: p["runs"]["dit"].update(guided_channels=0), "`runs.dit.guided_channels` must be a positive integer"),
    (lambda p: p["runs"]["dit"].update(guidance_scale=-1.0), "`runs.dit.guidance_scale` must be a non-negative"),
    (lambda p: p["runs"]["dit"].update(seeds=[-1]), "`runs.dit.seeds` must be a non-empty list of distinct "
                                                     "non-negative integers"),
    (lambda p: p["sample"].update(grid_classes=0), "`sample.grid_classes` must be a positive integer"),
    (lambda p: p["sample"].update(batch_size=0), "`sample.batch_size` must be a positive integer"),
    (lambda p: p["features"].update(width=0), "`features.width` must be a positive integer"),
    (lambda p: p["autoencoder"].update(block_out_channels=[]), "`autoencoder.block_out_channels` must be a non-empty"),
    (lambda p: p["data"]["synthetic"].update(base_per_family=0), "`data.synthetic.base_per_family` must be a positive"),
    (lambda p: p["data"]["synthetic"].update(base_per_family=9), "`data.synthetic.base_per_family` must be at most 8"),
    (lambda p: p["data"]["synthetic"].update(num_super=9), "`data.synthetic.num_super` must be at most 8"),
    (lambda p: p["report"].update(dir="reports"), "`report.dir` of profile 'smoke' must not be reports/"),
])
def test_params_that_divide_index_or_loop_are_range_checked(edit, message):
    params = _smoke()
    edit(params)
    with pytest.raises(UserError) as err:
        validate(params)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("key, value, hint", [("steps", "10", False), ("steps", 2.5, False), ("lr", "1e-3", True)])
def test_the_float_spelling_hint_comes_only_with_a_float_written_as_a_string(key, value, hint):
    params = _smoke()
    params["runs"]["dit"][key] = value
    with pytest.raises(UserError) as err:
        validate(params)
    assert ("1.0e-3" in str(err.value)) == hint, str(err.value)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize("damage, args, message", [
    (lambda w: _truncate(w / "models/dit/ema.safetensors"), ("sample", "dit"),
     "models/dit/ema.safetensors is truncated or corrupt (SafetensorError): run `dvc repro train@dit` to rebuild it"),
    (lambda w: _truncate(w / "models/dit/snapshots/step-0000002.safetensors"), ("sample", "dit"),
     "models/dit/snapshots/step-0000002.safetensors is truncated or corrupt (SafetensorError): "
     "run `dvc repro train@dit` to rebuild it"),
    (lambda w: (w / "models/dit/config.json").unlink(), ("sample", "dit"),
     "models/dit/config.json is missing: run `dvc repro train@dit`"),
    (lambda w: (w / "data/prepared/classes.json").write_text("{"), ("sample", "dit"),
     "data/prepared/classes.json is truncated or corrupt (JSONDecodeError): run `dvc repro prepare` to rebuild it"),
    (lambda w: _truncate(w / "models/features/judge.safetensors"), ("evaluate", "dit"),
     "models/features/judge.safetensors is truncated or corrupt (SafetensorError): run `dvc repro features` "
     "to rebuild it"),
    (lambda w: _truncate(w / "models/features/reference_stats.npz"), ("evaluate", "dit"),
     "models/features/reference_stats.npz is truncated or corrupt (BadZipFile): run `dvc repro features` "
     "to rebuild it"),
    (lambda w: (w / "samples/dit").mkdir(parents=True) or (w / "samples/dit/final.npz").write_bytes(b"PK\x03\x04"),
     ("evaluate", "dit"),
     "samples/dit/final.npz is truncated or corrupt (BadZipFile): run `dvc repro sample@dit` to rebuild it"),
])
def test_a_damaged_input_is_one_line_naming_it_and_the_command_that_rebuilds_it(trained, tmp_path, capsys,
                                                                                damage, args, message):
    work = _copy(trained, tmp_path / "work")
    damage(work)
    assert _one_error_line(capsys, work, *args) == f"error: {message}"


def test_missing_sd_vae_weights_do_not_suggest_the_stage_that_just_failed(tmp_path, capsys):
    from diffrepro.models.autoencoder import tiny_autoencoder

    params = _smoke()
    params["autoencoder"].update(kind="sd_vae", path="models/sd-vae-ft-ema")
    _write_params(tmp_path, params)
    tiny_autoencoder(16, (8, 16)).save_pretrained(tmp_path / "models" / "sd-vae-ft-ema")
    (tmp_path / "models" / "sd-vae-ft-ema" / "diffusion_pytorch_model.safetensors").unlink()
    line = _one_error_line(capsys, tmp_path, "autoencoder")
    assert line.startswith("error: cannot load the autoencoder in models/sd-vae-ft-ema (")
    assert line.endswith("): download the SD VAE (huggingface.co/stabilityai/sd-vae-ft-ema or -ft-mse: "
                         "config.json + diffusion_pytorch_model.safetensors) into that folder")
    assert "dvc repro autoencoder" not in line


# --- 4. small things --------------------------------------------------------------------------

def test_dvc_plots_output_is_git_ignored():
    assert subprocess.run(["git", "check-ignore", "-q", "dvc_plots/index.html"], cwd=ROOT).returncode == 0


def test_the_figures_kernels_are_shut_down_without_an_interrupt():
    """jupyter_client sends SIGINT before every shutdown; a kernel still handling a message logs it
    as "KeyboardInterrupt caught in kernel" on a run that succeeded."""
    import asyncio

    from diffrepro.stages.figures import QuietShutdownKernelManager

    sent = []

    async def start_and_shut_down():
        manager = QuietShutdownKernelManager(kernel_name="python3")
        await manager.start_kernel()
        send = manager.provisioner.send_signal

        async def recording(signum):
            sent.append(signum)
            await send(signum)

        manager.provisioner.send_signal = recording
        await manager.shutdown_kernel()
        assert not await manager.is_alive()

    asyncio.run(start_and_shut_down())
    assert signal.SIGINT not in sent
