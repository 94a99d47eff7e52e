"""DiMR (arXiv 2406.09416): a multi-resolution network with time-dependent layer norm, against DiT.
The published numbers and their sources: docs/papers/dimr.md."""

from __future__ import annotations

from diffrepro.papers.base import Claim, Paper, Table

G2R = {"dimr": {"fid": 1.63, "params": 1056352904, "gmacs": 331.1}}  # DiMR-G/2R's row (its DiT row: the table's)

PAPER = Paper(
    key="dimr",
    table=Table(
        "DiMR — multi-resolution network with time-dependent layer norm",
        "Paper: ImageNet 256, FID-50K: DiMR-XL/2R 1.70 (505 M params, 160 GMACs) and DiMR-G/2R 1.63 "
        "(1,056 M, 331 GMACs) vs DiT-XL/2 2.27 (675 M, 119 GMACs).",
        "Here: both trained from scratch on the default latents, matched GMACs, same steps and sampler.",
        {"dimr": {"fid": 1.70, "params": 505046408, "gmacs": 160.2},
         "dit": {"fid": 2.27, "params": 675129632, "gmacs": 118.6}},
        ("params", "gmacs", "fid", "fine_accuracy", "super_accuracy", "hue_error_deg", "diversity"),
        released={"dimr": "dimr_released", "dit": "dit_released"}),
    rows_by_profile={"dimr_g2r_imagenet256": G2R, "dimr_g2r_imagenet256_released": G2R},
    claims=(Claim("DiMR beats DiT at matched compute (FID)", "fid", "dimr", "dit"),),
)
