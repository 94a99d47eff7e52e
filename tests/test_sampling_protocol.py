"""How samples are drawn and scored: every run states its guidance schedule, DiMR's increasing
schedule is the power-cosine ramp, EDM's FID protocol (minimum over independent seed sets), and
a killed sample stage resumes to the same images bit for bit."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from diffrepro.config import run_params, validate
from diffrepro.diffusion.gaussian import GaussianDiffusion, guided_model_fn, make_betas, sample, space_timesteps
from diffrepro.errors import UserError
from diffrepro.replicates import expand
from diffrepro.runs import build_network
from diffrepro.sampling import RunSampler
from pipeline_repo import stage_in

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.mark.parametrize("section, key", [("runs.dit", "guidance_power"), ("pretrain", "guidance_schedule"),
                                          ("runs.edm_small", "seeds")])
def test_a_run_missing_a_key_is_named(section, key):
    params = copy.deepcopy(DEFAULT)
    run = params["pretrain"] if section == "pretrain" else params["runs"][section.split(".")[1]]
    del run[key]
    with pytest.raises(UserError, match=f"^params.yaml: `{section}.{key}` is missing$"):
        validate(params)


@pytest.mark.parametrize("edit, message", [
    (dict(guidance_schedule="cosine"), "`runs.dit.guidance_schedule` must be one of constant, increasing"),
    (dict(guidance_power=0.0), "`runs.dit.guidance_power` must be a positive number"),
])
def test_bad_guidance_schedule_params_are_named(edit, message):
    params = copy.deepcopy(DEFAULT)
    params["runs"]["dit"].update(edit)
    with pytest.raises(UserError, match=message):
        validate(params)


@pytest.mark.parametrize("schedule, power", [("increasing", 2.5), ("increasing", 1.0), ("constant", 1.0)])
def test_sampling_sees_the_hand_computed_guidance_weight_at_every_step(schedule, power):
    """ε_c = 1 and ε_g = 0, so the guided ε the sampler receives IS w(t):
    DiMR eval.py's w(t) = 1 + (w − 1)·½·(1 − cos(π·(1 − (t + 1)/T)^p)), or w when constant."""
    T, w = 1000, 4.0

    def model(x, t, y):
        return (y == 1).to(x.dtype).view(-1, 1, 1, 1).expand_as(x).clone()

    guided = guided_model_fn(model, torch.ones(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), w,
                             guided_channels=None, scale_schedule=schedule, num_timesteps=T, scale_power=power)
    seen = {}

    def recording(x, t):
        out = guided(x, t)
        seen[int(t[0])] = out.double()
        return out

    diffusion = GaussianDiffusion(make_betas("linear", T), learn_sigma=False)
    sample(diffusion, recording, (2, 1, 2, 2), sampler="ddim", steps=10, noise=torch.zeros(2, 1, 2, 2))
    assert sorted(seen) == space_timesteps(T, "10")
    for t, out in seen.items():
        ramp = 0.5 * (1 - math.cos(math.pi * (1 - (t + 1) / T) ** power))
        expected = w if schedule == "constant" else 1 + (w - 1) * ramp
        assert torch.allclose(out, torch.full_like(out, expected), rtol=1e-6), (t, out.flatten()[0].item(), expected)
    if schedule == "increasing":
        assert seen[T - 1].flatten()[0].item() == 1.0  # pure noise: no guidance at all


def _tiny_dit_sampler_inputs():
    torch.manual_seed(0)
    kwargs = {"input_size": 4, "in_channels": 4, "num_classes": 3}
    model = build_network("DiT-tiny/2", kwargs, "gaussian")
    with torch.no_grad():  # random weights everywhere (the zero-initialised output layers too)
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    config = {"model": "DiT-tiny/2", "method": "dit", "method_kwargs": {"class_dropout": 0.1},
              "diffusion": "gaussian", "schedule": "linear", "model_kwargs": kwargs}
    cfg = {"sampler": "ddim", "sample_steps": 5, "guidance_scale": 3.0, "guided_channels": None,
           "guidance_schedule": "increasing", "guidance_power": 2.0, "bf16": False}
    return model.eval(), config, cfg


def test_run_sampler_passes_the_schedule_and_power_through():
    model, config, cfg = _tiny_dit_sampler_inputs()
    labels, supers, indices = np.array([0, 1, 2]), np.zeros(3, np.int64), np.arange(3)
    images = RunSampler(model, config, cfg, seed=7, where="runs.dit")(labels, supers, indices)

    sampler = RunSampler(model, config, {**cfg, "guidance_schedule": "constant"}, seed=7, where="runs.dit")
    generators = sampler.generators(indices)
    x_T = torch.stack([torch.randn(4, 4, 4, generator=g) for g in generators])
    y = torch.from_numpy(labels)
    fn = guided_model_fn(model, y, torch.full_like(y, 3), 3.0, guided_channels=None,
                         scale_schedule="increasing", scale_power=2.0)
    direct = sample(sampler.diffusion, fn, x_T.shape, sampler="ddim", steps=5, noise=x_T, generator=generators)
    from diffrepro.models.autoencoder import to_uint8

    assert np.array_equal(images, to_uint8(direct))
    assert not np.array_equal(images, sampler(labels, supers, indices))  # constant w differs


