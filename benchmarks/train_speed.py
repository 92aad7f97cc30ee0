"""Training speed on this machine: what the TiM objective costs over flow matching, and what Ray + ZeRO costs.

  .venv/bin/python benchmarks/train_speed.py [--shards data/shards] [--steps 20] [--ray-steps 60] [--threads 1]

1. One process, one optimizer step (forward, backward, AdamW) of the same network and batch under TiM with the
   DDE derivative, flow matching, and TiM with the JVP derivative: median step time (the three take turns) and
   peak RSS (each in a fresh process, so that peaks do not mask each other). Aim: TiM-DDE <= 1.4x flow matching.
2. The `train` stage end to end (Ray Train, DeepSpeed ZeRO-2, gloo) with 2 workers x 1 thread against 1 worker x
   2 threads, same global batch: images/s after the first logging window. Aim: >= 0.85. A third run, 1 worker x
   1 thread, gives the scaling efficiency of the 2-worker run.
Prints a table and writes benchmarks/results/train_speed.md.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
OBJECTIVES = {"TiM (DDE)": ("tim", {"derivative": "dde"}), "flow matching": ("fm", {}),
              "TiM (JVP)": ("tim", {"derivative": "jvp"})}


def cpu_params(**overrides):
    """params.yaml's train section under the cpu profile (the model and batch that `tim train` uses here)."""
    from components.common.params import deep_merge, read_params, resolve_profile
    from components.train.settings import TrainParams

    section = dict(read_params(REPO / "params.yaml")["train"], profile="cpu")
    return TrainParams.model_validate(deep_merge(resolve_profile(section, "train"), overrides))


