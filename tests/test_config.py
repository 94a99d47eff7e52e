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


def test_cli_prints_one_line_and_exits_2_for_an_unknown_method(tmp_path):
    params = copy.deepcopy(DEFAULT)
    params["runs"]["dit"]["method"] = "nonesuch"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, "-m", "diffrepro", "train", "dit"], cwd=tmp_path,
                          capture_output=True, text=True, env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown method 'nonesuch'")


def test_missing_params_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_params(tmp_path / "params.yaml")
