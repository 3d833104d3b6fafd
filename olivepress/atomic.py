"""Outputs that are complete or absent: a step writes into a temporary sibling folder, then renames it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder that becomes ``final`` only if the block finishes.

    A crash leaves at most a ``.tmp-*`` folder beside ``final``, never a partial ``final``; an existing
    ``final`` is replaced whole.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield staging
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 text so that readers see the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, prefix=f".tmp-{path.name}-", delete=False
    ) as tmp:
        tmp.write(text)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp.name, 0o666 & ~umask)  # NamedTemporaryFile creates 0600; give the file normal permissions
    os.replace(tmp.name, path)
