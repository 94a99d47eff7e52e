"""Class-balanced samples of a trained run, decoded to uint8 images (the `sample@RUN` stage).

Every image's noise (its start and, for stochastic samplers, every step's) comes from its own
generator seeded by (sample seed, image index), so any subset can be regenerated and a killed
stage resumes chunk by chunk (finished chunks are kept in `checkpoints/<run>/samples/<set>/`)
without duplicating or dropping an image — as long as nothing that determines them changed: each
set's folder records the fingerprint of its params and weights, and starts over when that differs.
Under `accelerate launch` the chunks are dealt round-robin to any number of processes; the main
process assembles them in image order, so the result does not depend on the process count.
Writes `samples/<run>/final.npz` (images, labels, super_labels), one npz per training snapshot
(`step-XXXXXXX.npz`, for quality vs steps) and a labelled grid `samples/<run>/grid.png`. With
`sample.seed_sets` = S > 1 it also writes `final-set1.npz` ... `final-set{S-1}.npz`: set k uses
image indices k·N ... k·N + N − 1 (N = images per set), so no two sets share a noise; this is EDM's
FID protocol (three 50k sets, seeds 0-49999 / 50000-99999 / 100000-149999, report the minimum).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from diffrepro.atomic import atomic_path
from diffrepro.data import shards
from diffrepro.errors import UserError
from diffrepro.methods import get_method
from diffrepro.models.autoencoder import to_uint8
from diffrepro.runs import noise_process, rng

SAMPLE_SEED_OFFSET = 10_000  # sampling noise never reuses a training step's stream


def sample_labels(prepared_dir: str, split: str, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """`per_class` labels of every class (class-balanced), with their superclasses."""
    classes = shards.read_classes(prepared_dir)
    table = classes["base_classes"] if split == "base" else classes["classes"]
    labels = np.repeat(np.arange(len(table)), per_class)
    supers = np.asarray([table[y]["super"] for y in labels], np.int64)
    return labels, supers


class RunSampler:
    """Turns (labels, image indices) into images for one run's network and sampler params
    (`cfg`: the run's params, `where`: their key in params.yaml, for error messages)."""

    def __init__(self, model: torch.nn.Module, config: dict, cfg: dict, seed: int, vae=None, device="cpu", *,
                 where: str):
        self.device = torch.device(device)
        self.model, self.config, self.cfg, self.seed = model.to(self.device), config, cfg, seed
        self.vae = vae.to(self.device) if vae is not None else None
        self.method = get_method(config["method"], **config["method_kwargs"])
        self.diffusion = noise_process(config, model)
        self.diffusion.check_sampling(cfg, where)

    def generators(self, indices: np.ndarray) -> list[torch.Generator]:
        """One generator per image, seeded by (sample seed, image index)."""
        return [rng(self.seed, SAMPLE_SEED_OFFSET, int(i)) for i in indices]

    def __call__(self, labels: np.ndarray, supers: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """uint8 images of one chunk."""
        return to_uint8(self.on_device(labels, supers, indices))

    @torch.no_grad()
    def on_device(self, labels: np.ndarray, supers: np.ndarray, indices: np.ndarray) -> torch.Tensor:
        """Decoded images in [-1, 1] on the device. A run trained in bf16 samples its network in
        bf16 (autocast; the sampler's own arithmetic stays fp32); the decoder runs in fp32."""
        bf16 = self.cfg["bf16"] and self.device.type == "cuda"
        with torch.autocast("cuda", torch.bfloat16) if bf16 else contextlib.nullcontext():
            x0 = self._denoise(labels, supers, indices)
        if self.vae is not None:
            x0 = self.vae.decode(x0 / self.vae.config.scaling_factor).sample
        return x0

    def _denoise(self, labels: np.ndarray, supers: np.ndarray, indices: np.ndarray) -> torch.Tensor:
        kw = self.config["model_kwargs"]
        shape = (kw["in_channels"], kw["input_size"], kw["input_size"])
        generators = self.generators(indices)
        x_T = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device)
        y, s = torch.from_numpy(labels).to(self.device), torch.from_numpy(supers).to(self.device)
        if self.model.num_classes is None:  # unconditional net (EDM's --cond=0): no labels
            y = guide = None
        else:
            guide = self.method.guidance_labels(y, s, self.model)
        extra = self.method.sampling_kwargs(len(x_T), kw["input_size"], self.device)
        x0 = self.diffusion.sample_images(self.model, x_T, y, guide, self.cfg, generators, extra)
        return x0.float()


def sample_set(sampler: RunSampler, labels, supers, batch_size: int, chunk_dir: Path, desc: str,
               fingerprint: str, accelerator=None, index_offset: int = 0) -> None:
    """Every image of (labels, supers) as chunks of `batch_size` in `chunk_dir`, skipping chunks
    finished under the same `fingerprint` (of everything that determines them; chunks drawn under
    another are discarded first). Image i is drawn with index `index_offset + i` (its noise seed).

    With an accelerator, process k makes chunks k, k + N, k + 2N, ... and all wait for the last.
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    if rank == 0:
        _start_over_unless(chunk_dir, fingerprint)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    starts = list(range(0, len(labels), batch_size))
    for start in tqdm(starts[rank::world], desc=desc, mininterval=10, disable=rank != 0):
        chunk = chunk_dir / f"chunk-{start:07d}.npy"
        if chunk.exists():
            continue
        idx = np.arange(start, min(start + batch_size, len(labels)))
        images = sampler(labels[idx], supers[idx], idx + index_offset)
        with atomic_path(chunk) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, images)
    if accelerator is not None:
        accelerator.wait_for_everyone()


def _start_over_unless(chunk_dir: Path, fingerprint: str) -> None:
    """Empty `chunk_dir` unless its chunks were drawn under `fingerprint`; then record it there."""
    record = chunk_dir / "fingerprint.json"
    try:
        drawn_under = json.loads(record.read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):  # none yet (or unreadable): nothing to trust
        drawn_under = None
    if drawn_under == fingerprint:
        return
    if any(chunk_dir.glob("chunk-*.npy")):
        print(f"{chunk_dir} was sampled with other params; starting over")
    shutil.rmtree(chunk_dir, ignore_errors=True)
    chunk_dir.mkdir(parents=True)
    with atomic_path(record) as tmp:
        tmp.write_text(json.dumps({"fingerprint": fingerprint}))


def assemble(chunk_dir: Path, num_images: int, batch_size: int, rebuild: str) -> np.ndarray:
    """The chunks of one set, in image order (`rebuild`: the command that makes them again)."""
    chunks = []
    for start in range(0, num_images, batch_size):
        chunk = chunk_dir / f"chunk-{start:07d}.npy"
        try:
            chunks.append(np.load(chunk))
        except (OSError, ValueError, EOFError) as err:
            raise UserError(f"{chunk} is unreadable ({type(err).__name__}): delete it and run `{rebuild}` "
                            "again") from None
    return np.concatenate(chunks)


def save_grid(images: np.ndarray, labels: np.ndarray, per_row: int, path: Path, title: str) -> None:
    """A grid with one row per class (first `per_row` samples of it) and the class index at left.

    The tiles are laid out in one array and drawn by one `imshow` (one axes per tile took ~1 s
    per sample stage to render)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = np.unique(labels)
    h, w, c = images.shape[1:]
    gap = 1
    canvas = np.full((len(classes) * (h + gap) - gap, per_row * (w + gap) - gap, c), 255, np.uint8)
    for r, label in enumerate(classes):
        for k, image in enumerate(images[labels == label][:per_row]):
            canvas[r * (h + gap):r * (h + gap) + h, k * (w + gap):k * (w + gap) + w] = image
    fig, ax = plt.subplots(figsize=(per_row * 0.6 + 0.6, len(classes) * 0.6 + 0.4))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([r * (h + gap) + h / 2 for r in range(len(classes))], [str(label) for label in classes], fontsize=6)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title, fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
