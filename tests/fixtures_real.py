"""Tiny stand-ins for the real data sets, built at test time in the published layouts, and a
local HTTP server to download them from.

Every image is one flat colour chosen by its class (`class_color`), so a test can check that
each prepared image kept the label of the file it came from.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tarfile
import threading
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

PALETTE = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 210, 30), (200, 40, 200),
           (30, 200, 210), (120, 120, 120), (250, 140, 20)]


def class_color(k: int) -> tuple[int, int, int]:
    return PALETTE[k % len(PALETTE)]


def encode(color, width: int, height: int, fmt: str = "JPEG") -> bytes:
    """A flat-colour image file (4:4:4 JPEG keeps flat colours within a few levels)."""
    buf = io.BytesIO()
    image = Image.new("RGB", (width, height), tuple(color))
    if fmt == "JPEG":
        image.save(buf, "JPEG", quality=95, subsampling=0)
    else:
        image.save(buf, fmt)
    return buf.getvalue()


def corrupt_jpeg() -> bytes:
    """A JPEG cut short: a valid header, then nothing — PIL refuses to decode it."""
    return encode((0, 0, 0), 40, 30)[:120]


def _tar(path: Path, files: dict[str, bytes], mode: str = "w:gz") -> None:
    with tarfile.open(path, mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip(path: Path, files: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# --- iNaturalist 2021 ----------------------------------------------------------------------

INAT_SPECIES = [  # (8-part folder name, scientific name, supercategory)
    ("00000_Animalia_Chordata_Aves_Passeriformes_Corvidae_Corvus_corax", "Corvus corax", "Birds"),
    ("00001_Fungi_Basidiomycota_Agaricomycetes_Agaricales_Amanitaceae_Amanita_muscaria",
     "Amanita muscaria", "Fungi"),
    ("00002_Plantae_Tracheophyta_Magnoliopsida_Asterales_Asteraceae_Bellis_perennis",
     "Bellis perennis", "Plants"),
]
INAT_SIZES = {"train_mini": 4, "val": 2}  # images per species


def build_inat(root: Path, corrupt: bool = False) -> None:
    """train_mini.tar.gz / val.tar.gz (`<split>/<8-part folder>/<uuid>.jpg`) and their
    `<split>.json.tar.gz` (COCO-style keys of the README). Category k → colour k."""
    root.mkdir(parents=True, exist_ok=True)
    image_id = 0
    for split, per_class in INAT_SIZES.items():
        images, annotations, files = [], [], {}
        for k, (folder, _, _) in enumerate(INAT_SPECIES):
            for i in range(per_class):
                name = f"{split}/{folder}/{k:04x}{i:04x}-6b1e-4f8a-9c1d-000000000000.jpg"
                width, height = 40 + 7 * i, 30 + 5 * k  # non-square, varied, longest side ≤ 500
                files[name] = corrupt_jpeg() if corrupt and split == "train_mini" and k == i == 1 \
                    else encode(class_color(k), width, height)
                images.append({"id": image_id, "width": width, "height": height, "file_name": name,
                               "license": 0, "rights_holder": "x", "date": "2020-01-01",
                               "latitude": None, "longitude": None, "location_uncertainty": None})
                annotations.append({"id": image_id, "image_id": image_id, "category_id": k})
                image_id += 1
        categories = [{"id": k, "name": name, "common_name": name, "supercategory": sup,
                       "kingdom": folder.split("_")[1], "phylum": folder.split("_")[2],
                       "class": folder.split("_")[3], "order": folder.split("_")[4],
                       "family": folder.split("_")[5], "genus": folder.split("_")[6],
                       "specific_epithet": folder.split("_")[7], "image_dir_name": folder}
                      for k, (folder, name, sup) in enumerate(INAT_SPECIES)]
        # Shuffle the category list: class index must come from `id`, not list position.
        coco = {"info": {}, "licenses": [], "images": images, "annotations": annotations,
                "categories": categories[::-1]}
        _tar(root / f"{split}.tar.gz", files)
        _tar(root / f"{split}.json.tar.gz", {f"{split}.json": json.dumps(coco).encode()})


# --- CelebA --------------------------------------------------------------------------------

CELEBA_PARTITION = [0] * 6 + [1] * 2 + [2] * 3  # image k+1 → 0 train, 1 val, 2 test


def build_celeba(root: Path, corrupt: bool = False) -> None:
    """img_align_celeba.zip (`img_align_celeba/000001.jpg`, 178×218 like the aligned set)
    and list_eval_partition.txt; one unlisted extra image must be ignored."""
    root.mkdir(parents=True, exist_ok=True)
    files = {f"img_align_celeba/{k + 1:06d}.jpg": encode(class_color(code), 178, 218)
             for k, code in enumerate(CELEBA_PARTITION)}
    if corrupt:
        files["img_align_celeba/000002.jpg"] = corrupt_jpeg()
    _zip(root / "img_align_celeba.zip", files)
    (root / "list_eval_partition.txt").write_text(
        "".join(f"{k + 1:06d}.jpg {code}\n" for k, code in enumerate(CELEBA_PARTITION)))


# --- AFHQv2 --------------------------------------------------------------------------------

AFHQ_COUNTS = {"train": {"cat": 3, "dog": 2, "wild": 4}, "test": {"cat": 1, "dog": 1, "wild": 2}}


def build_afhq(root: Path, top: str = "") -> None:
    """afhq_v2.zip with `train|test/{cat,dog,wild}/pixabay_<kind>_NNNNNN.png`, optionally under
    a top folder (whether the real zip has one is not published). cat/dog/wild → colours 0/1/2."""
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, counts in AFHQ_COUNTS.items():
        for k, (kind, n) in enumerate(counts.items()):
            for i in range(n):
                files[f"{top}{split}/{kind}/pixabay_{kind}_{i:06d}.png"] = \
                    encode(class_color(k), 48, 48, "PNG")
    _zip(root / "afhq_v2.zip", files)


# --- ImageNet ------------------------------------------------------------------------------

IMAGENET_WNIDS = ["n01440764", "n01443537", "n01484850"]  # sorted: class index = position
IMAGENET_TRAIN, IMAGENET_VAL = 3, 2  # images per class
# Devkit ILSVRC2012_IDs deliberately differ from sorted positions: labels must go via wnids.
IMAGENET_ILSVRC_ID = {"n01443537": 1, "n01484850": 2, "n01440764": 3}


def _imagenet_images():
    train = {w: {f"{w}_{i:05d}.JPEG": encode(class_color(k), 50, 40 + 10 * i)
                 for i in range(IMAGENET_TRAIN)} for k, w in enumerate(IMAGENET_WNIDS)}
    val = [(f"ILSVRC2012_val_{n + 1:08d}.JPEG", IMAGENET_WNIDS[(n * 2) % 3])
           for n in range(IMAGENET_VAL * len(IMAGENET_WNIDS))]
    return train, val


def build_imagenet_tree(root: Path) -> None:
    """The unpacked ImageFolder layout: train/nXXXXXXXX/*.JPEG and val/nXXXXXXXX/*.JPEG."""
    train, val = _imagenet_images()
    for wnid, files in train.items():
        for name, data in files.items():
            (root / "train" / wnid).mkdir(parents=True, exist_ok=True)
            (root / "train" / wnid / name).write_bytes(data)
    for name, wnid in val:
        (root / "val" / wnid).mkdir(parents=True, exist_ok=True)
        color = class_color(IMAGENET_WNIDS.index(wnid))
        (root / "val" / wnid / name).write_bytes(encode(color, 60, 45))


def build_imagenet_archives(root: Path) -> None:
    """The official archives: ILSVRC2012_img_train.tar of per-class tars, a flat
    ILSVRC2012_img_val.tar, and the devkit's ground truth (ILSVRC2012_IDs) + meta.mat."""
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    train, val = _imagenet_images()
    _tar(root / "ILSVRC2012_img_train.tar",
         {f"{w}.tar": _tar_bytes(files) for w, files in train.items()}, mode="w")
    _tar(root / "ILSVRC2012_img_val.tar",
         {name: encode(class_color(IMAGENET_WNIDS.index(w)), 60, 45) for name, w in val}, mode="w")
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children",
              "wordnet_height", "num_train_images"]
    synsets = np.zeros((len(IMAGENET_ILSVRC_ID) + 1, 1), dtype=[(f, object) for f in fields])
    rows = sorted(IMAGENET_ILSVRC_ID.items(), key=lambda kv: kv[1])
    rows.append(("n00001740", 4))  # a non-leaf synset, as meta.mat also lists them
    for r, (wnid, sid) in enumerate(rows):
        synsets[r, 0] = (sid, wnid, wnid, "", 0 if r < 3 else 1, np.zeros(0), 0, IMAGENET_TRAIN)
    mat = io.BytesIO()
    savemat(mat, {"synsets": synsets})
    truth = "".join(f"{IMAGENET_ILSVRC_ID[w]}\n" for _, w in val)
    _tar(root / "ILSVRC2012_devkit_t12.tar.gz",
         {"ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt": truth.encode(),
          "ILSVRC2012_devkit_t12/data/meta.mat": mat.getvalue()})


def imagenet_expected_val() -> list[int]:
    """Class index of each val image in file-name order."""
    return [IMAGENET_WNIDS.index(w) for _, w in _imagenet_images()[1]]


# --- VegFru --------------------------------------------------------------------------------

VEGFRU_CLASSES = [  # (top folder, class folder, sup-class), label = position
    ("veg200_images", "Chinese_artichoke", 0),
    ("veg200_images", "bitter_gourd", 1),
    ("veg200_images", "cabbage", 1),
    ("fru92_images", "lychee", 2),
    ("fru92_images", "mango", 2),
]
VEGFRU_SPLITS = {"train": 3, "val": 1, "test": 2}  # images per class


def build_vegfru(root: Path, with_sup_lists: bool) -> None:
    """veg200_images/<class>/*.jpg, fru92_images/<class>/*.jpg and vegfru_list/ with
    `<relpath> <label>` lines (optionally the supvegfru_* sup-class lists)."""
    lists = root / "vegfru_list"
    lists.mkdir(parents=True, exist_ok=True)
    for split, n in VEGFRU_SPLITS.items():
        lines, sup_lines = [], []
        for label, (top, cls, sup) in enumerate(VEGFRU_CLASSES):
            for i in range(n):
                rel = f"{top}/{cls}/{top[0]}_{label:02d}_{split}_{i:04d}.jpg"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(encode(class_color(label), 64, 48))
                lines.append(f"{rel} {label}\n")
                sup_lines.append(f"{rel} {sup}\n")
        (lists / f"vegfru_{split}.txt").write_text("".join(lines))
        if with_sup_lists:
            (lists / f"supvegfru_{split}.txt").write_text("".join(sup_lines))


# --- A local HTTP server -------------------------------------------------------------------


@dataclass
class ServerState:
    files: dict[str, bytes]
    cut_after: int | None = None   # first response stops after this many body bytes
    ignore_range: bool = False     # answer 200 with the whole file even to a Range request
    requests: list = field(default_factory=list)  # (path, Range header or None)


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        state: ServerState = self.server.state
        body = state.files.get(self.path)
        state.requests.append((self.path, self.headers.get("Range")))
        if body is None:
            self.send_error(404)
            return
        start, status = 0, 200
        rng = self.headers.get("Range")
        if rng and not state.ignore_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_error(416)
                return
            status = 206
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if state.cut_after is not None:
            payload, state.cut_after = payload[:state.cut_after], None
            self.close_connection = True
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(files: dict[str, bytes], **behaviour):
    """Serve `files` ({"/path": bytes}) on 127.0.0.1; yields (base URL, state). The server
    shuts itself down after 120 s even if a test hangs."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.state = ServerState(files, **behaviour)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    deadline = threading.Timer(120, server.shutdown)
    deadline.daemon = True
    deadline.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.state
    finally:
        deadline.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# --- CelebA, unpacked ----------------------------------------------------------------------


def build_celeba_tree(root: Path) -> None:
    """The unpacked layout the download stage leaves: `img_align_celeba/NNNNNN.jpg` (178×218)
    next to list_eval_partition.txt; partition p → colour p."""
    (root / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    for k, code in enumerate(CELEBA_PARTITION):
        (root / "img_align_celeba" / f"{k + 1:06d}.jpg").write_bytes(encode(class_color(code), 178, 218))
    (root / "list_eval_partition.txt").write_text(
        "".join(f"{k + 1:06d}.jpg {code}\n" for k, code in enumerate(CELEBA_PARTITION)))
