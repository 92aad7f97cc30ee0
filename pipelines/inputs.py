"""The run form of the Kubeflow pipeline: which parameter becomes which params.yaml override, and the checks that
make a bad run fail in its first task (or before it is submitted), naming the parameter.

Every stage still reads params.yaml through ``--profile`` / ``--set`` (components/common/params.py); the form's
parameters are shortcuts for the overrides a person changes most, turned here into ``section.key=value``
assignments appended after the user's own ``params_set``, so that a field filled in on the form wins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from components.common.errors import ParamsError

TRAIN_MODES = ("in_pod", "ray_jobs", "kuberay")
# The sections each data task reads: its overrides are passed alone, so that its cache key does not change
# when another stage's parameters do.
DATA_STAGES = ("prepare", "validate", "shard", "encode")


def assignment(key: str, value: Any) -> str:
    """``key=value`` with the value as one line of YAML (what ``--set`` parses)."""
    return f"{key}={yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix('...').strip()}"


@dataclass(frozen=True)
class RunInputs:
    """The pipeline's parameters that shape params (the form's defaults mean "as params.yaml says")."""

    data_source: str = ""
    data_root: str = ""
    params_profile: str = ""
    params_set: Sequence[str] = ()
    train_mode: str = "in_pod"
    ray_workers: int = 0
    gpus_per_worker: int = 0
    zero_stage: int = -1
    init_from: str = ""
    nfe_list: Sequence[int] = ()
    gate: Mapping[str, Any] = field(default_factory=dict)
    model_name: str = ""
    mlflow_tracking_uri: str = ""

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> RunInputs:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def check(self) -> None:
        """Values the form's types cannot rule out; ParamsError names the parameter."""
        if self.train_mode not in TRAIN_MODES:
            raise ParamsError(f"pipeline parameter train_mode: {self.train_mode!r}; allowed: {', '.join(TRAIN_MODES)}")
        if self.ray_workers < 0 or self.gpus_per_worker < 0:
            raise ParamsError(f"pipeline parameters ray_workers ({self.ray_workers}) and gpus_per_worker "
                              f"({self.gpus_per_worker}) must be >= 0")
        if self.train_mode == "in_pod" and self.gpus_per_worker and self.ray_workers > 1:
            raise ParamsError("pipeline parameter ray_workers: in_pod trains in the task's own pod, which is one "
                              f"worker with gpus_per_worker={self.gpus_per_worker} GPUs; set ray_workers to 1 (or 0), "
                              "or use train_mode kuberay for more worker pods")
        if self.zero_stage not in (-1, 0, 1, 2, 3):
            raise ParamsError(f"pipeline parameter zero_stage: {self.zero_stage}; allowed: 0-3, or -1 for params.yaml's")
        if any(not isinstance(s, str) for s in self.params_set):
            raise ParamsError(f"pipeline parameter params_set: a list of 'section.key=value' strings; got "
                              f"{list(self.params_set)!r}")
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.nfe_list):
            raise ParamsError(f"pipeline parameter nfe_list: a list of step counts >= 1; got {list(self.nfe_list)!r}")
        if not isinstance(self.gate, Mapping):
            raise ParamsError(f"pipeline parameter gate: a mapping of registry.gate keys; got {self.gate!r}")

    @property
    def train_workers(self) -> int:
        """Ray Train workers: one per GPU of every worker, or one per worker on CPU (0: params.yaml's)."""
        if self.gpus_per_worker:
            return max(self.ray_workers, 1) * self.gpus_per_worker
        return self.ray_workers

    def overrides(self) -> list[str]:
        """The user's ``params_set``, then one assignment per form field that is set."""
        out = list(self.params_set)
        if self.data_source:
            out.append(assignment("prepare.source", self.data_source))
            # Each source has its own meaning of root (mnist5k takes none): a new source resets it.
            out.append(assignment("prepare.root", self.data_root or None))
        elif self.data_root:
            out.append(assignment("prepare.root", self.data_root))
        if self.train_workers:
            out.append(assignment("train.distributed.num_workers", self.train_workers))
        # The GPU count is the deployment's choice (the pod or the RayJob gets those GPUs): always explicit.
        out.append(assignment("train.distributed.use_gpu", self.gpus_per_worker > 0))
        if self.zero_stage >= 0:
            out.append(assignment("train.distributed.zero_stage", self.zero_stage))
        if self.init_from:
            out.append(assignment("train.init_from", self.init_from))
        if self.nfe_list:
            out.append(assignment("evaluate.steps", list(self.nfe_list)))
        for key, value in dict(self.gate).items():
            out.append(assignment(f"registry.gate.{key}", value))
        if self.model_name:
            out.append(assignment("registry.model_name", self.model_name))
        if self.mlflow_tracking_uri:
            out.append(assignment("mlflow.tracking_uri", self.mlflow_tracking_uri))
        return out


def section_sets(sets: Sequence[str], section: str) -> list[str]:
    """The assignments aimed at one section, in order."""
    return [s for s in sets if s.split("=", 1)[0].split(".", 1)[0].strip() == section]


def validated_overrides(values: Mapping[str, Any], params: Path) -> list[str]:
    """The run's ``--set`` list, after checking the form's values and every params section a run reads with it
    (a wrong type or an unknown key fails here, naming it)."""
    from components.common.params import ParamsSource
    from pipelines.runtime import schemas

    inputs = RunInputs.of(values)
    inputs.check()
    sets = inputs.overrides()
    src = ParamsSource(Path(params), inputs.params_profile or None, tuple(sets))
    for name, schema in schemas().items():
        src.load(name, schema)
    return sets


# --- the form as compiled: `--param name=value` checked against it -----------------------------------------------
IR_TYPES = {"STRING": str, "NUMBER_INTEGER": int, "NUMBER_DOUBLE": (int, float), "BOOLEAN": bool, "LIST": list,
            "STRUCT": dict}


def parse_pairs(items: Sequence[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ParamsError(f"--param {item!r}: expected name=value (e.g. train_mode=ray_jobs)")
        pairs[name.strip()] = value
    return pairs


def form_arguments(form: Mapping[str, Mapping[str, Any]], raw: Mapping[str, str]) -> dict[str, Any]:
    """``name=value`` pairs (YAML values) checked against a compiled form (name -> {parameterType, ...}): an
    unknown name or a value of the wrong type fails naming the parameter and its type."""
    out: dict[str, Any] = {}
    for name, text in raw.items():
        if name not in form:
            raise ParamsError(f"--param {name}: the pipeline has no such parameter; parameters: {', '.join(form)}")
        kind = form[name]["parameterType"]
        try:
            value = text if kind == "STRING" else yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ParamsError(f"--param {name}={text!r}: not valid YAML: {exc}") from None
        if not isinstance(value, IR_TYPES[kind]) or (kind.startswith("NUMBER") and isinstance(value, bool)):
            raise ParamsError(f"--param {name}={text!r}: {name} is {kind.lower().replace('_', ' ')}, "
                              f"got {type(value).__name__}")
        out[name] = value
    return out


def form_values(form: Mapping[str, Mapping[str, Any]], args: Mapping[str, Any]) -> dict[str, Any]:
    """Every parameter's value for a run: its argument, else the form's default."""
    return {name: args.get(name, spec.get("defaultValue")) for name, spec in form.items()}
