"""Stages `promote` and `rollback`: the champion/challenger gate and the guarded alias moves.

  tim promote --registered models/registered.json --out runs/promote/decision.json
  tim rollback --out runs/promote/rollback.json

A version becomes `champion` only if its evaluation is complete, it meets the absolute thresholds, it is
monotone when required, and it beats the current champion by the margin at every gate NFE; otherwise it gets
`challenger`. The champion it replaces keeps `previous`, which `tim rollback` restores.

Alias moves are serialised by a lease (components/registry/lease.py), and each move re-reads the champion
immediately before it: if the champion changed after the gate read it, nothing moves. docs/registry.md
describes the window that remains.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from components.common.errors import Contended, RegistryError
from components.common.files import write_json
from components.common.tracking import Tracking
from components.registry.client import (
    CHALLENGER,
    CHAMPION,
    LOWER_IS_BETTER,
    PREVIOUS,
    Evaluation,
    GateParams,
    RegistryParams,
    aliases,
    model_version,
    registered_model,
    version_evaluation,
)
from components.registry.lease import LEASE_TAG, lease

log = logging.getLogger(__name__)


class StaleChampion(Contended):
    """The champion moved between the gate's read and the alias move; nothing was moved."""


def _check(name: str, passed: bool, detail: str) -> dict[str, Any]:
    return {"check": name, "passed": passed, "detail": detail}


def judge(challenger: Evaluation, champion: Evaluation | None, gate: GateParams) -> list[dict[str, Any]]:
    """The gate's checks, in order; the challenger is promoted only if every one passes."""
    needed = sorted({gate.metric, *gate.max, *gate.min})
    missing = [f"{m}@NFE{n}" for n in gate.nfe for m in needed if challenger.figure(n, m) is None]
    if gate.require_monotone and challenger.monotone is None:
        missing.append("monotonicity verdict")
    checks = [_check("evaluation complete", not missing,
                     f"missing or not finite: {', '.join(missing)}" if missing else "every gate figure measured")]
    if missing:
        return checks
    if gate.require_monotone:
        checks.append(_check("monotone", challenger.monotone is True,
                             "FID stays within its noise as NFE grows" if challenger.monotone
                             else "FID gets worse beyond its noise as NFE grows"))
    for metric, bound in gate.max.items():
        worst = max(challenger.figure(n, metric) for n in gate.nfe)
        checks.append(_check(f"{metric} <= {bound:g}", worst <= bound, f"worst over NFE {gate.nfe}: {worst:.6g}"))
    for metric, bound in gate.min.items():
        worst = min(challenger.figure(n, metric) for n in gate.nfe)
        checks.append(_check(f"{metric} >= {bound:g}", worst >= bound, f"worst over NFE {gate.nfe}: {worst:.6g}"))
    if champion is None:
        checks.append(_check("beats champion", True, "no champion yet"))
        return checks
    sign = 1 if LOWER_IS_BETTER[gate.metric] else -1
    details, passed = [], True
    for n in gate.nfe:
        theirs = champion.figure(n, gate.metric)
        if theirs is None:
            raise RegistryError(f"the champion's evaluation (run {champion.run_id}) has no finite {gate.metric} "
                                f"at NFE {n}: it cannot be compared; re-evaluate it at the gate NFEs {gate.nfe}")
        ours = challenger.figure(n, gate.metric)
        gain, margin = sign * (theirs - ours), max(gate.min_improvement, gate.min_rel_improvement * abs(theirs))
        passed &= gain >= margin
        details.append(f"NFE {n}: {ours:.6g} vs {theirs:.6g} (gain {gain:.6g}, needed {margin:.6g})")
    checks.append(_check(f"beats champion on {gate.metric}", passed, "; ".join(details)))
    return checks


def _side(version, ev: Evaluation) -> dict[str, Any]:
    return {"version": str(version.version), "run_id": ev.run_id, "monotone": ev.monotone,
            "figures": {f"nfe_{n}": values for n, values in sorted(ev.per_nfe.items())}}