def test_edm_runs_reject_the_increasing_schedule_naming_the_key():
    _, config, cfg = _tiny_dit_sampler_inputs()
    model = build_network("ddpmpp-mini", {"input_size": 16, "in_channels": 3, "num_classes": 3}, "edm")
    config = {**config, "model": "ddpmpp-mini", "method": "edm", "diffusion": "edm"}
    with pytest.raises(UserError, match=r"`runs\.edm\.guidance_schedule` must be constant"):
        RunSampler(model, config, cfg, seed=0, where="runs.edm")


# --- the sample and evaluate stages on a tiny trained run ----------------------------------------

PER_CLASS, BATCH, SEED_SETS, CLASSES = 4, 4, 2, 16  # the smoke data has 16 fine classes


@pytest.fixture(scope="module")
def trained(tmp_path_factory, smoke_repo) -> Path:
    """The smoke profile's `dit` run as the session's smoke pipeline trained it (with one snapshot),
    sampling in chunks of 4 images, single-threaded like the killed stage's process
    (OMP_NUM_THREADS=1): same reduction order. Sampling params are not what the weights depend on."""
    from pipeline_repo import copy_outputs

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    work = copy_outputs(smoke_repo, tmp_path_factory.mktemp("sampling"), "data", "models/autoencoder",
                        "models/features", "models/dit")
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["sample"].update(per_class=PER_CLASS, batch_size=BATCH, seed_sets=SEED_SETS)
    params["runs"]["dit"].update(sample_steps=5)
    params["train_runs"], params["sample_runs"] = expand(params["runs"])  # as the composition does
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    yield work
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def straight(trained, tmp_path_factory) -> Path:
    """An uninterrupted sample + evaluate of the trained run."""
    work = tmp_path_factory.mktemp("straight") / "repo"
    shutil.copytree(trained, work)
    stage_in(work, "sample", "dit")
    stage_in(work, "evaluate", "dit")
    return work


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as npz:
        return {key: npz[key] for key in npz.files}


def test_seed_sets_use_offset_indices_and_evaluate_reports_their_minimum(straight, monkeypatch):
    from diffrepro.features import FeatureNet, feature_statistics, frechet_distance
    from diffrepro.models.autoencoder import load_autoencoder
    from diffrepro.runs import load_trained
    from diffrepro.sampling import sample_labels

    out = straight / "samples" / "dit"
    assert sorted(p.name for p in out.iterdir()) == \
        ["final-set1.npz", "final.npz", "grid.png", "sampling.json", "step-0000002.npz"]  # snapshots: set 0 only
    sets = [_npz(out / "final.npz"), _npz(out / "final-set1.npz")]

    monkeypatch.chdir(straight)
    params = yaml.safe_load(Path("params.yaml").read_text())
    cfg = run_params(params, "dit")
    labels, supers = sample_labels("data/prepared", cfg["split"], PER_CLASS)
    n = len(labels)
    model, config = load_trained("models/dit")
    sampler = RunSampler(model, config, cfg, params["seed"] + cfg["seed"], load_autoencoder("models/autoencoder"),
                         where="runs.dit")
    for k, saved in enumerate(sets):  # set k: image i drawn with index k·n + i
        direct = np.concatenate([sampler(labels[s:s + BATCH], supers[s:s + BATCH],
                                         np.arange(s, min(s + BATCH, n)) + k * n) for s in range(0, n, BATCH)])
        assert np.array_equal(saved["images"], direct), k
        assert np.array_equal(saved["labels"], labels)
    assert not np.array_equal(sets[0]["images"], sets[1]["images"])

    metrics = json.loads(Path("metrics/smoke/dit.json").read_text())
    reference = tuple(np.load("models/features/reference_stats.npz")[k] for k in ("mu", "sigma"))
    net = FeatureNet.load(params)
    fids = [frechet_distance(feature_statistics(net(s["images"])["features"]), reference) for s in sets]
    assert metrics["fid_seed_sets"] == pytest.approx(fids, rel=1e-6)
    assert metrics["fid"] == metrics["fid_seed_sets"][0]
    assert metrics["fid_min"] == min(metrics["fid_seed_sets"])
    assert metrics["sampling"]["seed_sets"] == SEED_SETS
    assert (metrics["sampling"]["guidance_schedule"], metrics["sampling"]["guidance_power"]) == ("constant", 1.0)


def test_sigkill_then_resume_gives_the_uninterrupted_samples_bit_for_bit(trained, straight, tmp_path):
    killed = tmp_path / "killed"
    shutil.copytree(trained, killed)
    chunks = killed / "checkpoints" / "dit" / "samples"
    total = (1 + SEED_SETS) * CLASSES * PER_CLASS // BATCH  # the snapshot's set + the final sets
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "diffrepro", "sample", "dit"], cwd=killed, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(chunks.glob("*/chunk-*.npy")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "samples" / "dit").exists(), "the stage finished before it could be killed"
    assert 0 < len(list(chunks.glob("*/chunk-*.npy"))) < total

    stage_in(killed, "sample", "dit")  # the resume: a fresh run of the stage over the kept chunks
    names = sorted(p.name for p in (straight / "samples" / "dit").glob("*.npz"))
    assert names == sorted(p.name for p in (killed / "samples" / "dit").glob("*.npz"))
    for name in names:
        a, b = _npz(straight / "samples" / "dit" / name), _npz(killed / "samples" / "dit" / name)
        assert np.bincount(b["labels"]).tolist() == [PER_CLASS] * CLASSES  # nothing dropped or repeated
        assert len(b["images"]) == len(b["labels"])
        for key in a:
            assert a[key].tobytes() == b[key].tobytes(), (name, key)
    assert not chunks.exists()  # finished: the chunks are cleaned up
