"""Cache keys from content: what a step reads, how it is set, which code and libraries run it.

A key never contains a path: the same bytes under another name give the same key (folders are hashed by
:func:`olivepress.files.folder_sha256`), and an edited line of the JSONL gives a new one.

A step's code version is the hash of its own module and of every olivepress module its code imports,
found from the import statements themselves (:func:`code_modules`): followed transitively within the
olivepress package, imports inside functions included, ``if TYPE_CHECKING:`` imports (type hints, never
run) left out. So editing ``export/builder.build_base_model`` invalidates evaluate, which imports it, and
editing ``chat.py`` invalidates no step. The modules in :data:`NOT_OUTPUT_CODE` are left out, and not
followed: they store, lock, retry, key and configure the outputs, they never compute them (a step's
settings are part of its key as values, so ``config.py`` decides nothing a key misses).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
from collections.abc import Iterator
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGE = "olivepress"
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
# olivepress modules that a step imports to store, lock, retry, key or configure its output, not to compute
# it: not part of any code version, and their own imports are not followed.
NOT_OUTPUT_CODE = frozenset(
    {
        "olivepress.store.cache_keys",
        "olivepress.config",
        "olivepress.errors",
        "olivepress.progress",  # reports where a step stands, on the terminal
        "olivepress.retry",
        "olivepress.store.s3_lease",
        "olivepress.steps",
        "olivepress.store",
    }
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


def source_bytes(path: Path) -> bytes:
    """A module's source as the code versions read it (a test may stand in an edited copy)."""
    return path.read_bytes()


def module_file(name: str) -> Path | None:
    """The source file of the olivepress module ``name``; None when ``name`` is no module (a function or
    class imported by ``from module import name``)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a parent that is a module, not a package
        return None
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:`` blocks."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _with_parents(name: str) -> list[str]:
    """``a.b.c`` → ``a``, ``a.b``, ``a.b.c``: importing a module runs its packages' ``__init__`` too."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def imported_modules(name: str) -> set[str]:
    """The olivepress modules that module ``name`` imports (directly), wherever the import statement is."""
    path = module_file(name)
    if path is None:
        raise ModuleNotFoundError(f"no olivepress source module named {name}")
    tree = ast.parse(source_bytes(path), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    candidates: list[str] = []
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            candidates += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = importlib.util.resolve_name("." * node.level + base, package)
            candidates += [base, *(f"{base}.{alias.name}" for alias in node.names)]
    found = set()
    for candidate in candidates:
        if candidate.split(".")[0] != PACKAGE:
            continue
        found.update(module for module in _with_parents(candidate) if module_file(module) is not None)
    found.discard(name)
    return found


@cache
def code_modules(module: str) -> tuple[str, ...]:
    """``module`` and every olivepress module its code imports, transitively, without
    :data:`NOT_OUTPUT_CODE`: what a step's code version covers."""
    seen, todo = set(_with_parents(module)), [module]
    while todo:
        for imported in imported_modules(todo.pop()):
            if imported not in seen and imported not in NOT_OUTPUT_CODE:
                seen.add(imported)
                todo.append(imported)
    return tuple(sorted(seen))


# Source files that a module compiles or reads as code, beside its own, relative to its folder: part of the
# code version of every step that imports the module (the LoraAdd kernel is built into optimize's output).
MODULE_DATA = {"olivepress.export.kernel": ("kernels/lora_add.cu",)}


@cache
def code_version(module: str) -> str:
    """Hash of the sources of :func:`code_modules` of ``module`` (a step's module, e.g. its ``__name__``),
    with the files :data:`MODULE_DATA` names."""
    digest = hashlib.sha256()
    for name in code_modules(module):
        path = module_file(name)
        assert path is not None, name
        digest.update(name.encode() + b"\0" + hashlib.sha256(source_bytes(path)).digest())
        for data in MODULE_DATA.get(name, ()):
            digest.update(data.encode() + b"\0" + hashlib.sha256(source_bytes(path.parent / data)).digest())
    return digest.hexdigest()


def records_sha256(records: list[dict[str, Any]]) -> str:
    """Hash of examples as the steps use them (prompt and response, in order)."""
    rows = [[record["prompt"], record["response"]] for record in records]
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode("utf-8")).hexdigest()


def step_key(step: str, module: str, *, inputs: dict[str, str], settings: dict[str, Any]) -> str:
    """The cache key of one step: a SHA-256 over everything that decides its output."""
    material = {
        "step": step,
        "inputs": inputs,
        "settings": settings,
        "code": code_version(module),
        "libraries": library_versions(),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode("utf-8")).hexdigest()
