"""The security scan: checkov (offline) over the rendered overlays, the pods of the RayJob template and of RayJobs
rendered from parameters, and the Dockerfile, with the kubernetes, dockerfile and secrets checks. Nothing may
fail; every skipped check is listed with its reason in docs/deploy.md."""

from __future__ import annotations

import re

import yaml

from tests.infra.manifests import DEPLOY_DOC, DOCKERFILE, INFRA


def failed_checks(checkov, *, canary: bool) -> list[dict]:
    out = []
    for report in checkov["by_framework"].values():
        for check in report["results"]["failed_checks"]:
            if check["file_path"].lstrip("/").startswith("canary/") == canary:
                out.append(check)
    return out


def scanned_files(checkov) -> set[str]:
    files = set()
    for report in checkov["by_framework"].values():
        for kind in ("passed_checks", "failed_checks", "skipped_checks"):
            files |= {c["file_path"].lstrip("/") for c in report["results"][kind]}
    return files


def test_checkov_ran_every_framework_on_every_file(checkov):
    assert {"kubernetes", "dockerfile", "secrets"} <= checkov["by_framework"].keys()
    for framework, report in checkov["by_framework"].items():
        assert report["summary"]["parsing_errors"] == 0, (framework, report["results"].get("parsing_errors"))
    expected = set(checkov["files"]) | {"canary/canary.yaml"}
    missing = {f for f in expected if f != "canary/canary.yaml" and f not in scanned_files(checkov)}
    assert not missing, f"checkov judged nothing in {sorted(missing)}"


def test_checkov_finds_nothing_in_the_project(checkov):
    failures = failed_checks(checkov, canary=False)
    assert not failures, "\n".join(f"{c['check_id']} {c['check_name']}: {c['file_path']} {c['resource']}"
                                   for c in failures)


def test_checkov_does_flag_a_broken_manifest(checkov):
    """The canary (privileged, no limits, no probes, a literal credential) must fail: the scan really judges."""
    flagged = {c["check_id"] for c in failed_checks(checkov, canary=True)}
    assert {"CKV_K8S_16", "CKV_K8S_11", "CKV_K8S_13", "CKV_K8S_8", "CKV_K8S_20"} <= flagged, sorted(flagged)
    assert any(check.startswith("CKV_SECRET_") for check in flagged), sorted(flagged)


def documented_skips() -> dict[str, str]:
    """Check id -> reason, from the table of docs/deploy.md's "Security scan" section."""
    text = DEPLOY_DOC.read_text()
    section = text[text.index("## Security scan"):]
    section = section[:section.find("\n## ", 3)] if "\n## " in section[3:] else section
    return {m.group(1): m.group(2).strip() for m in
            re.finditer(r"^\|\s*`?((?:CKV2?_[A-Z0-9_]+)|(?:DL\d{4}))`?\s*\|[^|]*\|\s*([^|]+)\|", section, re.M)}


def test_every_skipped_check_is_listed_and_justified_in_the_docs(checkov):
    config = yaml.safe_load((INFRA / "checkov.yaml").read_text())
    skipped = set(config.get("skip-check", []))
    for report in checkov["by_framework"].values():
        skipped |= {c["check_id"] for c in report["results"]["skipped_checks"]}
    skipped |= set(re.findall(r"hadolint ignore=(DL\d{4})", DOCKERFILE.read_text()))
    docs = documented_skips()
    assert skipped == set(docs), f"skipped: {sorted(skipped)}; documented in docs/deploy.md: {sorted(docs)}"
    assert all(len(reason) > 20 for reason in docs.values()), docs
