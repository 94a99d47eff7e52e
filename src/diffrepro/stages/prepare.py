"""`prepare` stage: raw data in, compact shards + classes.json out.

The embedded default (`data.dataset: synthetic`) is rendered here from the generator's settings
that `download` recorded. Real data sets go through `data/real.py` (decode, crop, shard).
"""

from __future__ import annotations

from pathlib import Path


from diffrepro.atomic import atomic_path
from diffrepro.data import shards, synthetic
from diffrepro.errors import UserError

SYNTHETIC_SPLITS = ("train", "heldout", "base")


def stage(params: dict) -> None:
    data = params["data"]
    out_dir = Path(data["prepared_dir"])
    if data["dataset"] != "synthetic":
        from diffrepro.data import real

        real.prepare_real(data["dataset"], Path(data["raw_dir"]), out_dir, data["image_size"],
                          skip_corrupt=data["skip_corrupt"])
        return
    manifest = Path(data["raw_dir"]) / "manifest.json"
    if not manifest.exists():
        raise UserError(f"{manifest} is missing: run `dvc repro download` first")
    with atomic_path(out_dir, is_dir=True) as tmp:
        prepare_synthetic(params["seed"], data["image_size"], data["synthetic"], tmp)


def prepare_synthetic(seed: int, image_size: int, cfg: dict, out_dir: Path) -> None:
    """Render every split of the synthetic set into `out_dir` (shards + classes.json)."""
    table = synthetic.class_table(cfg["num_super"], cfg["base_per_family"])
    families = table["super_classes"]
    train = synthetic.generate_split(table["classes"], families, cfg["images_per_class"], image_size, seed, "train")
    heldout = synthetic.generate_split(table["classes"], families, cfg["heldout_per_class"], image_size, seed, "heldout")
    base = synthetic.generate_split(table["base_classes"], families, cfg["base_images_per_class"], image_size, seed, "base")
    for name, split in zip(SYNTHETIC_SPLITS, (train, heldout, base)):
        shards.write_split(out_dir / name, *split)
    shards.write_classes(out_dir, {**table, "image_size": image_size, "seed": seed})
