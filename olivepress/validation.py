"""What validating a dataset found: the validate step writes it, the report publishes a failure's.

Here, not in ``tasks/validate.py``, so that the report reads it without importing the validate step, which
imports the report to publish its failure.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class LineIssue:
    """One problem on one 1-based line of the file; line 0 means the file as a whole."""

    line: int
    reason: str
    field: str | None = None


@dataclass
class ValidationReport:
    """Everything validation found; errors make the dataset unusable, warnings do not."""

    path: Path
    n_lines: int
    n_records: int
    errors: list[LineIssue]
    warnings: list[LineIssue]
    min_chars: int
    max_chars: int

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        verdict = "valid" if self.ok else "INVALID"
        return (
            f"{self.path}: {verdict}: {self.n_records} records on {self.n_lines} lines, "
            f"{len(self.errors)} errors, {len(self.warnings)} warnings"
        )

    def to_text(self, *, include_warnings: bool = False) -> str:
        """One `line N: reason; reason` row per bad line, sorted by line; warnings, if included, are marked."""
        reasons_by_line: dict[int, list[str]] = defaultdict(list)
        for issue in self.errors:
            reasons_by_line[issue.line].append(issue.reason)
        for issue in self.warnings if include_warnings else []:
            reasons_by_line[issue.line].append(f"warning: {issue.reason}")
        return "\n".join(
            f"{where(line)}: {'; '.join(reasons)}" for line, reasons in sorted(reasons_by_line.items())
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "ok": self.ok,
            "n_lines": self.n_lines,
            "n_records": self.n_records,
            "min_chars": self.min_chars,
            "max_chars": self.max_chars,
            "errors": [asdict(issue) for issue in sorted(self.errors, key=lambda issue: issue.line)],
            "warnings": [asdict(issue) for issue in sorted(self.warnings, key=lambda issue: issue.line)],
        }


def where(line: int) -> str:
    """How an issue names its line: ``line N``, or ``file`` for line 0."""
    return f"line {line}" if line else "file"
