"""The papers this repository replicates, one declaration each (papers/<paper>.py), in report order.

A declaration (`base.Paper`) is everything the report and the figures show of a paper: its table
with the published numbers in each profile's setting, its claims, the notebooks drawn for it and
any section of its own. The report and the `figures` stage iterate PAPERS; adding a paper is a
module here named in PAPERS, its runs in conf/, and its notebooks (listed in dvc.yaml's `figures`).
"""

from __future__ import annotations

from diffrepro.config import run_names
from diffrepro.papers import dimr, finediffusion, immiscible, patch_diffusion
from diffrepro.papers.base import Figure

PAPERS = (finediffusion.PAPER, dimr.PAPER, patch_diffusion.PAPER, immiscible.PAPER)
# Of every run, not of one paper: on the report's front page, above the papers' tables.
FRONT_PAGE_FIGURES = (Figure("loss_curves", "Training loss of every run"),
                      Figure("sample_grids", "Final samples of every run: first classes × samples per class"))


def speed_pairs(params: dict) -> list[tuple[str, str]]:
    """The (method, baseline) pairs the `speed` stage measures: the papers' whose two runs the profile has."""
    runs = run_names(params)
    return [(m, b) for paper in PAPERS for m, b in paper.speed_pairs if m in runs and b in runs]
