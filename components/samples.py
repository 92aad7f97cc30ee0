"""One picture of a model at several step counts: a panel per NFE, a row per class, the same noise in each
panel so that the columns compare like with like."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

import tim_core
from components.atomic import atomic_dir
from components.errors import ModelError
from components.tracking import image_grid

HEADER = 14  # pixels above each panel for its "NFE n" label


@torch.no_grad()
def nfe_grid(model: tim_core.TiM, transport: tim_core.Transport, steps: list[int], per_class: int = 8,
             cfg_scale: float = 1.0, seed: int = 0, device: str | torch.device = "cpu", mode: str = "transition",
             classes: int | None = None) -> Image.Image:
    """Samples of every class (or of ``classes`` evenly spaced ones) at each step count, side by side; the
    label shows the honest NFE."""
    model = model.to(device).eval()
    rows = min(model.num_classes, classes or model.num_classes)
    labels = torch.linspace(0, model.num_classes - 1, rows).round().long().repeat_interleave(per_class)
    noise = torch.randn(len(labels), model.in_channels, *model.input_size,
                        generator=torch.Generator().manual_seed(seed))
    panels = []
    for n in steps:
        result = tim_core.sample(model, noise.to(device), labels.to(device), n, transport=transport,
                                 cfg_scale=cfg_scale, mode=mode)
        panel = image_grid(result.samples.float().cpu().numpy(), rows=rows).convert("RGB")
        framed = Image.new("RGB", (panel.width, panel.height + HEADER), "white")
        framed.paste(panel, (0, HEADER))
        ImageDraw.Draw(framed).text((2, 1), f"{n} step{'s' * (n > 1)}, NFE {result.nfe}", fill="black")
        panels.append(framed)
    gap = 6
    out = Image.new("RGB", (sum(p.width for p in panels) + gap * (len(panels) - 1), panels[0].height), "white")
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width + gap
    return out


def run(model_dir: Path, out_dir: Path, steps: list[int], per_class: int, cfg_scale: float, seed: int) -> Path:
    """Load an exported model and write ``out_dir/grid.png`` (the folder appears only when complete)."""
    try:
        model, transport = tim_core.load_pretrained(model_dir)
        image = nfe_grid(model, transport, steps, per_class=per_class, cfg_scale=cfg_scale, seed=seed)
    except (FileNotFoundError, ValueError) as e:
        raise ModelError(f"{model_dir}: {e}") from None
    with atomic_dir(out_dir) as tmp:
        image.save(tmp / "grid.png", format="PNG")
    return out_dir / "grid.png"
