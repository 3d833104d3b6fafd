import json

import pytest

from olivepress.config import FinetuneSettings
from olivepress.tasks.finetune import (
    finetune_lora,
    olive_lora_config,
    prepare_training_model,
    read_training_memory,
    write_training_text,
)
from tests.conftest import LINEARS, sample_pairs


def test_training_text_uses_the_chat_template(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    path = write_training_text(
        tokenizer, [{"prompt": "Where?", "response": "Here."}], tmp_path / "t.jsonl", None
    )
    (line,) = path.read_text(encoding="utf-8").splitlines()
    assert (
        json.loads(line)["text"]
        == "<|im_start|>user\nWhere?<|im_end|>\n<|im_start|>assistant\nHere.<|im_end|>\n"
    )


def test_training_text_follows_a_text_template(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    template = "<|user|>{prompt}<|end|><|assistant|>{response}<|end|>"
    path = write_training_text(tokenizer, [{"prompt": "Q", "response": "A"}], tmp_path / "t.jsonl", template)
    assert json.loads(path.read_text())["text"] == "<|user|>Q<|end|><|assistant|>A<|end|>"


def test_olive_config_carries_the_settings(tmp_path):
    settings = FinetuneSettings(max_steps=7, lora_r=4, target_modules=["q_proj"], learning_rate=1e-3)
    config = olive_lora_config(tmp_path / "m", tmp_path / "t.jsonl", tmp_path, settings, device="cpu", seed=3)
    lora = config["passes"]["lora"]
    assert (lora["r"], lora["target_modules"], lora["torch_dtype"]) == (4, ["q_proj"], "float32")
    assert lora["training_args"]["max_steps"] == 7
    assert lora["training_args"]["learning_rate"] == 1e-3
    assert lora["training_args"]["logging_steps"] == 1
    gpu = olive_lora_config(tmp_path / "m", tmp_path / "t.jsonl", tmp_path, settings, device="gpu", seed=3)
    assert gpu["systems"]["local_system"]["accelerators"][0]["execution_providers"] == [
        "CUDAExecutionProvider"
    ]


def test_on_a_gpu_the_training_model_is_saved_as_olive_loads_it(tmp_path, tiny_int4_dir):
    """bfloat16 on disk (half the bytes), and what the LoRA pass loads from it is what it loaded from the
    float32 folder: the pass's own dtype, the same cast."""
    import torch
    from transformers import AutoModelForCausalLM

    for device in ("cpu", "gpu"):
        prepare_training_model(tiny_int4_dir, tmp_path / device, device=device)
    config = olive_lora_config(tmp_path / "gpu", tmp_path, tmp_path, FinetuneSettings(), device="gpu", seed=0)
    assert config["passes"]["lora"]["torch_dtype"] == "bfloat16"
    saved = {
        device: AutoModelForCausalLM.from_pretrained(tmp_path / device, dtype=torch.bfloat16).state_dict()
        for device in ("cpu", "gpu")
    }
    assert saved["gpu"].keys() == saved["cpu"].keys()
    for name, tensor in saved["gpu"].items():
        assert torch.equal(tensor, saved["cpu"][name]), name
    size = {device: (tmp_path / device / "model.safetensors").stat().st_size for device in ("cpu", "gpu")}
    assert size["gpu"] < 0.6 * size["cpu"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "cpu").dtype == torch.float32


@pytest.mark.slow
def test_lora_trains_on_the_dequantized_int4_model(tmp_path, tiny_int4_dir):
    from safetensors.torch import load_file

    settings = FinetuneSettings(
        max_steps=3, batch_size=2, max_seq_len=64, learning_rate=1e-2, checkpoint_every=2
    )
    result = finetune_lora(
        tiny_int4_dir, sample_pairs()[:12], tmp_path / "adapter", settings, work_dir=tmp_path / "w"
    )

    assert [entry["step"] for entry in result.losses] == [1, 2, 3]
    assert all(entry["loss"] > 0 for entry in result.losses)
    assert json.loads((tmp_path / "adapter" / "loss_history.json").read_text()) == result.losses
    assert read_training_memory(tmp_path / "adapter") == {
        "peak_allocated_mib": None,
        "peak_reserved_mib": None,
        "allocated_at_start_mib": None,
    }, "no GPU memory on CPU"
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(LINEARS), "by default every decoder linear"
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in tensors.items() if "lora_B" in name]
    assert lora_b and any(tensor.abs().max() > 0 for tensor in lora_b), "training moved LoRA B off zero"


def test_an_adapter_stored_before_training_memory_was_recorded_reads_as_none(tmp_path):
    assert read_training_memory(tmp_path) is None
