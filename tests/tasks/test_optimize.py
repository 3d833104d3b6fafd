import json

import numpy as np
import pytest

from olivepress.errors import UserError
from olivepress.export.folder import export_onnx
from olivepress.export.lora import LoraMatrices, export_adapter, group_branches, lora_a_name, lora_b_name
from olivepress.genai import ADAPTER_FILE, MERGED_MODEL_FILE, open_model, sequence_logits
from tests.conftest import LINEARS, make_lora_adapter

IDS = [1, 20, 31, 42, 53, 64, 75, 86, 97, 108, 2]


@pytest.fixture(scope="module")
def adapter_dir(tiny_int4_dir, tmp_path_factory):
    # o_proj gets its own rank, so its scaling (alpha / 2) differs from the others' (alpha / 4)
    return make_lora_adapter(tiny_int4_dir, tmp_path_factory.mktemp("lora"), rank_pattern={"o_proj": 2})


@pytest.fixture(scope="module")
def exported(tiny_int4_dir, adapter_dir, tmp_path_factory):
    # float32 activations in MatMulNBits (the CPU default, 4, rounds them to int8), the LM head as in the
    # checkpoint and the merged graph's branches in float, so the ONNX model's math is the dequantized PyTorch
    # model's and any mistake in the graph shows above rounding noise
    return export_onnx(
        tiny_int4_dir,
        adapter_dir,
        tmp_path_factory.mktemp("onnx"),
        accuracy_level=1,
        lm_head="float",
        merged_adapter_bits=32,
    )


def load_graph(model_dir):
    import onnx

    return onnx.load(str(model_dir / "model.onnx"))  # with the external data, to read the initializers


def initializer_values(graph) -> dict:
    from onnx import numpy_helper

    return {initializer.name: numpy_helper.to_array(initializer) for initializer in graph.initializer}


def test_folder_holds_what_the_runtime_loads(exported):
    names = {path.name for path in exported.model_dir.iterdir()}
    assert {"genai_config.json", "model.onnx", "model.onnx.data", ADAPTER_FILE, "tokenizer.json"} <= names
    # the merged graph shares the int4 weight file: it holds the graph and the adapter's matrices only
    assert MERGED_MODEL_FILE in names
    assert (exported.model_dir / MERGED_MODEL_FILE).stat().st_size < 2 * exported.adapter_bytes + 1_000_000
    assert exported.adapter_file == exported.model_dir / ADAPTER_FILE
    assert exported.lora_modules == 2 * len(LINEARS)
    assert exported.model_bytes > 0 and exported.adapter_bytes > 0
    decoder = json.loads((exported.model_dir / "genai_config.json").read_text())["model"]["decoder"]
    assert decoder["session_options"]["provider_options"] == []  # the CPU execution provider


def test_the_export_does_not_depend_on_the_repository_around_the_environment(exported):
    """The builder stamps the model with a git commit; found from inside a checkout (a development venv,
    CI's clone) it would be that checkout's HEAD, and each commit would change the export's bytes."""
    import subprocess

    import onnx
    import onnxruntime_genai as og

    stamp = onnx.load(exported.model_dir / "model.onnx", load_external_data=False).producer_version
    commit = getattr(og, "__commit__", None)
    assert stamp == og.__version__ + (f"+{commit[:7]}" if commit else "")
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert not head or head[:7] not in stamp


def builder_stem(layer: int, block: str, module: str) -> str:
    return f"model.layers.{layer}.{block}.{module}.MatMulNBits"


