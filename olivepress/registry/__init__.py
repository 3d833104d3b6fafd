"""Registered models: what an entry holds, and the local registry (the offline default backend).

An entry is a folder: ``model/`` (the ONNX Runtime GenAI folder with its ``.onnx_adapter``), ``report/``
and ``lineage.json`` (data hash, config, metrics, gate record, library versions, flow run); from a run with
several datasets also ``adapters/<name>.onnx_adapter``, one per dataset whose adapter passed its gate, each
with its own record under the lineage's ``adapters``. Both backends
register the same folder; ``lineage["content_sha256"]`` (the hash of every file but the lineage) is what
makes registering the same model twice return the existing version instead of a new one.

Local registry layout: ``<root>/<name>/<version>/``. An entry is staged beside its final place and renamed
into it, so a version folder that exists is complete; versions are claimed under a file lock
(``<root>/<name>/.lock``), so concurrent registrations never take the same one, and the same content
registered at once by two runs gets one version; files are made read-only once registered.

The Azure ML backend, beside it: :mod:`olivepress.registry.azureml`.
"""

from __future__ import annotations

import json
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from olivepress.files import file_lock, folder_sha256, move_into_place, staging_dir

LINEAGE_FILE = "lineage.json"
# an entry of a run with several datasets: its adapters by name, adapters/<name>.onnx_adapter, beside model/
ADAPTERS_DIR = "adapters"
ADAPTER_SUFFIX = ".onnx_adapter"
LOCK_FILE = ".lock"
STAGING_PREFIX = ".staging-"


@dataclass(frozen=True)
class Registration:
    backend: str  # "local" or "azureml"
    name: str
    version: str
    uri: str  # a folder for local, the asset id for Azure ML
    reused: bool  # True when this very content was already registered under ``version``


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    version: str
    path: Path
    lineage: dict[str, Any]


def content_sha256(sources: dict[str, Path]) -> str:
    """One hash over every file of ``sources`` (entry sub-folder → source folder), by relative path."""
    return folder_sha256(sources)


def default_model_name(base_model: Path | str) -> str:
    """A registry name from the base model's folder or name: lower case, safe for Azure ML and file systems."""
    slug = re.sub(r"[^a-z0-9_.-]+", "-", Path(base_model).name.lower()).strip("-._") or "model"
    return f"{slug}-olivepress"[:255]


def assemble_entry(target: Path, sources: dict[str, Path], lineage: dict[str, Any]) -> None:
    """Copy each source folder to ``target/<key>`` and write the lineage last."""
    for key, source in sources.items():
        shutil.copytree(source, target / key)
    (target / LINEAGE_FILE).write_text(json.dumps(lineage, indent=1, sort_keys=True), encoding="utf-8")


class LocalRegistry:
    def __init__(self, root: Path) -> None:
        self.root = root

    def register(self, name: str, sources: dict[str, Path], lineage: dict[str, Any]) -> Registration:
        """Add an entry under the next free version, or return the version that already holds this content."""
        model_root = self.root / name
        with staging_dir(model_root, prefix=STAGING_PREFIX) as staging:
            assemble_entry(staging, sources, lineage)
            waiting = f"registry: waiting for another registration of {name}"
            with file_lock(model_root / LOCK_FILE, waiting):
                for entry in self.entries(name):
                    if entry.lineage.get("content_sha256") == lineage["content_sha256"]:
                        return Registration("local", name, entry.version, str(entry.path), reused=True)
                version = str(max((int(e.version) for e in self.entries(name)), default=0) + 1)
                final = model_root / version
                if not move_into_place(staging, final, replace=False):
                    raise FileExistsError(f"{final} exists but is not a complete entry; move it away")
            make_read_only(final)
            return Registration("local", name, version, str(final), reused=False)

    def entries(self, name: str | None = None) -> list[RegistryEntry]:
        """Complete entries, oldest version first; staging folders and other files are not entries."""
        names = (
            [name]
            if name
            else sorted(p.name for p in self.root.iterdir() if p.is_dir())
            if self.root.is_dir()
            else []
        )
        found = []
        for model_name in names:
            model_root = self.root / model_name
            if not model_root.is_dir():
                continue
            versions = [p for p in model_root.iterdir() if p.is_dir() and p.name.isdigit()]
            for folder in sorted(versions, key=lambda p: int(p.name)):
                lineage_file = folder / LINEAGE_FILE
                if lineage_file.is_file():
                    lineage = json.loads(lineage_file.read_text(encoding="utf-8"))
                    found.append(RegistryEntry(model_name, folder.name, folder, lineage))
        return found


def make_read_only(folder: Path) -> None:
    """Registered files are immutable: clear every write bit (folders too, so nothing can be added)."""
    write_bits = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
    paths = sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True)
    for path in [*paths, folder]:
        path.chmod(path.stat().st_mode & ~write_bits)
