"""The report's arithmetic: seed replicates, verdicts against the seed range, equal-FID step counts,
and the papers' numbers of each profile's own setting; each paper's declaration complete and consistent."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffrepro import results
from diffrepro.papers import PAPERS, dimr, finediffusion
from diffrepro.stages import report
from diffrepro.stages.speed import MEASURES

ROOT = Path(__file__).resolve().parents[1]


def _metrics(run: str, fid: float, steps: int = 100, curve: tuple[tuple[int, float], ...] = (), **train) -> dict:
    return {"run": run, "model": "DiT-mini/2", "method": "dit", "fid": fid,
            "quality_vs_steps": [{"step": s, "fid": f} for s, f in curve],
            "train": {"steps": steps, "step_seconds": 0.1, "train_seconds": 10.0, "images_seen": 640,
                      "checkpoint_bytes": 2**20, **train}}


def _runs(**fids) -> dict:
    """name=[fid of seed 0, seed 1, ...] → metrics of `name`, `name_seed1`, ..."""
    out = {}
    for name, values in fids.items():
        for seed, fid in enumerate(values):
            run = name if seed == 0 else f"{name}_seed{seed}"
            out[run] = _metrics(run, fid)
    return out


def test_replicates_are_the_run_and_its_seed_runs_in_seed_order():
    metrics = {**_runs(dit=[1.0, 2.0, 3.0]), "dit_seed10": _metrics("dit_seed10", 4.0),
               "dit_small": _metrics("dit_small", 9.0), "dit_small_seed1": _metrics("dit_small_seed1", 8.0)}
    assert [m["run"] for m in results.replicates(metrics, "dit")] == ["dit", "dit_seed1", "dit_seed2", "dit_seed10"]
    assert [m["run"] for m in results.replicates(metrics, "dit_small")] == ["dit_small", "dit_small_seed1"]
    assert results.replicates(metrics, "absent") == []


@pytest.mark.parametrize(("method", "baseline", "expected"), [
    ([10.0, 11.0], [14.0, 15.0], "held"),          # means 10.5 vs 14.5: |4| > range 1
    ([14.0, 15.0], [10.0, 11.0], "not held"),
    ([10.0, 12.0], [11.5, 12.5], "inconclusive"),  # |1.0| ≤ range 2
    ([10.0], [20.0, 21.0], "inconclusive"),        # one seed on one side
])
def test_verdict_compares_the_difference_of_means_with_the_larger_seed_range(method, baseline, expected):
    assert results.verdict(method, baseline, lower_is_better=True).startswith(expected)
    flipped = {"held": "not held", "not held": "held"}.get(expected, expected)
    assert results.verdict(method, baseline, lower_is_better=False).startswith(flipped)


def test_frame_reports_mean_and_range_over_seeds():
    frame = report.results_frame(_runs(dimr=[10.0, 12.0], dit=[13.0]))
    fid = frame[(frame.metric == "fid") & (frame.paper == "dimr")].set_index("run")
    assert fid.loc["dimr", "value"] == pytest.approx(11.0) and fid.loc["dimr", "spread"] == pytest.approx(2.0)
    assert fid.loc["dimr", "seeds"] == 2 and fid.loc["dit", "seeds"] == 1
    assert fid.loc["dimr", "paper_value"] == 1.70


def test_paper_values_follow_the_profile_setting():
    assert dimr.PAPER.rows("dimr_g2r_imagenet256")["dimr"]["fid"] == 1.63
    assert dimr.PAPER.rows("default")["dimr"]["fid"] == 1.70
    fd512 = finediffusion.PAPER.rows("finediffusion_inat512")
    assert (fd512["finediffusion"]["fid"], fd512["finediffusion"]["lpips"]) == (9.490, 0.723)
    assert fd512["bitfit"] == {}  # the paper publishes BitFit only at iNat 256


def test_a_profiles_paper_numbers_stay_in_their_papers_table():
    """DiMR-G/2R's 1.63 is DiMR's number: the `dimr` run is no row of FineDiffusion's table there."""
    assert list(finediffusion.PAPER.rows("dimr_g2r_imagenet256")) == ["finediffusion", "full_finetune", "bitfit",
                                                                      "difffit"]
    frame = report.results_frame(_runs(dimr=[10.0], dit=[13.0]), "dimr_g2r_imagenet256")
    assert set(frame[frame.run == "dimr"].paper) == {"dimr"}
    assert frame[(frame.run == "dimr") & (frame.metric == "fid")].paper_value.tolist() == [1.63]


