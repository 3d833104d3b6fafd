"""Check a prompt/response JSON Lines dataset before any model work, naming every bad line.

A plain reader handles what Great Expectations never sees (bytes, JSON syntax, record shape); the content
rules (blank values, lengths, chat-template control tokens, duplicates) run as a GX suite over the parsed
records. The suite's DataFrame is indexed by line number, so GX's failing indexes are the file's line numbers.

Decisions worth knowing:
- A UTF-8 BOM at the start, CRLF line endings and a missing or present final newline are all valid.
- A blank (empty or whitespace-only) line between records is an error: JSON Lines has no empty lines, and
  one in the middle usually means a broken paste or merge. Blank lines after the last record are harmless
  editor leftovers, so they are only warned about.
- Extra keys are allowed and ignored; each one is warned about once, on the first line that has it.
- A key that appears twice in one object is an error naming it: JSON parsers keep one of the values
  silently, so the line would not train on what it seems to say.
- Duplicate prompts and duplicate prompt/response pairs are warnings, not errors: repeats are legitimate
  in small datasets, but they weigh those examples more in training.
- Issues about the file as a whole (no records at all) carry line 0.
- read_examples uses the same reader but not the GX rules: their bounds belong to the run's config, and the
  flow runs validate_jsonl first; loading data for later steps then costs no GX import.
- The bounds themselves (min_chars, max_chars) are checked by the config's ValidationSettings only.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from olivepress.config import ValidationSettings, checked
from olivepress.errors import UserError
from olivepress.files import atomic_write_text
from olivepress.steps import Step, StepSettings
from olivepress.store import ArtifactStore, Manifest
from olivepress.validation import LineIssue, ValidationReport, where

if TYPE_CHECKING:
    from great_expectations import ExpectationSuite

REQUIRED_FIELDS = ("prompt", "response")
UTF8_BOM = b"\xef\xbb\xbf"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
# ChatML/Phi/Llama-3 style <|name|> tokens, Llama-2 <s> and </s>, Gemma's turn markers. Inside training
# text they teach the model to end or switch turns in the middle of an answer.
CONTROL_TOKEN_REGEX = r"<\|[A-Za-z0-9_]+\|>|</?s>|<(?:start|end)_of_turn>"
MAX_ERRORS_IN_EXCEPTION = 20


DEFAULTS = ValidationSettings()


def validate_jsonl(
    path: str | os.PathLike[str], *, min_chars: int = DEFAULTS.min_chars, max_chars: int = DEFAULTS.max_chars
) -> ValidationReport:
    """Check every line of a {"prompt", "response"} JSON Lines file; raise UserError only if unreadable or
    if the bounds break the config's rules (ValidationSettings)."""
    checked(ValidationSettings, "validation", min_chars=min_chars, max_chars=max_chars)
    path = Path(path)
    n_lines, records, errors, warnings = _read_lines(path)
    if records:
        content_errors, content_warnings = _check_content(records, min_chars=min_chars, max_chars=max_chars)
        errors += content_errors
        warnings += content_warnings
    return ValidationReport(path, n_lines, len(records), errors, warnings, min_chars, max_chars)


