"""Step time and peak memory of each objective on the same network and batch, in one run.

    python benchmarks/objective_speed.py [--preset tiny] [--batch 64] [--steps 20] [--threads 2]

Each objective runs in its own subprocess so that peak memory (ru_maxrss on CPU, max_memory_allocated on
CUDA) belongs to that objective alone. A step is forward + objective + backward + AdamW. Prints a table and
writes benchmarks/results/objective_speed.md with the ratios against flow matching.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = {  # label: (objective, params)
    "flow matching": ("fm", {}),
    "TiM, DDE": ("tim", {"derivative": "dde"}),
    "TiM, JVP": ("tim", {"derivative": "jvp"}),
    "MeanFlow (JVP)": ("meanflow", {}),
}


def measure(label: str, preset: str, batch: int, steps: int, threads: int) -> dict:
    import torch

    import tim_core

    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    net = tim_core.build_model(preset).to(device)
    objective, params = CASES[label]
    loss_fn = tim_core.build_objective(objective, tim_core.get_transport("ot_fm"), null_label=net.num_classes,
                                       **params)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    H, W = net.input_size
    x = torch.randn(batch, net.in_channels, H, W, device=device)
    y = torch.randint(0, net.num_classes, (batch,), device=device)
    g = torch.Generator(device=device).manual_seed(0)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(steps + 3):  # 3 warm-up steps
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss, _ = loss_fn(net, x, y, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    peak_mb = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
               else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024)
    return {"label": label, "ms": 1000 * statistics.median(times), "peak_mb": peak_mb, "device": device}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one case and print JSON
    a = ap.parse_args()
    if a.one:
        print(json.dumps(measure(a.one, a.preset, a.batch, a.steps, a.threads)))
        return
    rows = []
    for label in CASES:
        out = subprocess.run([sys.executable, __file__, "--one", label, "--preset", a.preset, "--batch",
                              str(a.batch), "--steps", str(a.steps), "--threads", str(a.threads)],
                             check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[0]
    lines = [f"Objective step time, preset {a.preset}, batch {a.batch}, median of {a.steps} steps, "
             f"{a.threads} threads, {base['device']}",
             "", "| objective | ms / step | x flow matching | peak memory (MiB) | x flow matching |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['ms']:.1f} | {r['ms'] / base['ms']:.2f} | {r['peak_mb']:.0f} | "
                     f"{r['peak_mb'] / max(base['peak_mb'], 1e-9):.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).parent / "results" / "objective_speed.md"
    out.write_text(f"Command: `python benchmarks/objective_speed.py --preset {a.preset} --batch {a.batch} "
                   f"--steps {a.steps} --threads {a.threads}`\n\n" + text)


if __name__ == "__main__":
    main()
