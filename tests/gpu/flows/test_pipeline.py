"""The whole flow on a GPU on the tiny model: CUDA training, both targets built and gated, GPU memory recorded."""

import json
from pathlib import Path

import pytest

from olivepress.flows.pipeline import new_run_dir, olivepress_flow, run_folder
from olivepress.genai import GENAI_CONFIG
from tests.flows.test_pipeline import tiny_config

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_the_flow_trains_on_cuda_and_builds_and_gates_both_targets(tmp_path, tiny_model_dir):
    config = tiny_config(tmp_path, tiny_model_dir, device="auto", targets=["cpu", "cuda"])
    run_dir = new_run_dir(config)
    with run_folder(run_dir):
        result = olivepress_flow(config)

    assert json.loads((run_dir / "config.json").read_text())["device"] == "gpu", "auto: the visible GPU"
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = ["validate", "quantize", "finetune"]
    steps += [
        f"{step} {target}" for target in ("cpu", "cuda") for step in ("optimize", "evaluate_base", "evaluate")
    ]
    assert [(s["step"], s["status"]) for s in summary] == [
        (step, "completed") for step in [*steps, "report", "register"]
    ]
    for target, expected in (("cpu", []), ("cuda", ["cuda"])):
        genai_config = json.loads((run_dir / "onnx" / target / GENAI_CONFIG).read_text())
        providers = genai_config["model"]["decoder"]["session_options"]["provider_options"]
        assert [name for options in providers for name in options] == expected

    training = json.loads((run_dir / "adapter" / "training_memory.json").read_text())
    assert training["peak_allocated_mib"] > 0
    assert training["peak_reserved_mib"] >= training["peak_allocated_mib"]
    cpu, cuda = (
        json.loads((run_dir / "evaluations" / target / "evaluation.json").read_text())
        for target in ("cpu", "cuda")
    )
    assert [m["variant"] for m in cuda["metrics"]] == ["base", "quantized", "fine-tuned"]
    assert all(m["gpu_memory_mib"] > 0 for m in cuda["metrics"]), "the cuda target runs on the GPU"
    assert all(m["gpu_memory_mib"] is None for m in cpu["metrics"]), "the cpu target on the cores"
    assert cuda["metrics"][2]["generated_tokens"] > 0
    report = (run_dir / "report" / "report.md").read_text()
    assert "gpu_mem_mib" in report and "peak GPU memory in training" in report
    assert result["registration"]["version"] == "1"
    entry = Path(result["registration"]["uri"])
    assert sorted(p.name for p in (entry / "model").iterdir()) == ["cpu", "cuda"]
    assert set(json.loads((entry / "lineage.json").read_text())["targets"]) == {"cpu", "cuda"}
