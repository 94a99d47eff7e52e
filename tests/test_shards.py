"""The prepared shard format: exact round trip, damage detected with one clear error."""

import numpy as np
import pytest

from diffrepro.data import shards
from diffrepro.errors import UserError


def _arrays(n=10, size=4):
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), np.arange(n), np.arange(n) % 3)


def test_round_trip_across_several_shards(tmp_path):
    images, labels, supers = _arrays(10)
    shards.write_split(tmp_path / "train", images, labels, supers, shard_size=4)
    assert sorted(p.name for p in (tmp_path / "train").glob("*.images.npy")) == [
        "shard-00000.images.npy", "shard-00001.images.npy", "shard-00002.images.npy"]
    back = shards.read_split(tmp_path / "train")
    assert np.array_equal(back["images"], images)
    assert np.array_equal(back["labels"], labels) and np.array_equal(back["super_labels"], supers)
    assert shards.read_index(tmp_path / "train")["num_records"] == 10


def test_truncated_shard_is_named_in_the_error(tmp_path):
    shards.write_split(tmp_path / "train", *_arrays(10), shard_size=4)
    shard = tmp_path / "train" / "shard-00001.images.npy"
    shard.write_bytes(shard.read_bytes()[:200])
    with pytest.raises(UserError, match="shard-00001.images.npy is truncated or corrupt"):
        shards.read_split(tmp_path / "train")


def test_empty_split_leaves_nothing_behind(tmp_path):
    with pytest.raises(UserError, match="empty data set"):
        with shards.ShardWriter(tmp_path / "train"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_split_under_its_final_name(tmp_path):
    with pytest.raises(RuntimeError):
        with shards.ShardWriter(tmp_path / "train", shard_size=2) as writer:
            writer.add_batch(images=_arrays(4)[0], labels=np.arange(4), super_labels=np.arange(4))
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
