"""Fetch the real data sets' files: resumable HTTP downloads that count only once verified.

A download grows in `<name>.part` and resumes with an HTTP Range request after a dropped
connection or a killed run. The file takes its final name only after its published checksum
matched; where the owners publish none, its sha256 is computed and written beside it as
`<name>.sha256`, so later runs can still tell a damaged copy. Files with no direct HTTP source
(ImageNet, VegFru, CelebA, AFHQv2) are placed by hand; this module says which and where, and
verifies what is there.

Every URL, checksum and size below is copied from `docs/data_and_weights.md`.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from diffrepro.atomic import atomic_path
from diffrepro.errors import UserError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
USER_AGENT = "diffrepro-download/1"


@dataclass(frozen=True)
class RealFile:
    """One published file of a data set, as its owners describe it."""

    name: str                   # file under the data set's raw dir; a trailing "/" means a folder
    url: str | None             # None: no direct HTTP source, the user places it by hand
    md5: str | None = None      # None: UNKNOWN — not published
    sha256: str | None = None   # None: UNKNOWN — not published
    size: str | None = None     # as published, for disk planning; None: UNKNOWN
    how: str = ""               # where a hand-placed file comes from
    unpacked: str | None = None  # an unpacked folder that may stand in for the archive
    optional: bool = False      # needed only for some layouts (said in `how`)


_INAT = "https://ml-inat-competition-datasets.s3.amazonaws.com/2021/"
_IMAGENET_HOW = "image-net.org (login required; no public URL, torchvision refuses download=True)"
_CELEBA_HOW = ("Google Drive file id {} (e.g. `gdown {}`, not a dependency of this repo), "
               "see http://mmlab.ie.cuhk.edu.hk/projects/CelebA.html")
_VEGFRU_HOW = ("Baidu Pan http://pan.baidu.com/s/1boSNcV9 (ustc-vim/vegfru README); unpack it so "
               "that veg200_images/, fru92_images/ and vegfru_list/ sit directly in the raw dir")

REAL_FILES: dict[str, tuple[RealFile, ...]] = {
    "inat2021": (
        RealFile("train_mini.tar.gz", _INAT + "train_mini.tar.gz",
                 md5="db6ed8330e634445efc8fec83ae81442", size="42GB"),
        RealFile("train_mini.json.tar.gz", _INAT + "train_mini.json.tar.gz",
                 md5="395a35be3651d86dc3b0d365b8ea5f92", size="45MB"),
        RealFile("val.tar.gz", _INAT + "val.tar.gz",
                 md5="f6f6e0e242e3d4c9569ba56400938afc", size="8.4GB"),
        RealFile("val.json.tar.gz", _INAT + "val.json.tar.gz",
                 md5="4d761e0f6a86cc63e8f7afc91f6a8f0b", size="9.4MB"),
    ),
    "imagenet": (
        RealFile("ILSVRC2012_img_train.tar", None, md5="1d675b47d978889d74fa0da5fadfb00e",
                 how=_IMAGENET_HOW, unpacked="train/"),
        RealFile("ILSVRC2012_img_val.tar", None, md5="29b22e2961454d5413ddabcf34fc5622",
                 how=_IMAGENET_HOW, unpacked="val/"),
        RealFile("ILSVRC2012_devkit_t12.tar.gz", None, md5="fa75699e90414af021442c21a62c3abf",
                 how=_IMAGENET_HOW + "; needed only when val/ is flat (no wnid folders)",
                 unpacked="ILSVRC2012_devkit_t12/", optional=True),
    ),
    # VegFru: archive names, checksums and sizes UNKNOWN — not published; only the unpacked
    # layout (third-party code) is known, so that is what is checked.
    "vegfru": (
        RealFile("veg200_images/", None, how=_VEGFRU_HOW),
        RealFile("fru92_images/", None, how=_VEGFRU_HOW),
        RealFile("vegfru_list/", None, how=_VEGFRU_HOW),
    ),
    # CelebA lives on Google Drive (needs gdown): placed by hand, md5s from torchvision.
    "celeba": (
        RealFile("img_align_celeba.zip", None, md5="00d2c5bc6d35e252742224ab0c1e8fcb",
                 how=_CELEBA_HOW.format(*["0B7EVK8r0v71pZjFTYXZWM3FlRnM"] * 2),
                 unpacked="img_align_celeba/"),
        RealFile("list_eval_partition.txt", None, md5="d32c9cbf5e040fd4025c592c306e6668",
                 how=_CELEBA_HOW.format(*["0B7EVK8r0v71pY0NSMzRuSXJEVkk"] * 2)),
    ),
    # AFHQv2: a Dropbox page, not a file URL; checksum and size UNKNOWN — not published.
    "afhqv2": (
        RealFile("afhq_v2.zip", None,
                 how="https://www.dropbox.com/s/vkzjokiwof5h8w6/afhq_v2.zip?dl=0 "
                     "(clovaai/stargan-v2 download.sh), in a browser"),
    ),
}

# Prepared data set (params.yaml `data.dataset`) → the published files it is made from.
DATASET_SOURCES = {
    "inat2021": "inat2021",
    "vegfru": "vegfru",
    "imagenet": "imagenet",
    "celeba64": "celeba",
    "afhqv2_64": "afhqv2",
    "afhqv2wild_64": "afhqv2",
}


def download_dataset(dataset: str, raw_dir: str | os.PathLike, progress: bool = True) -> None:
    """Fetch every file of `dataset` into `raw_dir`, verified (hand-placed ones: check them)."""
    if dataset not in DATASET_SOURCES:
        raise UserError(f"unknown data set {dataset!r} (params.yaml `data.dataset`); known: "
                        f"{', '.join(DATASET_SOURCES)}, synthetic")
    raw_dir = Path(raw_dir)
    files = REAL_FILES[DATASET_SOURCES[dataset]]
    missing = [f for f in files
               if f.url is None and not f.optional and not _present(raw_dir, f)]
    if missing:
        wanted = "; ".join(
            f"{f.name}{f' (or its unpacked {f.unpacked})' if f.unpacked else ''} from {f.how}, "
            f"md5 {f.md5 or 'UNKNOWN — not published'}" for f in missing)
        raise UserError(f"{dataset} cannot be downloaded automatically: put these in {raw_dir}/ "
                        f"and run the download stage again: {wanted}")
    for f in files:
        if f.url is not None:
            download(f.url, raw_dir / f.name, md5=f.md5, sha256=f.sha256, progress=progress)
        elif not f.name.endswith("/") and (raw_dir / f.name).is_file():
            verify_file(raw_dir / f.name, md5=f.md5, sha256=f.sha256, how=f.how)


def _present(raw_dir: Path, f: RealFile) -> bool:
    here = (raw_dir / f.name).is_dir() if f.name.endswith("/") else (raw_dir / f.name).is_file()
    return here or (f.unpacked is not None and (raw_dir / f.unpacked).is_dir())


def download(url: str, dest: str | os.PathLike, md5: str | None = None,
             sha256: str | None = None, progress: bool = True, retries: int = 5,
             timeout: float = 60.0) -> Path:
    """Download `url` to `dest`, resuming `dest.part`; `dest` appears only once it is verified.

    A dropped connection is retried (resuming) up to `retries` times. A checksum mismatch deletes
    the download and raises. Without a published checksum the computed sha256 is recorded in
    `dest.sha256`, and a later call checks an existing `dest` against it.
    """
    dest = Path(dest)
    record = _record_path(dest)
    if dest.exists():
        expected = _expected(md5, sha256, record)
        if expected is None or _digest(dest, expected[0]) == expected[1]:
            return dest
        log.warning("%s no longer matches its %s; downloading it again", dest, expected[0])
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _fetch_into(url, part, progress, timeout)
            break
        except urllib.error.HTTPError as err:
            if err.code < 500:
                raise UserError(f"{dest}: {url} answered HTTP {err.code} {err.reason}; the file "
                                "has moved or needs a login — check the URL in data/download.py"
                                ) from None
            failure = err
        except (OSError, http.client.HTTPException) as err:
            failure = err
        if attempt == retries:
            raise UserError(f"{dest}: downloading {url} failed {retries + 1} times (last: "
                            f"{failure}); run again to resume from {part.name}") from None
        time.sleep(min(2.0**attempt - 1.0, 30.0))

    expected = _expected(md5, sha256, None)
    if expected is not None:
        algo, want = expected
        got = _digest(part, algo)
        if got != want:
            part.unlink()
            raise UserError(f"{dest}: {algo} mismatch (expected {want}, got {got}); the download "
                            f"from {url} was corrupt and is deleted — run again to re-download, "
                            "and if it fails again check the URL and published checksum")
    else:
        log.warning("%s: no checksum is published for this file; recording its sha256 in %s",
                    dest.name, record)
        _write_record(record, _digest(part, "sha256"), dest.name)
    os.replace(part, dest)
    return dest


def _fetch_into(url: str, part: Path, progress: bool, timeout: float) -> None:
    """Append the rest of `url` to `part` (or restart it if the server ignores Range)."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                          timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # `part` already holds the whole file; the checksum decides
            return
        raise
    with response:
        if offset and response.status == 206 \
                and _range_start(response.headers.get("Content-Range")) != offset:
            part.unlink()  # a range we did not ask for: start over on the next try
            raise OSError(f"{url} answered another byte range than {offset}-")
        if offset and response.status != 206:
            log.warning("%s: the server ignored the resume request; restarting from byte 0", url)
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        with open(part, "ab" if offset else "wb") as f, \
                tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                     desc=part.name.removesuffix(".part"), disable=not progress) as bar:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size < total:
        raise http.client.IncompleteRead(b"", total - size)


