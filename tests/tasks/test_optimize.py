import json

import numpy as np
import pytest

from olivepress.errors import UserError
from olivepress.genai import ADAPTER_FILE, open_model, sequence_logits
from olivepress.tasks.optimize import builder_node_prefix, export_onnx, lora_input_names
from tests.conftest import LINEARS, make_lora_adapter

IDS = [1, 20, 31, 42, 53, 64, 75, 86, 97, 108, 2]


@pytest.fixture(scope="module")
def adapter_dir(tiny_int4_dir, tmp_path_factory):
    # o_proj gets its own rank, so its scaling (alpha / 2) differs from the others' (alpha / 4)
    return make_lora_adapter(tiny_int4_dir, tmp_path_factory.mktemp("lora"), rank_pattern={"o_proj": 2})


@pytest.fixture(scope="module")
def exported(tiny_int4_dir, adapter_dir, tmp_path_factory):
    # float32 activations in MatMulNBits (the CPU default, 4, rounds them to int8), so the ONNX model's
    # math is the dequantized PyTorch model's and any mistake in the graph shows above rounding noise
    return export_onnx(tiny_int4_dir, adapter_dir, tmp_path_factory.mktemp("onnx"), accuracy_level=1)


def load_graph(model_dir):
    import onnx

    return onnx.load(str(model_dir / "model.onnx"))  # with the external data, to read the initializers


def initializer_values(graph) -> dict:
    from onnx import numpy_helper

    return {initializer.name: numpy_helper.to_array(initializer) for initializer in graph.initializer}


def test_folder_holds_what_the_runtime_loads(exported):
    names = {path.name for path in exported.model_dir.iterdir()}
    assert {"genai_config.json", "model.onnx", "model.onnx.data", ADAPTER_FILE, "tokenizer.json"} <= names
    assert exported.adapter_file == exported.model_dir / ADAPTER_FILE
    assert exported.lora_modules == 2 * len(LINEARS)
    assert exported.model_bytes > 0 and exported.adapter_bytes > 0
    decoder = json.loads((exported.model_dir / "genai_config.json").read_text())["model"]["decoder"]
    assert decoder["session_options"]["provider_options"] == []  # the CPU execution provider


def test_int4_weights_are_exactly_the_checkpoints(exported, tiny_int4_dir):
    from olivepress.int4 import pack_nibbles, read_int4_checkpoint

    _, weights = read_int4_checkpoint(tiny_int4_dir)
    model = load_graph(exported.model_dir)
    values = initializer_values(model.graph)
    int4_nodes = [node for node in model.graph.node if node.op_type == "MatMulNBits"]
    # one node per checkpoint weight: nothing else (the float embedding / LM head) was quantized
    assert len(int4_nodes) == len(weights)
    for module_name, weight in weights.items():
        stem = builder_node_prefix(module_name)[1:].replace("/", ".") + ".MatMulNBits"
        out_features = weight.q.shape[0]
        qweight = values[f"{stem}.qweight"]
        assert np.array_equal(qweight.reshape(out_features, -1), pack_nibbles(weight.q).numpy())
        assert np.array_equal(values[f"{stem}.scales"], weight.scales.numpy().reshape(-1))
        assert np.array_equal(values[f"{stem}.qzeros"], pack_nibbles(weight.zero_points).numpy().reshape(-1))
        node = next(node for node in int4_nodes if node.input[1] == f"{stem}.qweight")
        attributes = {attribute.name: attribute.i for attribute in node.attribute}
        assert (attributes["bits"], attributes["block_size"]) == (4, weight.group_size)
    assert {node.op_type for node in model.graph.node if node.name.startswith("/lm_head/")} == {"MatMul"}


def test_adapter_file_holds_float_a_and_scaled_b(exported, tiny_int4_dir, adapter_dir):
    import onnxruntime as ort
    from peft import PeftModel

    from olivepress.int4 import load_dequantized_model

    parameters = ort.AdapterFormat.read_adapter(str(exported.adapter_file)).get_parameters()
    peft_model = PeftModel.from_pretrained(load_dequantized_model(tiny_int4_dir), adapter_dir)
    for module_name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.o_proj"):
        layer = peft_model.base_model.model.get_submodule(module_name)
        a_name, b_name = lora_input_names(module_name)
        a, b = parameters[a_name].numpy(), parameters[b_name].numpy()
        assert a.dtype == b.dtype == np.float32
        expected_b = layer.lora_B["default"].weight.detach().numpy() * layer.scaling["default"]
        assert np.array_equal(a, layer.lora_A["default"].weight.detach().numpy().T)
        assert np.allclose(b, expected_b.T, rtol=1e-6, atol=0)
    assert (
        peft_model.base_model.model.get_submodule("model.layers.1.self_attn.o_proj").scaling["default"] == 4
    )


def test_logits_match_pytorch_with_and_without_adapter(exported, tiny_int4_dir, adapter_dir):
    import torch
    from peft import PeftModel

    from olivepress.int4 import load_dequantized_model

    base = load_dequantized_model(tiny_int4_dir)
    with torch.inference_mode():
        expected_off = base(torch.tensor([IDS])).logits[0].numpy()
        expected_on = PeftModel.from_pretrained(base, adapter_dir)(torch.tensor([IDS])).logits[0].numpy()
    off = sequence_logits(open_model(exported.model_dir), IDS)
    on = sequence_logits(open_model(exported.model_dir, exported.adapter_file), IDS)
    # float32 round-off only: measured 2e-7 without and 3e-6 with the adapter, whose own effect is ~1
    assert np.abs(off - expected_off).max() < 1e-4
    assert np.abs(on - expected_on).max() < 1e-4
    assert np.abs(on - off).max() > 0.2


def test_gpu_flag_builds_for_cuda_in_float16(tiny_int4_dir, adapter_dir, tmp_path):
    import onnx
    import onnxruntime as ort

    result = export_onnx(tiny_int4_dir, adapter_dir, tmp_path / "gpu", device="gpu")
    decoder = json.loads((result.model_dir / "genai_config.json").read_text())["model"]["decoder"]
    assert "cuda" in decoder["session_options"]["provider_options"][0]
    graph = onnx.load(str(result.model_dir / "model.onnx"), load_external_data=False).graph
    a_name, b_name = lora_input_names("model.layers.0.self_attn.q_proj")
    types = {value.name: value.type.tensor_type.elem_type for value in graph.input}
    assert types[a_name] == types[b_name] == onnx.TensorProto.FLOAT16
    parameters = ort.AdapterFormat.read_adapter(str(result.adapter_file)).get_parameters()
    assert parameters[a_name].numpy().dtype == np.float16


def test_export_without_adapter_has_no_lora(tiny_int4_dir, tmp_path):
    result = export_onnx(tiny_int4_dir, None, tmp_path / "plain")
    assert result.adapter_file is None and result.lora_modules == 0
    assert not (result.model_dir / ADAPTER_FILE).exists()
    assert len(sequence_logits(open_model(result.model_dir), IDS)) == len(IDS)


def test_dora_adapter_is_refused(tiny_int4_dir, tmp_path):
    adapter = make_lora_adapter(tiny_int4_dir, tmp_path / "dora", use_dora=True)
    with pytest.raises(UserError, match="use_dora"):
        export_onnx(tiny_int4_dir, adapter, tmp_path / "onnx")
