"""Real data sets → the prepared shard format: decode, center-crop, label, shard.

Each data set has a recipe that reads its raw files in the published layout — archives are
streamed, never unpacked, so a 42 GB set needs no second copy on disk — and maps every image to
a fine class and a superclass. The crops are the papers' own:
- iNat 2021, VegFru, ImageNet (FineDiffusion and DiMR build on DiT): ADM's `center_crop_arr`.
- CelebA and AFHQv2 (Patch Diffusion builds on EDM): EDM `dataset_tool.py --transform=center-crop`,
  a square crop of the short side followed by a Lanczos resize.
Output: `out_dir/<split>/` shards, `out_dir/classes.json` and `out_dir/prepare_report.json`
(split sizes, skipped corrupt images); `out_dir` appears only when all of it is written.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import multiprocessing
import os
import re
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from diffrepro.atomic import atomic_path
from diffrepro.data.shards import DEFAULT_SHARD_SIZE, ShardWriter, write_classes
from diffrepro.errors import UserError

ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError)
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
WNID = re.compile(r"n\d{8}")
DECODE_BATCH = 256


# ---------------------------------------------------------------------------------------------
# Crops


def center_crop_adm(image: Image.Image, size: int) -> np.ndarray:
    """ADM / DiT `center_crop_arr`: halve with BOX while the short side is ≥ 2·size, BICUBIC
    resize so the short side is `size`, then take the central size×size square."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size),
                         resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def center_crop_edm(image: Image.Image, size: int) -> np.ndarray:
    """EDM `dataset_tool.py --transform=center-crop`: central square of the short side, then a
    Lanczos resize to size×size (for AFHQv2's square images this is a plain Lanczos resize)."""
    arr = np.asarray(image)
    side = min(arr.shape[:2])
    top, left = (arr.shape[0] - side) // 2, (arr.shape[1] - side) // 2
    square = Image.fromarray(arr[top:top + side, left:left + side])
    return np.asarray(square.resize((size, size), resample=Image.LANCZOS))


CROPS: dict[str, Callable[[Image.Image, int], np.ndarray]] = {
    "adm_center_crop": center_crop_adm,
    "edm_center_crop_lanczos": center_crop_edm,
}


def _decode(task: tuple) -> tuple:
    """Worker: bytes → cropped uint8 array, or the reason it could not be decoded."""
    name, data, label, sup, size, crop = task
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return name, label, sup, CROPS[crop](image.convert("RGB"), size), None
    except DECODE_ERRORS as err:
        return name, label, sup, None, f"{type(err).__name__}: {err}"


# ---------------------------------------------------------------------------------------------
# Reading raw files: folders and archives alike


def _safe_name(archive: Path | str, name: str) -> str:
    """A member's path, refused if it is absolute or climbs out with '..' (path traversal)."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or ".." in parts or (parts and parts[0].endswith(":")):
        raise UserError(f"{archive}: member {name!r} points outside the archive (absolute or '..' "
                        "path); refusing it — get a clean copy from the official source")
    return "/".join(p for p in parts if p != ".")


def _members(source: Path, accept: Callable[[str], bool],
             fileobj: io.BufferedIOBase | None = None) -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of each regular file whose path `accept`s, in stored order.

    `source` is a folder (paths relative to its parent, sorted), a zip, or a tar of any
    compression (streamed). `fileobj` reads a tar held in memory (ImageNet's per-class tars).
    """
    if fileobj is None and source.is_dir():
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            rel = path.relative_to(source.parent).as_posix()
            if accept(rel):
                yield rel, path.read_bytes()
        return
    try:
        if fileobj is None and zipfile.is_zipfile(source):
            with zipfile.ZipFile(source) as zf:
                for info in zf.infolist():
                    name = _safe_name(source, info.filename)
                    if not info.is_dir() and accept(name):
                        yield name, zf.read(info)
            return
        with tarfile.open(None if fileobj else source, mode="r|*", fileobj=fileobj) as tf:
            for member in tf:
                name = _safe_name(source, member.name)
                if member.isfile() and accept(name):
                    yield name, tf.extractfile(member).read()
    except ARCHIVE_ERRORS as err:
        raise UserError(f"{source} is truncated or corrupt ({type(err).__name__}: {err}); delete "
                        "it and run the download stage again") from None


def _source(raw_dir: Path, folder: str, archive: str) -> Path:
    """The unpacked `folder` if present, else the `archive`; a clear error if neither is."""
    for candidate in (raw_dir / folder, raw_dir / archive):
        if candidate.exists():
            return candidate
    raise UserError(f"{raw_dir / archive} (or its unpacked {raw_dir / folder}/) is missing: run "
                    "the download stage (`dvc repro download`) first")