def read_examples(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Load the records as {"prompt", "response", "line"} dicts (extra keys dropped) for the later steps.

    Reads exactly as validate_jsonl does (BOM, CRLF, line numbers) and raises UserError listing the lines
    that cannot become records; the content rules are validate_jsonl's (see the module docstring).
    """
    path = Path(path)
    _, records, errors, _ = _read_lines(path)
    if errors:
        shown = sorted(errors, key=lambda issue: issue.line)[:MAX_ERRORS_IN_EXCEPTION]
        listing = "\n".join(f"  {where(issue.line)}: {issue.reason}" for issue in shown)
        more = f"\n  ... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
        raise UserError(f"{path} is not a valid dataset ({len(errors)} errors):\n{listing}{more}")
    return records


def write_report(report: ValidationReport, run_dir: str | os.PathLike[str]) -> Path:
    """Write validation.json and validation.txt (warnings included) into the run folder; return the JSON."""
    run_dir = Path(run_dir)
    json_path = run_dir / "validation.json"
    atomic_write_text(json_path, json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")
    details = report.to_text(include_warnings=True)
    atomic_write_text(run_dir / "validation.txt", "\n".join(filter(None, [report.summary(), details])) + "\n")
    return json_path


def _read_lines(path: Path) -> tuple[int, list[dict[str, Any]], list[LineIssue], list[LineIssue]]:
    """The plain reader: (line count, records, errors, warnings) for everything GX cannot see."""
    lines = _split_lines(_read_bytes(path))
    if lines and lines[0].startswith(UTF16_BOMS):
        return len(lines), [], [LineIssue(1, "file is UTF-16 encoded; save it as UTF-8")], []
    records, errors, warnings = _parse_lines(lines)
    if not records and not errors:
        errors.append(LineIssue(0, "file has no records (it is empty or only blank lines)"))
    return len(lines), records, errors, warnings


def _read_bytes(path: Path) -> bytes:
    if path.is_dir():
        raise UserError(f"dataset path is a directory, expected a JSON Lines file: {path}")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"dataset file not found: {path}") from None
    except OSError as exc:
        raise UserError(f"cannot read dataset file {path}: {exc.strerror}") from exc


def _split_lines(data: bytes) -> list[bytes]:
    """The file's lines; a leading BOM and the final newline are not content.

    CRLF needs no special case: the CR left on each line is whitespace to both JSON and the blank-line test.
    """
    data = data.removeprefix(UTF8_BOM)
    if not data:
        return []
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return lines


def _parse_lines(lines: list[bytes]) -> tuple[list[dict[str, Any]], list[LineIssue], list[LineIssue]]:
    """Turn lines into records, reporting every line that cannot become one."""
    records: list[dict[str, Any]] = []
    errors: list[LineIssue] = []
    blank_lines: list[int] = []
    last_content_line = 0
    lines_by_extra_key: dict[str, list[int]] = {}
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            blank_lines.append(number)
            continue
        last_content_line = number
        duplicated_keys: list[str] = []
        try:
            value = json.loads(raw.decode("utf-8"), object_pairs_hook=_object_noting(duplicated_keys))
        except UnicodeDecodeError as exc:
            reason = f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line)"
            errors.append(LineIssue(number, reason))
            continue
        except json.JSONDecodeError as exc:
            errors.append(LineIssue(number, f"invalid JSON: {exc.msg} (column {exc.colno})"))
            continue
        if not isinstance(value, dict):
            reason = f'expected a JSON object with "prompt" and "response", got {_json_kind(value)}'
            errors.append(LineIssue(number, reason))
            continue
        if duplicated_keys:
            errors += [
                LineIssue(number, f'duplicate key "{key}": a JSON object may hold each key once', key)
                for key in dict.fromkeys(duplicated_keys)
            ]
            continue
        field_errors = [
            LineIssue(number, f'"{field}" must be a string, got {_json_kind(value[field])}', field)
            if field in value
            else LineIssue(number, f'missing "{field}"', field)
            for field in REQUIRED_FIELDS
            if not isinstance(value.get(field), str)
        ]
        errors += field_errors
        for key in value:
            if key not in REQUIRED_FIELDS:
                lines_by_extra_key.setdefault(key, []).append(number)
        if not field_errors:
            records.append({"prompt": value["prompt"], "response": value["response"], "line": number})

    warnings = [
        LineIssue(number, "blank line at end of file (ignored)")
        for number in blank_lines
        if number > last_content_line
    ]
    errors += [
        LineIssue(number, "blank line between records (JSON Lines allows no empty lines; delete it)")
        for number in blank_lines
        if number < last_content_line
    ]
    warnings += [
        LineIssue(key_lines[0], f'extra key "{key}" is ignored (on {_count(len(key_lines), "line")})', key)
        for key, key_lines in lines_by_extra_key.items()
    ]
    return records, errors, warnings


def _object_noting(duplicated_keys: list[str]) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    """A json.loads object_pairs_hook that builds each object as usual and notes every key it saw twice
    (in any object of the line, nested ones included)."""

    def build(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        value: dict[str, Any] = {}
        for key, item in pairs:
            if key in value:
                duplicated_keys.append(key)
            value[key] = item
        return value

    return build


def _json_kind(value: Any) -> str:
    """JSON's name for a parsed value, so messages speak the user's format rather than Python's."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return {str: "a string", list: "an array", dict: "an object"}[type(value)]


def _check_content(
    records: list[dict[str, Any]], *, min_chars: int, max_chars: int
) -> tuple[list[LineIssue], list[LineIssue]]:
    """Run the GX suite over the records; failures of warning-severity expectations become warnings."""
    import great_expectations as gx
    import pandas as pd
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )
    from great_expectations.expectations.metadata_types import FailureSeverity

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    context = gx.get_context(
        mode="ephemeral",
        project_config=DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(),
            progress_bars=ProgressBarsConfig(globally=False),
        ),
    )
    frame = pd.DataFrame(
        {field: [record[field] for record in records] for field in REQUIRED_FIELDS},
        index=[record["line"] for record in records],
    )
    batch = (
        context.data_sources.add_pandas("dataset")
        .add_dataframe_asset("records")
        .add_batch_definition_whole_dataframe("all records")
        .get_batch(batch_parameters={"dataframe": frame})
    )
    results = batch.validate(_content_suite(min_chars, max_chars), result_format="COMPLETE").results

    records_by_line = {record["line"]: record for record in records}
    issues_by_rule: dict[str, list[LineIssue]] = {}
    warning_rules: set[str] = set()
    for result in results:
        config = result.expectation_config
        failing_lines = result.result.get("unexpected_index_list") or []
        if not result.success and not failing_lines:
            raise RuntimeError(
                f"Great Expectations could not evaluate {config.type}: {result.exception_info}"
            )
        rule, field = config.meta["rule"], config.meta.get("field")
        issues = _describe_failures(
            rule, field, failing_lines, records_by_line, min_chars=min_chars, max_chars=max_chars
        )
        issues_by_rule.setdefault(rule, []).extend(issues)
        if config.severity == FailureSeverity.WARNING:
            warning_rules.add(rule)

    # One reason per problem: a blank value is not also "too short", an exact repeat not also a repeated prompt.
    blank_values = {(issue.line, issue.field) for issue in issues_by_rule["blank"]}
    repeated_pairs = {issue.line for issue in issues_by_rule["duplicate_pair"]}
    issues_by_rule["length"] = [
        issue for issue in issues_by_rule["length"] if (issue.line, issue.field) not in blank_values
    ]
    issues_by_rule["duplicate_prompt"] = [
        issue for issue in issues_by_rule["duplicate_prompt"] if issue.line not in repeated_pairs
    ]
    errors = [
        issue for rule, issues in issues_by_rule.items() if rule not in warning_rules for issue in issues
    ]
    errors.sort(key=lambda issue: (issue.line, REQUIRED_FIELDS.index(issue.field)))
    warnings = [issue for rule, issues in issues_by_rule.items() if rule in warning_rules for issue in issues]
    return errors, warnings


