"""`--profile` and `--set` resolve exactly like editing params.yaml, for every section, and fail naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.common.errors import ParamsError
from components.common.params import ParamsSource
from components.data.prepare import PrepareParams
from components.evaluation.evaluate import EvaluateParams
from components.evaluation.grid import SamplesParams
from components.train.settings import TrainParams

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = {"train": TrainParams, "evaluate": EvaluateParams, "samples": SamplesParams, "prepare": PrepareParams}


def edited(tmp_path: Path, edit) -> ParamsSource:
    """params.yaml changed by ``edit(document)``, as a source with no command-line overrides."""
    document = yaml.safe_load((REPO / "params.yaml").read_text())
    edit(document)
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(document))
    return ParamsSource(path)


@pytest.mark.parametrize("section", sorted(SCHEMAS))
def test_profile_flag_equals_writing_the_profile_into_each_section(section, tmp_path):
    def choose_cpu_tiny(document):
        for body in document.values():
            if "cpu-tiny" in (body.get("profiles") or {}):
                body["profile"] = "cpu-tiny"

    by_flag = ParamsSource(REPO / "params.yaml", profile="cpu-tiny").load(section, SCHEMAS[section])
    assert by_flag == edited(tmp_path, choose_cpu_tiny).load(section, SCHEMAS[section])
    # The flag changed something in every section that defines the profile (else this test proves nothing).
    assert by_flag != ParamsSource(REPO / "params.yaml").load(section, SCHEMAS[section])


def test_set_equals_editing_the_value(tmp_path):
    sets = ("train.optim.global_batch=32", "train.objective.params={derivative: jvp}", "evaluate.steps=[1, 3]",
            "train.model.preset=small")

    def edit(document):
        document["train"]["optim"]["global_batch"] = 32
        document["train"]["objective"]["params"] = {"derivative": "jvp"}
        document["train"]["model"]["preset"] = "small"
        document["evaluate"]["steps"] = [1, 3]

    source = ParamsSource(REPO / "params.yaml", sets=sets)
    for section in ("train", "evaluate"):
        assert source.load(section, SCHEMAS[section]) == edited(tmp_path, edit).load(section, SCHEMAS[section])
    assert source.load("train", TrainParams).optim.global_batch == 32


def test_set_wins_over_the_profile_and_can_pick_one_sections_profile():
    source = ParamsSource(REPO / "params.yaml", profile="cpu-tiny", sets=("train.schedule.max_steps=9",))
    assert source.load("train", TrainParams).schedule.max_steps == 9          # cpu-tiny says 6
    assert source.load("train", TrainParams).optim.global_batch == 16         # the rest of cpu-tiny stays
    gpu = ParamsSource(REPO / "params.yaml", sets=("train.profile=gpu",)).load("train", TrainParams)
    assert gpu.model.preset == "B/4" and gpu.distributed.use_gpu


@pytest.mark.parametrize("sets, message", [
    (("train.optim.global_btach=32",), r"train\.optim\.global_btach: unknown key; allowed: global_batch"),
    (("trian.optim.global_batch=32",), r"has no section 'trian'; sections: mlflow, prepare"),
    (("train.optim.global_batch",), r"expected section\.key=value"),
    (("train.optim=32",), r"train\.optim: Input should be a valid dictionary"),
])
def test_bad_set_fails_naming_the_key(sets, message):
    with pytest.raises(ParamsError, match=message):
        ParamsSource(REPO / "params.yaml", sets=sets).load("train", TrainParams)


def test_unknown_profile_names_the_defined_ones():
    with pytest.raises(ParamsError, match=r"--profile 'cpu-tyni': no section .* defines it; defined: cpu, cpu-reduced, "
                                          r"cpu-tiny, gpu"):
        ParamsSource(REPO / "params.yaml", profile="cpu-tyni").load("train", TrainParams)


def test_params_show_prints_the_resolved_section():
    args = ["--params", str(REPO / "params.yaml"), "--profile", "cpu-tiny", "--set", "train.optim.grad_accum=2"]
    res = subprocess.run([sys.executable, "-m", "components.cli", "params", "show", "train", *args],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    shown = yaml.safe_load(res.stdout)
    source = ParamsSource(REPO / "params.yaml", "cpu-tiny", ("train.optim.grad_accum=2",))
    assert shown == source.section("train") and shown["optim"]["grad_accum"] == 2
    bad = subprocess.run([sys.executable, "-m", "components.cli", "prepare", "--params", str(REPO / "params.yaml"),
                          "--set", "prepare.sourse=s3", "--out", "nowhere"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "prepare.sourse: unknown key" in bad.stderr
    assert "--set prepare.sourse=s3" in bad.stderr
