"""The CUDA export: genai_config names the CUDA provider, and ONNX Runtime GenAI (CUDA build) runs it."""

import json

import onnx
import pytest

from olivepress.genai import ADAPTER_FILE, GENAI_CONFIG, open_model, prompt_token_ids, stream_generate

pytestmark = pytest.mark.gpu


def test_the_cuda_export_names_cuda_and_generates_in_onnxruntime_genai_cuda(cuda_export_dir):
    config = json.loads((cuda_export_dir / GENAI_CONFIG).read_text())
    provider_options = config["model"]["decoder"]["session_options"]["provider_options"]
    assert [name for options in provider_options for name in options] == ["cuda"]
    assert (cuda_export_dir / ADAPTER_FILE).is_file()
    # with optimize.lora_kernel, olivepress's operators' library ships in the folder and genai_config names it
    libraries = [path.name for path in cuda_export_dir.glob("*.so")]
    named = config["model"]["decoder"]["session_options"].get("custom_ops_library")
    assert libraries == ([named] if named else [])
    graph = onnx.load(str(cuda_export_dir / "model.onnx"), load_external_data=False).graph
    own_operators = {node.op_type for node in graph.node if node.domain == "olivepress"}
    assert bool(own_operators) == bool(named)  # MatMulNBitsLora (and LoraAdd where it cannot go) need it
    assert own_operators <= {"LoraAdd", "MatMulNBitsLora"}

    # with CUDA graphs every decoded token after the first replays the captured graph, adapter on and off
    for adapter in (None, cuda_export_dir / ADAPTER_FILE):
        loaded = open_model(cuda_export_dir, adapter)
        pieces = []
        stats = stream_generate(loaded, prompt_token_ids(loaded, "Where should I go?"), 16, pieces.append)
        assert 0 < stats.new_tokens <= 16
        assert 0 < stats.time_to_first_token_s <= stats.seconds
