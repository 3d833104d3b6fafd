"""End-to-end flow runs on a real (ephemeral) Prefect API."""

import json

import pytest

from olivepress.config import load_config
from olivepress.flows.pipeline import (
    StepRecord,
    format_summary,
    fuller_run_estimate,
    new_run_dir,
    olivepress_flow,
)
from olivepress.tasks.validate import InvalidData


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def tiny_config(tmp_path, model_dir, **overrides):
    return load_config(
        overrides={
            "model": model_dir,
            "output": tmp_path / "runs",
            "finetune.max_steps": 2,
            "finetune.batch_size": 2,
            "finetune.max_seq_len": 64,
            "quantize.calibration_samples": 4,
            "quantize.calibration_max_tokens": 64,
            **overrides,
        }
    )


@pytest.mark.slow
def test_tiny_model_end_to_end(tmp_path, tiny_model_dir):
    config = tiny_config(tmp_path, tiny_model_dir)
    run_dir = new_run_dir(config)
    result = olivepress_flow(config, run_dir)

    onnx_dir = run_dir / "onnx"
    assert result["onnx"] == str(onnx_dir)
    assert (onnx_dir / "genai_config.json").is_file()
    assert list(onnx_dir.glob("*.onnx_adapter"))
    assert (run_dir / "quantized" / "config.json").is_file()
    losses = json.loads((run_dir / "adapter" / "loss_history.json").read_text())
    assert [entry["step"] for entry in losses] == [1, 2]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [(s["step"], s["status"]) for s in summary] == [
        ("validate", "completed"),
        ("quantize", "completed"),
        ("finetune", "completed"),
        ("optimize", "completed"),
    ]
    assert not list(run_dir.glob(".tmp-*")), "no staging folder is left behind"


def test_bad_data_fails_the_flow_before_quantizing(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n["not", "an", "object"]\n', encoding="utf-8")
    config = tiny_config(tmp_path, tiny_model_dir, data=bad)
    run_dir = new_run_dir(config)
    with pytest.raises(InvalidData, match="line 2"):
        olivepress_flow(config, run_dir)
    assert (run_dir / "validation.json").is_file()
    assert not (run_dir / "quantized").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [(s["step"], s["status"]) for s in summary] == [("validate", "failed")]


def test_summary_table_lists_each_step_with_time_and_size():
    records = [
        StepRecord("validate", "completed", 0.42),
        StepRecord("quantize", "failed", 12.0, output=None, output_bytes=None),
        StepRecord("finetune", "completed", 61.5, output="/x", output_bytes=7_400_000),
    ]
    lines = format_summary(records).splitlines()
    assert lines[0].split() == ["step", "status", "time", "output", "size"]
    assert lines[2].split() == ["validate", "completed", "0.4", "s", "-"]
    assert lines[3].split() == ["quantize", "failed", "12.0", "s", "-"]
    assert lines[4].split() == ["finetune", "completed", "61.5", "s", "7.4", "MB"]


def test_fuller_run_estimate_scales_this_runs_times():
    config = load_config(overrides={"finetune.max_steps": 10, "finetune.batch_size": 4})
    records = [StepRecord("quantize", "completed", 60.0), StepRecord("finetune", "completed", 100.0)]
    text = fuller_run_estimate(config, records, n_examples=200)
    # 10 steps of 4 = 0.2 epochs; 3 epochs of 200 examples at batch 4 = 150 steps at 10 s each
    assert "0.2 epochs of 200 examples" in text
    assert "--max-steps 150: about 25 min" in text
