"""Read the shards written by `tim shard` (images) or `tim encode` (images or VAE latents): index, integrity check,
and a torch IterableDataset.

How readers split the data: every (rank, DataLoader worker) pair is one reader; there are
``world_size * num_workers`` of them. All readers agree on a per-epoch shard order (seeded).
- If a split has at least as many shards as readers, reader i takes shards i, i+n, i+2n, ...
  (whole shards; counts can differ by one shard between readers, no sample is lost or repeated).
- Otherwise (few shards, e.g. a tiny validation split) every reader streams all shards and keeps
  samples i, i+n, i+2n, ... - slower to read, but still every sample exactly once per epoch.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from components.common.errors import ShardError
from components.common.files import file_sha256


def read_index(shard_dir: str | Path) -> dict[str, Any]:
    path = Path(shard_dir) / "index.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardError(f"{path}: not found; run `tim shard` (or `dvc pull`) first") from None
    except json.JSONDecodeError as exc:
        raise ShardError(f"{path}: not valid JSON: {exc}") from None


def data_version(shard_dir: str | Path) -> str:
    """sha256 of the shard index, which lists every shard's own sha256: a content hash of the data."""
    return hashlib.sha256((Path(shard_dir) / "index.json").read_bytes()).hexdigest()


def _split_entry(index: dict[str, Any], split: str, shard_dir: str | Path) -> dict[str, Any]:
    if split not in index["splits"]:
        raise ShardError(f"{Path(shard_dir) / 'index.json'}: no split {split!r}; allowed: {', '.join(index['splits'])}")
    return index["splits"][split]


def verify_shards(shard_dir: str | Path, split: str | None = None) -> None:
    """Raise ShardError naming the first tar that is missing or whose sha256 differs from index.json."""
    index = read_index(shard_dir)
    for name in [split] if split else list(index["splits"]):
        for shard in _split_entry(index, name, shard_dir)["shards"]:
            path = Path(shard_dir) / shard["name"]
            if not path.is_file():
                raise ShardError(f"{path}: shard listed in index.json is missing")
            actual = file_sha256(path)
            if actual != shard["sha256"]:
                raise ShardError(
                    f"{path}: sha256 mismatch (index {shard['sha256'][:12]}..., file {actual[:12]}...): "
                    "truncated or modified; rebuild with `dvc repro shard` or restore with `dvc pull`"
                )


def sample_shape(index: dict[str, Any]) -> tuple[int, int, int]:
    """(C, H, W) of the samples: the latents' of an encoded index, else the images'."""
    entry = index.get("latent") or index["image"]
    return entry["channels"], entry["height"], entry["width"]


def decode_sample(sample: dict[str, Any]) -> tuple[torch.Tensor, int]:
    """A latent (``npy``: float32 [C, h, w], stored as the model sees it) or a PNG image mapped to [-1, 1]."""
    if "npy" in sample:
        return torch.from_numpy(np.load(io.BytesIO(sample["npy"]), allow_pickle=False)), int(sample["cls"])
    array = np.asarray(Image.open(io.BytesIO(sample["png"])), dtype=np.uint8)
    array = array if array.ndim == 3 else array[:, :, None]
    image = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
    return image, int(sample["cls"])


class ShardDataset(IterableDataset):
    """Yields ``(sample float32 [C,H,W], label int)`` from one split's shards: an image in [-1, 1] or a latent.

    ``repeat=True`` cycles forever (step-based training), reshuffling shard order every pass;
    otherwise one pass per iteration, and ``set_epoch`` changes the shuffle between epochs.
    """

    def __init__(
        self,
        shard_dir: str | Path,
        split: str,
        *,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        verify: bool = True,
        repeat: bool = False,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ShardError(f"rank {rank} is outside world_size {world_size}")
        self.shard_dir = Path(shard_dir)
        index = read_index(shard_dir)
        entry = _split_entry(index, split, shard_dir)
        if verify:
            verify_shards(shard_dir, split)
        self.urls = [str(self.shard_dir / s["name"]) for s in entry["shards"]]
        self.num_samples: int = entry["count"]
        self.sample_shape = sample_shape(index)
        self.classes: list[str] = index["classes"]
        self.split, self.shuffle_buffer, self.seed = split, shuffle_buffer, seed
        self.rank, self.world_size, self.repeat = rank, world_size, repeat
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _reader(self) -> tuple[int, int]:
        """(this reader's index, number of readers) over ranks x DataLoader workers."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    def _one_pass(self, epoch: int, reader: int, readers: int) -> Iterator[tuple[torch.Tensor, int]]:
        import webdataset as wds

        if not self.urls:
            return iter(())
        urls = list(self.urls)
        if self.shuffle_buffer > 0:
            random.Random(f"{self.seed}:{epoch}").shuffle(urls)  # same order on every reader
        stages: list[Any] = []
        if len(urls) >= readers:
            stages += [wds.SimpleShardList(urls[reader::readers]), wds.tarfile_to_samples()]
        else:
            stages += [wds.SimpleShardList(urls), wds.tarfile_to_samples()]
            stages.append(lambda samples: itertools.islice(samples, reader, None, readers))
        if self.shuffle_buffer > 1:
            rng = random.Random(f"{self.seed}:{epoch}:{reader}")
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng))
        stages.append(wds.map(decode_sample))
        return iter(wds.DataPipeline(*stages))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        reader, readers = self._reader()
        for epoch in itertools.count(self.epoch):
            yield from self._one_pass(epoch, reader, readers)
            if not self.repeat:
                return


def make_loader(
    shard_dir: str | Path,
    split: str,
    batch_size: int,
    *,
    num_workers: int = 0,
    drop_last: bool = False,
    **dataset_kwargs: Any,
) -> DataLoader:
    """DataLoader over ShardDataset; dataset_kwargs go to ShardDataset (shuffle_buffer, seed, rank, ...)."""
    dataset = ShardDataset(shard_dir, split, **dataset_kwargs)
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, drop_last=drop_last)


def load_split(shard_dir: str | Path, split: str) -> tuple[Tensor, Tensor]:
    """A whole split in memory, in shard order: images [N, C, H, W] in [-1, 1] and labels [N]."""
    dataset = ShardDataset(shard_dir, split, shuffle_buffer=0)
    images, labels = zip(*tqdm(dataset, total=dataset.num_samples, desc=f"read {split}", leave=False))
    return torch.stack(images), torch.tensor(labels)
