"""Reading shards with webdataset: contract, integrity checks, rank/worker splitting, repeat."""

from __future__ import annotations

import hashlib
import itertools
import shutil

import pandas as pd
import pytest
import torch

from components.common.errors import ShardError
from components.data.reader import ShardDataset, make_loader, read_index, verify_shards


def image_sha(image: torch.Tensor) -> str:
    """Undo the [-1, 1] scaling and hash the pixels exactly as the manifest does (H, W, C uint8)."""
    pixels = ((image + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    return hashlib.sha256(pixels.numpy().tobytes()).hexdigest()


def expected(tiny_data, split: str) -> list[tuple[str, int]]:
    """The split's (image sha256, label) pairs, as the validated manifest has them."""
    manifest = pd.read_csv(tiny_data / "validated" / "manifest.csv")
    rows = manifest.loc[manifest["split"] == split]
    assert rows["sha256"].is_unique  # a pair is then one image's: a label swapped between images shows
    return sorted(zip(rows["sha256"], rows["label"].astype(int)))


def pairs(samples) -> list[tuple[str, int]]:
    return [(image_sha(x), int(y)) for x, y in samples]


def test_dataset_yields_scaled_tensors_and_int_labels(tiny_data):
    image, label = next(iter(ShardDataset(tiny_data / "shards", "train", shuffle_buffer=10)))
    assert image.dtype == torch.float32 and image.shape == (1, 28, 28)
    assert image.min() >= -1 and image.max() <= 1 and image.min() < 0 < image.max()
    assert isinstance(label, int) and 0 <= label < 10


def test_one_pass_yields_every_image_once(tiny_data):
    seen = pairs(ShardDataset(tiny_data / "shards", "train"))
    assert sorted(seen) == expected(tiny_data, "train")  # every image once, each with its own label


def test_ranks_get_disjoint_complete_parts(tiny_data):
    parts = [
        pairs(ShardDataset(tiny_data / "shards", "train", rank=r, world_size=2, seed=1))
        for r in range(2)
    ]
    assert parts[0] and parts[1] and not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == expected(tiny_data, "train")


@pytest.mark.parametrize("split", ["train", "val"])  # val has one shard: readers split it by sample
def test_loader_workers_cover_split_exactly_once(tiny_data, split):
    assert len(read_index(tiny_data / "shards")["splits"]["val"]["shards"]) == 1
    loader = make_loader(tiny_data / "shards", split, batch_size=16, num_workers=2, world_size=2, rank=1)
    other = make_loader(tiny_data / "shards", split, batch_size=16, num_workers=2, world_size=2, rank=0)
    seen = [(image_sha(x), int(y)) for images, labels in itertools.chain(loader, other)
            for x, y in zip(images, labels)]
    assert sorted(seen) == expected(tiny_data, split)


def test_repeat_cycles_with_new_order(tiny_data):
    dataset = ShardDataset(tiny_data / "shards", "val", repeat=True, shuffle_buffer=50)
    n = dataset.num_samples
    first_two = pairs(itertools.islice(dataset, 2 * n))
    assert sorted(first_two[:n]) == sorted(first_two[n:]) == expected(tiny_data, "val")
    assert first_two[:n] != first_two[n:]


@pytest.mark.parametrize("damage", ["truncate", "tamper", "delete"])
def test_damaged_shard_is_named(tiny_data, tmp_path, damage):
    shards = shutil.copytree(tiny_data / "shards", tmp_path / "shards")
    tar = shards / "train" / "train-000001.tar"
    if damage == "truncate":
        tar.write_bytes(tar.read_bytes()[:5000])
    elif damage == "tamper":
        data = bytearray(tar.read_bytes())
        data[3000] ^= 0xFF
        tar.write_bytes(bytes(data))
    else:
        tar.unlink()
    expected_message = "is missing" if damage == "delete" else "sha256 mismatch"
    with pytest.raises(ShardError, match=f"{tar}: .*{expected_message}"):
        verify_shards(shards)
    with pytest.raises(ShardError, match=str(tar)):
        ShardDataset(shards, "train")
    verify_shards(shards, "val")  # the other split is untouched


def test_unknown_split_and_bad_rank(tiny_data):
    with pytest.raises(ShardError, match="no split 'test'; allowed: train, val"):
        ShardDataset(tiny_data / "shards", "test")
    with pytest.raises(ShardError, match="rank 2 is outside world_size 2"):
        ShardDataset(tiny_data / "shards", "train", rank=2, world_size=2)
