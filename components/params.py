"""Load one stage's section of params.yaml, apply its profile, and validate it with a pydantic schema.

Profiles convention (used by every stage): a section may contain ``profile: NAME`` and
``profiles: {NAME: {overrides}}``; the chosen profile's overrides are deep-merged over the section's
base keys before validation. Anything wrong fails here, before the stage does any work, with a
message naming the key and what is allowed.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from components.errors import ParamsError

PROFILE_KEY = "profile"
PROFILES_KEY = "profiles"


class StageParams(BaseModel):
    """Base for stage schemas: unknown keys are errors, values are immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


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


def load_section(stage: str, schema: type[BaseModel], params_path: str | Path = "params.yaml") -> BaseModel:
    """Return ``schema`` validated from section ``stage`` of params.yaml, after applying its profile.

    Raises ParamsError naming the file, the dotted key and what is allowed.
    """
    data = read_params(params_path)
    where = f"{params_path}: {stage}"
    if stage not in data:
        raise ParamsError(f"{params_path}: no {stage!r} section (found: {', '.join(data) or 'none'})")
    section = data[stage] or {}
    if not isinstance(section, dict):
        raise ParamsError(f"{where}: must be a mapping of keys")
    merged = resolve_profile(section, where)
    try:
        return schema.model_validate(merged)
    except ValidationError as exc:
        lines = [_describe(e, schema, where) for e in exc.errors()]
        if section.get(PROFILE_KEY):
            lines.append(f"(values after applying profile {section[PROFILE_KEY]!r})")
        raise ParamsError("\n".join(lines)) from None
