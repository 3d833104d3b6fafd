"""The real default model through the whole flow, on the lab's own data, with a few steps."""

import json

import numpy as np
import pytest

from olivepress.config import load_config
from olivepress.flows.pipeline import new_run_dir, olivepress_flow, run_folder


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.slow
def test_smollm2_on_the_lab_data(tmp_path, travel_jsonl):
    from olivepress.genai import open_model, sequence_logits

    config = load_config(
        overrides={
            "data": travel_jsonl,
            "output": tmp_path,
            "finetune.max_steps": 2,
            "finetune.max_seq_len": 128,
            "quantize.calibration_samples": 8,
            "quantize.calibration_max_tokens": 128,
            "evaluate.generation_samples": 4,
            "evaluate.max_new_tokens": 16,
            "registry.path": tmp_path / "registry",
            "store.cache_dir": tmp_path / "cache",
            # 2 training steps cannot win back AWQ's loss (perplexity ratio about 1.18): this tests the
            # path to registration, the gate's defaults are tested elsewhere
            "gate.max_perplexity_ratio": 1.5,
        }
    )
    run_dir = new_run_dir(config)
    onnx_dir = run_dir / "onnx" / "cpu"
    with run_folder(run_dir):
        result = olivepress_flow(config)
    assert result["registration"]["version"] == "1"
    metrics = {
        m["variant"]: m
        for m in json.loads((run_dir / "evaluations" / "cpu" / "evaluation.json").read_text())["metrics"]
    }
    assert metrics["base"]["bytes_on_disk"] > 2.5 * metrics["quantized"]["bytes_on_disk"]
    assert metrics["quantized"]["loss"] > metrics["base"]["loss"], "4 bits cost some held-out loss"

    with_adapter = open_model(onnx_dir, onnx_dir / "adapter_weights.onnx_adapter")
    without_adapter = open_model(onnx_dir)
    ids = with_adapter.tokenizer("What's a must-see in Paris?")["input_ids"]
    on = sequence_logits(with_adapter, ids)
    off = sequence_logits(without_adapter, ids)
    assert on.shape == off.shape == (len(ids), 49152)
    assert np.isfinite(on).all() and np.isfinite(off).all()
    assert np.abs(on - off).max() > 1e-3, "the trained adapter changes the logits"
