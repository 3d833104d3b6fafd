"""Cache keys from content: what a step reads, how it is set, which code and libraries run it.

A key never contains a path: the same bytes under another name give the same key (folders are hashed by
:func:`olivepress.files.folder_sha256`), and an edited line of the JSONL gives a new one. A step's code
version is the hash of its own module plus olivepress's shared modules (``olivepress/*.py``), so editing
the evaluate step does not invalidate quantization, while a change to a shared helper (conservatively)
invalidates every step.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent
# The libraries whose versions decide what the outputs are: part of every key, and of the lineage.
LIBRARIES = (
    "olivepress",
    "torch",
    "transformers",
    "llmcompressor",
    "olive-ai",
    "peft",
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-genai",
    "onnxruntime-genai-cuda",
    "prefect",
    "great-expectations",
    "rouge-score",
)


@cache
def library_versions() -> dict[str, str]:
    versions = {}
    for package in LIBRARIES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


@cache
def code_version(step_module: str) -> str:
    """Hash of the step's module file and of every shared olivepress module."""
    digest = hashlib.sha256()
    for path in [Path(step_module).resolve(), *sorted(PACKAGE_DIR.glob("*.py"))]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def records_sha256(records: list[dict[str, Any]]) -> str:
    """Hash of examples as the steps use them (prompt and response, in order)."""
    rows = [[record["prompt"], record["response"]] for record in records]
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode("utf-8")).hexdigest()


def step_key(step: str, step_module: str, *, inputs: dict[str, str], settings: dict[str, Any]) -> str:
    """The cache key of one step: a SHA-256 over everything that decides its output."""
    material = {
        "step": step,
        "inputs": inputs,
        "settings": settings,
        "code": code_version(step_module),
        "libraries": library_versions(),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode("utf-8")).hexdigest()
