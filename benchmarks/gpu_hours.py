"""GPU-hours of every paper profile, computed from the models' MACs and written-down assumptions.

    PYTHONPATH=src python benchmarks/gpu_hours.py                          # the README's tables
    PYTHONPATH=src python benchmarks/gpu_hours.py --tflops bf16=310,tf32=95   # with gpu_check.py's numbers

Work is counted, never timed: FLOPs = 2 × MACs, with forward MACs per image from
`diffrepro.models.info` (what `python -m diffrepro info` prints) for every network a stage runs —
the diffusion backbone at the profile's size, the SD-VAE encoder (latent extraction) and decoder
(sampling), the Inception network (reference statistics, FID of the samples). Hours = FLOPs /
sustained FLOP/s, where sustained = an H100's dense peak in the stage's precision × a
utilisation taken from the papers' own published throughputs (see UTILISATION). The papers'
own runs, where they published GPUs and times, are converted to H100-hours at equal
utilisation (ratio of dense peaks) for the last column.
"""

from __future__ import annotations

import argparse
import sys
from functools import cache
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from diffrepro.models.info import count_gmacs, model_info  # noqa: E402
from diffrepro.profiles import compose, profile_names  # noqa: E402

# Dense tensor-core (or, for fp32, CUDA-core) peaks in TFLOP/s per GPU, NVIDIA's datasheets (SXM).
PEAK = {"H100": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
        "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
        "V100": {"bf16": 125.0, "tf32": None, "fp32": 15.7}}  # V100: fp16, no bf16 or TF32
IMAGE_SIDE = 256
# Images per split and classes of each data set: the sets' published counts (VegFru: its total,
# an upper bound for its training split; AFHQv2-Wild: about 5,000).
DATASETS = {"inat2021": {"train": 500_000, "heldout": 100_000, "classes": 10_000, "supers": 11},
            "vegfru": {"train": 160_000, "heldout": 0, "classes": 292, "supers": 25},
            "imagenet": {"train": 1_281_167, "heldout": 50_000, "classes": 1000},
            "celeba64": {"train": 162_770, "heldout": 19_867, "classes": 1},
            "afhqv2wild_64": {"train": 5_000, "heldout": 500, "classes": 1}}