def _range_start(content_range: str | None) -> int | None:
    """First byte of a `Content-Range: bytes a-b/n` header."""
    if not content_range or not content_range.startswith("bytes "):
        return None
    return int(content_range[len("bytes "):].split("-", 1)[0])


def verify_file(path: str | os.PathLike, md5: str | None = None, sha256: str | None = None,
                how: str = "") -> None:
    """Check a hand-placed file against its published checksum (or its recorded sha256).

    The file is the user's, so a mismatch is reported, never deleted.
    """
    path = Path(path)
    record = _record_path(path)
    expected = _expected(md5, sha256, record)
    if expected is None:
        log.warning("%s: no checksum is published for this file; recording its sha256 in %s",
                    path.name, record)
        _write_record(record, _digest(path, "sha256"), path.name)
        return
    algo, want = expected
    got = _digest(path, algo)
    if got != want:
        raise UserError(f"{path}: {algo} mismatch (expected {want}, got {got}); it is damaged or "
                        f"a different version — replace it with a fresh copy"
                        f"{' from ' + how if how else ''}")


def _expected(md5: str | None, sha256: str | None, record: Path | None) -> tuple[str, str] | None:
    """(algorithm, hex digest) to check against: published sha256, published md5, or recorded."""
    if sha256:
        return "sha256", sha256.lower()
    if md5:
        return "md5", md5.lower()
    if record is not None and record.exists():
        return "sha256", record.read_text().split()[0]
    return None


def _digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _write_record(record: Path, digest: str, name: str) -> None:
    """`sha256sum`-compatible line, so `sha256sum -c` can check the file too."""
    with atomic_path(record) as tmp:
        tmp.write_text(f"{digest}  {name}\n")
