"""Each real data set's recipe on a tiny copy in its published layout: classes, superclasses,
split sizes, image sizes, labels that stay with their images; corrupt files; unsafe archives."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile

import numpy as np
import pytest
from fixtures_real import (AFHQ_COUNTS, CELEBA_PARTITION, IMAGENET_TRAIN, IMAGENET_VAL,
                           IMAGENET_WNIDS, INAT_SIZES, INAT_SPECIES, VEGFRU_CLASSES, VEGFRU_SPLITS,
                           build_afhq, build_celeba, build_imagenet_archives, build_imagenet_tree,
                           build_inat, build_vegfru, class_color, encode)
from PIL import Image

from diffrepro.data.real import _members, center_crop_adm, center_crop_edm, prepare_real
from diffrepro.data.shards import read_classes, read_split
from diffrepro.errors import UserError

RED, GREEN = (255, 0, 0), (0, 255, 0)


def _striped(width, height, stripe, horizontal):
    """Green image with red bands of `stripe` px on both ends of the long side."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:] = GREEN
    if horizontal:
        arr[:, :stripe] = arr[:, width - stripe:] = RED
    else:
        arr[:stripe] = arr[height - stripe:] = RED
    return Image.fromarray(arr)


def test_adm_crop_halves_resizes_and_keeps_exactly_the_centre():
    # 96×64 → BOX to 48×32 → 24×16 (stop: 16 < 32), bicubic ×1, centre crop drops 4 px per
    # side = exactly the 16 px red bands of the original. Any other geometry shows red.
    out = center_crop_adm(_striped(96, 64, 16, horizontal=True), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert (out == GREEN).all()
    # Bands 4 px wider reach into the crop at both edges: the crop is centred, not aligned.
    edge = center_crop_adm(_striped(96, 64, 20, horizontal=True), 16)
    assert edge[:, 0, 0].min() > 60 and edge[:, -1, 0].min() > 60


def test_edm_crop_is_the_central_square_of_a_celeba_image():
    # Aligned CelebA is 178×218: the square is rows 20..197, so 20-row bands vanish entirely.
    out = center_crop_edm(_striped(178, 218, 20, horizontal=False), 32)
    assert out.shape == (32, 32, 3)
    assert np.abs(out.astype(int) - GREEN).max() <= 1
    shifted = center_crop_edm(_striped(178, 218, 24, horizontal=False), 32)
    assert shifted[0, :, 0].min() > 40 and shifted[-1, :, 0].min() > 40
    # Lanczos filters: a 1-px checkerboard halves to mid-grey (nearest would keep 0 / 255).
    checker = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    grey = center_crop_edm(Image.fromarray(np.stack([checker] * 3, -1)), 32)
    assert np.abs(grey.astype(int) - 127.5).max() < 8


def _check_images(split, classes, tol=10):
    """Every image is the flat colour of its class, and its superclass is its class's."""
    means = split["images"].reshape(len(split["images"]), -1, 3).mean(1)
    expected = np.array([class_color(label) for label in split["labels"]])
    assert np.abs(means - expected).max() < tol
    assert (split["super_labels"] == [classes[label]["super"] for label in split["labels"]]).all()


def test_inat2021_classes_are_category_ids_and_supercategories(tmp_path):
    build_inat(tmp_path / "raw")
    report = prepare_real("inat2021", tmp_path / "raw", tmp_path / "out", 16, workers=0)
    meta = read_classes(tmp_path / "out")
    assert meta["super_classes"] == ["Birds", "Fungi", "Plants"]
    assert meta["classes"] == [{"name": name, "super": meta["super_classes"].index(sup)}
                               for _, name, sup in INAT_SPECIES]
    sizes = {"train": INAT_SIZES["train_mini"], "val": INAT_SIZES["val"]}
    assert report["split_sizes"] == {s: n * len(INAT_SPECIES) for s, n in sizes.items()}
    for split, per_class in sizes.items():
        data = read_split(tmp_path / "out" / split)
        assert data["images"].shape == (per_class * 3, 16, 16, 3)
        assert np.bincount(data["labels"]).tolist() == [per_class] * 3
        _check_images(data, meta["classes"])


def test_corrupt_image_is_named_or_skipped_and_counted(tmp_path):
    build_inat(tmp_path / "raw", corrupt=True)
    with pytest.raises(UserError) as err:
        prepare_real("inat2021", tmp_path / "raw", tmp_path / "out", 16, workers=0)
    bad = f"train_mini.tar.gz:train_mini/{INAT_SPECIES[1][0]}/00010001-"
    assert bad in str(err.value) and "skip_corrupt" in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing that looks finished
    report = prepare_real("inat2021", tmp_path / "raw", tmp_path / "out", 16,
                          skip_corrupt=True, workers=0)
    assert report["skipped_corrupt"] == 1 and bad in report["skipped_files"][0]
    assert json.loads((tmp_path / "out" / "prepare_report.json").read_text()) == report
    train = read_split(tmp_path / "out" / "train")
    assert np.bincount(train["labels"]).tolist() == [4, 3, 4]


def test_celeba64_splits_follow_the_partition_list(tmp_path):
    build_celeba(tmp_path / "raw")
    report = prepare_real("celeba64", tmp_path / "raw", tmp_path / "out", 32, workers=0)
    assert report["split_sizes"] == {"train": 6, "val": 2, "test": 3}
    for split, code in (("train", 0), ("val", 1), ("test", 2)):
        data = read_split(tmp_path / "out" / split)
        assert data["images"].shape == (CELEBA_PARTITION.count(code), 32, 32, 3)
        assert (data["labels"] == 0).all()
        # fixture colours encode the partition: a wrong split assignment shows up here
        assert np.abs(data["images"].reshape(-1, 3).mean(0) - class_color(code)).max() < 10
    assert read_classes(tmp_path / "out")["classes"] == [{"name": "face", "super": 0}]


def test_celeba_corrupt_jpeg_is_named(tmp_path):
    build_celeba(tmp_path / "raw", corrupt=True)
    with pytest.raises(UserError, match=r"img_align_celeba\.zip:img_align_celeba/000002\.jpg"):
        prepare_real("celeba64", tmp_path / "raw", tmp_path / "out", 32, workers=0)


def test_afhqv2_64_three_classes_and_wild_only_variant(tmp_path):
    build_afhq(tmp_path / "raw")
    prepare_real("afhqv2_64", tmp_path / "raw", tmp_path / "out", 16, workers=0)
    meta = read_classes(tmp_path / "out")
    assert [c["name"] for c in meta["classes"]] == ["cat", "dog", "wild"]
    for split, counts in AFHQ_COUNTS.items():
        data = read_split(tmp_path / "out" / split)
        assert data["images"].shape[1:] == (16, 16, 3)
        assert np.bincount(data["labels"]).tolist() == list(counts.values())
        _check_images(data, meta["classes"])

    build_afhq(tmp_path / "raw_top", top="afhq_v2/")  # the zip may have a top folder
    prepare_real("afhqv2wild_64", tmp_path / "raw_top", tmp_path / "wild", 32, workers=0)
    assert read_classes(tmp_path / "wild")["classes"] == [{"name": "wild", "super": 0}]
    for split, counts in AFHQ_COUNTS.items():
        data = read_split(tmp_path / "wild" / split)
        assert data["images"].shape == (counts["wild"], 32, 32, 3)
        assert np.abs(data["images"].reshape(-1, 3).mean(0) - class_color(2)).max() < 10


def test_output_does_not_depend_on_the_number_of_workers(tmp_path):
    build_afhq(tmp_path / "raw")
    prepare_real("afhqv2_64", tmp_path / "raw", tmp_path / "one", 16, workers=0)
    prepare_real("afhqv2_64", tmp_path / "raw", tmp_path / "two", 16, workers=2)
    for split in AFHQ_COUNTS:
        a, b = read_split(tmp_path / "one" / split), read_split(tmp_path / "two" / split)
        assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("layout", ["folders", "official_archives"])
def test_imagenet_sorted_wnids_and_val_labels(tmp_path, layout):
    (build_imagenet_tree if layout == "folders" else build_imagenet_archives)(tmp_path / "raw")
    report = prepare_real("imagenet", tmp_path / "raw", tmp_path / "out", 16, workers=0)
    meta = read_classes(tmp_path / "out")
    assert meta["classes"] == [{"name": w, "super": 0} for w in IMAGENET_WNIDS]
    assert meta["super_classes"] == ["all"]
    assert report["split_sizes"] == {"train": IMAGENET_TRAIN * 3, "val": IMAGENET_VAL * 3}
    for split in ("train", "val"):
        data = read_split(tmp_path / "out" / split)
        assert data["images"].shape[1:] == (16, 16, 3)
        _check_images(data, meta["classes"])
    if layout == "official_archives":  # devkit ILSVRC2012_IDs ≠ sorted positions, mapped via wnid
        from fixtures_real import imagenet_expected_val
        assert read_split(tmp_path / "out" / "val")["labels"].tolist() == imagenet_expected_val()


@pytest.mark.parametrize("with_sup_lists", [True, False])
def test_vegfru_superclasses(tmp_path, with_sup_lists):
    build_vegfru(tmp_path / "raw", with_sup_lists)
    report = prepare_real("vegfru", tmp_path / "raw", tmp_path / "out", 32, workers=0)
    meta = read_classes(tmp_path / "out")
    assert [c["name"] for c in meta["classes"]] == [cls for _, cls, _ in VEGFRU_CLASSES]
    if with_sup_lists:
        assert [c["super"] for c in meta["classes"]] == [sup for _, _, sup in VEGFRU_CLASSES]
        assert len(meta["super_classes"]) == 3
    else:
        assert meta["super_classes"] == ["vegetable", "fruit"]
        assert [c["super"] for c in meta["classes"]] == [int(top == "fru92_images")
                                                         for top, _, _ in VEGFRU_CLASSES]
    assert report["split_sizes"] == {s: n * len(VEGFRU_CLASSES) for s, n in VEGFRU_SPLITS.items()}
    data = read_split(tmp_path / "out" / "train")
    assert data["images"].shape == (3 * len(VEGFRU_CLASSES), 32, 32, 3)
    _check_images(data, meta["classes"])


def _evil_zip(path, name):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("train/cat/ok.png", encode(class_color(0), 8, 8, "PNG"))
        zf.writestr(name, b"pwned")


def _evil_tar(path, name):
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo(name)
        info.size = 5
        tf.addfile(info, io.BytesIO(b"pwned"))


@pytest.mark.parametrize("make, name", [
    (_evil_zip, "../escaped.txt"), (_evil_zip, "/abs/escaped.txt"),
    (_evil_tar, "../escaped.txt"), (_evil_tar, "a/../../escaped.txt")])
def test_path_traversal_is_refused(tmp_path, make, name):
    archive = tmp_path / ("evil.zip" if make is _evil_zip else "evil.tar.gz")
    make(archive, name)
    with pytest.raises(UserError, match="outside the archive"):
        list(_members(archive, lambda n: True))


def test_links_in_a_tar_are_never_read(tmp_path):
    archive = tmp_path / "link.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        link = tarfile.TarInfo("a/link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
        real = tarfile.TarInfo("a/real.png")
        real.size = 4
        tf.addfile(real, io.BytesIO(b"real"))
    assert list(_members(archive, lambda n: True)) == [("a/real.png", b"real")]


def test_prepare_refuses_an_archive_with_a_traversal_member(tmp_path):
    (tmp_path / "raw").mkdir()
    _evil_zip(tmp_path / "raw" / "afhq_v2.zip", "../../train/cat/x.png")
    with pytest.raises(UserError, match="outside the archive"):
        prepare_real("afhqv2_64", tmp_path / "raw", tmp_path / "out", 16, workers=0)


@pytest.mark.parametrize("kind", ["zip", "tar.gz", "tar", "folder"])
def test_members_reads_every_accepted_file_of_an_archive_or_folder(tmp_path, kind):
    files = {"./a/b.txt": b"bee", "c.bin": bytes(range(256)), "a/skip.txt": b"no"}
    source = tmp_path / ("root" if kind == "folder" else f"ok.{kind}")
    if kind == "zip":
        with zipfile.ZipFile(source, "w") as zf:
            for name, data in files.items():
                zf.writestr(name, data)
    elif kind == "folder":
        for name, data in files.items():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes(data)
    else:
        with tarfile.open(source, "w:gz" if kind == "tar.gz" else "w") as tf:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    members = dict(_members(source, lambda n: not n.endswith("skip.txt")))
    prefix = "root/" if kind == "folder" else ""  # a folder's paths start at its own name
    assert members == {f"{prefix}a/b.txt": b"bee", f"{prefix}c.bin": bytes(range(256))}


def test_unknown_dataset_is_one_line_listing_the_known_ones(tmp_path):
    with pytest.raises(UserError) as err:
        prepare_real("inat2018", tmp_path, tmp_path / "out", 16)
    message = str(err.value)
    assert "\n" not in message and "'inat2018'" in message
    for name in ("inat2021", "vegfru", "imagenet", "celeba64", "afhqv2_64", "afhqv2wild_64"):
        assert name in message