def setup(name: str, params: dict):
    import torch

    import tim_core

    p = cpu_params()
    torch.manual_seed(0)
    model = tim_core.build_model(p.model.preset, **p.model.overrides)
    objective = tim_core.build_objective(name, tim_core.get_transport(p.transport.name),
                                         null_label=model.num_classes, **params)
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, betas=p.optim.betas)
    x = torch.randn(p.optim.global_batch, model.in_channels, *model.input_size)
    labels = torch.randint(0, model.num_classes, (p.optim.global_batch,))
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        loss, _ = objective(model, x, labels, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def step_times(steps: int, threads: int) -> dict[str, float]:
    """Median seconds per optimizer step. The objectives take turns step by step, so a load that comes and
    goes on a shared machine slows all of them alike instead of whichever ran at the time."""
    import torch

    torch.set_num_threads(threads)
    runs = {label: setup(*spec) for label, spec in OBJECTIVES.items()}
    times: dict[str, list[float]] = {label: [] for label in runs}
    for i in range(steps + 3):  # 3 warm-up rounds
        for label, step in runs.items():
            start = time.perf_counter()
            step()
            if i >= 3:
                times[label].append(time.perf_counter() - start)
    return {label: statistics.median(t) for label, t in times.items()}


def peak_rss(name: str, params: dict, threads: int, queue: mp.Queue) -> None:
    """Runs in a fresh process: peak RSS (MiB) and its growth over the set-up during a few steps."""
    import torch

    torch.set_num_threads(threads)
    step = setup(name, params)
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(3):
        step()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put((peak_kib / 1024, (peak_kib - baseline_kib) / 1024))


def objective_table(steps: int, threads: int) -> dict[str, tuple[float, float, float]]:
    ctx = mp.get_context("spawn")
    memory = {}
    for label, spec in OBJECTIVES.items():
        queue = ctx.Queue()
        proc = ctx.Process(target=peak_rss, args=(*spec, threads, queue))
        proc.start()
        memory[label] = queue.get()
        proc.join()
    times = step_times(steps, threads)
    for label, t in times.items():
        print(f"  {label}: {t * 1000:.0f} ms/step, peak RSS {memory[label][0]:.0f} MiB", flush=True)
    return {label: (times[label], *memory[label]) for label in OBJECTIVES}


def build_shards(root: Path) -> Path:
    from components.data import prepare, shard, validate

    prepare.prepare(prepare.PrepareParams(limit=1000), root / "prepared")
    validate.validate(validate.ValidateParams(), root / "prepared", root / "validated")
    shard.shard(shard.ShardParams(shard_size=250), root / "prepared", root / "validated", root / "shards")
    return root / "shards"


def ray_throughput(shards: Path, workers: int, threads: int, steps: int, root: Path) -> float:
    """images/s of `train` over the windows after the first (which holds start-up and warm-up)."""
    from mlflow import MlflowClient

    from components.train.stage import train

    params = cpu_params(
        distributed={"num_workers": workers, "cpus_per_worker": threads, "zero_stage": 2, "max_failures": 0},
        schedule={"max_steps": steps, "max_minutes": 0, "log_every": 10, "sample_every": 0,
                  "checkpoint_every": steps},
        mlflow={"experiment": "train-speed", "log_system_metrics": False})
    project = root / f"ray-{workers}x{threads}"
    result = train(params, shards, project / "model", project_dir=project)
    history = MlflowClient(result.tracking_uri).get_metric_history(result.run_id, "perf/images_per_s")
    return statistics.median(m.value for m in sorted(history, key=lambda m: m.step)[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=Path, help="shard folder (default: 1,000 MNIST digits built in a temp dir)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per objective")
    parser.add_argument("--ray-steps", type=int, default=60, help="steps of each Ray run")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for the objective timing (default 1, as each worker of the cpu profile)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    p = cpu_params()
    load_before = os.getloadavg()[0]

    print(f"objectives: {p.model.preset} model, batch {p.optim.global_batch}, {args.threads} thread(s), one process")
    rows = objective_table(args.steps, args.threads)
    fm = rows["flow matching"][0]

    with tempfile.TemporaryDirectory(prefix="train-speed-") as tmp:
        shards = args.shards or build_shards(Path(tmp))
        print("Ray Train + DeepSpeed ZeRO-2 throughput")
        # (workers, threads each): the same cores as 1 or 2 processes, and one worker alone for the scaling.
        ray_rows = {(w, t): ray_throughput(shards.resolve(), w, t, args.ray_steps, Path(tmp))
                    for w, t in ((1, cores), (2, cores // 2 or 1), (1, cores // 2 or 1))}
    one, two, single = ray_rows[(1, cores)], ray_rows[(2, cores // 2 or 1)], ray_rows[(1, cores // 2 or 1)]

    load_after = os.getloadavg()[0]
    import deepspeed
    import ray
    import torch

    lines = [
        "# Training speed",
        "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC with `.venv/bin/python benchmarks/train_speed.py"
        f" --steps {args.steps} --ray-steps {args.ray_steps} --threads {args.threads}` on {cores} CPU cores"
        f" ({platform.processor() or platform.machine()}),"
        f" torch {torch.__version__}, deepspeed {deepspeed.__version__}, ray {ray.__version__}.",
        f"Model `{p.model.preset}` on 28x28x1 digits, batch {p.optim.global_batch} (the `cpu` profile).",
        f"1-minute load average {load_before:.1f} before and {load_after:.1f} after: other jobs shared the cores,"
        " so absolute figures are pessimistic; the ratios are the point.",
        "",
        f"## Objective cost (one process, {args.threads} thread(s), forward + backward + AdamW)",
        "",
        "| objective | ms / step | x flow matching | peak RSS MiB | RSS growth in the loop MiB |",
        "|---|---:|---:|---:|---:|",
        *(f"| {label} | {t * 1000:.0f} | {t / fm:.2f} | {peak:.0f} | {growth:.0f} |"
          for label, (t, peak, growth) in rows.items()),
        "",
        f"TiM with DDE costs {rows['TiM (DDE)'][0] / fm:.2f}x flow matching (aim <= 1.4x); "
        f"JVP costs {rows['TiM (JVP)'][0] / rows['TiM (DDE)'][0]:.2f}x DDE.",
        "",
        f"## Ray Train + DeepSpeed ZeRO-2 (global batch {p.optim.global_batch}, images/s after the first window)",
        "",
        "| workers x threads | images / s |",
        "|---|---:|",
        *(f"| {w} x {t} | {v:.0f} |" for (w, t), v in ray_rows.items()),
        "",
        f"2 workers x {cores // 2 or 1} thread reach {two / one:.2f} of 1 worker x {cores} threads on the same"
        f" cores (aim >= 0.85); against twice one {cores // 2 or 1}-thread worker alone they reach"
        f" {two / (2 * single):.2f} (gradient reduction, and each step waiting for the slower rank on shared cores).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    out = REPO / "benchmarks" / "results" / "train_speed.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
