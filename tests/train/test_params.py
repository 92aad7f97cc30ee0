"""The train section's schema: committed profiles validate, bad combinations fail before any work."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from components.common.tracking import flatten

from .conftest import REPO, tiny_params


@pytest.mark.parametrize("profile", ["cpu-tiny", "cpu", "gpu"])
def test_committed_profiles_validate(profile, tmp_path):
    import yaml

    from components.common.params import load_section
    from components.train.settings import TrainParams

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["profile"] = profile
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    p = load_section("train", TrainParams, tmp_path / "params.yaml")
    assert p.micro_batch * p.distributed.num_workers * p.optim.grad_accum == p.optim.global_batch
    assert p.distributed.use_gpu is (profile == "gpu")


def test_lr_scales_with_global_batch():
    p = tiny_params(optim={"global_batch": 32, "ref_batch": 16, "base_lr": 1e-3})
    assert p.lr == pytest.approx(2e-3)


def test_batch_must_split_over_workers_and_accumulation():
    with pytest.raises(ValidationError, match="not divisible by distributed.num_workers"):
        tiny_params(optim={"global_batch": 18, "grad_accum": 2})


def test_jvp_is_refused_under_zero3():
    with pytest.raises(ValidationError, match="ZeRO-3"):
        tiny_params(objective={"name": "meanflow"}, distributed={"zero_stage": 3})
    tiny_params(objective={"name": "meanflow"}, distributed={"zero_stage": 2})


def test_data_shape_keys_cannot_be_overridden():
    with pytest.raises(ValidationError, match="read from the shard index"):
        tiny_params(model={"overrides": {"num_classes": 3}})


def test_identity_ignores_budgets_and_runtime_knobs_only():
    base = tiny_params()
    same = tiny_params(schedule={"max_steps": 99, "max_minutes": 3}, distributed={"max_failures": 2},
                       mlflow={"log_system_metrics": False})
    assert base.identity("data-a") == same.identity("data-a")
    assert base.identity("data-a") != base.identity("data-b")
    assert base.identity("data-a") != tiny_params(optim={"base_lr": 5e-4}).identity("data-a")
    assert base.identity("data-a") != tiny_params(distributed={"zero_stage": 1}).identity("data-a")


def test_params_flatten_to_dotted_mlflow_keys():
    flat = flatten(tiny_params().model_dump(mode="json"))
    assert flat["optim.betas"] == "[0.9, 0.95]"
    assert flat["distributed.zero_stage"] == "2"
    assert flat["model.preset"] == "tiny"
