"""Write a stage's output folder under a temporary sibling and rename it into place only on success,
so an interrupted or failed stage never leaves a folder that looks finished."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # Same parent => same filesystem => os.replace/rename is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    tmp.chmod(0o755)  # mkdtemp creates 0700; outputs should read like any other folder
    tmp.rename(final)
