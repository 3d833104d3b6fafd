"""The real default model through the whole flow, on the lab's own data, with a few steps."""

import numpy as np
import pytest

from olivepress.config import load_config
from olivepress.flows.pipeline import new_run_dir, olivepress_flow


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
        }
    )
    run_dir = new_run_dir(config)
    onnx_dir = run_dir / "onnx"
    olivepress_flow(config, run_dir)

    with_adapter = open_model(onnx_dir, onnx_dir / "adapter_weights.onnx_adapter")
    without_adapter = open_model(onnx_dir)
    ids = with_adapter.tokenizer("What's a must-see in Paris?")["input_ids"]
    on = sequence_logits(with_adapter, ids)
    off = sequence_logits(without_adapter, ids)
    assert on.shape == off.shape == (len(ids), 49152)
    assert np.isfinite(on).all() and np.isfinite(off).all()
    assert np.abs(on - off).max() > 1e-3, "the trained adapter changes the logits"
