"""Fixtures for the evaluation tests: a briefly trained evaluator and a tiny TiM, each built once per session
(the tiny shards are tests/conftest.py's)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tim_core
from components.common.params import read_params, resolve_profile
from components.evaluation.evaluate import EvaluateParams
from components.evaluation.feature_net import EvaluatorParams, train_evaluator

REPO = Path(__file__).resolve().parents[2]


def tiny(stage: str, schema, **overrides):
    """params.yaml's section under its committed cpu-tiny profile, with ``overrides``."""
    section = dict(read_params(REPO / "params.yaml")[stage], profile="cpu-tiny")
    return schema.model_validate({**resolve_profile(section, stage), **overrides})


@pytest.fixture(scope="session")
def evaluator_dir(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evaluator") / "evaluator"
    train_evaluator(tiny("train_evaluator", EvaluatorParams), shards, out)
    return out


def save_tiny_model(directory: Path, objective: str | None = None) -> tim_core.TiM:
    """A tiny TiM with small random weights (zero-initialised heads would sample a constant)."""
    torch.manual_seed(0)
    model = tim_core.build_model("tiny", num_classes=10, hidden_size=32, depth=1, num_heads=2, adaln_rank=4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    extra = {"train": {"objective": objective}} if objective else None
    tim_core.save_pretrained(model, directory, tim_core.get_transport(), extra=extra)
    return model


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("model") / "tim"
    save_tiny_model(directory, "tim")
    return directory


@pytest.fixture
def eval_params():
    return lambda **overrides: tiny("evaluate", EvaluateParams, **overrides)