def test_int4_weights_are_exactly_the_checkpoints(exported, tiny_int4_dir):
    import torch

    from olivepress.export.int4 import pack_nibbles, read_int4_checkpoint

    _, weights = read_int4_checkpoint(tiny_int4_dir)
    model = load_graph(exported.model_dir)
    values = initializer_values(model.graph)
    int4_nodes = [node for node in model.graph.node if node.op_type == "MatMulNBits"]
    # q, k and v stay fused in one node, the builder's default, rows in that order
    by_node = {}
    for layer in range(2):
        attn, mlp = f"model.layers.{layer}.self_attn", f"model.layers.{layer}.mlp"
        by_node[builder_stem(layer, "attn", "qkv_proj")] = [
            f"{attn}.{m}" for m in ("q_proj", "k_proj", "v_proj")
        ]
        by_node[builder_stem(layer, "attn", "o_proj")] = [f"{attn}.o_proj"]
        for module in ("gate_proj", "up_proj", "down_proj"):
            by_node[builder_stem(layer, "mlp", module)] = [f"{mlp}.{module}"]
    # nothing else (the float embedding / LM head) was quantized
    assert len(int4_nodes) == len(by_node)
    for stem, modules in by_node.items():
        q = torch.cat([weights[m].q for m in modules])
        scales = torch.cat([weights[m].scales for m in modules])
        zero_points = torch.cat([weights[m].zero_points for m in modules])
        assert np.array_equal(values[f"{stem}.qweight"].reshape(q.shape[0], -1), pack_nibbles(q).numpy())
        assert np.array_equal(values[f"{stem}.scales"], scales.numpy().reshape(-1))
        assert np.array_equal(values[f"{stem}.qzeros"], pack_nibbles(zero_points).numpy().reshape(-1))
        node = next(node for node in int4_nodes if node.input[1] == f"{stem}.qweight")
        attributes = {attribute.name: attribute.i for attribute in node.attribute}
        assert (attributes["bits"], attributes["block_size"]) == (4, weights[modules[0]].group_size)
    assert {node.op_type for node in model.graph.node if node.name.startswith("/lm_head/")} == {"MatMul"}


def test_lm_head_setting_rounds_only_the_head_and_embedding(exported, tiny_int4_dir, adapter_dir, tmp_path):
    """The cpu target's LM head as 8- or 4-bit MatMulNBits and the embedding as a 4-bit table: smaller, its
    logits near the float head's (int8 nearer than int4), every decoder int4 node exactly the float export's."""
    float_values = initializer_values(load_graph(exported.model_dir).graph)
    decoder = [name for name in float_values if name.startswith("model.layers.")]
    reference = sequence_logits(open_model(exported.model_dir, exported.adapter_file), IDS)
    errors = {}
    for lm_head, bits in (("int8", 8), ("int4", 4)):
        result = export_onnx(
            tiny_int4_dir,
            adapter_dir,
            tmp_path / lm_head,
            accuracy_level=1,
            lm_head=lm_head,
            merged_adapter_bits=32,
        )
        graph = load_graph(result.model_dir).graph
        head = [node for node in graph.node if node.name.startswith("/lm_head/")]
        assert [node.op_type for node in head] == ["MatMulNBits"]
        assert {a.name: a.i for a in head[0].attribute}["bits"] == bits
        assert [node.op_type for node in graph.node if "embed_tokens" in node.name].count(
            "GatherBlockQuantized"
        )
        assert result.model_bytes < exported.model_bytes
        values = initializer_values(graph)
        assert decoder and all(np.array_equal(values[name], float_values[name]) for name in decoder)
        logits = sequence_logits(open_model(result.model_dir, result.adapter_file), IDS)
        assert np.corrcoef(logits.ravel(), reference.ravel())[0, 1] > 0.98
        errors[lm_head] = np.abs(logits - reference).mean()
    assert 0 < errors["int8"] < errors["int4"]


def test_the_cpu_merged_graph_holds_its_branches_in_8_bits(exported, tiny_int4_dir, adapter_dir, tmp_path):
    """Each LoRA product of the merged graph with a block of inputs an 8-bit MatMulNBits (under a third of its
    float bytes), its logits within a few percent of the adapter's own effect; model.onnx and the
    .onnx_adapter as before."""
    import onnx

    result = export_onnx(tiny_int4_dir, adapter_dir, tmp_path / "q8", accuracy_level=1, lm_head="float")
    merged = onnx.load(str(result.model_dir / MERGED_MODEL_FILE), load_external_data=False)
    products = [node for node in merged.graph.node if "_lora/" in node.name and "MatMul" in node.op_type]
    float_shapes = {
        tensor.name: tensor.dims
        for tensor in onnx.load(
            str(exported.model_dir / MERGED_MODEL_FILE), load_external_data=False
        ).graph.initializer
    }
    rounded = [node for node in products if node.op_type == "MatMulNBits"]
    # the tiny adapter's ranks (4, o_proj 2) leave its B products under a block: those stay float
    assert rounded and all(float_shapes[node.input[1].removesuffix("_Q8")][0] >= 16 for node in rounded)
    assert all(float_shapes[node.input[1]][0] < 16 for node in products if node.op_type == "MatMul")
    assert {a.i for node in rounded for a in node.attribute if a.name == "bits"} == {8}

    stored = {tensor.name: len(tensor.raw_data) for tensor in merged.graph.initializer}
    for node in rounded:  # 8 bits a weight and a 4-byte scale per 16, against 4 bytes a weight
        k, n = float_shapes[node.input[1].removesuffix("_Q8")]
        assert stored[node.input[1]] + stored[node.input[2]] < 0.33 * 4 * k * n
    for name in ("model.onnx", ADAPTER_FILE):
        assert (result.model_dir / name).read_bytes() == (exported.model_dir / name).read_bytes()

    off = sequence_logits(open_model(exported.model_dir), IDS)
    float_branches = sequence_logits(open_model(exported.model_dir, exported.adapter_file), IDS)
    eight_bits = sequence_logits(open_model(result.model_dir, result.adapter_file), IDS)
    assert 0 < np.abs(eight_bits - float_branches).mean() < 0.1 * np.abs(float_branches - off).mean()


