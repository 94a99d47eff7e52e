"""Shared test settings: a quiet, deterministic, single-threaded CPU environment, and the one smoke
pipeline the whole test run shares.

`bash run.sh test` runs the suite on two pytest-xdist workers (one per core). Every process —
workers and the stages they start — uses one intra-op thread: two processes with two OpenMP
threads each on two cores run toy-size work many times slower, and toy layers gain nothing from
a second thread anyway.
"""

import os
import shutil
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported, here and in every stage started

import pytest  # noqa: E402
import torch  # noqa: E402
from filelock import FileLock  # noqa: E402

from pipeline_repo import make_repo, run  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
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
def smoke_repo(tmp_path_factory, worker_id) -> Path:
    """A git + DVC copy of this repository in which `dvc exp run -S profile=smoke` ran every stage:
    outputs, dvc.lock, run cache. Built once per test run, by whichever xdist worker asks first
    while the others wait on a file lock (the suite's one run of the data and autoencoder stages);
    read it only: a test that changes it, or runs DVC in it, works on `copy_repo` or `copy_outputs`."""
    shared = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        shared = shared.parent  # the run's base folder, above every worker's own
    repo, done = shared / "smoke" / "repo", shared / "smoke" / "built"
    with FileLock(str(shared / "smoke.lock")):
        if not done.exists():
            shutil.rmtree(repo, ignore_errors=True)  # a build that failed half-way starts over
            make_repo(repo)
            run(repo, "dvc", "exp", "run", "-S", "profile=smoke")
            done.touch()
    return repo


# The slow tests that need no smoke pipeline: at the head of the second worker's share.
SLOW_WITHOUT_SMOKE = ("test_the_fanout_runs_every_stage_once", "structure_runs_at_tiny_size",
                      "test_dimr_xl2r_profile_structure", "test_sampling_is_class_balanced",
                      "test_two_processes_follow", "test_the_fanout_matrix")


def pytest_collection_modifyitems(config, items):
    """Order for `--dist worksteal` (run.sh test), which deals the first half of the list to one
    worker and the second half to the other, and rebalances by stealing from the end of a queue:
    the first worker builds the smoke pipeline and runs what needs it (no waiting on the lock),
    the second starts with the slowest tests that need nothing; quick tests end both halves."""
    if not getattr(config.option, "numprocesses", None):
        return
    smoke = [item for item in items if "smoke_repo" in item.fixturenames]
    slow = [item for item in items if item not in smoke and any(s in item.nodeid for s in SLOW_WITHOUT_SMOKE)]
    quick = [item for item in items if item not in smoke and item not in slow]
    half = len(items) // 2
    first = smoke + quick[:max(0, half - len(smoke))]
    items[:] = first + slow + [item for item in quick if item not in first]
