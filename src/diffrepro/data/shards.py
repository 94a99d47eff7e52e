"""The prepared format: a few large `.npz` shards per split plus `classes.json`.

Layout of a prepared folder::

    classes.json                    {"classes": [{"name", "super"}...], "super_classes": [...], ...}
    <split>/index.json              {"num_records", "arrays", "image_size", "shards": [{"files", "count"}...]}
    <split>/shard-00000.images.npy  uint8 (N,H,W,3)   (latents: `moments` float32 (N,2,2C,h,w))
    <split>/shard-00000.labels.npy  int64 (N,)
    <split>/shard-00000.super_labels.npy

Few large files keep DVC and file systems fast (DESIGN.md); plain `.npy` files are memory-mapped,
so a paper-scale split (iNat's 500k images, ImageNet's latents) is read lazily, batch by batch,
and `index.json` lets a reader detect a truncated or missing shard before any work starts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from diffrepro.atomic import atomic_path
from diffrepro.errors import UserError
from diffrepro.inputs import read_json

DEFAULT_SHARD_SIZE = 8192


class ShardWriter:
    """Streams records into shards of `shard_size` records each.

    Images go in with `add(image, label, super_label)`; any other arrays (e.g. latent moments)
    with `add_batch(name=array, ...)`, first axis = records. Use as a context manager on the
    split folder: it appears under its final name only when the writer closes without error.
    """

    def __init__(self, split_dir: str | Path, shard_size: int = DEFAULT_SHARD_SIZE):
        self.split_dir = Path(split_dir)
        self.shard_size = shard_size
        self._pending: dict[str, list[np.ndarray]] = {}
        self._pending_count = 0
        self._shards: list[dict] = []
        self._meta: dict = {}

    def __enter__(self):
        self._ctx = atomic_path(self.split_dir, is_dir=True)
        self._tmp = self._ctx.__enter__()
        return self

    def add(self, image: np.ndarray, label: int, super_label: int) -> None:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a uint8 HxWx3 image, got {image.dtype} {image.shape}")
        self._meta.setdefault("image_size", image.shape[0])
        self.add_batch(images=image[None], labels=np.asarray([label], np.int64),
                       super_labels=np.asarray([super_label], np.int64))

    def add_batch(self, **arrays: np.ndarray) -> None:
        counts = {len(a) for a in arrays.values()}
        if len(counts) != 1:
            raise ValueError(f"arrays of different lengths: { {k: len(a) for k, a in arrays.items()} }")
        if self._pending and set(arrays) != set(self._pending):
            raise ValueError(f"expected arrays {sorted(self._pending)}, got {sorted(arrays)}")
        for name, array in arrays.items():
            self._pending.setdefault(name, []).append(np.asarray(array))
        self._pending_count += counts.pop()
        while self._pending_count >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, count: int) -> None:
        merged = {k: np.concatenate(v) for k, v in self._pending.items()}
        stem = f"shard-{len(self._shards):05d}"
        files = {}
        for name, array in merged.items():
            files[name] = f"{stem}.{name}.npy"
            np.save(self._tmp / files[name], np.ascontiguousarray(array[:count]))
        self._shards.append({"files": files, "count": count})
        self._pending = {k: [v[count:]] for k, v in merged.items()}
        self._pending_count -= count

    def set_meta(self, **meta) -> None:
        """Extra facts stored in index.json (e.g. the latent scaling factor)."""
        self._meta.update(meta)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            if self._pending_count:
                self._flush(self._pending_count)
            if not self._shards:
                exc = UserError(f"{self.split_dir}: no records were written (empty data set)")
                self._ctx.__exit__(type(exc), exc, None)
                raise exc
            index = {"num_records": sum(s["count"] for s in self._shards),
                     "arrays": sorted(self._pending), **self._meta, "shards": self._shards}
            (self._tmp / "index.json").write_text(json.dumps(index, indent=1))
        return self._ctx.__exit__(exc_type, exc, tb)


def write_split(split_dir, images, labels, super_labels, shard_size=DEFAULT_SHARD_SIZE) -> None:
    """Write whole arrays as one split."""
    with ShardWriter(split_dir, shard_size) as writer:
        writer.set_meta(image_size=int(images.shape[1]))
        writer.add_batch(images=np.asarray(images, np.uint8), labels=np.asarray(labels, np.int64),
                         super_labels=np.asarray(super_labels, np.int64))


def read_index(split_dir: str | Path) -> dict:
    return read_json(Path(split_dir) / "index.json", "dvc repro")


class ShardedSplit:
    """A split's arrays, memory-mapped shard by shard; `take(index)` gathers records lazily."""

    def __init__(self, split_dir: str | Path):
        self.split_dir = Path(split_dir)
        index = read_index(self.split_dir)
        self.meta = index
        self.names = list(index["arrays"])
        self.shards: list[dict[str, np.ndarray]] = []
        for shard in index["shards"]:
            arrays = {}
            for name in self.names:
                path = self.split_dir / shard["files"][name]
                try:
                    arrays[name] = np.load(path, mmap_mode="r")
                except (OSError, ValueError, EOFError) as err:
                    raise UserError(f"{path} is truncated or corrupt ({type(err).__name__}: {err}); delete it "
                                    "and run `dvc checkout` or `dvc repro` to restore it") from None
                if len(arrays[name]) != shard["count"]:
                    raise UserError(f"{path} holds {len(arrays[name])} records but index.json says "
                                    f"{shard['count']}; re-run `dvc repro prepare`")
            self.shards.append(arrays)
        self.offsets = np.cumsum([0] + [s["count"] for s in index["shards"]])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def take(self, index) -> dict[str, np.ndarray]:
        """Records at global positions `index` (any order, repeats allowed), as in-memory arrays."""
        index = np.asarray(index, dtype=np.int64)
        shard_of = np.searchsorted(self.offsets, index, side="right") - 1
        out = {name: np.empty((len(index), *self.shards[0][name].shape[1:]), self.shards[0][name].dtype)
               for name in self.names}
        for k in np.unique(shard_of):
            rows = np.nonzero(shard_of == k)[0]
            local = index[rows] - self.offsets[k]
            for name in self.names:
                out[name][rows] = self.shards[k][name][local]
        return out

    def column(self, name: str) -> np.ndarray:
        """One whole array (e.g. all labels) in memory."""
        return np.concatenate([shard[name] for shard in self.shards])


def read_split(split_dir: str | Path) -> dict[str, np.ndarray]:
    """Load a whole split into memory (all its arrays); one clear error when a shard is damaged."""
    split = ShardedSplit(split_dir)
    return {name: split.column(name) for name in split.names}


def write_classes(prepared_dir: str | Path, classes: dict) -> None:
    with atomic_path(Path(prepared_dir) / "classes.json") as tmp:
        tmp.write_text(json.dumps(classes, indent=1))


def read_classes(prepared_dir: str | Path) -> dict:
    return read_json(Path(prepared_dir) / "classes.json", "dvc repro prepare")
