"""docs/adding_a_paper.md holds: a toy paper added through exactly the files it names runs end to end.

The toy paper's method trains only DiT's final layer (and the class table the new classes need).
It is added in a copy of the repository as a method module, its name in the schema's closed list,
a recipe, a profile and a paper declaration — nothing else — and `dvc exp run` must then train,
sample, score and report it, with the method really in charge of what trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from pipeline_repo import make_repo, run

METHOD = '''
from diffrepro.methods.base import Method, register_method


@register_method("final_layer")
class FinalLayer(Method):
    """Only the output layer trains (and the class table the fine-grained classes need)."""

    def configure_model(self, model):
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(("final_layer.", "y_embedder.")))
'''

RECIPE = """\
defaults: [tiny, _self_]
method: final_layer
init_from: models/pretrain
"""

PROFILE = """\
# @package _global_
defaults:
  - smoke
  - /run@runs.final_layer: final_layer
  - _self_
profile: toy
report:
  title: Toy paper
"""

DECLARATION = '''
from diffrepro.papers.base import Claim, Paper, Table

PAPER = Paper(
    key="toy",
    table=Table("Toy — the final layer alone", "Paper: none.", "Here: the smoke profile's fine-tuning.",
                {"final_layer": {}, "finediffusion": {}}, ("fid", "fine_accuracy")),
    claims=(Claim("The final layer alone beats FineDiffusion (FID)", "fid", "final_layer", "finediffusion"),),
)
'''


def _add_toy_paper(repo: Path) -> None:
    src = repo / "src" / "diffrepro"
    (src / "methods" / "toy.py").write_text(METHOD)
    schema = src / "schema.py"
    text = schema.read_text()
    assert text.count('Method = Literal["dit", ') == 1
    schema.write_text(text.replace('Method = Literal["dit", ', 'Method = Literal["final_layer", "dit", '))
    (repo / "conf" / "run" / "final_layer.yaml").write_text(RECIPE)
    (repo / "conf" / "profile" / "toy.yaml").write_text(PROFILE)
    (src / "papers" / "toy.py").write_text(DECLARATION)
    papers = src / "papers" / "__init__.py"
    text = papers.read_text()
    assert text.count("immiscible.PAPER)") == 1
    papers.write_text(text.replace("immiscible.PAPER)", "immiscible.PAPER, toy.PAPER)")
                      .replace("import dimr, finediffusion, immiscible, patch_diffusion",
                               "import dimr, finediffusion, immiscible, patch_diffusion, toy"))


@pytest.mark.timeout(900)
def test_a_toy_paper_added_through_the_documented_files_runs_end_to_end(tmp_path, smoke_repo):
    repo = make_repo(tmp_path / "repo")
    before = set(run(repo, "git", "ls-files").stdout.split())
    _add_toy_paper(repo)
    run(repo, "git", "add", "-A")
    changed = set(run(repo, "git", "diff", "--cached", "--name-only").stdout.split())
    assert changed == {"src/diffrepro/methods/toy.py", "src/diffrepro/schema.py", "conf/run/final_layer.yaml",
                       "conf/profile/toy.yaml", "src/diffrepro/papers/toy.py", "src/diffrepro/papers/__init__.py"}
    assert changed - before == {"src/diffrepro/methods/toy.py", "conf/run/final_layer.yaml",
                                "conf/profile/toy.yaml", "src/diffrepro/papers/toy.py"}
    # The smoke session's cache: stages whose code and inputs the toy paper does not touch
    # (data, autoencoder, judge) are restored from DVC's run cache instead of running again.
    run(repo, "dvc", "cache", "dir", str(smoke_repo / ".dvc" / "cache"))
    run(repo, "dvc", "exp", "run", "-S", "profile=toy")

    pretrained = load_file(repo / "models" / "pretrain" / "ema.safetensors")
    tuned = load_file(repo / "models" / "final_layer" / "model.safetensors")
    moved = {k for k in tuned if k in pretrained and tuned[k].shape == pretrained[k].shape
             and not (tuned[k] == pretrained[k]).all()}
    assert all(k.startswith(("final_layer.", "y_embedder.")) for k in moved), sorted(moved)  # the method decided
    assert any(k.startswith("final_layer.") for k in moved)
    metrics = json.loads((repo / "metrics" / "toy" / "final_layer.json").read_text())
    assert metrics["method"] == "final_layer" and 0 < metrics["train"]["trainable_percent"] < 50
    report = (repo / "reports" / "toy" / "results.md").read_text()
    assert "## Toy — the final layer alone" in report
    assert "| toy | The final layer alone beats FineDiffusion (FID) |" in report  # claims at a glance
