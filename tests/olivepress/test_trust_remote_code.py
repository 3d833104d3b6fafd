"""trust_remote_code on a real tiny model folder that ships its own code: config.json's auto_map points at
configuration_own_llama.py and modeling_own_llama.py beside it (Llama subclasses under a model_type
transformers does not have), which transformers imports from the folder, offline.

With the setting, quantize runs on it and its int4 checkpoint carries the code on to finetune (Olive's LoRA
pass included, two steps); without it, the first load and the config check are UserErrors that name it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from olivepress.architectures import load_config as load_model_config
from olivepress.config import FinetuneSettings, QuantizeSettings, load_config
from olivepress.errors import UserError
from tests.conftest import LINEARS, sample_pairs

MODEL_TYPE = "olivepress_own_llama"
CONFIGURATION = """from transformers import LlamaConfig


class OwnLlamaConfig(LlamaConfig):
    model_type = "olivepress_own_llama"
"""
MODELING = """from transformers import LlamaForCausalLM

from .configuration_own_llama import OwnLlamaConfig


class OwnLlamaForCausalLM(LlamaForCausalLM):
    config_class = OwnLlamaConfig
"""
CODE_FILES = {"configuration_own_llama.py", "modeling_own_llama.py"}


@pytest.fixture(scope="module")
def own_code_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Llama's weights and tokenizer under a model_type that only the folder's own code defines."""
    folder = shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("own-code") / "own_llama")
    (folder / "configuration_own_llama.py").write_text(CONFIGURATION)
    (folder / "modeling_own_llama.py").write_text(MODELING)
    config = json.loads((folder / "config.json").read_text())
    config |= {
        "model_type": MODEL_TYPE,
        "architectures": ["OwnLlamaForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_own_llama.OwnLlamaConfig",
            "AutoModelForCausalLM": "modeling_own_llama.OwnLlamaForCausalLM",
        },
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_without_the_setting_the_first_load_names_it(own_code_model, tmp_path):
    from olivepress.tasks.quantize import quantize_awq

    with pytest.raises(UserError) as caught:
        quantize_awq(own_code_model, sample_pairs(), tmp_path / "out", QuantizeSettings(), progress=False)
    message = str(caught.value)
    assert f"model_type {MODEL_TYPE!r} is not in transformers" in message
    assert "trust_remote_code: true" in message
    assert not (tmp_path / "out").exists(), "refused before anything was loaded or written"


def test_the_config_check_names_the_setting_before_any_step(own_code_model):
    with pytest.raises(UserError) as caught:
        load_config(overrides={"model": own_code_model})
    assert "auto_map" in str(caught.value) and "trust_remote_code: true" in str(caught.value)


def test_with_the_setting_quantize_and_finetune_run_on_the_folders_own_code(own_code_model, tmp_path):
    from olivepress.export.int4 import load_dequantized_model
    from olivepress.tasks.finetune import finetune_lora
    from olivepress.tasks.quantize import quantize_awq

    config = load_model_config(own_code_model, trust_remote_code=True)
    assert type(config).__name__ == "OwnLlamaConfig" and config.model_type == MODEL_TYPE

    settings = QuantizeSettings(group_size=32, calibration_samples=2, calibration_max_tokens=16)
    checkpoint = tmp_path / "int4"
    result = quantize_awq(
        own_code_model, sample_pairs(), checkpoint, settings, progress=False, trust_remote_code=True
    )
    assert result.quantized_linears == 14
    assert {path.name for path in checkpoint.glob("*.py")} >= CODE_FILES, "the checkpoint carries the code"
    saved = json.loads((checkpoint / "config.json").read_text())
    assert saved["model_type"] == MODEL_TYPE
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_own_llama.OwnLlamaForCausalLM"

    with pytest.raises(UserError, match="trust_remote_code"):
        load_dequantized_model(checkpoint)
    model = load_dequantized_model(checkpoint, trust_remote_code=True)
    assert type(model).__name__ == "OwnLlamaForCausalLM"
    assert type(model).__module__.startswith("transformers_modules."), "the folder's code, not transformers'"

    settings = FinetuneSettings(max_steps=2, batch_size=2, max_seq_len=64)
    work = tmp_path / "work"
    result = finetune_lora(
        checkpoint, sample_pairs()[:8], tmp_path / "adapter", settings, work_dir=work, trust_remote_code=True
    )
    assert [entry["step"] for entry in result.losses] == [1, 2], "Olive's LoRA pass trained it"
    assert {path.name for path in (work / "dequantized").glob("*.py")} >= CODE_FILES
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(LINEARS), "its linears, read off its own class"
