"""Released profiles: a run with a `release` adopts the authors' checkpoint instead of training, is
sampled and scored as a trained run is, and the report shows its numbers beside the paper's.

On the composition (instant): each `*_released` profile is its paper profile without the trained
runs, and each released run samples as the paper's trained run does. End to end (tiny dims, CPU,
the stage commands in this process): the released runs of every released profile go train →
sample → evaluate → report from fixture files written in the official on-disk layout by the
helpers of test_official_weights.py, and the weights a run saved give the forward pass of the
fixture read by the release's own loader.

The tiny runs score with the judge features (`features.kind: judge`), not Inception: one Inception
FID is a matrix square root of 2048 × 2048, about 25 s on one core, per run and seed set. The
paper protocol at tiny size (Inception, the ADM reference batch, LPIPS) is what test_dimr_profiles,
test_paper_profiles and test_patch_profiles run; that the released profiles evaluate exactly as
the paper profiles do is checked here on the composition.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from diffrepro.diffusion.edm import EDMDenoiser
from diffrepro.errors import UserError
from diffrepro.models import official_weights as ow
from diffrepro.models.registry import build_model
from diffrepro.papers import PAPERS
from diffrepro.profiles import compose, profile_names
from diffrepro.replicates import SAMPLING_KEYS
from diffrepro.results import fmt
from diffrepro.runs import load_trained
from params_util import recompose
from pipeline_repo import stage_in
from test_official_weights import (_marker, forward, official_dimr, official_dit, official_edm, randomize, save_dimr,
                                   save_dit, save_edm, save_finediffusion)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
DIMR_XL, DIMR_G = "models/DiMR-XL_2R_800epochs.pth", "models/DiMR-G_2R_800epochs.pth"
DIT_256 = "models/DiT-XL-2-256x256.pt"
# released profile → (its paper profile, {released run: (the trained row it stands for, release, official file)})
RELEASED = {
    "dimr_xl2r_imagenet256_released": ("dimr_xl2r_imagenet256", {"dimr_released": ("dimr", "dimr", DIMR_XL),
                                                                 "dit_released": ("dit", "dit", DIT_256)}),
    "dimr_g2r_imagenet256_released": ("dimr_g2r_imagenet256", {"dimr_released": ("dimr", "dimr", DIMR_G),
                                                               "dit_released": ("dit", "dit", DIT_256)}),
    "finediffusion_inat256_released": ("finediffusion_inat256", {
        "finediffusion_released": ("finediffusion", "finediffusion", "models/FineDiffusion-iNat.pt")}),
    "finediffusion_inat512_released": ("finediffusion_inat512", {
        "finediffusion_released": ("finediffusion", "finediffusion", "models/FineDiffusion-iNat-512.pt")}),
    "finediffusion_vegfru256_released": ("finediffusion_vegfru256", {
        "finediffusion_released": ("finediffusion", "finediffusion", "models/FineDiffusion-VegFru.pt")}),
    "patch_celeba64_released": ("patch_celeba64", {
        "patch_released": ("patch", "patch_diffusion", "models/patch-diffusion-celeba64.pkl")}),
    "patch_afhqv2wild64_released": ("patch_afhqv2wild64", {
        "patch_released": ("patch", "patch_diffusion", "models/patch-diffusion-afhqv2wild64.pkl")}),
}
# sampler, steps, guidance, guided channels: DiT sample_ddp.py, DiMR eval.py, FineDiffusion sample.py,
# Patch Diffusion's README (generate.py --steps=50); docs/papers/*.md
# DiMR's DiT-XL/2 baseline is DiT's released checkpoint, never retrained (≈ 4,400 H100-hours)
NOT_RETRAINED = {("dimr_xl2r_imagenet256", "dit"), ("dimr_g2r_imagenet256", "dit")}
PAPER_SAMPLING = {"dit": ("ddpm", 250, 1.5, 3), "dimr": ("dpm_solver", 250, 1.4, None),
                  "finediffusion": ("ddpm", 250, 4.0, 3), "patch_diffusion": ("heun", 50, 1.0, None)}
NETWORK_KEYS = ("model", "method", "model_kwargs", "method_kwargs", "diffusion", "schedule", "space", "data", "split",
                "bf16")


def test_every_released_profile_is_declared_here():
    assert {p for p in profile_names(CONF) if p.endswith("_released")} == set(RELEASED)


@pytest.mark.parametrize("profile", RELEASED)
def test_a_released_profile_is_its_paper_profile_without_the_trained_runs(profile):
    paper_profile, released = RELEASED[profile]
    ours, theirs = compose(profile, conf_dir=CONF), compose(paper_profile, conf_dir=CONF)
    apart = ("profile", "report", "runs", "train_runs", "sample_runs")
    assert {k: v for k, v in ours.items() if k not in apart} == {k: v for k, v in theirs.items() if k not in apart}
    assert ours["report"]["dir"] == f"reports/{profile}" and list(ours["runs"]) == list(released)
    for run, (row, release, official) in released.items():
        cfg = ours["runs"][run]
        assert (cfg["release"], cfg["init_from"], cfg["steps"], cfg["eval_at"]) == (release, official, 0, [])
        assert tuple(cfg[k] for k in ("sampler", "sample_steps", "guidance_scale", "guided_channels")) == \
            PAPER_SAMPLING[release]
        if (paper_profile, row) in NOT_RETRAINED:  # the paper profile's baseline is the release itself
            assert row not in theirs["runs"]
        else:  # the same network, sampled the same way, as the trained run
            trained = theirs["runs"][row]
            assert {k: cfg[k] for k in NETWORK_KEYS + SAMPLING_KEYS} == \
                {k: trained[k] for k in NETWORK_KEYS + SAMPLING_KEYS}
        # beside the trained runs in the paper profile, but Patch Diffusion's: which uploaded file is
        # which is not published, so only its released profile names one (a path in params)
        assert theirs["runs"].get(run) == (None if release == "patch_diffusion" else cfg)


def test_a_released_run_with_training_steps_is_refused():
    with pytest.raises(UserError) as err:
        compose("dimr_xl2r_imagenet256_released", ("runs.dit_released.steps=10",), conf_dir=CONF)
    assert str(err.value) == ("conf/profile/dimr_xl2r_imagenet256_released.yaml: `runs.dit_released.steps` must "
                              "be 0: the run adopts the dit release (`runs.dit_released.release`) as is, got 10")


def test_a_missing_official_file_is_named_with_its_url_before_any_stage_works(tmp_path, capsys):
    from diffrepro.preflight import required_weights

    params = compose("dimr_xl2r_imagenet256_released", conf_dir=CONF)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for path, _ in required_weights(params):  # every other file the profile reads is in place
        if str(path) not in (DIMR_XL, DIT_256):
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / path).write_bytes(b"")
    with pytest.raises(SystemExit) as stop:
        stage_in(tmp_path, "download")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "needs 2 file(s) not found here" in err
    assert f"{DIMR_XL} (the official dimr release: {ow.OFFICIAL_URLS['DiMR-XL/2R']})" in err
    assert f"{DIT_256} (the official dit release: {ow.OFFICIAL_URLS['DiT-XL/2-256']})" in err
    assert not (tmp_path / "data" / "raw").exists()


# --- end to end at tiny size ----------------------------------------------------------------------

@dataclass
class Fixture:
    """One official file: the random network written into it, a fresh one of the same architecture,
    the release's own loader, and inputs for the forward pass."""
    run: str
    release: str
    source: torch.nn.Module
    fresh: torch.nn.Module
    loader: object
    inputs: tuple


