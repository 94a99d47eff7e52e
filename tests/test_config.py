"""params.yaml validation: one clear line for each kind of bad input, before any work."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from diffrepro.config import load_params, validate
from diffrepro.replicates import expand
from diffrepro.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = yaml.safe_load((ROOT / "params.yaml").read_text())


def test_the_committed_params_are_valid():
    validate(copy.deepcopy(DEFAULT))


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["data"].update(image_sise=16), "unknown key `data.image_sise`"),
    (lambda p: p["data"].update(image_size="16"), "`data.image_size` must be int"),
    (lambda p: p["data"].update(image_size=-16), "`data.image_size` must be a positive integer"),
    (lambda p: p["runs"]["dit"].update(lr="1e-3"), "`runs.dit.lr` must be float"),
    (lambda p: p["runs"]["dit"].update(steps=2.5), "`runs.dit.steps` must be int"),
    (lambda p: p["runs"]["dit"].update(bf16=1), "`runs.dit.bf16` must be bool"),
    (lambda p: p["runs"]["dit"].pop("lr"), "`runs.dit.lr` is missing"),
    (lambda p: p["runs"]["dit"].update(seed=1), "unknown key `runs.dit.seed`; known keys here: model, method"),
    (lambda p: p["sample"].update(seed_sets=0), "`sample.seed_sets` must be a positive integer, got 0"),
    (lambda p: p["runs"]["dit"].update(ema_decay=1.5), "`runs.dit.ema_decay` must be between 0 and 1, got 1.5"),
    (lambda p: p["evaluate"].update(reference_batch="ref.npz"), "`evaluate.reference_batch` holds 2048-d Inception"),
    (lambda p: (p["evaluate"].update(reference_batch="ref.npz"), p["features"].update(kind="inception", inception_dims=64)),
     "needs `features.kind: inception` and `features.inception_dims: 2048`"),
])
def test_bad_params_are_named(edit, message):
    params = copy.deepcopy(DEFAULT)
    edit(params)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(params)


@pytest.mark.parametrize("key, typo", [("sampler", "ddmi"), ("assignment", "lsa-global"), ("space", "latents"),
                                       ("diffusion", "EDM"), ("schedule", "cosine"), ("method", "fine_diffusion"),
                                       ("guidance_schedule", "linear"), ("release", "DiMR")])
def test_a_typo_in_any_closed_choice_is_refused_before_any_stage_runs(key, typo):
    params = copy.deepcopy(DEFAULT)
    params["runs"]["dit"][key] = typo
    with pytest.raises(UserError, match=f"`runs.dit.{key}` must be one of .*got '{typo}'"):
        validate(params)


def test_every_schema_error_gets_its_own_line():
    params = copy.deepcopy(DEFAULT)
    params["runs"]["dit"]["sampler"] = "ddmi"
    params["data"]["image_size"] = "16"
    with pytest.raises(UserError) as err:
        validate(params)
    lines = str(err.value).splitlines()
    assert len(lines) == 2 and all(line.startswith("params.yaml: `") for line in lines)
    assert any("`data.image_size` must be int" in line for line in lines)
    assert any("`runs.dit.sampler` must be one of" in line for line in lines)


@pytest.mark.parametrize("section, typo", [("autoencoder", "sdvae"), ("features", "inceptionv3")])
def test_a_typo_in_a_sections_kind_is_refused(section, typo):
    params = copy.deepcopy(DEFAULT)
    params[section]["kind"] = typo
    with pytest.raises(UserError, match=f"`{section}.kind` must be one of"):
        validate(params)


def test_a_sampler_of_the_other_diffusion_is_refused_not_silently_replaced():
    for run, sampler in (("edm_small", "ddim"), ("dit", "heun")):
        params = copy.deepcopy(DEFAULT)
        params["runs"][run]["sampler"] = sampler
        with pytest.raises(UserError, match=f"`runs.{run}.sampler` must be one of"):
            validate(params)
    params = copy.deepcopy(DEFAULT)
    params["runs"]["dit"]["sampler"] = "pndm"  # SD v1.4's scheduler, on DiT's linear schedule
    with pytest.raises(UserError, match="set `runs.dit.schedule` to scaled_linear"):
        validate(params)


def test_the_closed_choices_are_exactly_what_the_code_implements():
    from diffrepro.schema import CHOICES, EDM_SAMPLERS, GAUSSIAN_SAMPLERS
    from diffrepro.methods import METHODS, get_method
    from diffrepro.methods.immiscible import MODES
    from diffrepro.runs import DIFFUSIONS, SPACES

    get_method("dit")  # imports every method module: METHODS is complete
    assert set(CHOICES["method"]) == set(METHODS)
    assert CHOICES["assignment"] == MODES and CHOICES["space"] == SPACES and CHOICES["diffusion"] == DIFFUSIONS
    from diffrepro.diffusion.gaussian import make_betas

    for name in CHOICES["schedule"]:
        assert len(make_betas(name, 10)) == 10
    with pytest.raises(UserError):
        make_betas("cosine", 10)
    assert set(GAUSSIAN_SAMPLERS) | set(EDM_SAMPLERS) == set(CHOICES["sampler"])
    from diffrepro.models.official_weights import RELEASES

    assert set(CHOICES["release"]) == set(RELEASES)


def test_a_released_checkpoint_is_adopted_not_trained():
    """A run with a `release` trains 0 steps (the cross-field rule), named in one line."""
    params = copy.deepcopy(DEFAULT)
    params["runs"]["dit"].update(release="dit", init_from="models/DiT-XL-2-256x256.pt")  # steps: 1000
    with pytest.raises(UserError) as err:
        validate(params)
    assert str(err.value) == ("params.yaml: `runs.dit.steps` must be 0: the run adopts the dit release "
                              "(`runs.dit.release`) as is, got 1000")
    params["runs"]["dit"].update(steps=0, eval_at=[])
    params["train_runs"], params["sample_runs"] = expand(params["runs"])
    validate(params)


def test_cli_prints_one_line_and_exits_2_for_an_unknown_method(tmp_path):
    params = copy.deepcopy(DEFAULT)
    params["runs"]["dit"]["method"] = "nonesuch"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, "-m", "diffrepro", "train", "dit"], cwd=tmp_path,
                          capture_output=True, text=True, env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: params.yaml: `runs.dit.method` must be one of dit, finediffusion, full_finetune, bitfit, difffit, "
        "dimr, edm, patch, got 'nonesuch'"]


def test_missing_params_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_params(tmp_path / "params.yaml")


def test_a_hand_edited_run_whose_replicates_were_not_regenerated_is_refused():
    params = copy.deepcopy(DEFAULT)
    params["runs"]["dit"]["lr"] = 0.002  # params.yaml edited by hand: train_runs still says 0.001
    with pytest.raises(UserError, match="`train_runs` / `sample_runs` do not match `runs`.*diffrepro params"):
        validate(params)


@pytest.mark.parametrize("seeds, message", [([], "non-empty"), ([0, 0], "distinct"), ([-1], "non-negative"),
                                            (["1"], "integers")])
def test_bad_seed_lists_are_named(seeds, message):
    params = copy.deepcopy(DEFAULT)
    params["runs"]["dit"]["seeds"] = seeds
    with pytest.raises(UserError, match=f"`runs.dit.seeds` must be a {message}|`runs.dit.seeds` must be a non-empty"):
        validate(params)


def test_each_seed_is_a_run_and_the_sampling_params_are_apart_from_the_training_ones():
    from diffrepro.config import run_key, run_names, run_params, training_params
    from diffrepro.replicates import SAMPLING_KEYS

    runs, names = DEFAULT["runs"], run_names(DEFAULT)
    assert len(names) == sum(len(run["seeds"]) for run in runs.values())
    for name, run in runs.items():
        first, *others = run["seeds"]
        assert [n for n in names if n == name or n.startswith(f"{name}_seed")] == \
            [name] + [f"{name}_seed{s}" for s in others]
        for seed in run["seeds"]:
            key = name if seed == first else f"{name}_seed{seed}"
            assert run_params(DEFAULT, key) == {**{k: v for k, v in run.items() if k != "seeds"}, "seed": seed}
            assert not set(SAMPLING_KEYS) & set(training_params(DEFAULT, key))
            assert run_key(key, DEFAULT) == f"runs.{name}"
    assert training_params(DEFAULT, "pretrain")["seed"] == DEFAULT["pretrain"]["seeds"][0]


def test_an_override_of_a_run_reaches_every_seed_of_it():
    from diffrepro.profiles import compose

    params = compose("default", ("runs.finediffusion.lr=0.02", "runs.full_finetune.seeds=[0,1,2]",
                                 "runs.finediffusion.guidance_scale=5.0"), conf_dir=ROOT / "conf")
    assert [params["train_runs"][k]["lr"] for k in ("finediffusion", "finediffusion_seed1")] == [0.02, 0.02]
    assert [params["sample_runs"][k]["guidance_scale"] for k in ("finediffusion", "finediffusion_seed1")] == [5.0, 5.0]
    assert params["train_runs"]["finediffusion"] == {**DEFAULT["train_runs"]["finediffusion"], "lr": 0.02}
    assert [params["train_runs"][f"full_finetune{s}"]["seed"] for s in ("", "_seed1", "_seed2")] == [0, 1, 2]


def test_the_train_stage_depends_on_no_sampling_param():
    """Changing `guidance_scale` (the README's first ablation) must resample and rescore, not retrain."""
    from diffrepro.replicates import SAMPLING_KEYS

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert stages["train"]["foreach"] == "${train_runs}" and stages["pretrain"]["params"] == ["seed", "pretrain"]
    assert stages["train"]["do"]["params"] == ["seed", "train_runs.${key}"]
    assert "sample_runs.${key}" in stages["sample"]["do"]["params"]
    assert all(not set(SAMPLING_KEYS) & set(run) for run in DEFAULT["train_runs"].values())
    assert "train_runs" in stages["speed"]["params"] and "runs" not in stages["speed"]["params"]


def test_conf_is_a_few_recipes_and_short_profiles():
    """Runs are composed (conf/run/ recipes + overrides): conf/ stays at most a third of the
    2,574 lines it took when every profile spelled out every run."""
    lines = sum(len(p.read_text().splitlines()) for p in (ROOT / "conf").rglob("*.yaml"))
    assert lines <= 2574 // 3, lines
    default = (ROOT / "conf" / "profile" / "default.yaml").read_text().splitlines()
    assert len(default) <= 80  # one screen


def _readme_overrides() -> list[str]:
    """Every `-S` override of a `dvc exp run` line in the README, sweeps split into single values."""
    import re
    import shlex

    overrides = []
    for line in (ROOT / "README.md").read_text().splitlines():
        if not line.lstrip().startswith("dvc exp run"):
            continue
        words = shlex.split(line.split("#")[0].rstrip().removesuffix("\\"))
        for flag, value in zip(words, words[1:]):
            if flag == "-S" and not value.startswith("profile="):
                key, values = value.split("=", 1)
                overrides += [f"{key}={v}" for v in re.split(r",(?![^\[]*\])", values)]
    return overrides


@pytest.mark.parametrize("override", _readme_overrides())
def test_every_ablation_the_readme_shows_composes_into_valid_params(override):
    from diffrepro.profiles import compose

    params = compose("default", (override,), conf_dir=ROOT / "conf")  # validated
    node = params
    for part in override.lstrip("+").split("=")[0].split("."):
        node = node[part]
    assert str(node).lower() == override.split("=", 1)[1].lower()