def test_a_released_checkpoint_shows_beside_the_trained_run_and_the_papers_number():
    frame = report.results_frame(_runs(dimr=[10.0, 12.0], dit=[13.0], dimr_released=[1.8]), "dimr_g2r_imagenet256")
    lines = report.paper_table(frame, dimr.PAPER, "dimr_g2r_imagenet256").splitlines()
    assert "| FID: trained here (paper) | FID: released ckpt here |" in lines[0]
    rows = {line.split(" | ")[0]: line for line in lines[2:]}
    assert set(rows) == {"| dimr", "| dit"} and "| 11 ±1 (1.63) | 1.8 |" in rows["| dimr"]
    assert "| 13 (2.27) | – |" in rows["| dit"]  # no released DiT in these metrics
    fid = frame[frame.metric == "fid"].set_index("run")
    assert (fid.loc["dimr_released", "value"], fid.loc["dimr_released", "paper_value"]) == (1.8, 1.63)
    plain = report.paper_table(report.results_frame(_runs(dimr=[10.0], dit=[13.0])), dimr.PAPER)
    assert "released" not in plain and "| FID (paper) |" in plain  # without released runs: as before


def test_steps_to_equal_fid_is_the_first_step_at_or_below_the_baselines_final_fid():
    metrics = {"vanilla": _metrics("vanilla", 12.0, steps=600, curve=((200, 20.0), (400, 14.0))),
               "imm": _metrics("imm", 11.0, steps=600, curve=((200, 15.0), (400, 12.0)))}
    assert results.steps_to_equal_fid(metrics, "imm", "vanilla") == (400, 600)
    assert results.steps_to_equal_fid(metrics, "vanilla", "imm") is None  # 12.0 never ≤ 11.0


def test_the_learning_floor_names_every_run_below_ten_times_chance():
    chance = 1 / 64
    metrics = {"a": {"fine_accuracy": 0.40}, "b": {"fine_accuracy": 0.15}, "c": {"fine_accuracy": 0.156},
               "d": {"fid": 3.0}}
    line = report.learning_floor(metrics, chance)
    assert line.startswith("- Every run learned its classes (fine accuracy ≥ 10× chance = 15.6%): no — below it: b, c;")
    assert line.endswith("the lowest, b, at 15.0% (9.6× chance).")
    assert ": yes; the lowest, a," in report.learning_floor({"a": metrics["a"]}, chance)
    assert report.learning_floor({"d": metrics["d"]}, chance) is None  # no judge: no accuracy to hold up


def test_large_integral_numbers_print_without_exponents():
    assert results.fmt(1000.0) == "1,000" and results.fmt(61632) == "61,632" and results.fmt(0.1234) == "0.123"


def test_figures_show_the_profiles_runs_at_seed_zero_unless_runs_are_named():
    from diffrepro.figures import profile_runs, select

    params = {"runs": {"edm": {"seeds": [0]}, "dit": {"seeds": [0, 1]}},  # declared runs: dit_seed1 too
              "train_runs": {"edm": {}, "dit": {}, "dit_seed1": {}}}
    assert profile_runs(params) == ["dit", "edm"]
    assert profile_runs(params, with_pretrain=True) == ["dit", "edm", "pretrain"]
    assert profile_runs(params, ["dit_seed1", "dit"]) == ["dit_seed1", "dit"]
    assert select(["dit_seed1", "edm", "dit", "bitfit"], ["dit_seed1", "dit", "absent"]) == ["dit_seed1", "dit"]


def test_front_page_lists_each_decidable_claim_with_the_papers_numbers_and_the_verdict():
    summary = report.claims_summary(_runs(dimr=[10.0, 11.0], dit=[14.0, 15.0]), "dimr_g2r_imagenet256")
    rows = [line for line in summary.splitlines()[2:]]
    assert rows == ["| dimr | DiMR beats DiT at matched compute (FID) | 1.63 vs 2.27 | 10.5 vs 14.5 (2, 2) | held |"]


