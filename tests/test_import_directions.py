"""Which way imports go (docs/architecture.md): the library imports no step or flow, and no two step modules
import each other. Every import statement counts, ``if TYPE_CHECKING:`` ones too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent
# the folders that install as olivepress.tasks, olivepress.flows, olivepress.deployments
UPPER = ("olivepress.tasks", "olivepress.flows", "olivepress.deployments")


def imports(path: Path) -> set[str]:
    """The modules ``path`` imports, as written (``from a import b``: ``a`` and ``a.b``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_bytes())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_the_library_imports_no_step_flow_or_deployment():
    upward = {
        str(path.relative_to(ROOT)): sorted(name for name in imports(path) if name.startswith(UPPER))
        for path in (ROOT / "olivepress").rglob("*.py")
    }
    assert {path: names for path, names in upward.items() if names} == {}


def test_no_two_step_modules_import_each_other():
    steps = {f"olivepress.tasks.{path.stem}": imports(path) for path in (ROOT / "tasks").glob("*.py")}
    mutual = sorted((a, b) for a in steps for b in steps if a < b and b in steps[a] and a in steps[b])
    assert mutual == []