def _content_suite(min_chars: int, max_chars: int) -> ExpectationSuite:
    """The GX expectations; `meta` names the rule so failures can be explained line by line."""
    import great_expectations as gx
    from great_expectations.expectations.metadata_types import FailureSeverity

    expectations = gx.expectations
    suite = gx.ExpectationSuite(name="prompt_response_dataset")
    for field in REQUIRED_FIELDS:
        suite.add_expectation(
            expectations.ExpectColumnValuesToMatchRegex(
                column=field, regex=r"\S", meta={"rule": "blank", "field": field}
            )
        )
        suite.add_expectation(
            expectations.ExpectColumnValueLengthsToBeBetween(
                column=field,
                min_value=min_chars,
                max_value=max_chars,
                meta={"rule": "length", "field": field},
            )
        )
        suite.add_expectation(
            expectations.ExpectColumnValuesToNotMatchRegex(
                column=field, regex=CONTROL_TOKEN_REGEX, meta={"rule": "control_token", "field": field}
            )
        )
    suite.add_expectation(
        expectations.ExpectColumnValuesToBeUnique(
            column="prompt", severity=FailureSeverity.WARNING, meta={"rule": "duplicate_prompt"}
        )
    )
    suite.add_expectation(
        expectations.ExpectCompoundColumnsToBeUnique(
            column_list=list(REQUIRED_FIELDS),
            severity=FailureSeverity.WARNING,
            meta={"rule": "duplicate_pair"},
        )
    )
    return suite


