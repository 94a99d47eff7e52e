"""Can this machine run the paper profiles? The first thing to run on a new GPU runner.

    PYTHONPATH=src python benchmarks/gpu_check.py            # everything below, under 8 minutes
    PYTHONPATH=src python benchmarks/gpu_check.py --driver   # only: a GPU is visible, the driver is new enough

With CUDA it reports the GPUs and the NVIDIA driver, and stops with one line when the driver is
older than the CUDA build of torch needs (a CUDA 13 build: driver 580 or newer); then it runs the
smoke profile end to end (`dvc repro`, every computing stage through `diffrepro.launch`) on one
GPU, and measures on one GPU, each after warm-up steps and between device syncs:
- DiT-XL/2 training steps/s and peak memory at DiT's per-GPU batch (32 = 256 over 8 GPUs), in
  bf16 autocast and in fp32 with TF32 matmuls, with AdamW and an EMA as `train` keeps them, and
  EDM's DDPM++ (EDM and Patch Diffusion runs) at the same batch in full fp32, as EDM trains;
- DiT-XL/2 sampling images/s: 250 steps with guidance (two network evaluations per step);
- the SD-VAE encoder (SD's config, random weights) through `encode_moments`, image + flip as
  `extract_latents` encodes them.
Without CUDA it runs the device stand-in harness (`diffrepro.device_standin`): every code path a
GPU run takes, on a device that refuses CPU tensors. Either way it prints a Markdown table for
the README (Running on GPUs); the training rows' TFLOP/s are what `benchmarks/gpu_hours.py
--tflops bf16=..,tf32=..,fp32=..` takes to turn the README's GPU-hours into this machine's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # runnable as a plain script, before anything is set up

import torch  # noqa: E402

MIN_DRIVER = {13: 580, 12: 525, 11: 450}  # Linux driver branch each CUDA major needs (NVIDIA's table)
DIT, DIT_BATCH, IMAGE_SIZE = "DiT-XL/2", 32, 256
DIT_KWARGS = {"num_classes": 1000, "image_size": IMAGE_SIZE}  # ImageNet at 256 px: 32×32×4 latents
EDM, EDM_KWARGS = "ddpmpp", {"input_size": 64, "num_classes": None}  # EDM's and Patch Diffusion's network
SAMPLE_STEPS, SAMPLE_BATCH = 250, 64
VAE_IMAGES, VAE_BATCH = 256, 64  # latents.batch_size of the paper profiles
PIPELINE_FILES = ("src", "conf", "notebooks", "dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", ".dvc/config")


class DriverError(Exception):
    """The machine cannot run this torch on its GPUs: stop with one line."""


def driver_version() -> str | None:
    """The NVIDIA driver's version, or None where no driver answers."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.split()
    return lines[0] if out.returncode == 0 and lines else None


def check_driver(driver: str | None) -> str:
    """One line describing the GPUs, or DriverError when this torch cannot use them."""
    build = torch.version.cuda
    if driver is None:
        raise DriverError("no NVIDIA driver answers (nvidia-smi): this machine has no usable GPU")
    if build is None:
        raise DriverError(f"torch {torch.__version__} is a CPU-only build: install the pinned CUDA build (README)")
    needed = MIN_DRIVER.get(int(build.split(".")[0]), 0)
    branch = int(driver.split(".")[0])
    if branch < needed:
        fits = [major for major, least in MIN_DRIVER.items() if branch >= least]
        instead = f", or install a torch build for CUDA {max(fits)} (docs/gpu.md)" if fits else ""
        raise DriverError(f"NVIDIA driver {driver} is older than {needed}, the minimum for torch {torch.__version__} "
                          f"(a CUDA {build} build): update the driver{instead}")
    if not torch.cuda.is_available():
        raise DriverError(f"driver {driver} is new enough for CUDA {build}, yet torch sees no GPU "
                          "(CUDA_VISIBLE_DEVICES? the nvidia kernel module?)")
    props = torch.cuda.get_device_properties(0)
    return (f"{torch.cuda.device_count()} × {props.name} (sm_{props.major}{props.minor}, "
            f"{props.total_memory / 2**30:.0f} GiB), driver {driver}, torch {torch.__version__} (CUDA {build})")


# ---- CUDA measurements ----------------------------------------------------------------------------