def test_symmetric_blocks_round_each_block_to_its_own_scale():
    from olivepress.export.merged_bits import BLOCK_SIZE, symmetric_blocks

    weight = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)  # K not a whole block
    weight[:, 2] = 0  # a column of zeros keeps a zero scale
    q, scales = symmetric_blocks(weight)
    assert q.shape == (3, 2, BLOCK_SIZE) and q.dtype == np.uint8 and scales.shape == (6,)
    restored = ((q.astype(np.float32) - 128) * scales.reshape(3, 2, 1)).reshape(3, -1).T[:20]
    assert np.abs(restored - weight).max() <= scales.max() / 2 + 1e-7
    assert (q[:, 1, 4:] == 128).all(), "the padding past K is zero"
    assert (scales.reshape(3, 2)[2] == 0).all() and np.array_equal(restored[:, 2], weight[:, 2])


def test_the_cuda_target_keeps_the_lm_head_float(tiny_int4_dir, tmp_path):
    result = export_onnx(tiny_int4_dir, None, tmp_path / "cuda", target="cuda", lm_head="int4")
    graph = load_graph(result.model_dir).graph
    assert {node.op_type for node in graph.node if node.name.startswith("/lm_head/")} == {"MatMul"}
    assert "GatherBlockQuantized" not in {node.op_type for node in graph.node}


def test_one_branch_per_group_of_linears_sharing_an_input(exported):
    """A decoder layer gets 14 LoRA nodes (an A product per group, a B product and a sum per int4 node),
    not 21 (three per linear)."""
    graph = load_graph(exported.model_dir).graph
    lora_nodes = [node for node in graph.node if "_lora/" in node.name]
    assert len(lora_nodes) == 2 * 14
    assert sum(node.name.endswith("/A") for node in lora_nodes) == 2 * 4


def test_adapter_file_holds_float_a_and_scaled_b(exported, tiny_int4_dir, adapter_dir):
    import onnxruntime as ort
    from peft import PeftModel

    from olivepress.export.int4 import load_dequantized_model

    parameters = ort.AdapterFormat.read_adapter(str(exported.adapter_file)).get_parameters()
    peft_model = PeftModel.from_pretrained(load_dequantized_model(tiny_int4_dir), adapter_dir)

    def matrices(module_name):
        layer = peft_model.base_model.model.get_submodule(module_name)
        a = layer.lora_A["default"].weight.detach().numpy().T
        return a, (layer.lora_B["default"].weight.detach().numpy() * layer.scaling["default"]).T

    a_q, b_q = matrices("model.layers.0.self_attn.q_proj")
    a_v, b_v = matrices("model.layers.0.self_attn.v_proj")
    a_qkv = parameters[lora_a_name(0, "qkv")].numpy()
    b_qkv = parameters[lora_b_name(0, "qkv_proj")].numpy()
    assert a_qkv.dtype == b_qkv.dtype == np.float32
    rank, q_size = a_q.shape[1], b_q.shape[1]
    assert np.array_equal(a_qkv[:, :rank], a_q) and np.array_equal(a_qkv[:, 2 * rank :], a_v)
    assert np.allclose(b_qkv[:rank, :q_size], b_q, rtol=1e-6, atol=0)
    assert np.allclose(b_qkv[2 * rank :, -b_v.shape[1] :], b_v, rtol=1e-6, atol=0)
    assert not b_qkv[:rank, q_size:].any()  # q's rows touch only q's columns

    a_o, b_o = matrices("model.layers.1.self_attn.o_proj")
    assert np.array_equal(parameters[lora_a_name(1, "o")].numpy(), a_o)
    assert np.allclose(parameters[lora_b_name(1, "o_proj")].numpy(), b_o, rtol=1e-6, atol=0)
    assert (
        peft_model.base_model.model.get_submodule("model.layers.1.self_attn.o_proj").scaling["default"] == 4
    )


