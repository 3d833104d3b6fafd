"""The command line as a user meets it: exit codes and messages, in a real subprocess."""

import subprocess
import sys
from pathlib import Path

import pytest

from olivepress.config import SAMPLE_DATA


def olivepress(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "olivepress.flows.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def test_validate_accepts_the_shipped_sample():
    result = olivepress("validate", str(SAMPLE_DATA))
    assert result.returncode == 0, result.stderr
    assert "valid records" in result.stdout


def test_validate_names_each_bad_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "Where?", "response": "Here."}\n'
        "not json\n"
        '{"prompt": "", "response": "Empty prompt."}\n'
        '{"prompt": "Fine?", "response": "Yes."}\n',
        encoding="utf-8",
    )
    result = olivepress("validate", str(bad))
    assert result.returncode == 1
    bad_lines = [line for line in result.stderr.splitlines() if line.startswith("line ")]
    assert [line.split(":")[0] for line in bad_lines] == ["line 2", "line 3"]
    assert "Traceback" not in result.stderr


def test_run_stops_on_bad_data_before_any_model_is_loaded(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Where?"}\n', encoding="utf-8")
    result = olivepress("run", "--data", str(bad), "--output", str(tmp_path / "runs"))
    assert result.returncode == 1
    assert "line 1" in result.stderr
    assert "Traceback" not in result.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "validation.txt").is_file()
    assert not (run_dir / "quantized").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--max-steps", "0"], "finetune.max_steps"),
        (["--model", "/nonexistent/model"], "model:"),
        (["--data", "/nonexistent.jsonl"], "data:"),
    ],
)
def test_run_rejects_bad_settings_by_field_name(tmp_path, args, expected):
    result = olivepress("run", *args, "--output", str(tmp_path))
    assert result.returncode == 1
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir()), "nothing is written before the config is valid"


def test_run_rejects_a_bad_config_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("device: tpu\n")
    result = olivepress("run", "--config", str(config))
    assert result.returncode == 1
    assert "device:" in result.stderr


def test_models_lists_each_registered_version_with_its_metrics(tmp_path):
    from olivepress.registry import LocalRegistry, content_sha256
    from olivepress.tasks.report import metrics_rows
    from tests.tasks.test_report import evaluation

    registry = LocalRegistry(tmp_path / "registry")
    for text in ("one", "two"):
        model = tmp_path / text
        model.mkdir()
        (model / "model.onnx").write_text(text)
        lineage = {
            "content_sha256": content_sha256({"model": model}),
            "metrics": metrics_rows(evaluation(True)),
            "data": {"sha256": "0123456789abcdef"},
            "registered_at": "2026-11-25T12:00:00+00:00",
        }
        registry.register("travel-model", {"model": model}, lineage)

    result = olivepress("models", "--registry", str(tmp_path / "registry"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["name", "version", "registered"]
    assert [line.split()[:2] for line in lines[1:]] == [["travel-model", "1"], ["travel-model", "2"]]
    assert "17.81 (base 21.75)" in lines[1] and "0123456789ab" in lines[1]


def test_models_on_an_empty_registry_says_so(tmp_path):
    result = olivepress("models", "--registry", str(tmp_path / "none"))
    assert result.returncode == 0
    assert "no registered models" in result.stdout