def _label_of(source: Path, name: str) -> str:
    """How an image is named in messages: the archive and its member, or the file's path."""
    return str(source.parent / name) if source.is_dir() else f"{source}:{name}"


def _is_image(name: str, exts: tuple[str, ...]) -> bool:
    return name.lower().endswith(exts)


# ---------------------------------------------------------------------------------------------
# Recipes: one per data set


Item = tuple[str, bytes, int, int]  # (name for messages, encoded image, class, superclass)


@dataclass
class Plan:
    """What a recipe found: the class table, the crop, and a lazy image stream per split."""

    classes: list[dict]
    super_classes: list[str]
    crop: str
    splits: dict[str, tuple[Iterable[Item], int | None]]  # split → (items, expected count)
    notes: str


def _inat2021(raw_dir: Path, dataset: str) -> Plan:
    """iNat 2021: train_mini → `train`, val → `val`; class = category id, superclass = the
    JSON's `supercategory` (sorted names: 11 on the real data)."""
    train_json, val_json = _coco_json(raw_dir, "train_mini"), _coco_json(raw_dir, "val")
    categories = sorted(train_json["categories"], key=lambda c: c["id"])
    if [c["id"] for c in categories] != list(range(len(categories))):
        raise UserError(f"{raw_dir}/train_mini.json: category ids are not "
                        f"0..{len(categories) - 1}; this is not the iNat 2021 annotation file")
    if sorted(c["id"] for c in val_json["categories"]) != list(range(len(categories))):
        raise UserError(f"{raw_dir}/val.json has other categories than train_mini.json; "
                        "re-download both")
    supers = sorted({c["supercategory"] for c in categories})
    classes = [{"name": c["name"], "super": supers.index(c["supercategory"])} for c in categories]
    splits = {split: _inat_split(raw_dir, stem, annotations, classes)
              for split, stem, annotations in (("train", "train_mini", train_json),
                                               ("val", "val", val_json))}
    return Plan(classes, supers, "adm_center_crop", splits,
                "class index = iNat category id; superclass = JSON supercategory, sorted by name")


def _coco_json(raw_dir: Path, stem: str) -> dict:
    """`<stem>.json`, unpacked or inside `<stem>.json.tar.gz` (the member's name is not
    published: `<stem>.json` if present, else the archive's only .json)."""
    if (raw_dir / f"{stem}.json").is_file():
        return json.loads((raw_dir / f"{stem}.json").read_text())
    archive = _source(raw_dir, f"{stem}.json", f"{stem}.json.tar.gz")
    found = dict(_members(archive, lambda n: n.endswith(".json")))
    exact = [n for n in found if PurePosixPath(n).name == f"{stem}.json"]
    if len(exact) != 1 and len(found) != 1:
        raise UserError(f"{archive}: expected {stem}.json or a single .json inside, found "
                        f"{sorted(found) or 'none'}; re-download it")
    return json.loads(found[exact[0] if len(exact) == 1 else next(iter(found))])


def _inat_split(raw_dir: Path, stem: str, annotations: dict, classes: list[dict]):
    """Images of one iNat split, labelled through the JSON (matched on `<folder>/<file>`)."""
    category = {a["image_id"]: a["category_id"] for a in annotations["annotations"]}
    unlabelled = [img["file_name"] for img in annotations["images"] if img["id"] not in category]
    if unlabelled:
        raise UserError(f"{raw_dir}/{stem}.json: image {unlabelled[0]} has no annotation; "
                        "this is not a training/validation annotation file — re-download it")
    by_path = {_tail(img["file_name"], 2): category[img["id"]] for img in annotations["images"]}
    source = _source(raw_dir, stem, f"{stem}.tar.gz")

    def items() -> Iterator[Item]:
        seen = 0
        for name, data in _members(source, lambda n: _is_image(n, (".jpg", ".jpeg"))):
            key = _tail(name, 2)
            if key not in by_path:
                raise UserError(f"{_label_of(source, name)} is not in {stem}.json: the images and "
                                "annotations do not belong together — re-download both")
            seen += 1
            label = by_path[key]
            yield _label_of(source, name), data, label, classes[label]["super"]
        if seen != len(by_path):
            raise UserError(f"{source} holds {seen} images but {stem}.json lists {len(by_path)}; "
                            "the archive is incomplete — re-download it")

    return items(), len(by_path)