SIZES = {"q_proj": 8, "k_proj": 4, "v_proj": 4, "o_proj": 8, "gate_proj": 16, "up_proj": 16, "down_proj": 8}
SIZES |= {"qkv.in": 8, "o.in": 8, "gate_up.in": 8, "down.in": 16}


def lora(rank, out_features, seed):
    rng = np.random.default_rng(seed)
    return LoraMatrices(a=rng.normal(size=(8, rank)), b=rng.normal(size=(rank, out_features)))


def test_fused_peft_modules_map_onto_split_nodes():
    """Phi-3's adapter (qkv_proj, gate_up_proj) on a graph whose gate and up are separate nodes."""
    peft = {
        "model.layers.0.self_attn.qkv_proj": lora(2, 16, 0),
        "model.layers.0.mlp.gate_up_proj": lora(2, 32, 1),
    }
    nodes = {(0, "qkv"): ["qkv_proj"], (0, "gate_up"): ["gate_proj", "up_proj"]}
    qkv, gate_up = group_branches(peft, nodes, SIZES)
    assert np.array_equal(qkv.b_per_node["qkv_proj"], peft["model.layers.0.self_attn.qkv_proj"].b)
    fused_b = peft["model.layers.0.mlp.gate_up_proj"].b
    assert np.array_equal(gate_up.b_per_node["gate_proj"], fused_b[:, :16])
    assert np.array_equal(gate_up.b_per_node["up_proj"], fused_b[:, 16:])


def test_split_peft_modules_map_onto_fused_node_and_unadapted_columns_stay_zero():
    peft = {
        "model.layers.0.self_attn.v_proj": lora(3, 4, 0),
        "model.layers.0.self_attn.q_proj": lora(2, 8, 1),
    }
    (fused,) = group_branches(peft, {(0, "qkv"): ["qkv_proj"]}, SIZES)
    # A in column order q then v, whatever order PEFT listed them in
    assert np.array_equal(fused.a[:, :2], peft["model.layers.0.self_attn.q_proj"].a)
    b = fused.b_per_node["qkv_proj"]
    assert b.shape == (5, 16) and not b[:, 8:12].any()  # k is not adapted
    (split,) = group_branches(peft, {(0, "qkv"): ["q_proj", "k_proj", "v_proj"]}, SIZES)
    assert set(split.b_per_node) == {"q_proj", "v_proj"}  # no B, hence no product, for k


def test_a_group_the_graph_has_no_node_for_is_an_error():
    down = LoraMatrices(a=np.ones((16, 2)), b=np.ones((2, 8)))
    with pytest.raises(RuntimeError, match="no int4 node for layer 0's down"):
        group_branches({"model.layers.0.mlp.down_proj": down}, {(0, "o"): ["o_proj"]}, SIZES)


def test_matrices_of_another_model_are_refused():
    with pytest.raises(UserError, match="columns"):
        group_branches({"model.layers.0.self_attn.o_proj": lora(2, 5, 0)}, {(0, "o"): ["o_proj"]}, SIZES)
    with pytest.raises(UserError, match="rows"):
        group_branches({"model.layers.0.mlp.down_proj": lora(2, 8, 0)}, {(0, "down"): ["down_proj"]}, SIZES)


