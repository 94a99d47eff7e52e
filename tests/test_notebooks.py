"""The figure notebooks: each, executed by papermill on a smoke pipeline's outputs, draws its PNG
from the runs that exist; the committed notebooks carry no outputs and are exactly the figures the
papers name and dvc.yaml's `figures@<notebook>` stages; the numbers behind the figures match hand
counts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
import yaml
from PIL import Image

from diffrepro import figures
from diffrepro.errors import UserError
from diffrepro.papers import finediffusion, patch_diffusion
from diffrepro.stages.figures import NOTEBOOKS, stage as figures_stage
from pipeline_repo import ROOT, copy_repo

PARAMETERS = {"metrics_dir": "metrics/default", "samples_dir": "samples", "logs_dir": "logs/default",
              "out_dir": "reports/plots", "runs": None}
# What each notebook should find in the smoke profile (runs dit and finediffusion, plus pretrain's log).
SMOKE_SHOWN = {"sample_grids": "dit, finediffusion", "loss_curves": "dit, finediffusion, pretrain",
               "immiscible_quality_vs_steps": "dit", "speedups": "no runs",
               "finediffusion_superclass_accuracy": "finediffusion"}


@pytest.fixture(scope="module")
def smoke_repo(smoke_repo, tmp_path_factory):
    """A copy of the session's smoke repo: the notebooks write into it."""
    return copy_repo(smoke_repo, tmp_path_factory.mktemp("figures") / "repo")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory, smoke_repo):
    """A kernelspec of this interpreter (importing the copy's src/), found through JUPYTER_PATH."""
    import ipykernel.kernelspec

    prefix = tmp_path_factory.mktemp("kernel")
    name = "diffrepro-figures-test"
    ipykernel.kernelspec.install(prefix=str(prefix), kernel_name=name,
                                 env={"PYTHONPATH": str(smoke_repo / "src"), "MPLBACKEND": "Agg"})
    spec = json.loads((prefix / "share/jupyter/kernels" / name / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(prefix / "share/jupyter"))
        yield name


@pytest.fixture(scope="module")
def executed(smoke_repo, kernel):
    """{notebook: executed notebook}; the PNGs land in <repo>/figs-test."""
    import papermill

    out = {}
    for name in NOTEBOOKS:
        out[name] = papermill.execute_notebook(
            str(ROOT / "notebooks" / f"{name}.ipynb"), str(smoke_repo / f"{name}.out.ipynb"),
            parameters={"metrics_dir": "metrics/smoke", "logs_dir": "logs/smoke", "out_dir": "figs-test"},
            cwd=str(smoke_repo),
            kernel_name=kernel, progress_bar=False)
    return out


def _printed(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if o.output_type == "stream")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_draws_its_png_from_the_runs_that_exist(executed, smoke_repo, name):
    path = smoke_repo / "figs-test" / f"{name}.png"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and min(img.size) >= 200, img.size
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.std() > 10  # not a blank canvas
    assert path.stat().st_size > 5_000
    assert f"figs-test/{name}.png: {SMOKE_SHOWN[name]}\n" in _printed(executed[name])


def test_the_notebooks_are_the_papers_figures_and_one_dvc_stage_each():
    on_disk = {p.stem for p in (ROOT / "notebooks").glob("*.ipynb")}
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["figures"]["foreach"]
    assert set(NOTEBOOKS) == on_disk == set(stages) == set(SMOKE_SHOWN)
    assert len(NOTEBOOKS) == len(on_disk)


def test_an_unknown_notebook_is_one_clear_error():
    with pytest.raises(UserError, match=r"notebooks/sample_grid\.ipynb is not a figure of the report: name one of"):
        figures_stage({"report": {"dir": "unused"}}, "sample_grid")


def test_committed_notebooks_carry_no_outputs_and_the_same_parameters():
    for name in NOTEBOOKS:
        nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.outputs == [] and c.execution_count is None for c in code), name
        assert code[0].metadata.get("tags") == ["parameters"], name
        defined: dict = {}
        exec(code[0].source, {}, defined)
        assert {k: defined[k] for k in PARAMETERS} == PARAMETERS, name


def test_superclass_accuracies_weighted_by_samples_give_evaluates_fine_accuracy(smoke_repo, monkeypatch):
    """The same judge on the same final.npz: per-superclass accuracies, weighted by each
    superclass's sample count, must equal the fine accuracy the evaluate stage wrote."""
    from diffrepro.config import load_params

    monkeypatch.chdir(smoke_repo)
    params = load_params()
    s = figures.load_samples("samples", ["finediffusion"])["finediffusion"]
    num_super = int(s["super_labels"].max()) + 1
    acc = figures.superclass_accuracy(figures.load_judge(params)(s["images"])["fine_pred"], s["labels"],
                                      s["super_labels"], num_super)
    weights = np.bincount(s["super_labels"], minlength=num_super)
    expected = json.loads(Path("metrics/smoke/finediffusion.json").read_text())["fine_accuracy"]
    assert float((acc * weights).sum() / weights.sum()) == pytest.approx(expected, abs=1e-12)


def test_superclass_accuracy_equals_a_hand_count():
    labels = np.array([0, 1, 1, 2, 3, 3, 3, 5])
    supers = np.array([0, 0, 0, 1, 1, 1, 1, 3])
    pred = np.array([0, 0, 1, 2, 3, 0, 0, 5])
    # superclass 0: 2 of 3 right; 1: 2 of 4; 2: no samples; 3: 1 of 1
    acc = figures.superclass_accuracy(pred, labels, supers, 4)
    assert acc[[0, 1, 3]] == pytest.approx([2 / 3, 2 / 4, 1.0]) and np.isnan(acc[2])


