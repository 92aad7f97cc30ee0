"""Stage `encode`: the data a model trains on, from the image shards: VAE latents, or the images themselves.

  tim encode --shards data/shards --out data/encoded [--profile ..] [--set ..]

With ``encode.vae`` set (a local diffusers AutoencoderKL folder, or a hub id with a pinned revision, loaded on
this machine), every image shard becomes a latent shard of the same name and sample order: ``<id>.npy`` (float32
[c, h, w], scaled and shifted as the model sees it) and ``<id>.cls``. The VAE itself is saved in ``<out>/vae/``,
and index.json records the latent shape, scale, shift and the VAE's identity (name, revision, sha256 of its
weights), which training copies into the run and the exported model. Without a VAE (the default for the bundled
digits) the image shards are linked as they are: the stage always runs, and `train` always reads its output.

Shards are encoded in-process, or by ``num_workers`` Ray actors (one VAE each, on a GPU when there is one): the
driver sends each actor a shard's bytes and writes what comes back, so workers need no shared file system, and
the output is byte-identical whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from tqdm import tqdm

from components.common.errors import DataError, ModelError
from components.common.files import atomic_dir, file_sha256
from components.common.params import StageParams
from components.data.reader import data_version, decode_sample, read_index, verify_shards
from tim_core.latent import LatentSpace  # imports diffusers only when a VAE is loaded

log = logging.getLogger(__name__)


class EncodeParams(StageParams):
    vae: str | None = None          # null: train on the images; else a local VAE folder or a hub id
    revision: str | None = None     # a hub id's commit (required for one, so that the latents can be reproduced)
    subfolder: str | None = None    # the VAE's folder inside the hub repository or local folder (e.g. "vae")
    scale: float | None = None      # null: the VAE config's scaling_factor
    shift: float | None = None      # null: the VAE config's shift_factor (0 when it has none)
    batch_size: int = Field(64, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: a GPU when there is one
    num_workers: int = Field(1, ge=1)  # > 1: data-parallel Ray actors, one VAE each
    cpus_per_worker: int = Field(1, ge=1)
    ray_address: str | None = None  # null: RAY_ADDRESS, else a Ray started in-process
    object_store_mb: int = Field(200, ge=75)
    probe_timeout_s: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def _vae_options(self) -> EncodeParams:
        if self.vae is None and any(v is not None for v in (self.revision, self.subfolder, self.scale, self.shift)):
            raise ValueError("revision, subfolder, scale and shift describe a VAE: set encode.vae as well")
        return self


def vae_fingerprint(params: EncodeParams) -> str | None:
    """What names the VAE's weights before they are loaded (a cache key's part): a local folder's file hashes,
    a hub id's revision; None without a VAE."""
    if params.vae is None:
        return None
    folder = Path(params.vae).expanduser() / (params.subfolder or "")
    if not folder.is_dir():
        return f"{params.vae}@{params.revision}/{params.subfolder or ''}"
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder).as_posix()}:{file_sha256(path)};".encode())
    return digest.hexdigest()


