"""Stage `train_evaluator`: a small convolutional classifier trained on the train split of the shards.

  tim train-evaluator --params params.yaml --shards data/shards --out models/evaluator

Its penultimate layer is the feature space in which `tim evaluate` measures Frechet distance, KID and
precision/recall: no standard network (Inception) fits 28x28 digits or arbitrary small datasets, and none can
be downloaded here. Its accuracy on generated samples says whether they show the class they were asked for.
Saved as model.safetensors + config.json (architecture, classes, validation accuracy, data version).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from components.common.errors import ModelError
from components.common.files import atomic_dir
from components.common.params import StageParams
from components.data.reader import load_split
from tim_core.io import CONFIG, WEIGHTS

log = logging.getLogger(__name__)



class EvaluatorParams(StageParams):
    seed: int = 0
    width: int = Field(32, ge=4)           # channels of the first conv block; then 2x and 4x
    feature_dim: int = Field(128, ge=8)    # the penultimate layer: the feature space of FID/KID/PR
    epochs: int = Field(6, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    threads: int = Field(0, ge=0)          # torch CPU threads; 0 = torch's default
    min_val_accuracy: float = Field(0.0, ge=0, le=1)  # fail the stage below this (a broken evaluator misleads)


class Evaluator(nn.Module):
    """Three conv blocks, a fixed 4x4 pooled grid (any input size), a feature layer and the class logits."""

    def __init__(self, in_channels: int, num_classes: int, input_size: list[int], width: int = 32,
                 feature_dim: int = 128) -> None:
        super().__init__()
        self.config = {"in_channels": in_channels, "num_classes": num_classes, "input_size": list(input_size),
                       "width": width, "feature_dim": feature_dim}
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.BatchNorm2d(4 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(4 * width * 16, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


@torch.no_grad()
def batched(fn, x: Tensor, batch_size: int = 500) -> Tensor:
    return torch.cat([fn(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def accuracy(model: Evaluator, x: Tensor, y: Tensor) -> float:
    return float((batched(model, x).argmax(1) == y).double().mean())


def train_evaluator(params: EvaluatorParams, shard_dir: str | Path, out_dir: str | Path) -> dict:
    """Train on the train split, measure on the validation split, save to ``out_dir``; returns the config."""
    from components.data.reader import data_version, read_index


    if params.threads:
        torch.set_num_threads(params.threads)
    index = read_index(shard_dir)
    x, y = load_split(shard_dir, "train")
    x_val, y_val = load_split(shard_dir, "val")
    torch.manual_seed(params.seed)
    model = Evaluator(x.shape[1], index["num_classes"], list(x.shape[2:]), params.width, params.feature_dim)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.lr)
    steps = params.epochs * -(-len(x) // params.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, params.lr, total_steps=steps)
    generator = torch.Generator().manual_seed(params.seed)
    started = time.perf_counter()
    with tqdm(total=steps, desc="train evaluator") as bar:
        for _ in range(params.epochs):
            model.train()
            for batch in torch.randperm(len(x), generator=generator).split(params.batch_size):
                # A one-pixel random shift: cheap augmentation that keeps the classifier honest on samples.
                shift = torch.randint(-1, 2, (2,), generator=generator).tolist()
                loss = nn.functional.cross_entropy(model(x[batch].roll(shift, dims=(2, 3))), y[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    val_accuracy = accuracy(model, x_val, y_val)
    log.info("evaluator: validation accuracy %.4f after %.0f s", val_accuracy, time.perf_counter() - started)
    if val_accuracy < params.min_val_accuracy:
        raise ModelError(f"evaluator validation accuracy {val_accuracy:.4f} is below train_evaluator."
                         f"min_val_accuracy={params.min_val_accuracy}; train longer (epochs) or check the data")
    config = {**model.config, "classes": index["classes"], "val_accuracy": val_accuracy,
              "train_seconds": time.perf_counter() - started, "data_version": data_version(Path(shard_dir)),
              "params": params.model_dump(mode="json")}
    with atomic_dir(out_dir) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
    return config


def load_evaluator(directory: str | Path) -> tuple[Evaluator, dict]:
    directory = Path(directory)
    for name in (WEIGHTS, CONFIG):
        if not (directory / name).is_file():
            raise ModelError(f"{directory / name} is missing: run `tim train-evaluator` first")
    config = json.loads((directory / CONFIG).read_text())
    model = Evaluator(**{k: config[k] for k in ("in_channels", "num_classes", "input_size", "width", "feature_dim")})
    model.load_state_dict(load_file(str(directory / WEIGHTS)))
    return model.eval(), config