def test_sample_mosaic_puts_sample_k_of_class_c_at_row_c_column_k():
    h, w = 3, 2
    labels = np.array([1, 0, 1, 0, 2, 1])
    images = np.stack([np.full((h, w, 3), 10 * (i + 1), np.uint8) for i in range(len(labels))])
    mosaic = figures.sample_mosaic(images, labels, num_classes=2, per_class=3, gap=1)
    assert mosaic.shape == (2 * h + 1, 3 * w + 2, 3)
    block = lambda c, k: mosaic[c * (h + 1):c * (h + 1) + h, k * (w + 1):k * (w + 1) + w]  # noqa: E731
    # class 0: images 1, 3 (a third is missing → white); class 1: images 0, 2, 5; class 2 not shown
    for (c, k), i in {(0, 0): 1, (0, 1): 3, (1, 0): 0, (1, 1): 2, (1, 2): 5}.items():
        assert (block(c, k) == 10 * (i + 1)).all(), (c, k)
    assert (block(0, 2) == 255).all() and (mosaic[h, :] == 255).all()


def test_quality_curve_appends_the_final_model_and_orders_by_step():
    metrics = {"train": {"steps": 30}, "fid": 4.0, "fine_accuracy": 0.9,
               "quality_vs_steps": [{"step": 20, "fid": 6.0, "fine_accuracy": 0.5},
                                    {"step": 10, "fid": 9.0, "fine_accuracy": 0.25},
                                    {"step": 30, "fid": 99.0, "fine_accuracy": 0.0}]}  # superseded by final
    curve = figures.quality_curve(metrics)
    assert curve["step"].tolist() == [10, 20, 30]
    assert curve["fid"].tolist() == [9.0, 6.0, 4.0] and curve["fine_accuracy"].tolist() == [0.25, 0.5, 0.9]
    assert curve["hue_error_deg"].isna().all()


def test_speedups_are_the_speed_stages_interleaved_ratios():
    def ratio(median):
        return {"median": median, "min": median - 0.1, "max": median + 0.1, "rounds": [median]}

    speed = {"pairs": {"finediffusion_vs_full_finetune": {"per_step": ratio(1.5), "to_budget": ratio(9.0)},
                       "difffit_vs_full_finetune": {"per_step": ratio(0.5)},
                       "patch_small_vs_edm_small": {"per_step": ratio(1.2), "per_image": ratio(4.0),
                                                    "to_budget": ratio(2.5)}}}
    bars = figures.speedups(speed)
    assert bars["finediffusion"] == {"finediffusion": ratio(1.5), "difffit": ratio(0.5)}  # per step, not to budget
    assert bars["patch"] == {"patch_small: to the image budget": ratio(2.5), "patch_small: per image": ratio(4.0)}
    assert figures.speedups({}) == {"finediffusion": {}, "patch": {}}
    assert finediffusion.SPEEDUP == 1.56  # the papers' numbers the figure draws
    assert patch_diffusion.WALL_CLOCK_SPEEDUP == pytest.approx(48.5 / 24.6)


def test_npz_memmap_reads_what_np_load_reads(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"images": rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8), "labels": np.arange(5),
              "fortran": np.asfortranarray(rng.normal(size=(3, 7))), "scalar": np.float32(2.5)}
    np.savez(tmp_path / "plain.npz", **arrays)
    np.savez_compressed(tmp_path / "packed.npz", **arrays)
    for name in ("plain", "packed"):
        read = figures.npz_memmap(tmp_path / f"{name}.npz")
        assert set(read) == set(arrays)
        for key, value in arrays.items():
            assert read[key].dtype == value.dtype and np.array_equal(read[key], value), (name, key)
    assert isinstance(figures.npz_memmap(tmp_path / "plain.npz")["images"], np.memmap)


def test_runs_are_drawn_in_the_asked_order_and_absent_ones_skipped(tmp_path):
    for run_name in ("b", "a", "c", "z"):
        (tmp_path / f"{run_name}.json").write_text(json.dumps({"run": run_name}))
    profile = {"runs": {"b": {}, "a": {}, "c": {}, "missing": {}}}  # `z`: another profile's leftover
    assert list(figures.load_metrics(tmp_path, figures.profile_runs(profile))) == ["a", "b", "c"]
    assert list(figures.load_metrics(tmp_path, ["c", "missing", "a"])) == ["c", "a"]


def test_loss_curves_read_what_dvclive_writes(tmp_path):
    from dvclive import Live

    for run_name, losses in {"x": [3.0, 2.0, 1.5], "y": [5.0]}.items():
        live = Live(dir=str(tmp_path / run_name), dvcyaml=None, save_dvc_exp=False)
        for i, loss in enumerate(losses):
            live.step = 25 * (i + 1)
            live.log_metric("train/loss", loss)
        live.end()
    (tmp_path / "no_log").mkdir()
    frames = figures.load_losses(tmp_path, ["no_log", "x", "y"])
    assert list(frames) == ["x", "y"]
    assert frames["x"]["loss"].tolist() == [3.0, 2.0, 1.5] and frames["y"]["loss"].tolist() == [5.0]
    assert frames["x"]["step"].tolist() == [25, 50, 75]


def test_fine_tuning_runs_are_those_started_from_a_trained_model():
    params = {"train_runs": {"dit": {"init_from": "data/latents", "data": "data/latents"},
                       "finediffusion": {"init_from": "models/pretrain", "data": "data/latents"},
                       "edm": {"init_from": "data/prepared", "data": "data/prepared"}}}
    assert figures.fine_tuning_runs(params, ["finediffusion", "dit", "edm", "absent"]) == ["finediffusion"]