def test_logits_match_pytorch_with_and_without_adapter(exported, tiny_int4_dir, adapter_dir):
    import torch
    from peft import PeftModel

    from olivepress.export.int4 import load_dequantized_model

    base = load_dequantized_model(tiny_int4_dir)
    with torch.inference_mode():
        expected_off = base(torch.tensor([IDS])).logits[0].numpy()
        expected_on = PeftModel.from_pretrained(base, adapter_dir)(torch.tensor([IDS])).logits[0].numpy()
    off = sequence_logits(open_model(exported.model_dir), IDS)
    merged = open_model(exported.model_dir, exported.adapter_file)
    run_time = open_model(exported.model_dir, exported.adapter_file, run_time_adapter=True)
    assert merged.adapter_merged and merged.adapters is None
    assert not run_time.adapter_merged and run_time.adapters is not None
    on = sequence_logits(merged, IDS)
    # the merged graph and the run-time adapter are one computation
    assert np.array_equal(on, sequence_logits(run_time, IDS))
    # float32 round-off only: measured 2e-7 without and 3e-6 with the adapter, whose own effect is ~1
    assert np.abs(off - expected_off).max() < 1e-4
    assert np.abs(on - expected_on).max() < 1e-4
    assert np.abs(on - off).max() > 0.2


def test_another_adapter_for_the_same_export_gives_its_own_logits(exported, tiny_int4_dir, tmp_path):
    """One int4 model, several adapters: a second adapter (other rank, fewer linears) exported against the
    first one's graph computes what its own export computes."""
    second = make_lora_adapter(
        tiny_int4_dir, tmp_path / "second", seed=7, r=2, target_modules=["q_proj", "down_proj"]
    )
    adapter_file = export_adapter(tiny_int4_dir, second, exported.model_dir, tmp_path / "second.onnx_adapter")
    alone = export_onnx(tiny_int4_dir, second, tmp_path / "alone", accuracy_level=1, lm_head="float")

    shared = sequence_logits(open_model(exported.model_dir, adapter_file), IDS)
    own = sequence_logits(open_model(alone.model_dir, alone.adapter_file, run_time_adapter=True), IDS)
    first = sequence_logits(open_model(exported.model_dir, exported.adapter_file, run_time_adapter=True), IDS)
    np.testing.assert_allclose(shared, own, atol=1e-5)
    assert not np.allclose(shared, first, atol=1e-3)


def test_an_adapter_on_linears_the_export_has_no_branch_for_is_refused(tiny_int4_dir, tmp_path):
    narrow = make_lora_adapter(tiny_int4_dir, tmp_path / "narrow", target_modules=["q_proj"])
    exported = export_onnx(tiny_int4_dir, narrow, tmp_path / "onnx")
    wider = make_lora_adapter(tiny_int4_dir, tmp_path / "wider", target_modules=["q_proj", "down_proj"])
    with pytest.raises(UserError, match="no LoRA branch for layer 0's down linears"):
        export_adapter(tiny_int4_dir, wider, exported.model_dir, tmp_path / "wider.onnx_adapter")


def test_gpu_flag_builds_for_cuda_in_float16(tiny_int4_dir, adapter_dir, tmp_path):
    import onnx
    import onnxruntime as ort

    result = export_onnx(tiny_int4_dir, adapter_dir, tmp_path / "gpu", target="cuda", cuda_graph=True)
    decoder = json.loads((result.model_dir / "genai_config.json").read_text())["model"]["decoder"]
    assert decoder["session_options"]["provider_options"][0]["cuda"]["enable_cuda_graph"] == "1"
    graph = onnx.load(str(result.model_dir / "model.onnx"), load_external_data=False).graph
    a_name, b_name = lora_a_name(0, "qkv"), lora_b_name(0, "qkv_proj")
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


