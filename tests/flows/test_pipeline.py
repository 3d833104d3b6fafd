"""End-to-end flow runs on a real (ephemeral) Prefect API."""

import json

import pytest

from olivepress.config import load_config
from olivepress.flows.pipeline import InvalidData, new_run_dir, olivepress_flow


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
