"""Immiscible Diffusion (arXiv 2406.12303): batch linear assignment of noise to images.
The published numbers and their sources: docs/papers/immiscible.md."""

from __future__ import annotations

from diffrepro.papers.base import Claim, Figure, Paper, Table
from diffrepro.results import fmt, quality_curve, replicates, steps_to_equal_fid

CLAIMS = (Claim("Immiscible beats vanilla from scratch (FID)", "fid", "immiscible", "dit"),
          Claim("Immiscible beats vanilla (FID)", "fid", "immiscible", "vanilla"),  # the SD profiles' runs
          Claim("Immiscible beats vanilla when fine-tuning (FID)", "fid", "immiscible_ft", "full_finetune"))
# The figure's panels: (vanilla, Immiscible) of each arm, from scratch and fine-tuned from `pretrain`.
PLOTTED_ARMS = {"from scratch": ("dit", "immiscible"), "fine-tuning": ("full_finetune", "immiscible_ft")}


def quality_section(metrics: dict[str, dict], speed: dict) -> str:
    """FID at every evaluated step of each arm's runs, and the steps Immiscible needs to reach vanilla's final FID."""
    arms = [(c.method, c.baseline) for c in CLAIMS]
    lines = ["| run | step | FID (mean over seeds) | fine acc (seed 0) | hue err ° (seed 0) |", "|---|---|---|---|---|"]
    for run in dict.fromkeys(run for pair in arms for run in reversed(pair)):
        for step, fid, q in quality_curve(metrics, run):
            lines.append(f"| {run} | {step} | {fmt(fid)} | {fmt(q.get('fine_accuracy'))} | "
                         f"{fmt(q.get('hue_error_deg'))} |")
    ratios = []
    for method, baseline in arms:
        if replicates(metrics, method) and replicates(metrics, baseline):
            equal = steps_to_equal_fid(metrics, method, baseline)
            ratios.append(f"- Steps to {baseline}'s final FID: {method} "
                          + (f"reaches it at step {equal[0]} of {equal[1]}: {equal[1] / equal[0]:.2f}× fewer steps."
                             if equal else "does not reach it within its steps."))
    return "Quality vs training steps:\n\n" + "\n".join(lines + ([""] + ratios if ratios else []))


PAPER = Paper(
    key="immiscible",
    table=Table(
        "Immiscible Diffusion — batch linear assignment of noise to images",
        "Paper: Stable Diffusion on ImageNet, FID (pytorch-fid): from scratch 20k steps 17.92 → 16.43; "
        "fine-tuning SD v1.4 5k steps 11.45 → 10.28.",
        "Here: `DiT-mini/2` on the default latents; scratch arm = `dit` (vanilla) vs `immiscible`, "
        "fine-tune arm = `full_finetune` (vanilla) vs `immiscible_ft` (the same fine-tuning with assignment) from `pretrain`. The image–noise distance is the "
        "mean L2 distance between each training latent and the noise it is paired with.",
        {"dit": {"fid": 17.92}, "immiscible": {"fid": 16.43}, "full_finetune": {"fid": 11.45},
         "immiscible_ft": {"fid": 10.28}, "vanilla": {}},  # vanilla: the SD profiles' baseline (numbers below)
        ("fid", "fine_accuracy", "hue_error_deg", "mean_image_noise_distance")),
    rows_by_profile={
        "immiscible_sd_scratch": {"vanilla": {"fid": 17.92}, "immiscible": {"fid": 16.43}},
        "vanilla_sd_scratch": {"vanilla": {"fid": 17.92}},
        "immiscible_sd_finetune": {"vanilla": {"fid": 11.45}, "immiscible": {"fid": 10.28}},
        "vanilla_sd_finetune": {"vanilla": {"fid": 11.45}}},
    claims=CLAIMS,
    figures=(Figure("immiscible_quality_vs_steps", "Immiscible Diffusion: FID and fine accuracy vs training steps"),),
    section=quality_section,
)