def test_cuda_branches_become_one_lora_add_node_per_group(tiny_int4_dir, adapter_dir, tmp_path):
    """The CUDA export's graph (built here without a GPU) with LoraAdd in place of MatMul, MatMul, Add, the
    int4 nodes kept (fuse_int4 False: the form of int4 nodes MatMulNBitsLora cannot take): one node per
    group of int4 nodes reading the same activations (the builder's gate and up: two), each pair its int4
    node's output and its own B, after the group's A; whatever read an int4 output now reads its sum, and
    every node still comes after what it reads."""
    from olivepress.export.lora import graft_branches, graph_and_branches

    model_dir = export_onnx(tiny_int4_dir, None, tmp_path / "onnx", target="cuda").model_dir
    model, branches = graph_and_branches(model_dir, tiny_int4_dir, read_lora_of(adapter_dir))
    int4_nodes = {node.output[0]: node for node in model.graph.node if node.op_type == "MatMulNBits"}
    parameters = graft_branches(model, branches, lora_add=True, fuse_int4=False)

    fused = [node for node in model.graph.node if node.op_type == "LoraAdd"]
    assert fused and all(node.domain == "olivepress" for node in fused)
    assert {"MatMul", "Add"}.isdisjoint(node.op_type for node in model.graph.node if "_lora/" in node.name), (
        "no branch keeps ONNX Runtime's own operators"
    )
    assert len(fused) == sum(1 for branch in branches if branch.b_per_node)
    assert max(len(node.output) for node in fused) == 2  # gate and up in one launch
    graph_inputs = {value.name for value in model.graph.input}
    readers = {name for node in model.graph.node if node.op_type != "LoraAdd" for name in node.input}
    for node in fused:
        y1, x, a, b1, *more = node.input
        pairs = [(y1, b1), *zip(more[::2], more[1::2], strict=True)]
        assert len(pairs) == len(node.output)
        for (y, b), summed in zip(pairs, node.output, strict=True):
            assert int4_nodes[y].input[0] == x  # every pair's int4 node reads the group's activations
            assert {a, b} <= graph_inputs and parameters[a].shape[1] == parameters[b].shape[0]
            assert y not in readers and summed in readers  # the sum replaced the int4 output
    assert ("olivepress", 1) in {(o.domain, o.version) for o in model.opset_import}
    # still in topological order (onnx's checker refuses the builder's own contrib operators)
    known = graph_inputs | {initializer.name for initializer in model.graph.initializer} | {""}
    for node in model.graph.node:
        assert set(node.input) <= known, f"{node.name} reads a value made after it"
        known |= set(node.output)


def test_cuda_branches_go_inside_the_int4_nodes(tiny_int4_dir, adapter_dir, tmp_path):
    """With lora_add, every adapted int4 node of the CUDA export becomes one MatMulNBitsLora: its own inputs,
    then its group's A and its own B, and its own output (whatever read it reads the branch's sum); no
    LoraAdd is left, the int4 nodes the adapter leaves alone stay MatMulNBits, and an adapter for the same
    base still finds every input it feeds."""
    from olivepress.export.lora import (
        adapter_parameters,
        graft_branches,
        graph_and_branches,
        int4_node_modules,
    )

    model_dir = export_onnx(tiny_int4_dir, None, tmp_path / "onnx", target="cuda").model_dir
    model, branches = graph_and_branches(model_dir, tiny_int4_dir, read_lora_of(adapter_dir))
    int4_nodes = {node.name: node for node in model.graph.node if node.op_type == "MatMulNBits"}
    modules_before = int4_node_modules(model.graph)
    parameters = graft_branches(model, branches, lora_add=True)

    fused = [node for node in model.graph.node if node.op_type == "MatMulNBitsLora"]
    assert len(fused) == sum(len(branch.b_per_node) for branch in branches) > 0
    assert "LoraAdd" not in {node.op_type for node in model.graph.node}
    assert not [node for node in model.graph.node if "_lora/" in node.name], "no separate branch nodes"
    graph_inputs = {value.name for value in model.graph.input}
    for node in fused:
        original = int4_nodes[node.name.removesuffix("Lora")]
        assert node.domain == "olivepress"
        assert list(node.input[:4]) == list(original.input) and list(node.output) == list(original.output)
        a, b = node.input[4:]
        assert {a, b} <= graph_inputs and parameters[a].shape[1] == parameters[b].shape[0]
    assert int4_node_modules(model.graph) == modules_before
    assert adapter_parameters(model.graph, branches).keys() == parameters.keys()
    assert ("olivepress", 1) in {(o.domain, o.version) for o in model.opset_import}