@cache
def vae_gmacs(side: int) -> tuple[float, float]:
    """(encoder, decoder) GMACs per image of the SD VAE at `side` pixels."""
    from gpu_check import sd_vae

    with torch.device("meta"):
        vae = sd_vae()
    x = torch.randn(1, 3, side, side, device="meta")
    z = torch.randn(1, 4, side // 8, side // 8, device="meta")
    return count_gmacs(vae.encoder, (x,)), count_gmacs(vae.decoder, (z,))


@cache
def inception_gmacs() -> float:
    """GMACs per image of Inception-v3 at 299 px (torchvision's layout; pytorch-fid's FID variant
    differs only in its pooling)."""
    from torchvision.models import inception_v3

    with torch.device("meta"):
        net = inception_v3(weights=None, aux_logits=False, init_weights=False)
    return count_gmacs(net.eval(), (torch.randn(1, 3, 299, 299, device="meta"),))


def dit_step_flops(batch: int, passes: int, vae_in_loop: bool = False) -> float:
    """FLOPs of one DiT-XL/2 training step at 256 px (and of encoding its batch, as DiT's train.py does)."""
    dit = model_info("DiT-XL/2", num_classes=1000, image_size=IMAGE_SIDE)["gmacs"]
    return 2e9 * batch * (passes * dit + (vae_gmacs(IMAGE_SIDE)[0] if vae_in_loop else 0))


def utilisation() -> dict[str, tuple[float, str]]:
    """{precision: (share of the dense peak sustained, where the share comes from)}."""
    bf16 = dit_step_flops(128, passes=4) * 0.84 / 1e12  # gradient checkpointing: a second forward
    tf32 = dit_step_flops(256, passes=3, vae_in_loop=True) * 0.81 / 8 / 1e12
    return {"bf16": (bf16 / PEAK["A100"]["bf16"], f"fast-DiT's DiT-XL/2 on one A100: 0.84 steps/s at batch 128 in "
                     f"mixed precision with gradient checkpointing = {bf16:.0f} TFLOP/s"),
            "tf32": (tf32 / PEAK["A100"]["tf32"], f"DiT's own train.py on 8 A100 with TF32: 0.81 steps/s at batch 256, "
                     f"SD-VAE encoding in the loop = {tf32:.0f} TFLOP/s per GPU"),
            "fp32": (0.5, "assumed: no paper publishes an fp32 throughput")}


def precision(run: dict) -> str:
    """bf16 autocast, or fp32 with TF32 matmuls except EDM's (diffrepro.runs.set_matmul_precision)."""
    return "bf16" if run["bf16"] else ("fp32" if run["diffusion"] == "edm" else "tf32")


def backbone(run: dict, side: int, data: dict) -> dict:
    """`info` of a run's network at its input size: params, trainable, GMACs per image."""
    size = {"input_size": side} if run["space"] == "pixel" else {"image_size": side}
    if run["model"] == "sd-v1.4-unet":  # conditioned on prompts: no class table
        return model_info(run["model"], method=run["method"], **size)
    kwargs = {**size, "num_classes": run["model_kwargs"].get("num_classes", data["classes"])}
    if run["method"] == "finediffusion":
        kwargs["num_super_classes"] = data["supers"]
    return model_info(run["model"], method=run["method"], **kwargs)


def run_flops(params: dict, name: str) -> dict:
    """{stage: FLOPs} of one run: train, sample (every FID set, decoding included), evaluate."""
    from diffrepro.diffusion.edm import heun_nfe
    from diffrepro.methods.patch import patch_size_probabilities

    run, data = params["runs"][name], DATASETS[params["data"]["dataset"]]
    side = params["data"]["image_size"]
    info = backbone(run, side, data)
    macs = info["gmacs"] * 1e9
    # backward = activation gradients (one forward) + weight gradients (one forward × trainable share)
    passes = 2 + info["trainable"] / info["params"] + bool(run["model_kwargs"].get("gradient_checkpointing"))
    pixels = 1.0
    if run["method"] == "patch":  # a step on patches of side s loads R/s times the images, s/R of the pixels
        sizes = patch_size_probabilities(side, run["method_kwargs"].get("real_p", 0.5))
        pixels = sum(p * s / side for s, p in sizes.items())
    train = 2 * passes * macs * run["steps"] * run["batch_size"] * pixels
    steps = run["sample_steps"]
    nfe = {"heun": heun_nfe(steps), "pndm": steps + 1}.get(run["sampler"], steps)  # pndm: first step twice
    samples = params["sample"]["per_class"] * data["classes"] * params["sample"]["seed_sets"]
    guided = 2 if run["guidance_scale"] != 1.0 else 1
    decode = vae_gmacs(side)[1] * 1e9 if run["space"] == "latent" else 0.0
    return {"info": info, "nfe": nfe, "samples": samples, "guided": guided, "passes": passes,
            "train": train, "sample": 2 * samples * (nfe * guided * macs + decode),
            "evaluate": 2 * samples * inception_gmacs() * 1e9}


def shared_flops(params: dict) -> dict:
    """{stage: FLOPs} of the stages every run shares: latents (image + flip, every split) and the
    Inception statistics of the training split."""
    data, side = DATASETS[params["data"]["dataset"]], params["data"]["image_size"]
    latents = 0.0
    if params["autoencoder"]["kind"] == "sd_vae":
        latents = 2 * 2 * (data["train"] + data["heldout"]) * vae_gmacs(side)[0] * 1e9
    return {"extract_latents": latents, "features": 2 * data["train"] * inception_gmacs() * 1e9}


# The papers' own runs as published (docs/gpu.md): (what they say, their GPU, its GPU-hours), keyed
# (profile family, run); run None: every run of the family.
PAPER_RUNS = {
    ("dimr", "dimr"): ("16 GPUs (batch 1024 = 16 × 64), type and hours not published", None, None),
    ("dimr", "dit"): ("DiT's train.py: 0.81 steps/s on 8 A100 (TF32, VAE in the loop) → 7M steps", "A100",
                      8 * 7e6 / 0.81 / 3600),
    ("patch_celeba64", "edm"): ("EDM 48.5 h (the paper's real_p ablation) on 16 V100 (a secondary source)", "V100",
                                16 * 48.5),
    ("patch_celeba64", "patch"): ("24.6 h (real_p 0.5, same table) on 16 V100 (a secondary source)", "V100", 16 * 24.6),
    ("patch_afhqv2wild64", None): ("75 Mimg on 16 V100 (a secondary source), hours not published", None, None),
    ("immiscible_sd_scratch", None): ("8 A800 (A100-class), hours not published", None, None),
    ("immiscible_sd_finetune", None): ("4 RTX A6000, hours not published", None, None),
    ("finediffusion", None): ("GPUs, hours and batch not published", None, None),
}


def hours_text(hours: float) -> str:
    return "–" if hours == 0 else f"{hours:,.0f}" if hours >= 10 else f"{hours:.2g}"


def paper_cell(profile: str, name: str, hours: float, flops: float, run: dict) -> str:
    """What the paper published for this run, in H100-hours at equal utilisation (ratio of dense
    peaks), and the share of its GPUs' peak that our FLOP count implies it sustained."""
    family = next((f for f in ("dimr", "finediffusion") if profile.startswith(f)), profile)
    family = family.replace("vanilla_sd_", "immiscible_sd_")  # the vanilla arm alone
    text, gpu, gpu_hours = PAPER_RUNS.get((family, name)) or PAPER_RUNS.get((family, None), ("–", None, None))
    if gpu is None:
        return text
    kind = precision(run)
    theirs = gpu_hours * PEAK[gpu][kind] / PEAK["H100"][kind]
    implied = flops / (gpu_hours * 3600 * PEAK[gpu][kind] * 1e12)
    return (f"{text}: {gpu_hours:,.0f} {gpu}-h = {implied:.0%} of their {kind} peak ≈ {theirs:,.0f} H100-h at "
            f"equal utilisation; this estimate {hours / theirs:.2f}×")


def tables(tflops: dict[str, float], sources: dict[str, str]) -> str:
    total_rows, run_rows = [], []
    for profile in profile_names(ROOT / "conf"):
        params = compose(profile, conf_dir=ROOT / "conf")
        if not params["needs_gpu"]:
            continue
        shared = {k: v / (tflops["tf32"] * 1e12) / 3600 for k, v in shared_flops(params).items()}
        sums = {"train": 0.0, "sample": 0.0, "evaluate": 0.0}
        for name, run in params["runs"].items():
            f = run_flops(params, name)
            rate = tflops[precision(run)] * 1e12 * 3600
            hours = {k: f[k] / (rate if k != "evaluate" else tflops["tf32"] * 1e12 * 3600) for k in sums}
            for k in sums:
                sums[k] += hours[k]
            info, guided = f["info"], " × 2" if f["guided"] == 2 else ""
            if run["release"]:  # adopted as is: no training, no paper run to compare with
                trained, paper = f"the `{run['release']}` release, adopted", "– (released checkpoint)"
            else:
                trained = f"{info['trainable_percent']:.3g} % trained ({f['passes']:.2f} passes)"
                paper = paper_cell(profile, name, hours["train"], f["train"], run)
            run_rows.append(
                f"| `{profile}` | `{name}` | {info['model']} {info['gmacs']:.1f} GMACs, {trained} | "
                f"{run['steps']:,} × {run['batch_size']} | {precision(run)} | "
                f"{hours_text(hours['train'])} | {f['samples']:,} × {f['nfe']} NFE{guided}: "
                f"{hours_text(hours['sample'])} | {hours_text(hours['evaluate'])} | {paper} |")
        total = sum(shared.values()) + sum(sums.values())
        cells = [shared["extract_latents"], shared["features"], sums["train"], sums["sample"], sums["evaluate"]]
        total_rows.append(f"| `{profile}` | {' | '.join(map(hours_text, cells))} | **{hours_text(total)}** |")
    enc, dec = vae_gmacs(IMAGE_SIDE)
    assumptions = [
        "- Sustained throughput per H100 = dense peak × utilisation: "
        + "; ".join(f"{k} {PEAK['H100'][k]:g} × {tflops[k] / PEAK['H100'][k]:.0%} = {tflops[k]:.0f} TFLOP/s "
                    f"({sources[k]})" for k in ("bf16", "tf32", "fp32")) + ".",
        "- Precision per stage as the code runs it: training and sampling in bf16 where a run sets `bf16`, else "
        "fp32 with TF32 matmuls, except EDM/Patch runs in full fp32 (as EDM's code); latents, Inception, "
        "decoding: TF32.",
        "- Training FLOPs = 2 × MACs × images × passes: forward 1 + activation gradients 1 + weight gradients "
        "× the trained share of parameters (FineDiffusion/BitFit/DiffFit ≈ 2 passes, full training 3), "
        "+1 with gradient checkpointing (SD runs). Patch runs: a step over patches of side s holds R/s × "
        "the batch at (s/R)² of the pixels, so 0.70 × a full-size step's MACs at real_p 0.5.",
        f"- Sampling FLOPs = 2 × samples × (NFE × MACs, × 2 with guidance + SD-VAE decoder {dec:.0f} GMACs at "
        "256 px); "
        "samples = `sample.per_class` × classes × `sample.seed_sets` (every FID set).",
        f"- Latent extraction: SD-VAE encoder {enc:.0f} GMACs per 256-px image, × 2 (each image and its flip), every "
        f"split; Inception-v3 {inception_gmacs():.1f} GMACs per image: the training split (reference "
        "statistics) and every sample (FID). Data sets: "
        + ", ".join(f"{k} {v['train']:,} train / {v['heldout']:,} held-out" for k, v in DATASETS.items()) + ".",
        "- Not counted: `prepare` (JPEG decoding, CPU), LPIPS (AlexNet, small), checkpoint writes, and GPUs idle "
        "while the host works. The largest of these: the immiscible arm of `immiscible_sd_scratch` solves a "
        "2048 × 2048 linear assignment on the host every step (about 0.7 s on this repository's CI CPUs) while "
        "every GPU waits: 20,000 steps ≈ 3.9 h of wall time, ≈ 31 GPU-hours on 8 GPUs.",
    ]
    return "\n".join([
        "Assumptions (all H100-hours are GPU-hours: divide by the GPUs of a machine for wall time):", *assumptions, "",
        "| profile | extract_latents | features (Inception statistics) | train, all runs | sample, every FID set | "
        "evaluate (Inception of the samples) | total H100-h |", "|---|---|---|---|---|---|---|", *total_rows, "",
        "| profile | run | network | steps × batch | precision | train H100-h | sample: images × NFE: H100-h | "
        "evaluate H100-h | the paper's own run |", "|---|---|---|---|---|---|---|---|---|", *run_rows])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tflops", default="", help="measured sustained TFLOP/s, e.g. bf16=310,tf32=95,fp32=30")
    args = parser.parse_args(argv)
    shares = utilisation()
    tflops = {k: share * PEAK["H100"][k] for k, (share, _) in shares.items()}
    sources = {k: source for k, (_, source) in shares.items()}
    for item in filter(None, args.tflops.split(",")):
        key, value = item.split("=")
        tflops[key], sources[key] = float(value), "measured on this machine"
    print(tables(tflops, sources))


if __name__ == "__main__":
    main()