def _dit(**kwargs) -> torch.nn.Module:
    return build_model("DiT-tiny/2", in_channels=4, **kwargs)


def _setup_dimr(work: Path, params: dict) -> list[Fixture]:
    """DiMR-XL/2R's and DiT-XL/2's files, at tiny dims: 3 ImageNet classes, 32 px (latents 4 × 4 × 4)."""
    from fixtures_real import build_imagenet_tree

    params["data"]["image_size"] = 32
    for cfg in params["runs"].values():
        cfg["model"] = "DiMR-mini/2R" if cfg["release"] == "dimr" else "DiT-tiny/2"
    build_imagenet_tree(work / "data" / "raw")
    _tiny_sd_vae(work / params["autoencoder"]["path"], 32)
    dimr = lambda: build_model("DiMR-mini/2R", input_size=4, in_channels=4, num_classes=3).eval()  # noqa: E731
    dit = lambda: _dit(input_size=4, num_classes=3).eval()  # noqa: E731
    fixtures = [Fixture("dimr_released", "dimr", randomize(dimr(), 2), dimr(), ow.load_dimr,
                        (torch.randn(2, 4, 4, 4), torch.tensor([10, 900]), torch.tensor([0, 3]))),
                Fixture("dit_released", "dit", randomize(dit(), 3), dit(), ow.load_dit,
                        (torch.randn(2, 4, 4, 4), torch.tensor([10, 900]), torch.tensor([2, 3])))]  # 3: null row
    save_dimr(official_dimr(fixtures[0].source), work / "models", _file_name(params["runs"]["dimr_released"]))
    save_dit(official_dit(fixtures[1].source), work / "models", _file_name(params["runs"]["dit_released"]))
    return fixtures


