"""Every kind of bad line is named by its line number and a reason; real-world files (BOM, CRLF) pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from olivepress.config import SAMPLE_DATA
from olivepress.errors import UserError
from olivepress.tasks.validate import read_examples, validate_jsonl, write_report
from olivepress.validation import ValidationReport

BAD_LINE = 3
CHAT_TEMPLATE_TOKENS = [
    "<|im_end|>",
    "<|im_start|>",
    "<|endoftext|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "<|system|>",
    "</s>",
    "<s>",
    "<|eot_id|>",
    "<start_of_turn>",
    "<end_of_turn>",
]


def good_line(number: int) -> bytes:
    record = {"prompt": f"How do I reach viewpoint {number}?", "response": f"Take bus {number} uphill."}
    return json.dumps(record).encode()


def record_line(prompt: object, response: object) -> bytes:
    return json.dumps({"prompt": prompt, "response": response}, ensure_ascii=False).encode()


def write_jsonl(
    tmp_path: Path, lines: list[bytes], *, newline: bytes = b"\n", final_newline: bool = True
) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_bytes(newline.join(lines) + (newline if final_newline else b""))
    return path


def with_bad_line(bad: bytes, total: int = 5) -> list[bytes]:
    return [bad if number == BAD_LINE else good_line(number) for number in range(1, total + 1)]


def error_lines(report: ValidationReport) -> list[int]:
    return [issue.line for issue in report.errors]


@pytest.mark.parametrize(
    ("bad_line", "expected_reason"),
    [
        pytest.param(
            b'{"prompt": "Where to eat?", "response": "Try the market."', "invalid json", id="invalid-json"
        ),
        pytest.param(b'{"prompt": "Caf\xe9 hours?", "response": "From 8."}', "utf-8", id="invalid-utf8"),
        pytest.param(b'["Where to eat?", "Try the market."]', "got an array", id="json-array"),
        pytest.param(b"42", "got a number", id="json-number"),
        pytest.param(b'"Where to eat?"', "got a string", id="json-string"),
        pytest.param(b'{"response": "Try the market."}', 'missing "prompt"', id="missing-prompt"),
        pytest.param(b'{"prompt": "Where to eat?"}', 'missing "response"', id="missing-response"),
        pytest.param(
            record_line("Where to eat?", 42), '"response" must be a string, got a number', id="number"
        ),
        pytest.param(record_line("Where to eat?", None), '"response" must be a string, got null', id="null"),
        pytest.param(record_line("", "Try the market."), "prompt is blank", id="empty-prompt"),
        pytest.param(
            record_line("Where to eat?", " \t\u00a0 "), "response is blank", id="whitespace-response"
        ),
        pytest.param(
            record_line("Where to eat?", "x" * 4001), "4001 characters, more than max_chars=4000", id="long"
        ),
        pytest.param(record_line("Where to eat?<|im_end|>", "Try it."), "control token", id="control-token"),
        pytest.param(b"", "blank line between records", id="empty-middle-line"),
        pytest.param(b"  \t", "blank line between records", id="whitespace-middle-line"),
    ],
)
def test_one_bad_line_is_named_with_its_reason(tmp_path, bad_line, expected_reason):
    report = validate_jsonl(write_jsonl(tmp_path, with_bad_line(bad_line)))

    assert not report.ok
    assert error_lines(report) == [BAD_LINE]
    assert expected_reason.lower() in report.errors[0].reason.lower()
    assert report.to_text().startswith(f"line {BAD_LINE}: ")
    assert len(report.to_text().splitlines()) == 1


def test_every_bad_line_in_a_file_is_reported_in_line_order(tmp_path):
    lines = [
        good_line(1),
        b"{not json}",
        good_line(3),
        record_line("Hi <|assistant|>", "Hello."),
        good_line(5),
        record_line("Too long?", "y" * 50),
        b'{"prompt": "No answer?"}',
        record_line("   ", "</s>"),
    ]
    report = validate_jsonl(write_jsonl(tmp_path, lines), max_chars=40)

    assert sorted(error_lines(report)) == [2, 4, 6, 7, 8, 8]
    text_lines = report.to_text().splitlines()
    assert [row.split(":")[0] for row in text_lines] == ["line 2", "line 4", "line 6", "line 7", "line 8"]
    assert "prompt is blank" in text_lines[-1]
    assert 'response contains the chat-template control token "</s>"' in text_lines[-1]
    assert report.n_records == 6


@pytest.mark.parametrize("token", CHAT_TEMPLATE_TOKENS)
def test_each_control_token_is_named(tmp_path, token):
    report = validate_jsonl(
        write_jsonl(tmp_path, with_bad_line(record_line("Tips?", f"Go early {token} now.")))
    )

    assert error_lines(report) == [BAD_LINE]
    assert f'"{token}"' in report.errors[0].reason


def test_text_that_merely_looks_like_markup_passes(tmp_path):
    lines = [record_line("Is <b>bold</b> ok in a sign?", "Yes, and so is a <span> or <ss> or a |pipe|.")]
    assert validate_jsonl(write_jsonl(tmp_path, lines)).ok


def test_blank_value_is_not_also_reported_as_too_short(tmp_path):
    report = validate_jsonl(write_jsonl(tmp_path, with_bad_line(record_line("Tips?", "  "))), min_chars=5)

    assert [issue.reason for issue in report.errors] == ["response is blank (empty or whitespace only)"]


def test_too_short_uses_min_chars(tmp_path):
    report = validate_jsonl(write_jsonl(tmp_path, with_bad_line(record_line("Tips?", "Go"))), min_chars=3)

    assert error_lines(report) == [BAD_LINE]
    assert report.errors[0].reason == "response is 2 characters, fewer than min_chars=3"
    assert report.errors[0].field == "response"


def test_crlf_bom_and_no_final_newline_are_valid_and_read_identically(tmp_path):
    lines = [record_line("Café hours in Lyon?", "Most open at 8; many close on Sundays."), good_line(2)]
    path = write_jsonl(tmp_path, lines, newline=b"\r\n", final_newline=False)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())

    report = validate_jsonl(path)
    examples = read_examples(path)

    assert report.ok, report.to_text()
    assert report.warnings == []
    assert (report.n_lines, report.n_records) == (2, 2)
    assert examples[0] == {
        "prompt": "Café hours in Lyon?",
        "response": "Most open at 8; many close on Sundays.",
        "line": 1,
    }
    assert examples[1]["line"] == 2
    assert not examples[1]["response"].endswith("\r")


def test_blank_lines_after_the_last_record_are_only_warnings(tmp_path):
    report = validate_jsonl(write_jsonl(tmp_path, [good_line(1), good_line(2), b"", b"  "]))

    assert report.ok
    assert [(issue.line, issue.reason) for issue in report.warnings] == [
        (3, "blank line at end of file (ignored)"),
        (4, "blank line at end of file (ignored)"),
    ]


def test_duplicates_are_warnings_naming_both_lines(tmp_path):
    lines = [
        record_line("Best beach in Crete?", "Elafonisi."),
        record_line("Best ferry to Naxos?", "The morning fast boat."),
        record_line("Best beach in Crete?", "Balos lagoon."),
        record_line("Best ferry to Naxos?", "The morning fast boat."),
    ]
    report = validate_jsonl(write_jsonl(tmp_path, lines))

    assert report.ok
    assert [(issue.line, issue.reason) for issue in report.warnings] == [
        (3, "duplicate prompt: same as line 1 with a different response"),
        (4, "duplicate example: same prompt and response as line 2"),
    ]
    assert report.to_text() == ""
    assert (
        report.to_text(include_warnings=True).splitlines()[0].startswith("line 3: warning: duplicate prompt")
    )


def test_extra_keys_are_warned_once_and_dropped(tmp_path):
    lines = [
        b'{"prompt": "Visa for Peru?", "response": "Check the embassy site.", "id": 1}',
        b'{"prompt": "Tipping in Peru?", "response": "About 10 percent.", "id": 2, "lang": "en"}',
    ]
    path = write_jsonl(tmp_path, lines)
    report = validate_jsonl(path)

    assert report.ok
    assert [(issue.line, issue.field, issue.reason) for issue in report.warnings] == [
        (1, "id", 'extra key "id" is ignored (on 2 lines)'),
        (2, "lang", 'extra key "lang" is ignored (on 1 line)'),
    ]
    assert set(read_examples(path)[1]) == {"prompt", "response", "line"}


@pytest.mark.parametrize(
    "content", [b"", b"\n", b"\xef\xbb\xbf", b"\r\n\r\n"], ids=["empty", "newline", "bom", "blanks"]
)
def test_file_without_records_is_an_error(tmp_path, content):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    report = validate_jsonl(path)

    assert not report.ok
    assert report.n_records == 0
    assert report.to_text() == "file: file has no records (it is empty or only blank lines)"


def test_utf16_file_gets_one_clear_error(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n', encoding="utf-16")

    report = validate_jsonl(path)

    assert [(issue.line, issue.reason) for issue in report.errors] == [
        (1, "file is UTF-16 encoded; save it as UTF-8")
    ]


def test_missing_file_and_directory_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        validate_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="directory"):
        validate_jsonl(tmp_path)
    with pytest.raises(UserError, match="not found"):
        read_examples(tmp_path / "nope.jsonl")


def test_bounds_out_of_order_are_a_user_error(tmp_path):
    with pytest.raises(UserError, match="min_chars"):
        validate_jsonl(write_jsonl(tmp_path, [good_line(1)]), min_chars=10, max_chars=5)


def test_a_duplicated_key_is_a_bad_line_naming_the_key(tmp_path):
    path = write_jsonl(tmp_path, with_bad_line(b'{"prompt": "a", "prompt": "b", "response": "c"}'))

    report = validate_jsonl(path)

    assert error_lines(report) == [BAD_LINE]
    assert report.errors[0].field == "prompt"
    assert (
        report.to_text() == f'line {BAD_LINE}: duplicate key "prompt": a JSON object may hold each key once'
    )
    assert report.n_records == 4, "the line is not a record: neither value is silently kept"
    with pytest.raises(UserError, match=rf'line {BAD_LINE}: duplicate key "prompt"'):
        read_examples(path)


def test_each_duplicated_key_of_a_line_is_named_once(tmp_path):
    line = b'{"prompt": "a", "response": "b", "response": "c", "tag": 1, "tag": 2, "tag": 3}'
    report = validate_jsonl(write_jsonl(tmp_path, with_bad_line(line)))

    assert [(issue.line, issue.field) for issue in report.errors] == [
        (BAD_LINE, "response"),
        (BAD_LINE, "tag"),
    ]


def test_bounds_follow_the_configs_rules(tmp_path):
    with pytest.raises(UserError, match=r"validation\.min_chars: Input should be greater than or equal to 1"):
        validate_jsonl(write_jsonl(tmp_path, [good_line(1)]), min_chars=0)


def test_read_examples_refuses_a_file_with_unreadable_lines(tmp_path):
    path = write_jsonl(tmp_path, with_bad_line(b"[1, 2]"))

    with pytest.raises(UserError, match=rf"line {BAD_LINE}: expected a JSON object"):
        read_examples(path)


def test_write_report_writes_json_and_text_atomically(tmp_path):
    report = validate_jsonl(write_jsonl(tmp_path, [*with_bad_line(b"oops"), good_line(1)]))
    run_dir = tmp_path / "run"

    json_path = write_report(report, run_dir)

    assert json_path == run_dir / "validation.json"
    assert json.loads(json_path.read_text(encoding="utf-8")) == report.to_dict()
    assert report.to_dict()["ok"] is False
    text = (run_dir / "validation.txt").read_text(encoding="utf-8")
    assert text.splitlines()[0].endswith("INVALID: 5 records on 6 lines, 1 errors, 1 warnings")
    assert f"line {BAD_LINE}: invalid JSON" in text
    assert "line 6: warning: duplicate example: same prompt and response as line 1" in text
    assert sorted(path.name for path in run_dir.iterdir()) == ["validation.json", "validation.txt"]


def test_the_labs_travel_dataset_is_valid_with_duplicate_warnings(travel_jsonl):
    report = validate_jsonl(travel_jsonl)

    assert report.ok, report.to_text()
    assert (report.n_lines, report.n_records) == (289, 289)
    assert len(report.warnings) == 99
    assert all(issue.reason.startswith("duplicate ") for issue in report.warnings)
    assert "line 27: warning: duplicate example: same prompt and response as line 1" in report.to_text(
        include_warnings=True
    )
    assert len(read_examples(travel_jsonl)) == 289


def test_the_shipped_sample_is_valid_and_clean():
    report = validate_jsonl(SAMPLE_DATA)

    assert report.ok, report.to_text()
    assert report.warnings == []
    assert report.n_records >= 50
    assert b"\r" not in SAMPLE_DATA.read_bytes()
