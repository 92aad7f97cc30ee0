"""Sampling throughput (images/s) of one exported model at each step count.

    python benchmarks/sampling_speed.py [--model models/tim] [--batch 50] [--repeats 2] [--threads 2]

One batch of class-balanced labels, the same noise at every step count; the best of ``--repeats`` timed runs
after one 1-step warm-up (the best, because the cores may be shared and slowdowns only ever add time). The honest NFE
comes from the sampler. Prints a table and writes benchmarks/results/sampling_speed.md with each step count's
speed-up over the slowest one.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

import tim_core

STEPS = [1, 2, 4, 8, 16, 32, 64, 128]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/tim")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sampling_speed.md"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model, transport = tim_core.load_pretrained(args.model)
    labels = torch.arange(args.batch) % model.num_classes
    noise = torch.randn(args.batch, model.in_channels, *model.input_size, generator=torch.Generator().manual_seed(0))
    tim_core.sample(model, noise, labels, 1, transport=transport)  # warm-up: first-call allocations
    rows = []
    for steps in STEPS:
        best, nfe = float("inf"), 0
        for _ in range(args.repeats):
            started = time.perf_counter()
            nfe = tim_core.sample(model, noise, labels, steps, transport=transport).nfe
            best = min(best, time.perf_counter() - started)
        rows.append((steps, nfe, args.batch / best))
        print(f"{steps:4d} steps  NFE {nfe:4d}  {args.batch / best:10.1f} images/s", flush=True)

    slowest = rows[-1][2]
    params = sum(p.numel() for p in model.parameters())
    lines = [
        "# Sampling speed",
        "",
        f"`python benchmarks/sampling_speed.py --model {args.model} --batch {args.batch} --repeats {args.repeats} "
        f"--threads {args.threads}`",
        "",
        f"Model: {args.model} ({params / 1e6:.2f} M parameters, input {model.in_channels}x"
        f"{'x'.join(map(str, model.input_size))}), torch {torch.__version__}, {args.threads} threads, "
        f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (shared cores slow every "
        "row alike; ratios are steadier than absolute rates).",
        "",
        "| steps | NFE | images/s | speed-up over the last row |",
        "|---:|---:|---:|---:|",
        *[f"| {s} | {n} | {r:.1f} | {r / slowest:.1f}x |" for s, n, r in rows],
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
