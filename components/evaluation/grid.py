"""Stage `samples`: one picture of a model at several step counts: a panel per NFE, a row per class, the same
noise in each panel so that the columns compare like with like. The training run's sample grids and
`tim evaluate`'s samples.png are drawn by the same function."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw
from pydantic import Field, field_validator

import tim_core
from components.common.errors import ModelError
from components.common.files import atomic_dir
from components.common.params import StageParams
from tim_core.images import image_grid

HEADER = 14  # pixels above each panel for its "NFE n" label


class SamplesParams(StageParams):
    """params.yaml's ``samples`` section."""

    steps: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 32])  # one panel per step count
    per_class: int = Field(8, ge=1)       # samples per class (columns of each panel)
    cfg_scale: float = Field(1.0, ge=0)   # classifier-free guidance (1 = off; > 1 doubles the NFE)
    seed: int = 0                         # noise seed, shared by every panel

    @field_validator("steps")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(s < 1 for s in v):
            raise ValueError("must be a non-empty list of step counts >= 1")
        return v


@torch.no_grad()
def nfe_grid(model: tim_core.TiM, transport: tim_core.Transport, steps: list[int], per_class: int = 8,
             cfg_scale: float = 1.0, seed: int = 0, device: str | torch.device = "cpu", mode: str = "transition",
             classes: int | None = None, latent: tim_core.LatentSpace | None = None) -> Image.Image:
    """Samples of every class (or of ``classes`` evenly spaced ones) at each step count, side by side; the
    label shows the honest NFE. A model of ``latent`` space has its samples decoded to images."""
    model = model.to(device).eval()
    rows = min(model.num_classes, classes or model.num_classes)
    labels = torch.linspace(0, model.num_classes - 1, rows).round().long().repeat_interleave(per_class)
    noise = torch.randn(len(labels), model.in_channels, *model.input_size,
                        generator=torch.Generator().manual_seed(seed))
    panels = []
    for n in steps:
        result = tim_core.sample(model, noise.to(device), labels.to(device), n, transport=transport,
                                 cfg_scale=cfg_scale, mode=mode)
        images = latent.decode(result.samples.float()) if latent is not None else result.samples.float()
        panel = Image.fromarray(image_grid(images.cpu().numpy(), rows=rows)).convert("RGB")
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


def samples(params: SamplesParams, model_dir: str | Path, out_dir: str | Path) -> Path:
    """Load an exported model and write ``out_dir/grid.png`` (the folder appears only when complete); its path."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    try:
        model, transport = tim_core.load_pretrained(model_dir)
        image = nfe_grid(model, transport, params.steps, per_class=params.per_class, cfg_scale=params.cfg_scale,
                         seed=params.seed, latent=tim_core.load_latent_space(model_dir))
    except (FileNotFoundError, ValueError) as e:
        raise ModelError(f"{model_dir}: {e}") from None
    with atomic_dir(out_dir) as tmp:
        image.save(tmp / "grid.png", format="PNG")
    return out_dir / "grid.png"