def _describe_failures(
    rule: str,
    field: str | None,
    failing_lines: list[int],
    records_by_line: dict[int, dict[str, Any]],
    *,
    min_chars: int,
    max_chars: int,
) -> list[LineIssue]:
    """Turn one expectation's failing line numbers into issues whose reasons say what is wrong."""
    if rule == "blank":
        return [
            LineIssue(line, f"{field} is blank (empty or whitespace only)", field) for line in failing_lines
        ]
    if rule == "length":
        return [
            LineIssue(
                line, _length_reason(field, len(records_by_line[line][field]), min_chars, max_chars), field
            )
            for line in failing_lines
        ]
    if rule == "control_token":
        return [
            LineIssue(line, f'{field} contains the chat-template control token "{token}"', field)
            for line in failing_lines
            for token in [re.search(CONTROL_TOKEN_REGEX, records_by_line[line][field]).group()]
        ]
    if rule == "duplicate_prompt":
        repeats = _later_repeats(failing_lines, lambda line: records_by_line[line]["prompt"])
        reason = "duplicate prompt: same as line {} with a different response"
        return [LineIssue(line, reason.format(first), "prompt") for line, first in repeats.items()]
    if rule == "duplicate_pair":
        repeats = _later_repeats(
            failing_lines, lambda line: (records_by_line[line]["prompt"], records_by_line[line]["response"])
        )
        reason = "duplicate example: same prompt and response as line {}"
        return [LineIssue(line, reason.format(first)) for line, first in repeats.items()]
    raise ValueError(f"no description for rule {rule!r}")


def _length_reason(field: str, length: int, min_chars: int, max_chars: int) -> str:
    if length > max_chars:
        return f"{field} is {length} characters, more than max_chars={max_chars}"
    return f"{field} is {length} characters, fewer than min_chars={min_chars}"


def _later_repeats(lines: list[int], key_of: Callable[[int], Hashable]) -> dict[int, int]:
    """Map each line whose key already appeared earlier to the line where it first appeared."""
    first_line_by_key: dict[Hashable, int] = {}
    repeats = {}
    for line in sorted(lines):
        first = first_line_by_key.setdefault(key_of(line), line)
        if first != line:
            repeats[line] = first
    return repeats


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


class InvalidData(UserError):
    """The data failed validation; the message is the report."""


STEP = Step(
    "validate",
    __name__,
    inputs=("data_file",),
    settings=("validation",),
    context=("run_dir", "data_name"),  # where a failure's report goes, what its message calls the file
    tags=("validate",),
)


@STEP.task
def validate_task(
    store: ArtifactStore, key: str, settings: StepSettings, data_file: Path, run_dir: Path, data_name: str
) -> Manifest:
    """Bad data stops the run here, before any model is loaded, with the report in ``run_dir`` and on the
    flow run's Artifacts tab; it is never retried (it would fail the same way). A valid file's report is
    stored under ``key``, so the same bytes are not validated twice."""

    def compute(out: Path) -> None:
        report = validate_jsonl(
            data_file, min_chars=settings.validation.min_chars, max_chars=settings.validation.max_chars
        )
        write_report(report, out)
        if not report.ok:
            from olivepress.tasks.report import publish_validation_failure

            report_path = write_report(report, run_dir)
            publish_validation_failure(report)
            raise InvalidData(
                f"{data_name} has {len(report.errors)} bad line(s); nothing was trained on it "
                f"(report: {report_path}):\n{report.to_text()}"
            )

    return store.produce("validate", key, compute)