def _tail(path: str, n: int) -> str:
    return "/".join(PurePosixPath(path).parts[-n:])


def _vegfru(raw_dir: Path, dataset: str) -> Plan:
    """VegFru (unpacked layout): splits from `vegfru_list/vegfru_{train,val,test}.txt`; the
    superclass is one of the 25 sup-classes when `supvegfru_*.txt` are present, else
    vegetable / fruit (veg200_images vs fru92_images)."""
    lists = raw_dir / "vegfru_list"
    names = [s for s in ("train", "val", "test") if (lists / f"vegfru_{s}.txt").is_file()]
    if "train" not in names:
        raise UserError(f"{lists / 'vegfru_train.txt'} is missing: unpack VegFru so that "
                        "veg200_images/, fru92_images/ and vegfru_list/ sit in the raw dir")
    entries = {s: _read_list(lists / f"vegfru_{s}.txt") for s in names}
    use_sup = all((lists / f"supvegfru_{s}.txt").is_file() for s in names)
    sup_of_path = {}
    if use_sup:
        for s in names:
            sup_of_path.update(_read_list(lists / f"supvegfru_{s}.txt"))

    class_name: dict[int, str] = {}
    class_super: dict[int, int] = {}
    for s in names:
        for rel, label in entries[s]:
            parts = PurePosixPath(rel).parts
            if len(parts) < 3 or parts[0] not in ("veg200_images", "fru92_images"):
                raise UserError(f"{lists}/vegfru_{s}.txt: path {rel!r} is not under "
                                "veg200_images/ or fru92_images/")
            if use_sup and rel not in sup_of_path:
                raise UserError(f"{lists}/supvegfru_{s}.txt has no line for {rel}")
            sup = sup_of_path[rel] if use_sup else int(parts[0] == "fru92_images")
            if class_name.setdefault(label, parts[1]) != parts[1] or \
                    class_super.setdefault(label, sup) != sup:
                raise UserError(f"{lists}/vegfru_{s}.txt: label {label} is given to two different "
                                "classes or sup-classes; the lists are inconsistent")
    if sorted(class_name) != list(range(len(class_name))):
        raise UserError(f"{lists}: class labels are not 0..{len(class_name) - 1}")
    num_super = max(class_super.values()) + 1
    supers = [f"sup{k:02d}" for k in range(num_super)] if use_sup else ["vegetable", "fruit"]
    classes = [{"name": class_name[k], "super": class_super[k]} for k in range(len(class_name))]

    def items(split: str) -> Iterator[Item]:
        for rel, label in entries[split]:
            path = raw_dir / rel
            if not path.is_file():
                raise UserError(f"{path} is listed in vegfru_{split}.txt but missing; "
                                "re-unpack VegFru")
            yield str(path), path.read_bytes(), label, class_super[label]

    splits = {s: (items(s), len(entries[s])) for s in names}
    return Plan(classes, supers, "adm_center_crop", splits,
                "class = vegfru_*.txt label; superclass = " + (
                    "supvegfru_*.txt sup-class (names not in the data: sup00..)" if use_sup
                    else "vegetable (veg200_images) / fruit (fru92_images)"))


def _read_list(path: Path) -> list[tuple[str, int]]:
    """`<relpath> <int label>` lines."""
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rel, label = line.rsplit(maxsplit=1)
                out.append((rel.strip(), int(label)))
            except ValueError:
                raise UserError(f"{path}:{number}: expected '<path> <label>', got {line!r}"
                                ) from None
    return out