def decide(client, name: str, version: str | int, gate: GateParams) -> dict[str, Any]:
    """Read the challenger and the current champion and judge; moves nothing."""
    challenger = model_version(client, name, version)
    champion_version = aliases(registered_model(client, name)).get(CHAMPION)
    decision: dict[str, Any] = {"model": name, "rule": gate.model_dump(mode="json"),
                                "decided_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    challenger_ev = version_evaluation(client, challenger, gate.guidance_scale)
    decision["challenger"] = _side(challenger, challenger_ev)
    if champion_version == str(challenger.version):
        return {**decision, "champion": decision["challenger"], "checks": [], "verdict": "unchanged"}
    champion = model_version(client, name, champion_version) if champion_version else None
    champion_ev = version_evaluation(client, champion, gate.guidance_scale) if champion else None
    decision["champion"] = _side(champion, champion_ev) if champion else None
    checks = judge(challenger_ev, champion_ev, gate)
    return {**decision, "checks": checks, "verdict": "promoted" if all(c["passed"] for c in checks) else "rejected"}


def _guard(client, name: str, expected: str | None, token: str | None) -> dict[str, str]:
    """Re-read the registry right before a move: same champion as judged, and (when locked) still our lease."""
    model = registered_model(client, name)
    current = aliases(model)
    if current.get(CHAMPION) != expected:
        raise StaleChampion(f"{name!r}: the champion changed from {expected or 'none'} to "
                            f"{current.get(CHAMPION) or 'none'} while the gate ran; nothing was moved, "
                            "run the promotion again to judge against the new champion")
    if token is not None and json.loads(model.tags.get(LEASE_TAG) or "{}").get("owner") != token:
        raise StaleChampion(f"{name!r}: the promotion lease expired while the gate ran; nothing was moved")
    return current


def apply(client, decision: dict[str, Any], token: str | None = None) -> dict[str, Any]:
    """Move the aliases the decision calls for, after the guard; returns the decision with the aliases after."""
    name, version = decision["model"], decision["challenger"]["version"]
    expected = decision["champion"]["version"] if decision["champion"] else None
    before = _guard(client, name, expected, token)
    if decision["verdict"] == "promoted":
        if expected:
            client.set_registered_model_alias(name, PREVIOUS, expected)
        client.set_registered_model_alias(name, CHAMPION, version)
        if before.get(CHALLENGER) == version:
            client.delete_registered_model_alias(name, CHALLENGER)
    elif decision["verdict"] == "rejected":
        client.set_registered_model_alias(name, CHALLENGER, version)
    if decision["verdict"] != "unchanged":
        client.set_model_version_tag(name, version, "tim.promotion.verdict", decision["verdict"])
        client.set_model_version_tag(name, version, "tim.promotion.judged_against", expected or "none")
    return {**decision, "aliases": aliases(registered_model(client, name))}


def _record(client, decision: dict[str, Any], run_id: str, kind: str, out_file: Path | None) -> None:
    """The decision as JSON: on the version's training run in MLflow, and in ``out_file``."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    client.log_dict(run_id, decision, f"promotion/{kind}-{stamp}.json")
    if out_file is not None:
        write_json(out_file, decision)


def registered_version(params: RegistryParams, registered_file: str | Path, tracking: Tracking) -> str:
    """The version `tim register` recorded in ``registered_file`` (which must name this model and store)."""
    path = Path(registered_file)
    if not path.is_file():
        raise RegistryError(f"{path}: no registration record; run `tim register` first or pass --version")
    record = json.loads(path.read_text())
    if record.get("name") != params.model_name:
        raise RegistryError(f"{path} names model {record.get('name')!r}, params registry.model_name is "
                            f"{params.model_name!r}")
    tracking.same_store(record.get("tracking_uri"), f"the version in {path}")
    return str(record["version"])


def promote(params: RegistryParams, version: str | int, out_file: str | Path | None = None, *,
            tracking: Tracking) -> dict[str, Any]:
    """Judge ``version`` against the champion and move the aliases; returns the decision."""
    uri = tracking.uri
    client = tracking.client(must_exist=True)
    registered_model(client, params.model_name)
    with lease(client, params.model_name, params.lock) as token:
        decision = decide(client, params.model_name, version, params.gate)
        decision = apply(client, decision, token)
    decision["tracking_uri"] = uri
    _record(client, decision, decision["challenger"]["run_id"], "decision", Path(out_file) if out_file else None)
    log.info("%s version %s: %s", params.model_name, version, decision["verdict"])
    return decision


def rollback(params: RegistryParams, out_file: str | Path | None = None, *, tracking: Tracking) -> dict[str, Any]:
    """Give `champion` back to the `previous` version (no gate: it passed one when it was promoted)."""
    uri = tracking.uri
    client = tracking.client(must_exist=True)
    name = params.model_name
    with lease(client, name, params.lock) as token:
        before = aliases(registered_model(client, name))
        current, previous = before.get(CHAMPION), before.get(PREVIOUS)
        if not current or not previous:
            missing = CHAMPION if not current else PREVIOUS
            raise RegistryError(f"{name!r}: alias {missing!r} points nowhere, nothing to roll back to "
                                f"(aliases: {before or 'none'})")
        demoted = model_version(client, name, current)
        model_version(client, name, previous)  # still there (deleting a version drops its aliases, but say so)
        _guard(client, name, current, token)
        client.set_registered_model_alias(name, CHAMPION, previous)
        # `previous` would now name the demoted version; a second rollback must not re-promote it unjudged.
        client.delete_registered_model_alias(name, PREVIOUS)
        client.set_model_version_tag(name, current, "tim.promotion.verdict", "rolled_back")
        decision = {"model": name, "verdict": "rolled_back", "from": current, "to": previous,
                    "decided_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "aliases": aliases(registered_model(client, name)), "tracking_uri": uri}
    run_id = demoted.tags.get("tim.train.run_id") or demoted.run_id
    _record(client, decision, run_id, "rollback", Path(out_file) if out_file else None)
    return decision

