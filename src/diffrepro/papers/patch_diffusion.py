"""Patch Diffusion (arXiv 2304.12526): patch-wise training of EDM with coordinate channels.
The published numbers and their sources: docs/papers/patch_diffusion.md."""

from __future__ import annotations

from diffrepro.papers.base import Claim, Paper, Regime, SpeedClaim, Table
from diffrepro.results import fmt_ratio, replicates, steps_to_equal_fid

EDM_HOURS, PATCH_HOURS = 48.5, 24.6  # CelebA-64 to the same image budget (the paper's real_p ablation)
WALL_CLOCK_SPEEDUP = EDM_HOURS / PATCH_HOURS
PAIRS = (("patch", "edm"), ("patch_small", "edm_small"))  # (method, baseline), each measured by the speed stage


def speedup_section(metrics: dict[str, dict], speed: dict) -> str:
    """Patch vs EDM three ways: per step and per image (interleaved rounds, `speed` stage), and
    wall-clock to EDM's final FID (each run's quality-vs-steps curve at its measured step time)."""
    lines = ["| patch vs EDM | per step | per image | to the image budget | to equal FID |", "|---|---|---|---|---|"]
    for method, baseline in PAIRS:
        pair = speed.get("pairs", {}).get(f"{method}_vs_{baseline}")
        if pair is None or not replicates(metrics, method) or not replicates(metrics, baseline):
            continue
        equal = steps_to_equal_fid(metrics, method, baseline)
        if equal is None:
            to_fid = "not reached"
        else:  # baseline's steps at its step time / the method's steps to that FID at its step time
            to_fid = f"{pair['per_step']['median'] * equal[1] / equal[0]:.2f}× (step {equal[0]})"
        lines.append(f"| {method} vs {baseline} | {fmt_ratio(pair['per_step'])} | {fmt_ratio(pair['per_image'])} | "
                     f"{fmt_ratio(pair['to_budget'])} | {to_fid} |")
    if len(lines) == 2:
        return ""
    return ("Speed-up of patch-wise training (median [range] over interleaved rounds; paper ≈2× wall-clock):\n\n"
            + "\n".join(lines))


AFHQV2_WILD = {"patch": {"fid": 1.93}, "edm": {"fid": 2.59}}
SMALL_DATA = Claim("Patch Diffusion is better on a small data set (FID)", "fid", "patch_small", "edm_small")

PAPER = Paper(
    key="patch",
    table=Table(
        "Patch Diffusion — patch-wise training with coordinate channels (EDM, pixel space)",
        "Paper: CelebA-64 FID 1.77 with p = 0.5 in 24.6 h vs EDM 1.66 in 48.5 h (~2× faster to the same "
        "image budget); on the small AFHQv2-Wild (~5k images) 1.93 vs EDM 2.59. FID as EDM reports it: "
        "the minimum over three 50k sample sets (`fid min`; `fid` is the first set alone).",
        "Here: 16 px default images, same network and image budget; `*_small` train on 8 images per class "
        "(512 images; `images_per_class`, the regime variable: reports/regimes.md maps the claim over it).",
        {"patch": {"fid": 1.77, "train_hours": PATCH_HOURS}, "edm": {"fid": 1.66, "train_hours": EDM_HOURS},
         "patch_small": {"fid": 1.93}, "edm_small": {"fid": 2.59}},
        ("images_seen", "steps", "train_seconds", "step_seconds", "fid", "fid_min", "fine_accuracy",
         "hue_error_deg"),
        released={"patch": "patch_released"}),
    rows_by_profile={"patch_afhqv2wild64": AFHQV2_WILD, "patch_afhqv2wild64_released": AFHQV2_WILD},
    claims=(SMALL_DATA,),
    speed_claims=(SpeedClaim("Patch Diffusion reaches the image budget faster (wall-clock)", "patch_vs_edm",
                             "to_budget", WALL_CLOCK_SPEEDUP),
                  SpeedClaim("Patch Diffusion reaches the image budget faster (wall-clock, small data)",
                             "patch_small_vs_edm_small", "to_budget", WALL_CLOCK_SPEEDUP)),
    speed_pairs=(("patch", "edm"), ("patch_small", "edm_small")),
    section=speedup_section,
    regime=Regime("small_images_per_class", "training images per class", SMALL_DATA,
                  "a small data set (AFHQv2-Wild: ≈5k images, vs CelebA's 200k)"),
)
