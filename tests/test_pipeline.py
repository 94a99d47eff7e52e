"""The DVC pipeline end to end at toy size: every stage runs, is cached, and restores."""

import json
import shutil

from pipeline_repo import copy_repo, run

STAGES = ("download", "prepare", "autoencoder", "extract_latents", "features", "pretrain", "train@dit", "train@finediffusion", "sample@dit",
          "evaluate@dit", "figures@sample_grids", "report")
# The same stages with two processes each: the fan-out replay in tests/test_workflows.py.


def test_smoke_profile_runs_every_stage_end_to_end(smoke_repo):
    metrics = json.loads((smoke_repo / "metrics" / "smoke" / "dit.json").read_text())
    assert metrics["num_samples"] == 32 and metrics["train"]["steps"] == 4
    assert [q["step"] for q in metrics["quality_vs_steps"]] == [2]
    report = (smoke_repo / "reports" / "smoke" / "results.md").read_text()
    assert "Profile `smoke`" in report and "DiT-tiny/2" in report
    lock = (smoke_repo / "dvc.lock").read_text()
    assert all(f"{stage}:" in lock for stage in STAGES)


def test_second_repro_has_nothing_to_do(smoke_repo, tmp_path):
    out = run(copy_repo(smoke_repo, tmp_path / "repo"), "dvc", "repro").stdout
    assert "Running stage" not in out
    assert "Data and pipelines are up to date" in out


def test_deleted_outputs_come_back_from_the_run_cache(smoke_repo, tmp_path):
    repo = copy_repo(smoke_repo, tmp_path / "repo")
    before = (repo / "data" / "prepared" / "train" / "shard-00000.images.npy").read_bytes()
    shutil.rmtree(repo / "data" / "prepared")
    shutil.rmtree(repo / "models" / "autoencoder")
    out = run(repo, "dvc", "repro").stdout
    assert "Running stage" not in out, out
    assert (repo / "data" / "prepared" / "train" / "shard-00000.images.npy").read_bytes() == before
    assert (repo / "models" / "autoencoder" / "config.json").exists()


def test_dag_shows_every_stage(smoke_repo):
    dag = run(smoke_repo, "dvc", "dag", "--md").stdout
    for stage in STAGES:
        assert stage in dag
