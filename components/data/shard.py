"""Stage `shard`: pack the validated images into webdataset tar shards per split, plus index.json.

Layout (the contract read by components/shards.py and the training code):
  <shard_dir>/index.json
  <shard_dir>/<split>/<split>-000000.tar ...      split in (train, val)
Each sample is ``<id>.png`` (the prepared PNG bytes) and ``<id>.cls`` (the integer label).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import Field
from tqdm import tqdm

from components.common.errors import DataError
from components.common.files import atomic_dir, file_sha256
from components.common.params import StageParams
from components.data.prepare import SPLITS, read_manifest

log = logging.getLogger(__name__)


class ShardParams(StageParams):
    shard_size: int = Field(1000, ge=1)  # samples per tar file
    seed: int = 0  # order of samples inside a split's shards


def checked_png(prepared_dir: Path, row: dict, shape: tuple[int, int, int]) -> bytes:
    """Read one prepared PNG and make sure it is still the image the validated manifest describes."""
    path = prepared_dir / row["path"]
    try:
        data = path.read_bytes()
        array = np.asarray(Image.open(io.BytesIO(data)), dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"{path}: cannot read image (id {row['id']}): {exc}") from None
    array = array if array.ndim == 3 else array[:, :, None]
    if array.shape != shape or hashlib.sha256(array.tobytes()).hexdigest() != row["sha256"]:
        raise DataError(f"{path}: differs from the validated manifest (id {row['id']}); re-run prepare and validate")
    return data


def write_tar(path: Path, samples: list[tuple[str, bytes, int]]) -> None:
    import webdataset as wds

    # A fixed mtime makes the same samples give byte-identical tars, so DVC hashes are reproducible.
    with wds.TarWriter(str(path), mtime=0) as sink:
        for key, png, label in samples:
            sink.write({"__key__": key, "png": png, "cls": label})


def shard(params: ShardParams, prepared_dir: str | Path, validated_dir: str | Path, out_dir: str | Path) -> Path:
    """Run the stage with already-validated params; returns the shard folder."""
    prepared_dir, validated_dir, out_dir = Path(prepared_dir), Path(validated_dir), Path(out_dir)
    manifest_path = validated_dir / "manifest.csv"
    if not manifest_path.is_file():
        raise DataError(f"{manifest_path}: not found; run `tim validate` first (it writes it only when data passes)")
    manifest = read_manifest(manifest_path)
    meta = json.loads((validated_dir / "dataset.json").read_text())
    image = meta["image"]
    shape = (image["height"], image["width"], image["channels"])
    rng = np.random.default_rng(params.seed)
    index: dict = {"splits": {}, "image": image, "num_classes": len(meta["classes"]), "classes": meta["classes"]}

    with atomic_dir(out_dir) as tmp:
        for split in SPLITS:
            rows = manifest[manifest["split"] == split].to_dict("records")
            rows = [rows[i] for i in rng.permutation(len(rows))]
            (tmp / split).mkdir()
            shards = []
            bar = tqdm(total=len(rows), desc=f"shard {split}", unit="img")
            for number, start in enumerate(range(0, len(rows), params.shard_size)):
                chunk = rows[start : start + params.shard_size]
                samples = [(r["id"], checked_png(prepared_dir, r, shape), int(r["label"])) for r in chunk]
                name = f"{split}/{split}-{number:06d}.tar"
                write_tar(tmp / name, samples)
                shards.append({"name": name, "count": len(chunk), "sha256": file_sha256(tmp / name)})
                bar.update(len(chunk))
            bar.close()
            index["splits"][split] = {"count": len(rows), "shards": shards}
        (tmp / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    log.info("shard: %s", {s: len(v["shards"]) for s, v in index["splits"].items()})
    return out_dir