def _setup_finediffusion(work: Path, params: dict, build_raw=None, classes: int = 3, supers: int = 3) -> list[Fixture]:
    """FineDiffusion-iNat.pt (or the file the profile names) and the DiT-XL/2 base the profile's
    `pretrain` adopts: 3 iNat species in 3 supercategories (or `build_raw`'s data set), 16 px
    (latents 4 × 2 × 2)."""
    from fixtures_real import build_inat

    params["data"]["image_size"] = 16
    params["runs"]["finediffusion_released"]["model"] = params["pretrain"]["model"] = "DiT-tiny/2"
    (build_raw or build_inat)(work / "data" / "raw")
    _tiny_sd_vae(work / params["autoencoder"]["path"], 16)
    fine = lambda: _dit(input_size=2, num_classes=classes, num_super_classes=supers,  # noqa: E731
                        affine_norms=True).eval()
    base = lambda: _dit(input_size=2, num_classes=1000).eval()  # noqa: E731
    fixtures = [Fixture("finediffusion_released", "finediffusion", randomize(fine(), 4), fine(),
                        ow.load_finediffusion, (torch.randn(2, 4, 2, 2), torch.tensor([10, 900]), torch.tensor([1, 5]))),
                Fixture("pretrain", "dit", randomize(base(), 5), base(), ow.load_dit,
                        (torch.randn(2, 4, 2, 2), torch.tensor([10, 900]), torch.tensor([999, 1000])))]
    save_finediffusion(official_dit(fixtures[0].source), work / "models",  # the EMA beside zeroed raw weights
                       _file_name(params["runs"]["finediffusion_released"]))
    save_dit(official_dit(fixtures[1].source), work / "models", _file_name(params["pretrain"]))
    return fixtures


def _setup_patch(work: Path, params: dict, build_raw=None) -> list[Fixture]:
    """A Patch Diffusion snapshot pickle of a DDPM++ with the 2 coordinate channels, at 16 px, and
    CelebA (or `build_raw`'s data set) in data/raw. The upload's file names are UNKNOWN: the run
    reads the path params give it, here the helper's name."""
    from fixtures_real import build_celeba_tree

    build_raw = build_raw or build_celeba_tree
    params["data"]["image_size"] = 16
    params["sample"]["per_class"] = 2  # one class, three seed sets
    run = params["runs"]["patch_released"]
    run.update(model="ddpmpp-mini", init_from="models/network-snapshot-200000.pkl")
    build_raw(work / "data" / "raw")
    net = lambda: EDMDenoiser(build_model("ddpmpp-mini", input_size=16, in_channels=3, extra_in_channels=2,  # noqa: E731
                                          **run["model_kwargs"])).eval()
    fixture = Fixture("patch_released", "patch_diffusion", randomize(net(), 6), net(), ow.load_patch_diffusion,
                      (torch.randn(2, 3, 16, 16), torch.tensor([0.3, 4.0]), None, torch.rand(2, 2, 16, 16) * 2 - 1))
    (work / "models").mkdir(exist_ok=True)
    save_edm(official_edm(fixture.source), work / "models", "SongUNet", _marker(work))
    return [fixture]


def _file_name(run: dict) -> str:
    """The official file's name as the profile gives it (`init_from`, under models/)."""
    return Path(run["init_from"]).name


def _tiny_sd_vae(path: Path, size: int) -> None:
    """A tiny VAE in the SD folder layout (f = 8, scaling 0.18215)."""
    from diffrepro.models.autoencoder import tiny_autoencoder

    vae = tiny_autoencoder(size, (8, 8, 8, 8), 4, 1)
    vae.register_to_config(scaling_factor=0.18215)
    vae.save_pretrained(path)


def _setup_finediffusion_vegfru(work: Path, params: dict) -> list[Fixture]:
    """As _setup_finediffusion, on VegFru with its sup-class lists (5 classes in 3 sup-classes) and
    FineDiffusion-VegFru.pt: the tiered class table of another data set."""
    from fixtures_real import VEGFRU_CLASSES, build_vegfru

    supers = len({sup for _, _, sup in VEGFRU_CLASSES})
    return _setup_finediffusion(work, params, lambda raw: build_vegfru(raw, with_sup_lists=True),
                                len(VEGFRU_CLASSES), supers)


def _setup_patch_afhq(work: Path, params: dict) -> list[Fixture]:
    """As _setup_patch, on afhq_v2.zip (the AFHQv2-Wild images are the data set)."""
    from fixtures_real import build_afhq

    return _setup_patch(work, params, build_afhq)


SETUPS = {"dimr_xl2r_imagenet256_released": _setup_dimr, "dimr_g2r_imagenet256_released": _setup_dimr,
          "finediffusion_inat256_released": _setup_finediffusion, "finediffusion_inat512_released": _setup_finediffusion,
          "finediffusion_vegfru256_released": _setup_finediffusion_vegfru, "patch_celeba64_released": _setup_patch,
          "patch_afhqv2wild64_released": _setup_patch_afhq}


def test_every_released_profile_runs_end_to_end_here():
    assert set(SETUPS) == set(RELEASED)