@pytest.mark.parametrize(("rounds", "expected"), [((1.2, 1.4, 1.6), "held"), ((0.7, 0.8, 0.9), "not held"),
                                                  ((0.9, 1.3, 1.5), "inconclusive")])
def test_a_speed_claim_holds_only_when_every_interleaved_round_agrees(rounds, expected):
    ratio = {"median": sorted(rounds)[1], "min": min(rounds), "max": max(rounds), "rounds": list(rounds)}
    assert report.speed_verdict(ratio).startswith(expected)
    speed = {"pairs": {"finediffusion_vs_full_finetune": {"method": "finediffusion", "baseline": "full_finetune",
                                                          "per_step": ratio}}}
    summary = report.claims_summary({}, "default", speed).splitlines()[2:]
    assert summary == [f"| finediffusion | FineDiffusion trains faster per step than full fine-tuning | 1.56× | "
                       f"{results.fmt(ratio['median'])}× [{results.fmt(min(rounds))}–{results.fmt(max(rounds))}] "
                       f"(median [range] over interleaved rounds) | {report.speed_verdict(ratio)} |"]
    frame = report.results_frame(_runs(finediffusion=[20.0], full_finetune=[12.0]), speed=speed)
    speedup = frame[frame.metric == "speedup"].set_index("run").value
    assert speedup["finediffusion"] == pytest.approx(ratio["median"]) and speedup["full_finetune"] == 1.0


@pytest.mark.parametrize("paper", PAPERS, ids=lambda p: p.key)
def test_a_papers_declaration_is_complete_and_consistent(paper):
    rows = paper.table.rows
    assert paper.table.columns and set(paper.table.columns) <= set(report.TITLES), paper.key
    for claim in paper.claims:  # a claim compares two rows of its table
        assert {claim.method, claim.baseline} <= set(rows) and claim.metric in paper.table.columns, claim
    for claim in paper.speed_claims:  # measured: one of the pairs the speed stage interleaves
        method, baseline = claim.pair.split("_vs_")
        assert {method, baseline} <= set(rows) and claim.measure in MEASURES and claim.paper_ratio > 0, claim
        assert (method, baseline) in paper.speed_pairs, claim
    for method, baseline in paper.speed_pairs:
        assert {method, baseline} <= set(rows), (method, baseline)
    if paper.speedup_baseline is not None:  # the speed-up column: every row measured against the baseline
        assert {(r, paper.speedup_baseline) for r in rows if r != paper.speedup_baseline} <= set(paper.speed_pairs)
    assert paper.speedup_baseline is None or paper.speedup_baseline in rows
    for row, run in paper.table.released.items():  # a released run stands for a row, named after it
        assert row in rows and run == f"{row}_released", (row, run)
    for figure in paper.figures:
        assert (ROOT / "notebooks" / f"{figure.notebook}.ipynb").is_file(), figure
    profiles = {p.stem for p in (ROOT / "conf" / "profile").glob("*.yaml")}
    for profile, profile_rows in paper.rows_by_profile.items():
        assert profile in profiles, (paper.key, profile)
        assert set(profile_rows) <= set(rows), (paper.key, profile)
    for profile in ["default", *paper.rows_by_profile]:  # every published number has a column name
        assert all(set(numbers) <= set(report.TITLES) for numbers in paper.rows(profile).values()), profile


def test_papers_have_distinct_keys_and_titles():
    assert len({p.key for p in PAPERS}) == len({p.table.title for p in PAPERS}) == len(PAPERS)


def _table_after(text: str, heading: str) -> list[str]:
    """The markdown table that follows `heading` (its first run of `|` lines)."""
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def test_the_readme_opens_with_the_default_reports_claims_table():
    """The front page's table is the committed report's (`dvc repro` regenerates it; copy it on change)."""
    readme, results_md = (ROOT / "README.md").read_text(), (ROOT / "reports" / "results.md").read_text()
    ours = _table_after(results_md, "## Claims at a glance")
    assert results_md.index("## Claims at a glance") < results_md.index("## Shared stages")
    assert _table_after(readme, "<!-- claims: the table of reports/results.md -->") == ours
    assert readme.index("<!-- claims:") < readme.index("## What `dvc repro` runs")
