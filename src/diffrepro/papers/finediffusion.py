"""FineDiffusion (arXiv 2402.18331): parameter-efficient fine-tuning of DiT to fine-grained classes.
The published numbers and their sources: docs/papers/finediffusion.md."""

from __future__ import annotations

from diffrepro.papers.base import Claim, Figure, Paper, Regime, SpeedClaim, Table

SPEEDUP = 1.56  # per training step, against full fine-tuning (DiT-XL/2, 1.77 % of its parameters trainable)
BASELINE = "full_finetune"
PEFT_RUNS = ("finediffusion", "bitfit", "difffit")  # the parameter-efficient runs, each against BASELINE
# The rows of the 512 px and VegFru settings (the paper publishes BitFit and DiffFit only at iNat 256)
INAT512 = {"finediffusion": {"fid": 9.490, "lpips": 0.723, "trainable_percent": 1.77, "speedup": SPEEDUP},
           BASELINE: {"trainable_percent": 100.0, "speedup": 1.0}, "bitfit": {}, "difffit": {}}
VEGFRU256 = {"finediffusion": {"fid": 12.382, "lpips": 0.667, "trainable_percent": 1.77, "speedup": SPEEDUP},
             BASELINE: {"trainable_percent": 100.0, "speedup": 1.0}, "bitfit": {}, "difffit": {}}

CLAIMS = (Claim("FineDiffusion beats full fine-tuning (FID)", "fid", "finediffusion", BASELINE),
          Claim("FineDiffusion beats BitFit (FID)", "fid", "finediffusion", "bitfit"),
          Claim("FineDiffusion beats DiffFit (FID)", "fid", "finediffusion", "difffit"))

PAPER = Paper(
    key="finediffusion",
    table=Table(
        "FineDiffusion — parameter-efficient fine-tuning to fine-grained classes",
        "Paper: DiT-XL/2 fine-tuned with 1.77 % of its parameters trainable, 1.56× faster per step than "
        "full fine-tuning; FID / LPIPS diversity: iNat21-mini (10,000 classes) 256 px 9.776 / 0.721, "
        "512 px 9.490 / 0.723, VegFru 256 px 12.382 / 0.667; on iNat 256 full fine-tuning 13.034 / 0.651, "
        "BitFit 15.022, DiffFit 15.068. Speed-up = full fine-tuning's step time / this run's.",
        "Here: `DiT-mini/2` pre-trained on 32 base classes × 240 images (`pretrain`), fine-tuned on the 64 "
        "fine-grained classes with 24 images each (`regime.finetune_images_per_class`). LPIPS needs the AlexNet weights (paper profiles); `diversity` is the "
        "judge-feature analogue: within-class spread of samples / that of real held-out images.",
        {"finediffusion": {"fid": 9.776, "lpips": 0.721, "trainable_percent": 1.77, "speedup": SPEEDUP},
         BASELINE: {"fid": 13.034, "lpips": 0.651, "trainable_percent": 100.0, "speedup": 1.0},
         "bitfit": {"fid": 15.022}, "difffit": {"fid": 15.068}},
        ("fid", "fine_accuracy", "super_accuracy", "hue_error_deg", "diversity", "lpips", "trainable_percent",
         "checkpoint_mb", "speedup"),
        released={"finediffusion": "finediffusion_released"}),
    rows_by_profile={"finediffusion_inat512": INAT512, "finediffusion_inat512_released": INAT512,
                     "finediffusion_vegfru256": VEGFRU256, "finediffusion_vegfru256_released": VEGFRU256},
    claims=CLAIMS,
    speed_claims=(SpeedClaim("FineDiffusion trains faster per step than full fine-tuning",
                             f"finediffusion_vs_{BASELINE}", "per_step", SPEEDUP),),
    figures=(Figure("finediffusion_superclass_accuracy", "FineDiffusion: fine-class accuracy per superclass"),
             Figure("speedups", "Speed-ups vs the papers' 1.56× (FineDiffusion) and ≈2× (Patch Diffusion)")),
    speed_pairs=tuple((run, BASELINE) for run in ("finediffusion", "bitfit", "difffit")),
    speedup_baseline=BASELINE,
    regime=Regime("finetune_images_per_class", "fine-tuning images per class", CLAIMS[0],
                  "few images per class (iNat21-mini: 50) after a prior trained on many (ImageNet: ~1,300)"),
)
