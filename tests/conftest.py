"""Shared test settings: a quiet, deterministic, single-threaded-per-test CPU environment."""

import os

import pytest
import torch

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
