"""The embedded default data set: deterministic, fine-grained, varied, with disjoint base classes."""

import numpy as np
import pytest

from diffrepro.data import synthetic
from diffrepro.data import shards
from diffrepro.stages.prepare import prepare_synthetic

CFG = {"num_super": 8, "base_per_family": 2, "images_per_class": 3, "heldout_per_class": 2,
       "base_images_per_class": 2}


def test_class_structure_is_fine_grained():
    table = synthetic.class_table(8, 2)
    assert len(table["super_classes"]) == 8 and len(table["classes"]) == 64
    supers = [c["super"] for c in table["classes"]]
    assert all(supers.count(s) == 8 for s in range(8))
    # within a superclass, fine classes differ only in hue, 45° apart
    hues = sorted(c["hue"] for c in table["classes"] if c["super"] == 3)
    assert np.allclose(np.diff(hues), 45.0)
    # base classes are disjoint from the fine classes (different hues, different names)
    fine = {(c["super"], c["hue"]) for c in table["classes"]}
    assert not fine & {(c["super"], c["hue"]) for c in table["base_classes"]}
    assert not {c["name"] for c in table["classes"]} & {c["name"] for c in table["base_classes"]}


@pytest.mark.parametrize("size", [16, 32])
def test_same_seed_same_bytes_and_other_seed_other_bytes(size, tmp_path):
    prepare_synthetic(7, size, CFG, tmp_path / "a")
    prepare_synthetic(7, size, CFG, tmp_path / "b")
    prepare_synthetic(8, size, CFG, tmp_path / "c")
    for split in ("train", "heldout", "base"):
        a = (tmp_path / "a" / split / "shard-00000.images.npy").read_bytes()
        assert a == (tmp_path / "b" / split / "shard-00000.images.npy").read_bytes()
        assert a != (tmp_path / "c" / split / "shard-00000.images.npy").read_bytes()
    train = shards.read_split(tmp_path / "a" / "train")
    assert train["images"].shape == (64 * 3, size, size, 3) and train["images"].dtype == np.uint8
    assert len(shards.read_split(tmp_path / "a" / "heldout")["labels"]) == 64 * 2
    assert len(shards.read_split(tmp_path / "a" / "base")["labels"]) == 16 * 2
    assert shards.read_classes(tmp_path / "a")["image_size"] == size


def test_images_vary_within_a_class_and_show_the_class_hue():
    table = synthetic.class_table(8, 2)
    images, labels, _ = synthetic.generate_split(table["classes"], table["super_classes"], 6, 32, 0, "train")
    one_class = images[labels == 10].astype(float)
    assert np.abs(one_class[0] - one_class[1]).mean() > 10  # pose, background and noise differ
    # the object's hue, measured independently from pixels, is the class hue (± a few degrees)
    target = np.asarray([table["classes"][y]["hue"] for y in labels])
    err = synthetic.hue_error(synthetic.object_hue(images), target)
    assert np.median(err) < 8.0
    # ... and is far from the neighbouring fine class's hue (45° away): a subtle but real difference
    assert np.median(synthetic.hue_error(synthetic.object_hue(images), target + 45)) > 30


def test_hsv_conversion_matches_colorsys():
    import colorsys

    rng = np.random.default_rng(0)
    h, s, v = rng.uniform(0, 360, 50), rng.uniform(0, 1, 50), rng.uniform(0, 1, 50)
    ours = synthetic.hsv_to_rgb(h, s, v)
    ref = np.asarray([colorsys.hsv_to_rgb(a / 360, b, c) for a, b, c in zip(h, s, v)])
    assert np.allclose(ours, ref, atol=1e-9)