def synced_seconds(fn, device: torch.device, repeats: int, warmup: int) -> float:
    """Seconds per call of `fn`: warm-up calls, then `repeats` calls between device syncs (CUDA
    queues work and returns at once: only a sync says when it is done)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    tic = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - tic) / repeats


def use_tf32(enabled: bool) -> None:
    """fp32 matmuls and convolutions on TF32 tensor cores, or in full fp32 (torch's defaults differ)."""
    precision = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision


def train_throughput(precision: str, device: torch.device, model_name: str = DIT, model_kwargs: dict = DIT_KWARGS,
                     batch: int = DIT_BATCH, repeats: int = 10, warmup: int = 3) -> dict:
    """Steps/s and peak memory of AdamW training steps (with `train`'s EMA update) of one model, in
    `precision`: bf16 autocast, fp32 with TF32 matmuls (DiT, DiMR, SD runs), or full fp32 (EDM runs)."""
    import torch.nn.functional as F

    from diffrepro.models.registry import build_model
    from diffrepro.training import RunEma

    use_tf32(precision != "fp32")  # as `train` sets it (diffrepro.runs.set_matmul_precision)
    torch.manual_seed(0)
    with device:
        model = build_model(model_name, **model_kwargs)
    ema = RunEma(model, 0.9999, warmup=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    inputs = model.example_inputs(batch, device)
    target = torch.randn_like(model(*inputs)).detach()

    def step():
        with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
            out = model(*inputs)
        F.mse_loss(out.float(), target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model, 0)

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)  # before the first step: the optimizer's states count
    seconds = synced_seconds(step, device, repeats, warmup)
    peak = torch.cuda.max_memory_allocated(device) if cuda else 0
    return {"steps_per_s": 1 / seconds, "images_per_s": batch / seconds, "peak_gib": peak / 2**30}


def sampling_throughput(device: torch.device, model_name: str = DIT, model_kwargs: dict = DIT_KWARGS,
                        batch: int = SAMPLE_BATCH, repeats: int = 10, warmup: int = 3) -> float:
    """Images/s of guided sampling with `SAMPLE_STEPS` steps in bf16 (the network evaluations,
    which are nearly all of a sampling step: the solver's own arithmetic is a few elementwise ops)."""
    from diffrepro.models.registry import build_model

    use_tf32(True)
    with device:
        model = build_model(model_name, **model_kwargs).eval()
    inputs = model.example_inputs(2 * batch, device)  # conditional and unconditional halves

    @torch.no_grad()
    def evaluate():
        with torch.autocast(device.type, torch.bfloat16):
            model(*inputs)

    return batch / (SAMPLE_STEPS * synced_seconds(evaluate, device, repeats, warmup))


def sd_vae(block_out_channels=(128, 256, 512, 512), layers_per_block: int = 2):
    """Stable Diffusion's KL-f8 autoencoder (the config of stabilityai/sd-vae-ft-*), random weights."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(block_out_channels),
                         layers_per_block=layers_per_block, norm_num_groups=32, sample_size=IMAGE_SIZE,
                         scaling_factor=0.18215)


def vae_encoder_throughput(device: torch.device, vae=None, images: int = VAE_IMAGES, batch: int = VAE_BATCH,
                           size: int = IMAGE_SIZE, repeats: int = 2) -> float:
    """Source images/s of `encode_moments` (each image and its flip), in the default precision."""
    import numpy as np

    from diffrepro.latents import encode_moments

    vae = (vae or sd_vae()).to(device).eval().requires_grad_(False)
    uint8 = np.random.default_rng(0).integers(0, 256, (images, size, size, 3), dtype=np.uint8)

    @torch.no_grad()
    def encode():
        encode_moments(vae, uint8, batch)

    return images / synced_seconds(encode, device, repeats, 1)


def smoke_repro(limit_s: float) -> float:
    """Seconds of `dvc repro` of the smoke profile in a throw-away copy of the pipeline, one process."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in PIPELINE_FILES:
            src, dst = ROOT / name, work / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
            elif src.exists():
                shutil.copy2(src, dst)
        env = {**os.environ, "DIFFREPRO_NUM_PROCESSES": "1", "DVC_NO_ANALYTICS": "1",
               "PYTHONPATH": str(work / "src"), "DIFFREPRO_CHECKPOINTS": str(work / "checkpoints"),
               "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        tic = time.perf_counter()
        git = ["git", "-c", "user.name=gpu_check", "-c", "user.email=gpu_check@localhost"]
        commands = ([*git, "init", "-q"], [*git, "add", "-A"], [*git, "commit", "-qm", "pipeline"],  # dvclive needs one
                    [sys.executable, "-m", "diffrepro", "params", "--profile", "smoke"], ["dvc", "repro"])
        for command in commands:
            proc = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True,
                                  timeout=max(1.0, limit_s - (time.perf_counter() - tic)))
            if proc.returncode:
                lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
                causes = [line for line in lines if "error" in line.lower() and "failed to reproduce" not in line]
                raise RuntimeError(f"`{' '.join(command[-2:])}`: {(causes or lines or [proc.returncode])[-1]}")
        if not (work / "reports" / "smoke" / "results.md").exists():
            raise RuntimeError("dvc repro finished without reports/smoke/results.md")
        return time.perf_counter() - tic


def cuda_rows() -> list[dict]:
    """Every CUDA measurement, each in its own try: a failure is one row, the rest still runs."""
    from diffrepro.models.info import model_info

    device = torch.device("cuda", 0)
    rows = []

    def measure(check: str, fn) -> None:
        try:
            rows.append({"check": check, "ok": True, "detail": fn()})
        except Exception as err:  # noqa: BLE001 - a failed measurement is a row, not the end
            first = str(err).splitlines()[0] if str(err) else ""
            rows.append({"check": check, "ok": False, "detail": f"{type(err).__name__}: {first}"})
        torch.cuda.empty_cache()

    def training(precision: str, model_name: str = DIT, model_kwargs: dict = DIT_KWARGS) -> str:
        r = train_throughput(precision, device, model_name, model_kwargs)
        gmacs = model_info(model_name, **model_kwargs)["gmacs"]
        tflops = 6 * gmacs * 1e9 * r["images_per_s"] / 1e12  # forward + backward = 3 forward passes
        return (f"{r['steps_per_s']:.2f} steps/s = {r['images_per_s']:.0f} images/s, peak {r['peak_gib']:.1f} GiB, "
                f"{tflops:.0f} TFLOP/s of model FLOPs")

    measure("smoke profile: `dvc repro` through the launcher, 1 GPU", lambda: f"{smoke_repro(300):.0f} s")
    measure("SD-VAE encoder (`extract_latents`: image + flip), default precision",
            lambda: f"{vae_encoder_throughput(device):.0f} images/s")
    measure(f"{DIT} training, batch {DIT_BATCH}/GPU, bf16 autocast", lambda: training("bf16"))
    measure(f"{DIT} training, batch {DIT_BATCH}/GPU, fp32 with TF32", lambda: training("tf32"))
    measure(f"{EDM} (EDM, Patch) training at 64 px, batch {DIT_BATCH}/GPU, fp32 without TF32 (as EDM)",
            lambda: training("fp32", EDM, EDM_KWARGS))
    measure(f"{DIT} sampling, {SAMPLE_STEPS} steps + guidance, bf16",
            lambda: f"{sampling_throughput(device):.2f} images/s")
    return rows


# ---- without CUDA ---------------------------------------------------------------------------------

class HarnessTimeout(BaseException):
    """Raised by the alarm; a BaseException so that the harness's per-check `except Exception`
    does not turn it into one failed row and carry on."""


def standin_rows(limit_s: int) -> list[dict]:
    from diffrepro.device_standin import run_harness

    def expire(signum, frame):
        raise HarnessTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(limit_s)
    try:
        return run_harness()
    except HarnessTimeout:
        return [{"check": "device stand-in harness", "ok": False, "detail": f"did not finish within {limit_s} s"}]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def cuda_table(rows: list[dict], gpu: str) -> str:
    lines = [f"| check on one {gpu} | result | detail |", "|---|---|---|"]
    lines += [f"| {r['check']} | {'ok' if r['ok'] else 'FAILED'} | {r['detail']} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--driver", action="store_true",
                        help="only check that a GPU is visible and the driver new enough")
    parser.add_argument("--cpu-limit", type=int, default=600, help="seconds the stand-in harness may take (no CUDA)")
    args = parser.parse_args(argv)
    tic = time.perf_counter()
    driver = driver_version()
    if driver is not None or args.driver:
        try:
            gpus = check_driver(driver)
        except DriverError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"GPU: {gpus}")
        if args.driver:
            return 0
        rows = cuda_rows()
        text = cuda_table(rows, torch.cuda.get_device_name(0))
    else:
        from diffrepro.device_standin import format_table

        print(f"No NVIDIA driver here: the device stand-in harness instead (torch {torch.__version__}, CPU).")
        rows = standin_rows(args.cpu_limit)
        text = format_table(rows)
    print(f"\n{text}\n\n{sum(r['ok'] for r in rows)}/{len(rows)} ok in {time.perf_counter() - tic:.0f} s")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
