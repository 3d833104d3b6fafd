"""Every supported decoder family (olivepress.architectures) through the whole flow, on a tiny random model."""

import json

import pytest

from olivepress.flows.pipeline import new_run_dir, olivepress_flow, run_folder
from olivepress.tasks.finetune import decoder_linear_names
from tests.conftest import ARCHITECTURES, build_tiny_model
from tests.flows.test_pipeline import tiny_config

STEPS = ("validate", "quantize", "finetune", "optimize", "evaluate_base", "evaluate", "report", "register")


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.parametrize(
    ("architecture", "expected"),
    [
        ("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        ("phi3", ["o_proj", "qkv_proj", "gate_up_proj", "down_proj"]),
    ],
)
def test_lora_targets_every_decoder_linear_by_its_own_name(tmp_path, architecture, expected):
    assert decoder_linear_names(build_tiny_model(tmp_path, architecture=architecture)) == expected


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_architecture_end_to_end(prefect_api, tmp_path, architecture):
    from safetensors.torch import load_file

    model_dir = build_tiny_model(tmp_path / architecture, architecture=architecture)
    config = tiny_config(tmp_path, model_dir)
    run_dir = new_run_dir(config)
    with run_folder(run_dir):
        olivepress_flow(config)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert [(s["step"], s["status"]) for s in summary] == [(step, "completed") for step in STEPS]
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    adapted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in adapter}
    assert adapted == set(decoder_linear_names(model_dir)), "LoRA on every attention and MLP linear"
    if architecture == "phi3":
        assert adapted == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    losses = {
        m["variant"]: m["loss"]
        for m in json.loads((run_dir / "evaluations" / "cpu" / "evaluation.json").read_text())["metrics"]
    }
    assert list(losses) == ["base", "quantized", "fine-tuned"]
    assert losses["fine-tuned"] != losses["quantized"], "the ONNX model runs the adapter"


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_exported_models_compute_what_pytorch_computes(tmp_path, architecture):
    """The end-to-end run only shows each family runs; this shows it runs right: the base export against
    the HF model, the int4 export (float32 MatMulNBits math) with and without a LoRA adapter on every
    decoder linear against the dequantized model under PEFT."""
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from olivepress.export.builder import build_base_model
    from olivepress.export.folder import export_onnx
    from olivepress.export.int4 import load_dequantized_model, write_rtn_checkpoint
    from olivepress.genai import open_model, sequence_logits
    from tests.conftest import make_lora_adapter

    model_dir = build_tiny_model(tmp_path / "hf", architecture=architecture)
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("sliding_window"):  # a window shorter than the 64 tokens, so its masking is checked too
        (model_dir / "config.json").write_text(json.dumps({**config, "sliding_window": 16}))
    write_rtn_checkpoint(model_dir, tmp_path / "int4")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    adapter = make_lora_adapter(
        tmp_path / "int4", tmp_path / "lora", target_modules=decoder_linear_names(model_dir)
    )
    # float activations, LM head and merged branches: the export's math is then the PyTorch model's
    exported = export_onnx(
        tmp_path / "int4",
        adapter,
        tmp_path / "onnx",
        accuracy_level=1,
        lm_head="float",
        merged_adapter_bits=32,
    )
    build_base_model(model_dir, tmp_path / "base")

    ids = list(range(5, 69))
    dequantized = load_dequantized_model(tmp_path / "int4")
    with torch.inference_mode():
        expected = {
            "base": model(torch.tensor([ids])).logits[0].numpy(),
            "off": dequantized(torch.tensor([ids])).logits[0].numpy(),
            "on": PeftModel.from_pretrained(dequantized, adapter)(torch.tensor([ids])).logits[0].numpy(),
        }
    measured = {
        "base": sequence_logits(open_model(tmp_path / "base"), ids),
        "off": sequence_logits(open_model(exported.model_dir), ids),
        "on": sequence_logits(open_model(exported.model_dir, exported.adapter_file), ids),
    }
    assert np.abs(expected["on"] - expected["off"]).max() > 0.1, "the adapter changes the output"
    # float32 round-off only: measured at most 5e-5 (Gemma 2 with the adapter), most below 1e-6
    for variant, logits in measured.items():
        assert np.abs(logits - expected[variant]).max() < 5e-4, variant
