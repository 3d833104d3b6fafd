"""The whole flow with ``device: gpu`` on the tiny model: CUDA training, a CUDA export, GPU memory recorded."""

import json

import pytest

from olivepress.flows.pipeline import new_run_dir, olivepress_flow
from olivepress.genai import GENAI_CONFIG
from tests.flows.test_pipeline import tiny_config

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_the_flow_runs_on_cuda_end_to_end(tmp_path, tiny_model_dir):
    config = tiny_config(tmp_path, tiny_model_dir, device="gpu")
    run_dir = new_run_dir(config)
    result = olivepress_flow(config, run_dir)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert [(s["step"], s["status"]) for s in summary] == [
        (step, "completed")
        for step in ("validate", "quantize", "finetune", "optimize", "evaluate", "report", "register")
    ]
    genai_config = json.loads((run_dir / "onnx" / GENAI_CONFIG).read_text())
    providers = genai_config["model"]["decoder"]["session_options"]["provider_options"]
    assert [name for options in providers for name in options] == ["cuda"]

    training = json.loads((run_dir / "adapter" / "training_memory.json").read_text())
    assert training["peak_allocated_mib"] > 0
    assert training["peak_reserved_mib"] >= training["peak_allocated_mib"]
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert [m["variant"] for m in evaluation["metrics"]] == ["base", "quantized", "fine-tuned"]
    assert all(m["gpu_memory_mib"] > 0 for m in evaluation["metrics"])
    assert all(m["generated_tokens"] > 0 for m in evaluation["metrics"])
    report = (run_dir / "report" / "report.md").read_text()
    assert "gpu_mem_mib" in report and "peak GPU memory in training" in report
    assert result["registration"]["version"] == "1"