def _device(choice: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if choice == "auto" else choice


def _samples(tar: bytes, name: str) -> list[dict[str, Any]]:
    """The samples of one webdataset tar, in order."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    return list(group_by_keys(tar_file_expander([{"url": name, "stream": io.BytesIO(tar)}])))


def encode_tar(space: LatentSpace, tar: bytes, name: str, batch_size: int) -> bytes:
    """One image shard's bytes -> the latent shard's bytes (same keys, same order, byte-identical on rerun)."""
    import webdataset as wds

    samples = _samples(tar, name)
    buffer = io.BytesIO()
    with wds.TarWriter(buffer, mtime=0) as sink:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            images, labels = zip(*map(decode_sample, chunk))
            latents = space.encode(torch.stack(images)).cpu().numpy()
            for sample, latent, label in zip(chunk, latents, labels):
                sink.write({"__key__": sample["__key__"], "npy": np.ascontiguousarray(latent), "cls": label})
    return buffer.getvalue()


class EncodeActor:
    """A Ray actor holding one copy of the VAE (built from the driver's weights: workers download nothing)."""

    def __init__(self, vae_config: dict[str, Any], weights: dict[str, torch.Tensor], spec: dict[str, Any],
                 device: str, threads: int) -> None:
        from diffusers import AutoencoderKL

        torch.set_num_threads(threads)
        vae = AutoencoderKL.from_config(vae_config)
        vae.load_state_dict(weights)
        self.space = LatentSpace(vae, spec["scale"], spec["shift"], spec["vae"]).to(device)
        if self.space.digest != spec["vae"]["sha256"]:
            raise RuntimeError("the VAE's weights changed on their way to a Ray worker")

    def encode(self, tar: bytes, name: str, batch_size: int) -> bytes:
        return encode_tar(self.space, tar, name, batch_size)


def load_space(params: EncodeParams, channels: int) -> LatentSpace:
    """The VAE the params name, checked against the images' channels."""
    try:
        space = LatentSpace.from_source(params.vae, params.revision, params.subfolder, params.scale,
                                                 params.shift)
    except (FileNotFoundError, ValueError) as e:
        raise ModelError(f"encode.vae: {e}") from None
    if space.image_channels != channels:
        raise DataError(f"encode.vae {params.vae} takes {space.image_channels}-channel images, the shards hold "
                        f"{channels}-channel ones (prepare.channels)")
    return space


def link_images(shard_dir: Path, index: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """No VAE: the image shards as they are (hard links where the file system allows, else copies)."""
    for split in index["splits"].values():
        for shard in split["shards"]:
            (tmp / shard["name"]).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(shard_dir / shard["name"], tmp / shard["name"])
            except OSError:
                shutil.copy2(shard_dir / shard["name"], tmp / shard["name"])
    return index["splits"]


def encode_splits(params: EncodeParams, space: LatentSpace, shard_dir: Path, index: dict[str, Any],
                  tmp: Path) -> dict:
    """Every image shard -> a latent shard under ``tmp``; the new splits entry of the index."""
    jobs = [(split, shard) for split, entry in index["splits"].items() for shard in entry["shards"]]
    total = sum(shard["count"] for _, shard in jobs)
    device = _device(params.device)
    bar = tqdm(total=total, desc=f"encode on {params.num_workers} x {device}", unit="img")

    def store(shard: dict[str, Any], data: bytes) -> dict[str, Any]:
        path = tmp / shard["name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        bar.update(shard["count"])
        return {"name": shard["name"], "count": shard["count"], "sha256": file_sha256(path)}

    if params.num_workers == 1:
        space.to(device)
        results = [store(shard, encode_tar(space, (shard_dir / shard["name"]).read_bytes(), shard["name"],
                                           params.batch_size)) for _, shard in jobs]
    else:
        results = encode_on_ray(params, space, shard_dir, jobs, store)
    bar.close()
    splits = {name: {"count": entry["count"], "shards": []} for name, entry in index["splits"].items()}
    for (split, _), result in zip(jobs, results):
        splits[split]["shards"].append(result)
    return splits


def encode_on_ray(params: EncodeParams, space: LatentSpace, shard_dir: Path, jobs: list,
                  store) -> list[dict[str, Any]]:
    from components.common.ray_cluster import ray_session

    with ray_session(params.ray_address, num_cpus=params.num_workers * params.cpus_per_worker,
                     object_store_mb=params.object_store_mb, probe_timeout_s=params.probe_timeout_s):
        import ray
        from ray.util import ActorPool

        gpu = params.device == "cuda" or (params.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
        actor = ray.remote(num_cpus=params.cpus_per_worker, num_gpus=1 if gpu else 0)(EncodeActor)
        spec = {"scale": space.scale, "shift": space.shift, "vae": space.identity}
        weights = ray.put({k: v.cpu() for k, v in space.vae.state_dict().items()})
        pool = ActorPool([actor.remote(dict(space.vae.config), weights, spec, "cuda" if gpu else "cpu",
                                       params.cpus_per_worker) for _ in range(params.num_workers)])
        work = ((shard, (shard_dir / shard["name"]).read_bytes()) for _, shard in jobs)
        outputs = pool.map(lambda a, job: a.encode.remote(job[1], job[0]["name"], params.batch_size), work)
        return [store(shard, data) for (_, shard), data in zip(jobs, outputs)]


def encode(params: EncodeParams, shard_dir: str | Path, out_dir: str | Path) -> Path:
    """Run the stage with validated params; returns the output folder (written whole or not at all)."""
    shard_dir, out_dir = Path(shard_dir), Path(out_dir)
    index = read_index(shard_dir)
    verify_shards(shard_dir)
    source = {"shards": data_version(shard_dir)}
    with atomic_dir(out_dir) as tmp:
        if params.vae is None:
            out = {**index, "splits": link_images(shard_dir, index, tmp), "encoding": {"space": "pixels", **source}}
        else:
            image = index["image"]
            space = load_space(params, image["channels"])
            if image["height"] % space.factor or image["width"] % space.factor:
                raise DataError(f"{shard_dir}: images of {image['height']}x{image['width']} do not divide by the "
                                f"VAE's downsampling factor {space.factor} (prepare.resolution)")
            splits = encode_splits(params, space, shard_dir, index, tmp)
            shape = (space.vae.config.latent_channels, image["height"] // space.factor,
                     image["width"] // space.factor)
            space.save(tmp)
            out = {**index, "splits": splits, "latent": space.spec(shape), "encoding": {"space": "latent", **source}}
            log.info("encode: %d images -> latents %s with %s (sha256 %s...)", sum(s["count"] for s in
                     splits.values()), shape, params.vae, space.digest[:12])
        (tmp / "index.json").write_text(json.dumps(out, indent=2) + "\n")
    return out_dir


def standin_vae(out_dir: str | Path, channels: int = 1, seed: int = 0) -> Path:
    """A small random-weight AutoencoderKL in a real VAE's layout (4 latent channels, downsampling 2): it stands
    in for a downloaded VAE to try or test the latent path; its latents carry no meaning."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=channels, out_channels=channels, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, scaling_factor=1.0)
    with atomic_dir(out_dir) as tmp:
        vae.save_pretrained(str(tmp), safe_serialization=True)
    return Path(out_dir)
