"""Shared test settings: a quiet, deterministic, single-threaded-per-test CPU environment, and the
one smoke pipeline the whole session shares."""

import os
from pathlib import Path

import pytest
import torch

from pipeline_repo import make_repo, run

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("DIFFREPRO_ALLOW_CPU", "1")  # tiny copies of the paper profiles run on the CPU


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Toy-size layers: on a busy 2-core machine two intra-op threads make them ~20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smoke_repo(tmp_path_factory) -> Path:
    """A git + DVC copy of this repository in which `dvc exp run -S profile=smoke` ran every stage:
    outputs, dvc.lock, run cache. Built once per session (the suite's one run of the data and
    autoencoder stages); read it only: a test that changes it works on `copy_repo` or `copy_outputs`."""
    repo = make_repo(tmp_path_factory.mktemp("smoke") / "repo")
    run(repo, "dvc", "exp", "run", "-S", "profile=smoke")
    return repo