def _imagenet(raw_dir: Path, dataset: str) -> Plan:
    """ImageNet-1k: class index = position of the wnid in sorted order (torchvision
    ImageFolder); no superclass (one superclass 0 for every image). `train/` folders or
    ILSVRC2012_img_train.tar (per-class tars inside); `val/` wnid folders, or flat val images
    labelled by the devkit ground truth."""
    train = _source(raw_dir, "train", "ILSVRC2012_img_train.tar")
    if train.is_dir():
        wnids = sorted(p.name for p in train.iterdir() if p.is_dir() and WNID.fullmatch(p.name))
    else:
        try:
            with tarfile.open(train) as tf:  # uncompressed: listing seeks, it does not read images
                wnids = sorted(PurePosixPath(n).stem for n in tf.getnames() if n.endswith(".tar"))
        except ARCHIVE_ERRORS as err:
            raise UserError(f"{train} is truncated or corrupt ({err}); replace it") from None
    if not wnids:
        raise UserError(f"{train} holds no nXXXXXXXX class folders or tars")
    index = {w: k for k, w in enumerate(wnids)}
    val = _source(raw_dir, "val", "ILSVRC2012_img_val.tar")
    exts = (".jpeg", ".jpg")

    def train_items() -> Iterator[Item]:
        for name, data in _members(train, lambda n: _is_image(n, exts + (".tar",))):
            if name.endswith(".tar"):
                wnid = PurePosixPath(name).stem
                inner = Path(f"{train}:{name}")
                images = _members(inner, lambda n: _is_image(n, exts), io.BytesIO(data))
                for img, img_data in images:
                    yield f"{inner}/{img}", img_data, index[wnid], 0
            else:
                yield _label_of(train, name), data, _class(index, name, train), 0

    def val_items() -> Iterator[Item]:
        truth = None
        for name, data in _members(val, lambda n: _is_image(n, exts)):
            folder = PurePosixPath(name).parent.name
            if WNID.fullmatch(folder):
                label = _class(index, name, val)
            else:
                truth = truth or _devkit_val_wnids(raw_dir)
                number = int(re.findall(r"\d+", PurePosixPath(name).stem)[-1])
                if not 1 <= number <= len(truth):
                    raise UserError(f"{_label_of(val, name)}: no ground-truth line {number} "
                                    "in the devkit")
                label = _class(index, truth[number - 1], val)
            yield _label_of(val, name), data, label, 0

    classes = [{"name": w, "super": 0} for w in wnids]
    return Plan(classes, ["all"], "adm_center_crop",
                {"train": (train_items(), None), "val": (val_items(), None)},
                "class index = sorted wnid order; no superclass: every image has superclass 0")


def _class(index: dict[str, int], name: str, source: Path) -> int:
    """Class of an image named by (or sitting in a folder named by) its wnid."""
    parts = PurePosixPath(name).parts
    wnid = next((p for p in reversed(parts) if WNID.fullmatch(p)), None)
    if wnid not in index:
        raise UserError(f"{_label_of(source, name)}: class {wnid} is not one of the train classes")
    return index[wnid]


def _devkit_val_wnids(raw_dir: Path) -> list[str]:
    """wnid of validation image k (1-based) from the devkit: ground-truth ILSVRC2012_IDs
    mapped through `meta.mat` (IDs are not the sorted-wnid class indices)."""
    from scipy.io import loadmat

    devkit = _source(raw_dir, "ILSVRC2012_devkit_t12", "ILSVRC2012_devkit_t12.tar.gz")
    wanted = ("data/ILSVRC2012_validation_ground_truth.txt", "data/meta.mat")
    found = {w: data for name, data in _members(devkit, lambda n: n.endswith(wanted))
             for w in wanted if name.endswith(w)}
    if len(found) != 2:
        raise UserError(f"{devkit}: needs {' and '.join(wanted)} to label the flat val images")
    synsets = loadmat(io.BytesIO(found[wanted[1]]), squeeze_me=True)["synsets"]
    wnid_of_id = {int(i): str(w) for i, w in zip(synsets["ILSVRC2012_ID"], synsets["WNID"])}
    return [wnid_of_id[int(line)] for line in found[wanted[0]].decode().split()]


def _celeba64(raw_dir: Path, dataset: str) -> Plan:
    """CelebA aligned: splits from list_eval_partition.txt (0 train, 1 val, 2 test); one class.
    Patch Diffusion's dataset_tool run used every image, i.e. all three splits together."""
    partition_file = raw_dir / "list_eval_partition.txt"
    if not partition_file.is_file():
        raise UserError(f"{partition_file} is missing: run the download stage first")
    partition = {PurePosixPath(rel).name: code for rel, code in _read_list(partition_file)}
    source = _source(raw_dir, "img_align_celeba", "img_align_celeba.zip")

    def items(code: int) -> Iterator[Item]:
        wanted = {name for name, c in partition.items() if c == code}
        seen = set()
        for name, data in _members(source, lambda n: PurePosixPath(n).name in wanted):
            seen.add(PurePosixPath(name).name)
            yield _label_of(source, name), data, 0, 0
        if seen != wanted:
            raise UserError(f"{source} lacks {len(wanted - seen)} images listed in "
                            f"{partition_file.name} (e.g. {min(wanted - seen)}); re-download it")

    splits = {split: (items(code), sum(c == code for c in partition.values()))
              for split, code in (("train", 0), ("val", 1), ("test", 2))}
    return Plan([{"name": "face", "super": 0}], ["face"], "edm_center_crop_lanczos", splits,
                "unconditional: one class; splits from list_eval_partition.txt")


