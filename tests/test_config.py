"""params.yaml validation: one clear line for each kind of bad input, before any work."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from diffrepro.config import load_params, validate
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
])
def test_bad_params_are_named(edit, message):
    params = copy.deepcopy(DEFAULT)
    edit(params)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(params)


@pytest.mark.parametrize("key, typo", [("sampler", "ddmi"), ("assignment", "lsa-global"), ("space", "latents"),
                                       ("diffusion", "EDM"), ("schedule", "cosine"), ("method", "fine_diffusion"),
                                       ("guidance_schedule", "linear")])
def test_a_typo_in_any_closed_choice_is_refused_before_any_stage_runs(key, typo):
    params = copy.deepcopy(DEFAULT)
    params["runs"]["dit"][key] = typo
    with pytest.raises(UserError, match=f"`runs.dit.{key}` must be one of .*got '{typo}'"):
        validate(params)


@pytest.mark.parametrize("section, typo", [("autoencoder", "sdvae"), ("features", "inceptionv3")])
def test_a_typo_in_a_sections_kind_is_refused(section, typo):
    params = copy.deepcopy(DEFAULT)
    params[section]["kind"] = typo
    with pytest.raises(UserError, match=f"`{section}.kind` must be one of"):
        validate(params)


def test_a_sampler_of_the_other_diffusion_is_refused_not_silently_replaced():
    for run, sampler in (("edm", "ddim"), ("dit", "heun")):
        params = copy.deepcopy(DEFAULT)
        params["runs"][run]["sampler"] = sampler
        with pytest.raises(UserError, match=f"`runs.{run}.sampler` must be one of"):
            validate(params)
    params = copy.deepcopy(DEFAULT)
    params["runs"]["dit"]["sampler"] = "pndm"  # SD v1.4's scheduler, on DiT's linear schedule
    with pytest.raises(UserError, match="set `runs.dit.schedule` to scaled_linear"):
        validate(params)


def test_the_closed_choices_are_exactly_what_the_code_implements():
    from diffrepro.config import CHOICES, EDM_SAMPLERS, GAUSSIAN_SAMPLERS
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


def _readme_overrides() -> list[str]:
    """Every `-S` override of a `dvc exp run` line in the README, sweeps split into single values."""
    import re
    import shlex

    overrides = []
    for line in (ROOT / "README.md").read_text().splitlines():
        if not line.lstrip().startswith("dvc exp run"):
            continue
        words = shlex.split(line.split("#")[0])
        for flag, value in zip(words, words[1:]):
            if flag == "-S" and not value.startswith("profile="):
                key, values = value.split("=", 1)
                overrides += [f"{key}={v}" for v in re.split(r",(?![^\[]*\])", values)]
    return overrides


@pytest.mark.parametrize("override", _readme_overrides())
def test_every_ablation_the_readme_shows_composes_into_valid_params(override):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        params = OmegaConf.to_container(compose(config_name="config", overrides=[override]), resolve=True)
    validate(params)
    node = params
    for part in override.lstrip("+").split("=")[0].split("."):
        node = node[part]
    assert str(node).lower() == override.split("=", 1)[1].lower()