def test_int4_nodes_the_kernel_cannot_take_keep_lora_add(tiny_int4_dir, adapter_dir, tmp_path):
    """A group mixing int4 nodes MatMulNBitsLora takes and one it cannot (here: no zero points): the others
    are fused, that one alone gets a LoraAdd after it, and the graph stays in dependency order."""
    from olivepress.export.lora import graft_branches, graph_and_branches

    model_dir = export_onnx(tiny_int4_dir, None, tmp_path / "onnx", target="cuda").model_dir
    model, branches = graph_and_branches(model_dir, tiny_int4_dir, read_lora_of(adapter_dir))
    plain = [node for node in model.graph.node if node.op_type == "MatMulNBits" and "/mlp/" in node.name]
    without_zero_points = plain[0]
    del without_zero_points.input[3:]
    graft_branches(model, branches, lora_add=True)

    lora_adds = [node for node in model.graph.node if node.op_type == "LoraAdd"]
    assert len(lora_adds) == 1 and lora_adds[0].input[0] == without_zero_points.output[0]
    assert len(lora_adds[0].output) == 1  # only the node the kernel cannot take
    assert without_zero_points.name in {node.name for node in model.graph.node}
    fused = [node for node in model.graph.node if node.op_type == "MatMulNBitsLora"]
    assert len(fused) == sum(len(branch.b_per_node) for branch in branches) - 1
    known = {value.name for value in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    for node in model.graph.node:
        assert set(node.input) <= known, f"{node.name} reads a value made after it"
        known |= set(node.output)


def test_fusable_takes_only_what_the_kernel_runs():
    """MatMulNBitsLora needs uint8 zero points, 4 bits, K a multiple of 8 and at most 16384 inputs."""
    import numpy as np
    from onnx import helper, numpy_helper

    from olivepress.export.lora import fusable

    def node_and_initializers(k=64, block=32, bits=4, zero_type=np.uint8, with_zero=True):
        blocks = -(-k // block)
        initializers = {
            "w": numpy_helper.from_array(np.zeros((8, blocks, block // 2), np.uint8), "w"),
            "z": numpy_helper.from_array(np.zeros(8 * ((blocks + 1) // 2), zero_type), "z"),
        }
        inputs = ["x", "w", "s", "z"] if with_zero else ["x", "w", "s"]
        node = helper.make_node("MatMulNBits", inputs, ["y"], K=k, N=8, bits=bits, block_size=block)
        return node, initializers

    assert fusable(*node_and_initializers())
    assert fusable(*node_and_initializers(k=16384, block=128))
    assert not fusable(*node_and_initializers(k=16384 + 128, block=128))
    assert not fusable(*node_and_initializers(k=60))
    assert not fusable(*node_and_initializers(bits=8))
    assert not fusable(*node_and_initializers(with_zero=False))
    assert not fusable(*node_and_initializers(zero_type=np.float16))
    assert not fusable(*node_and_initializers(k=48, block=16))  # 3 blocks of 16: a row of 48, not 32s


def read_lora_of(adapter_dir):
    from olivepress.export.lora import read_lora

    return read_lora(adapter_dir)


def test_lora_kernel_off_or_missing_keeps_onnx_runtimes_operators(
    tiny_int4_dir, adapter_dir, tmp_path, monkeypatch, caplog
):
    """auto without ONNX Runtime's header warns and exports the three-operator branches; on refuses."""
    monkeypatch.delenv("OLIVEPRESS_ORT_INCLUDE", raising=False)
    with pytest.raises(UserError, match="OLIVEPRESS_ORT_INCLUDE"):
        export_onnx(tiny_int4_dir, adapter_dir, tmp_path / "on", target="cuda", lora_kernel="on")
    out = export_onnx(tiny_int4_dir, adapter_dir, tmp_path / "auto", target="cuda", lora_kernel="auto")
    assert "not LoraAdd" in caplog.text
    graph = load_graph(out.model_dir).graph
    assert "LoraAdd" not in {node.op_type for node in graph.node}
    assert not list(out.model_dir.glob("*.so"))
    options = json.loads((out.model_dir / "genai_config.json").read_text())["model"]["decoder"]
    assert "custom_ops_library" not in options["session_options"]


def test_nodes_move_only_as_far_as_what_they_read_requires():
    from onnx import helper

    from olivepress.export.lora import in_dependency_order

    def node(name, inputs, outputs):
        return helper.make_node("Identity", inputs, outputs, name=name)

    in_order = [node("a", ["x"], ["a"]), node("b", ["a"], ["b"]), node("c", ["x"], ["c"])]
    assert in_dependency_order(in_order) == in_order
    # a reader of the sum placed between the group's int4 nodes, before the node that makes the sum
    grafted = [
        node("gate", ["x"], ["g"]),
        node("act", ["g_sum"], ["act"]),
        node("up", ["x"], ["u"]),
        node("lora", ["g", "u"], ["g_sum", "u_sum"]),
        node("mul", ["act", "u_sum"], ["y"]),
    ]
    assert [n.name for n in in_dependency_order(grafted)] == ["gate", "up", "lora", "act", "mul"]
    with pytest.raises(RuntimeError, match="cycle"):
        in_dependency_order([node("p", ["q"], ["p"]), node("q", ["p"], ["q"])])
