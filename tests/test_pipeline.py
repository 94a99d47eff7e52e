"""The DVC pipeline end to end at toy size: every stage runs, is cached, and restores."""

import json

import pytest

from pipeline_repo import make_repo, run

STAGES = ("download", "prepare", "autoencoder", "extract_latents", "features", "pretrain", "train@dit", "train@finediffusion", "sample@dit",
          "evaluate@dit", "figures", "report")


@pytest.fixture(scope="module")
def smoke_repo(tmp_path_factory):
    repo = make_repo(tmp_path_factory.mktemp("pipeline") / "repo")
    run(repo, "dvc", "exp", "run", "-S", "profile=smoke")
    return repo


def test_smoke_profile_runs_every_stage_end_to_end(smoke_repo):
    metrics = json.loads((smoke_repo / "metrics" / "smoke" / "dit.json").read_text())
    assert metrics["num_samples"] == 32 and metrics["train"]["steps"] == 4
    assert [q["step"] for q in metrics["quality_vs_steps"]] == [2]
    report = (smoke_repo / "reports" / "smoke" / "results.md").read_text()
    assert "Profile `smoke`" in report and "DiT-tiny/2" in report
    lock = (smoke_repo / "dvc.lock").read_text()
    assert all(f"{stage}:" in lock for stage in STAGES)


def test_second_repro_has_nothing_to_do(smoke_repo):
    out = run(smoke_repo, "dvc", "repro").stdout
    assert "Running stage" not in out
    assert "Data and pipelines are up to date" in out


def test_deleted_outputs_come_back_from_the_run_cache(smoke_repo):
    import shutil

    before = (smoke_repo / "data" / "prepared" / "train" / "shard-00000.images.npy").read_bytes()
    shutil.rmtree(smoke_repo / "data" / "prepared")
    shutil.rmtree(smoke_repo / "models" / "autoencoder")
    out = run(smoke_repo, "dvc", "repro").stdout
    assert "Running stage" not in out, out
    assert (smoke_repo / "data" / "prepared" / "train" / "shard-00000.images.npy").read_bytes() == before
    assert (smoke_repo / "models" / "autoencoder" / "config.json").exists()


def test_dag_shows_every_stage(smoke_repo):
    dag = run(smoke_repo, "dvc", "dag", "--md").stdout
    for stage in STAGES:
        assert stage in dag


def test_two_processes_per_stage_reproduce_the_one_process_metrics(smoke_repo, tmp_path):
    """Every computing stage through the launcher with 2 (gloo) processes: same global batches,
    samples split across processes; only the order of floating-point reductions differs."""
    two = make_repo(tmp_path / "two")
    out = run(two, "dvc", "exp", "run", "-S", "profile=smoke", extra_env={"DIFFREPRO_NUM_PROCESSES": "2"}).stdout
    assert "diffrepro.launch train dit" in out
    for run_name in ("dit", "finediffusion"):
        one = json.loads((smoke_repo / "metrics" / "smoke" / f"{run_name}.json").read_text())
        both = json.loads((two / "metrics" / "smoke" / f"{run_name}.json").read_text())
        assert both["num_samples"] == one["num_samples"]
        assert both["train"]["images_seen"] == one["train"]["images_seen"]
        assert both["train"]["final_loss"] == pytest.approx(one["train"]["final_loss"], rel=1e-4)
        for metric in ("fid", "fine_accuracy", "super_accuracy"):
            assert both[metric] == pytest.approx(one[metric], rel=0.02, abs=0.02), metric