@pytest.fixture(scope="module", params=list(SETUPS))
def released(request, tmp_path_factory):
    """One released profile as is but at tiny dims, through every stage it runs."""
    profile = request.param
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp(profile)
    params = compose(profile, conf_dir=CONF)
    params["features"].update(kind="judge", steps=4, batch_size=8, width=16)  # see the module docstring
    params["evaluate"]["reference_batch"] = None
    params["sample"].update(per_class=1, batch_size=8)
    for cfg in [params["pretrain"], *params["runs"].values()]:
        cfg.update(batch_size=4, sample_steps=3, bf16=False)
    fixtures = SETUPS[profile](work, params)
    (work / "params.yaml").write_text(yaml.safe_dump(recompose(params)))
    latent = params["autoencoder"]["kind"] == "sd_vae"
    for stage in ("prepare", *(("autoencoder", "extract-latents") if latent else ()), "features"):
        stage_in(work, stage)
    stage_in(work, "train", "pretrain")
    for run in params["runs"]:
        for stage in ("train", "sample", "evaluate"):
            stage_in(work, stage, run)
    stage_in(work, "speed")
    stage_in(work, "report")
    yield work, params, fixtures
    torch.set_num_threads(threads)


def test_a_released_run_saves_the_official_file_as_its_weights(released):
    """models/<run>/ gives the forward pass of the fixture read by the release's own loader (the
    EMA weights where the file holds raw ones too); nothing was trained; the file is recorded."""
    work, params, fixtures = released
    for f in fixtures:
        cfg = params["pretrain"] if f.run == "pretrain" else params["runs"][f.run]
        path = work / cfg["init_from"]
        saved, _ = load_trained(work / "models" / f.run)
        direct = f.loader(f.fresh, path)
        torch.testing.assert_close(forward(saved, f.inputs), forward(direct, f.inputs))
        torch.testing.assert_close(forward(saved, f.inputs), forward(f.source, f.inputs))
        trained = json.loads((work / "models" / f.run / "train_metrics.json").read_text())
        assert trained["steps"] == trained["images_seen"] == 0
        assert trained["adopted"] == {"release": f.release, "file": cfg["init_from"],
                                      "url": ow.release_url(f.release, path),
                                      "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert not _marker(work).exists()  # the code inside the snapshot pickle never ran


def test_a_released_run_is_sampled_and_scored_with_the_papers_settings(released):
    work, params, fixtures = released
    for f in fixtures:
        if f.run == "pretrain":
            continue
        cfg = params["runs"][f.run]
        metrics = json.loads((work / "metrics" / params["profile"] / f"{f.run}.json").read_text())
        assert metrics["init_from"] == cfg["init_from"] and metrics["train"]["adopted"]["release"] == f.release
        assert (metrics["sampling"]["sampler"], metrics["sampling"]["sample_steps"]) == (cfg["sampler"], 3)
        assert metrics["sampling"]["guidance_scale"] == PAPER_SAMPLING[f.release][2]
        assert metrics["num_samples"] > 0 and metrics["fid"] >= 0


def test_the_report_shows_the_released_checkpoint_beside_the_papers_number(released):
    work, params, fixtures = released
    profile = params["profile"]
    report = (work / "reports" / profile / "results.md").read_text()
    frame = pd.read_csv(work / "reports" / profile / "results.csv")
    paper = next(p for p in PAPERS if any(f.run in p.table.released.values() for f in fixtures))
    assert "FID: trained here (paper) | FID: released ckpt here" in report
    for f in fixtures:
        if f.run == "pretrain":
            continue
        row = next(r for r, released_run in paper.table.released.items() if released_run == f.run)
        published = paper.rows(profile)[row]["fid"]
        fid = json.loads((work / "metrics" / profile / f"{f.run}.json").read_text())["fid"]
        line = next(line for line in report.splitlines() if line.startswith(f"| {f.run} |"))
        assert f"| – ({fmt(published)}) | {fmt(fid)} |" in line  # no trained run here: the released one alone
        csv = frame[(frame.run == f.run) & (frame.metric == "fid")]
        assert csv.value.tolist() == [pytest.approx(fid)] and csv.paper_value.tolist() == [published]
    for claim in paper.claims:  # no trained run: a claim compares the authors' released checkpoints
        sides = [paper.table.released.get(run) for run in (claim.method, claim.baseline)]
        if None in sides:  # a side nobody released (FineDiffusion's fine-tuning baselines): no verdict
            assert f"| {claim.text} |" not in report
            continue
        values = [json.loads((work / "metrics" / profile / f"{run}.json").read_text())[claim.metric] for run in sides]
        line = next(line for line in report.splitlines() if f"| {claim.text} |" in line)
        assert f"{fmt(values[0])} vs {fmt(values[1])} (1, 1)" in line
