"""Benchmark the data stages on the default data (params.yaml as committed: 5,000 MNIST digits).

    python benchmarks/data_stages.py [--params params.yaml] [--batch-size 256]

Times prepare, validate and shard (in-process, cold imports included, target < 60 s together), then the
shard reader's throughput in images/s with 0 and 2 DataLoader workers. Prints a table and writes
benchmarks/results/data_stages.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "data_stages.md"


def timed(fn, *args):
    start = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - start


def read_rate(shard_dir: Path, workers: int, batch_size: int, images: int) -> float:
    """Steady-state images/s: cycle the train split (repeat=True) and start the clock after the first
    batch, so DataLoader worker start-up is not counted."""
    from components.data.reader import make_loader

    loader = iter(make_loader(shard_dir, "train", batch_size, num_workers=workers, verify=False, repeat=True))
    next(loader)
    start, seen = time.perf_counter(), 0
    while seen < images:
        seen += len(next(loader)[1])
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--read-images", type=int, default=20_000, help="images read per throughput figure")
    args = parser.parse_args()
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

    from components.common.params import ParamsSource
    from components.data import prepare, shard, validate
    from components.data.reader import verify_shards

    src = ParamsSource(Path(args.params))

    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        _, t_prepare = timed(prepare.prepare, src.load("prepare", prepare.PrepareParams), data / "prepared")
        _, t_validate = timed(validate.validate, src.load("validate", validate.ValidateParams), data / "prepared",
                              data / "validated")
        _, t_shard = timed(shard.shard, src.load("shard", shard.ShardParams), data / "prepared", data / "validated",
                           data / "shards")
        _, t_verify = timed(verify_shards, data / "shards")
        total = t_prepare + t_validate + t_shard
        rows += [
            ("prepare (s)", f"{t_prepare:.1f}"),
            ("validate (s, incl. great_expectations import)", f"{t_validate:.1f}"),
            ("shard (s)", f"{t_shard:.1f}"),
            ("prepare + validate + shard (s, target < 60)", f"{total:.1f}"),
            ("verify_shards, all splits (s)", f"{t_verify:.2f}"),
        ]
        load = os.getloadavg()[0]
        for workers in (0, 2):
            rate = read_rate(data / "shards", workers, args.batch_size, args.read_images)
            rows.append((f"read train, {workers} loader workers, batch {args.batch_size} (images/s)", f"{rate:,.0f}"))

    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name:<{width}}  {value:>8}" for name, value in rows))
    header = (
        f"# Data stages benchmark\n\n{datetime.date.today()} - {platform.python_version()} on {os.cpu_count()} CPU cores"
        f" ({platform.machine()}), 1-min load average before the reads {load:.1f}"
        f" (other processes share the cores), params: {args.params}\n\n"
        "Command: `python benchmarks/data_stages.py`\n\n| measure | value |\n|---|---:|\n"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(header + "".join(f"| {name} | {value} |\n" for name, value in rows))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