def _afhqv2(raw_dir: Path, dataset: str) -> Plan:
    """AFHQv2 `train|test/{cat,dog,wild}/*.png` (with or without a top folder in the zip);
    classes in sorted order as EDM's dataset_tool labels them; `afhqv2wild_64` keeps `wild`."""
    kinds = ("wild",) if dataset == "afhqv2wild_64" else ("cat", "dog", "wild")
    source = _source(raw_dir, "afhq_v2", "afhq_v2.zip")

    def items(split: str) -> Iterator[Item]:
        def wanted(name: str) -> bool:
            parts = PurePosixPath(name).parts
            return (_is_image(name, (".png", ".jpg")) and len(parts) >= 3
                    and parts[-3] == split and parts[-2] in kinds)

        for name, data in _members(source, wanted):
            kind = PurePosixPath(name).parent.name
            yield _label_of(source, name), data, kinds.index(kind), 0

    return Plan([{"name": k, "super": 0} for k in kinds], ["animal"], "edm_center_crop_lanczos",
                {s: (items(s), None) for s in ("train", "test")},
                f"classes {', '.join(kinds)}; no superclass (all 0)")


RECIPES: dict[str, Callable[[Path, str], Plan]] = {
    "inat2021": _inat2021,
    "vegfru": _vegfru,
    "imagenet": _imagenet,
    "celeba64": _celeba64,
    "afhqv2_64": _afhqv2,
    "afhqv2wild_64": _afhqv2,
}


# ---------------------------------------------------------------------------------------------
# Preparation


def prepare_real(dataset: str, raw_dir: str | os.PathLike, out_dir: str | os.PathLike,
                 image_size: int, skip_corrupt: bool = False, workers: int | None = None,
                 shard_size: int = DEFAULT_SHARD_SIZE) -> dict:
    """Decode, crop and shard `dataset` from `raw_dir` into `out_dir`; returns the report.

    An image that cannot be decoded stops the run with its name, unless `skip_corrupt`, which
    skips it and lists it in `prepare_report.json`. `workers` processes decode in parallel
    (None: one per CPU); the output is the same for any number of workers.
    """
    if dataset not in RECIPES:
        raise UserError(f"unknown data set {dataset!r} (params.yaml `data.dataset`); known: "
                        f"{', '.join(RECIPES)}, synthetic")
    if image_size < 1:
        raise UserError(f"params.yaml `data.image_size` must be positive, got {image_size}")
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    if not raw_dir.is_dir():
        raise UserError(f"{raw_dir} is missing: run the download stage (`dvc repro download`) "
                        "first")
    plan = RECIPES[dataset](raw_dir, dataset)
    workers = (os.cpu_count() or 1) if workers is None else workers
    skipped: list[str] = []
    sizes: dict[str, int] = {}
    pool = multiprocessing.Pool(workers) if workers > 1 else contextlib.nullcontext()
    with pool as pool, atomic_path(out_dir, is_dir=True) as tmp:
        for split, (items, total) in plan.splits.items():
            tasks = ((name, data, label, sup, image_size, plan.crop)
                     for name, data, label, sup in items)
            with ShardWriter(tmp / split, shard_size) as writer:
                for name, label, sup, image, error in tqdm(
                        _decoded(tasks, pool), total=total, desc=f"{dataset}/{split}",
                        unit="img", mininterval=5):
                    if error is not None:
                        if not skip_corrupt:
                            raise UserError(f"{name}: cannot decode the image ({error}); replace "
                                            "the file, or set `data.skip_corrupt: true` to skip "
                                            "it (skips are listed in prepare_report.json)")
                        skipped.append(name)
                        continue
                    writer.add(image, label, sup)
                    sizes[split] = sizes.get(split, 0) + 1
        write_classes(tmp, {"dataset": dataset, "image_size": image_size,
                            "classes": plan.classes, "super_classes": plan.super_classes,
                            "crop": plan.crop, "notes": plan.notes})
        report = {"dataset": dataset, "image_size": image_size, "split_sizes": sizes,
                  "skipped_corrupt": len(skipped), "skipped_files": skipped}
        (tmp / "prepare_report.json").write_text(json.dumps(report, indent=1))
    return report


def _decoded(tasks: Iterator[tuple], pool) -> Iterator[tuple]:
    """Decode in order; batches keep memory bounded (Pool.imap would read the whole archive)."""
    if pool is None:
        yield from map(_decode, tasks)
        return
    while batch := list(itertools.islice(tasks, DECODE_BATCH)):
        yield from pool.map(_decode, batch, chunksize=8)
