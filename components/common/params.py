"""params.yaml, profiles and ``--set`` overrides, resolved in one place for every stage and runner.

A section (one per stage) may contain ``profile: NAME`` and ``profiles: {NAME: {overrides}}``; the chosen
profile's overrides are deep-merged over the section's base keys. On the command line (and in the Kubeflow
tasks, which call the same code):

- ``--profile NAME`` selects NAME in every section that defines it, exactly as if ``profile: NAME`` were
  written in each of those sections; sections without NAME keep their own ``profile:``. A NAME that no section
  defines is an error.
- ``--set section.key.sub=value`` (repeatable; the value is YAML) is applied after the profile, exactly as if the
  resolved section had that value. ``--set section.profile=NAME`` picks one section's profile.

Anything wrong fails here, before the stage does any work, naming the file, the dotted key and what is allowed.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from components.common.errors import ParamsError

PROFILE_KEY = "profile"
PROFILES_KEY = "profiles"


class StageParams(BaseModel):
    """Base for stage schemas: unknown keys are errors, values are immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


Schema = TypeVar("Schema", bound=BaseModel)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Return base updated by override; nested mappings merge, everything else is replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_params(params_path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(params_path)
    if not path.is_file():
        raise ParamsError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: top level must be a mapping of stage sections")
    return data


def resolve_profile(section: dict[str, Any], where: str) -> dict[str, Any]:
    """Apply ``profile``/``profiles`` to a section and return the plain merged mapping."""
    base = {k: v for k, v in section.items() if k not in (PROFILE_KEY, PROFILES_KEY)}
    profiles = section.get(PROFILES_KEY) or {}
    if not isinstance(profiles, dict) or not all(isinstance(v, dict) for v in profiles.values()):
        raise ParamsError(f"{where}.{PROFILES_KEY}: must map profile names to mappings of overrides")
    name = section.get(PROFILE_KEY)
    if name is None:
        return base
    if name not in profiles:
        allowed = ", ".join(map(str, profiles)) or "(none defined)"
        raise ParamsError(f"{where}.{PROFILE_KEY}: unknown profile {name!r}; allowed: {allowed}")
    return deep_merge(base, profiles[name])


def parse_set(assignment: str) -> tuple[str, list[str], Any]:
    """``section.key.sub=value`` -> (section, [key, sub], value parsed as YAML)."""
    dotted, sep, raw = assignment.partition("=")
    parts = dotted.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise ParamsError(f"--set {assignment!r}: expected section.key=value (e.g. train.optim.global_batch=32)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ParamsError(f"--set {assignment!r}: the value is not valid YAML: {exc}") from None
    return parts[0], parts[1:], value


def _assign(mapping: dict[str, Any], keys: list[str], value: Any, what: str) -> dict[str, Any]:
    """A copy of ``mapping`` with ``keys`` set to ``value``; missing levels are created (the schema rejects
    unknown keys afterwards, naming them)."""
    out = dict(mapping)
    head, rest = keys[0], keys[1:]
    if not rest:
        out[head] = value
        return out
    inner = out.get(head) if out.get(head) is not None else {}
    if not isinstance(inner, dict):
        raise ParamsError(f"{what}: {head} is {inner!r}, not a mapping of keys")
    out[head] = _assign(inner, rest, value, what)
    return out


def _model_at(schema: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """Follow a pydantic error location through nested models to the model that owns its last key."""
    model: type[BaseModel] | None = schema
    for part in loc:
        if model is None or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        candidates = typing.get_args(annotation) or (annotation,)
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return model


def _describe(error: dict[str, Any], schema: type[BaseModel], where: str) -> str:
    loc = tuple(error["loc"])
    key = ".".join([where, *map(str, loc)])
    if error["type"] == "extra_forbidden":
        owner = _model_at(schema, loc[:-1])
        allowed = ", ".join(owner.model_fields) if owner else "?"
        return f"{key}: unknown key; allowed: {allowed}"
    return f"{key}: {error['msg']} (got {error.get('input')!r})"


def validate(schema: type[Schema], values: dict[str, Any], where: str, note: str = "") -> Schema:
    """``schema`` built from plain ``values``; ParamsError naming each bad key (``where`` prefixes them)."""
    try:
        return schema.model_validate(values)
    except ValidationError as exc:
        lines = [_describe(e, schema, where) for e in exc.errors()]
        raise ParamsError("\n".join(lines + ([note] if note else []))) from None


@dataclass(frozen=True)
class ParamsSource:
    """Where a command's params come from: the file, the ``--profile`` and the ``--set`` overrides."""

    path: Path = Path("params.yaml")
    profile: str | None = None
    sets: tuple[str, ...] = ()

    @property
    def project_dir(self) -> Path:
        """The folder of params.yaml: relative paths in params (stores, Ray storage) are taken under it."""
        return Path(self.path).resolve().parent

    def document(self) -> dict[str, Any]:
        """The raw file with ``--profile`` and the ``section.profile`` assignments applied (profiles unresolved)."""
        data = read_params(self.path)
        if self.profile is not None:
            defining = [name for name, s in data.items()
                        if isinstance(s, dict) and self.profile in (s.get(PROFILES_KEY) or {})]
            if not defining:
                known = sorted({p for s in data.values() if isinstance(s, dict) for p in (s.get(PROFILES_KEY) or {})})
                raise ParamsError(f"--profile {self.profile!r}: no section of {self.path} defines it; "
                                  f"defined: {', '.join(known) or 'none'}")
            for name in defining:
                data[name] = {**data[name], PROFILE_KEY: self.profile}
        for assignment in self.sets:
            section, keys, value = parse_set(assignment)
            if section not in data:
                raise ParamsError(f"--set {assignment!r}: {self.path} has no section {section!r}; "
                                  f"sections: {', '.join(data)}")
            if keys == [PROFILE_KEY]:
                data[section] = {**(data[section] or {}), PROFILE_KEY: value}
        return data

    def section(self, stage: str) -> dict[str, Any]:
        """Section ``stage`` as a plain mapping: profile applied, then every ``--set`` aimed at it."""
        data = self.document()
        if stage not in data:
            raise ParamsError(f"{self.path}: no {stage!r} section (found: {', '.join(data) or 'none'})")
        section = data[stage] or {}
        if not isinstance(section, dict):
            raise ParamsError(f"{self.path}: {stage}: must be a mapping of keys")
        resolved = resolve_profile(section, f"{self.path}: {stage}")
        for assignment in self.sets:
            name, keys, value = parse_set(assignment)
            if name == stage and keys != [PROFILE_KEY]:
                resolved = _assign(resolved, keys, value, f"--set {assignment!r}")
        return resolved

    def load(self, stage: str, schema: type[Schema]) -> Schema:
        """``schema`` validated from the resolved section ``stage``."""
        profile = (self.document().get(stage) or {}).get(PROFILE_KEY)
        notes = [f"profile {profile!r}"] if profile else []
        notes += [f"--set {s}" for s in self.sets if s.startswith(f"{stage}.")]
        note = f"(values after applying {', '.join(notes)})" if notes else ""
        return validate(schema, self.section(stage), f"{self.path}: {stage}", note)


def load_section(stage: str, schema: type[Schema], params_path: str | Path = "params.yaml") -> Schema:
    """``schema`` validated from section ``stage`` of the file, with the file's own profile choice."""
    return ParamsSource(Path(params_path)).load(stage, schema)
