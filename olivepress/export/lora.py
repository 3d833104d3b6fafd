"""LoRA branches grafted onto the int4 ONNX graph, grouped by the activation they read.

A decoder layer's linears read four activations: q/k/v read the attention norm's output, o_proj the
attention's output, gate/up the MLP norm's output, down_proj the MLP's product. Each group gets one branch:
one ``MatMul`` by the group's A matrices side by side (``x @ [A_q | A_k | A_v]``), then per int4 node of
the group one ``MatMul`` by that node's block of B (block-diagonal across the group's modules) and an
``Add`` onto the node's output. On a GPU, batch-1 decoding is bound by the number of kernels launched, not
by these matrices' size, so grouping matters: a branch per linear launches 21 kernels a layer and needs
q/k/v split out of the builder's fused QKV node; grouped branches launch 14 and keep the fused node.

On CUDA (``lora_add``) the branches are olivepress's own operators (:mod:`olivepress.export.kernel`): each
int4 node the kernel can take becomes one ``olivepress.MatMulNBitsLora`` node, ``x @ W + (x @ A) @ B`` in
one kernel (the branch adds no launch: a layer runs as many kernels as without an adapter); the others of a
group get one ``olivepress.LoraAdd`` node after them, ``y_i + (x @ A) @ B_i`` for each in one kernel.

The matrices are graph inputs with empty defaults ([in, 0] and [0, out]): with no adapter active the
branches multiply by nothing and add zeros; with one active, ONNX Runtime feeds the adapter file's values.
PEFT's module names are Hugging Face's, fused (Phi-3's ``qkv_proj``, ``gate_up_proj``) or not; the builder's
node names are its own (``/model/layers.3/attn/qkv_proj/MatMulNBits``); both map onto the same columns.

Here too: the adapter read from PEFT's files (:func:`read_lora`) and written as the export's adapter file
and merged graph (:func:`add_lora_branches`), or as a further adapter's file (:func:`export_adapter`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from olivepress.errors import UserError
from olivepress.genai import ADAPTER_FILE, MERGED_MODEL_FILE, MODEL_FILE

if TYPE_CHECKING:
    from pathlib import Path

    import numpy as np

# PEFT module names of the decoder linears that can carry LoRA, Hugging Face's spelling.
PEFT_LINEAR = re.compile(
    r"^model\.layers\.(\d+)\.(?:self_attn|mlp)\."
    r"(q_proj|k_proj|v_proj|qkv_proj|o_proj|gate_proj|up_proj|gate_up_proj|down_proj)$"
)
# Per group: the builder's block name and the group's column parts in the order of its fused output.
GROUPS = {
    "qkv": ("attn", ("q_proj", "k_proj", "v_proj")),
    "o": ("attn", ("o_proj",)),
    "gate_up": ("mlp", ("gate_proj", "up_proj")),
    "down": ("mlp", ("down_proj",)),
}
# A fused module (PEFT's or the builder's) covers several parts of its group, in this order.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
GROUP_OF_PART = {part: group for group, (_, parts) in GROUPS.items() for part in parts}


@dataclass(frozen=True)
class LoraMatrices:
    """One linear's LoRA, as the graph multiplies it: ``x @ a @ b`` with PEFT's scaling folded into b."""

    a: np.ndarray  # (in_features, rank)
    b: np.ndarray  # (rank, out_features), already multiplied by lora_alpha / r (or its rsLoRA form)


def parts_of(module: str) -> tuple[str, ...]:
    return FUSED.get(module, (module,))


def part_sizes(config: dict) -> dict[str, int]:
    """Output columns of each part and input rows of each group (``qkv.in``...), from config.json."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv_heads = config.get("num_key_value_heads") or heads
    intermediate = config["intermediate_size"]
    return {
        "q_proj": heads * head_dim,
        "k_proj": kv_heads * head_dim,
        "v_proj": kv_heads * head_dim,
        "o_proj": config["hidden_size"],
        "gate_proj": intermediate,
        "up_proj": intermediate,
        "down_proj": config["hidden_size"],
        "qkv.in": config["hidden_size"],
        "o.in": heads * head_dim,
        "gate_up.in": config["hidden_size"],
        "down.in": intermediate,
    }


def lora_a_name(layer: int, group: str) -> str:
    return f"model.layers.{layer}.{group}.lora_A"


def lora_b_name(layer: int, node_module: str) -> str:
    return f"model.layers.{layer}.{node_module}.lora_B"


@dataclass(frozen=True)
class Branch:
    """One group's branch in one layer: A side by side, and B's block per int4 node of the group."""

    layer: int
    group: str
    a: np.ndarray  # (in_features, total rank of the group's adapted modules)
    b_per_node: dict[str, np.ndarray]  # builder module name (e.g. qkv_proj) -> (total rank, its columns)


def group_branches(
    lora: dict[str, LoraMatrices], node_modules: dict[tuple[int, str], list[str]], sizes: dict[str, int]
) -> list[Branch]:
    """Combine PEFT's per-module matrices into one branch per (layer, group).

    ``node_modules`` lists, per (layer, group), the builder's int4 nodes by module name (``qkv_proj`` or
    ``q_proj``, ``k_proj``, ``v_proj``), in column order. A node none of whose columns are adapted gets no B.
    """
    import numpy as np

    by_group: dict[tuple[int, str], list[tuple[str, LoraMatrices]]] = {}
    for name, matrices in lora.items():
        match = PEFT_LINEAR.match(name)
        if match is None:
            raise ValueError(f"{name} is not a decoder linear")
        layer, module = int(match.group(1)), match.group(2)
        by_group.setdefault((layer, GROUP_OF_PART[parts_of(module)[0]]), []).append((module, matrices))

    branches = []
    group_order = list(GROUPS)
    for (layer, group), members in sorted(
        by_group.items(), key=lambda i: (i[0][0], group_order.index(i[0][1]))
    ):
        parts = GROUPS[group][1]
        column_start = {}
        offset = 0
        for part in parts:
            column_start[part] = offset
            offset += sizes[part]
        members.sort(key=lambda member: parts.index(parts_of(member[0])[0]))
        for module, matrices in members:
            if matrices.a.shape[0] != sizes[f"{group}.in"]:
                raise UserError(
                    f"LoRA A of layer {layer} {module} has {matrices.a.shape[0]} rows; "
                    f"the model's {group} input has {sizes[f'{group}.in']}: the adapter is not this model's"
                )
        a = np.concatenate([matrices.a for _, matrices in members], axis=1)
        b = np.zeros((a.shape[1], offset), dtype=a.dtype)
        row = 0
        for module, matrices in members:
            start = column_start[parts_of(module)[0]]
            width = sum(sizes[part] for part in parts_of(module))
            if matrices.b.shape[1] != width:
                raise UserError(
                    f"LoRA B of layer {layer} {module} has {matrices.b.shape[1]} columns, not {width}: "
                    "the adapter is not this model's"
                )
            rank = matrices.a.shape[1]
            b[row : row + rank, start : start + width] = matrices.b
            row += rank
        if (layer, group) not in node_modules:
            raise RuntimeError(f"the exported graph has no int4 node for layer {layer}'s {group} linears")
        b_per_node = {}
        for node_module in node_modules[(layer, group)]:
            start = column_start[parts_of(node_module)[0]]
            width = sum(sizes[part] for part in parts_of(node_module))
            block = b[:, start : start + width]
            if block.any():
                b_per_node[node_module] = np.ascontiguousarray(block)
        branches.append(Branch(layer=layer, group=group, a=a, b_per_node=b_per_node))
    return branches


# the builder's int4 nodes, and the MatMulNBitsLora nodes graft_branches puts in their place
INT4_NODE = re.compile(r"^/model/layers\.(\d+)/(attn|mlp)/(\w+)/MatMulNBits(?:Lora)?$")
# MatMulNBitsLora keeps x in a block's shared memory: 16384 inputs at most (kMaxFusedK in lora_add.cu)
FUSED_MAX_INPUTS = 16384


def fusable(node, initializers: dict) -> bool:
    """Whether MatMulNBitsLora can replace the int4 node ``node``: 4 bits, blocks of 16 to 128 inputs, uint8
    zero points, K a multiple of 8 and its padded row of 32 (16-byte words) within FUSED_MAX_INPUTS."""
    import onnx
    from onnx import helper

    attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
    k, block = attributes.get("K", 0), attributes.get("block_size", 0)
    if attributes.get("bits", 4) != 4 or block not in (16, 32, 64, 128) or len(node.input) != 4:
        return False
    weights, zero_points = initializers.get(node.input[1]), initializers.get(node.input[3])
    padded = -(-k // block) * block
    return (
        weights is not None
        and len(weights.dims) == 3
        and zero_points is not None
        and zero_points.data_type == onnx.TensorProto.UINT8
        and k % 8 == 0
        and padded % 32 == 0
        and padded <= FUSED_MAX_INPUTS
    )


def int4_node_modules(graph) -> dict[tuple[int, str], list[str]]:
    """The builder's int4 nodes per (layer, group), by module name, in column order."""
    found: dict[tuple[int, str], list[str]] = {}
    for node in graph.node:
        match = INT4_NODE.match(node.name)
        if match is None or parts_of(match.group(3))[0] not in GROUP_OF_PART:
            continue
        module = match.group(3)
        group = GROUP_OF_PART[parts_of(module)[0]]
        found.setdefault((int(match.group(1)), group), []).append(module)
    order = [part for _, parts in GROUPS.values() for part in parts]
    return {key: sorted(modules, key=lambda m: order.index(parts_of(m)[0])) for key, modules in found.items()}


def graft_branches(
    model, branches: list[Branch], *, lora_add: bool = False, fuse_int4: bool = True
) -> dict[str, np.ndarray]:
    """Add the branches to ``model`` (an onnx ModelProto, in place); returns the adapter's parameters, in
    the graph's float type.

    A group's A product goes right after its first int4 node (its input exists there), each B product and
    sum right after the int4 node it adds to, so every consumer of that node's output, which now reads the
    sum, still comes later. With ``lora_add`` (float16 graphs for CUDA only) each int4 node that
    :func:`fusable` accepts becomes ``olivepress.MatMulNBitsLora(x, W, scales, zero_points, A, B)`` with the
    node's own output (``fuse_int4``: False keeps every int4 node, for comparing the forms); the group's
    other int4 nodes get one ``olivepress.LoraAdd`` node after the last of them: ``(y1, x, A, B1, y2, B2,
    y3, B3)`` to one sum per int4 node, ``x @ A`` computed once; a consumer that came between the group's
    int4 nodes moves after it.
    """
    import onnx
    from onnx import helper

    from olivepress.export.kernel import LORA_ADD_DOMAIN

    graph = model.graph
    nodes = {node.name: node for node in graph.node}
    initializers = {initializer.name: initializer for initializer in graph.initializer}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, index))
    position = {node.name: index for index, node in enumerate(graph.node)}

    inserted_after: dict[str, list] = {}
    replaced: dict[str, onnx.NodeProto] = {}  # int4 node name -> its MatMulNBitsLora
    for branch in branches:
        block = GROUPS[branch.group][0]
        targets = {
            module: nodes[f"/model/layers.{branch.layer}/{block}/{module}/MatMulNBits"]
            for module in branch.b_per_node
        }
        if not targets:
            continue
        first = min(targets.values(), key=lambda node: position[node.name])
        activations = first.input[0]
        if any(node.input[0] != activations for node in targets.values()):
            raise RuntimeError(f"the int4 nodes of layer {branch.layer} {branch.group} read different inputs")
        io_dtype = initializers[first.input[2]].data_type  # MatMulNBits' scales: the activations' type
        if lora_add and io_dtype != onnx.TensorProto.FLOAT16:
            raise ValueError("LoraAdd takes float16 activations; this graph's are not")
        stem = f"/model/layers.{branch.layer}/{block}/{branch.group}_lora"
        rank_dim = f"lora_r_{branch.layer}_{branch.group}"
        a_name, a_output = lora_a_name(branch.layer, branch.group), f"{stem}/A/output_0"
        add_lora_input(graph, a_name, io_dtype, [branch.a.shape[0], rank_dim], (branch.a.shape[0], 0))
        if not lora_add:
            inserted_after.setdefault(first.name, []).append(
                helper.make_node("MatMul", [activations, a_name], [a_output], name=f"{stem}/A")
            )
        lora_add_inputs, sums, separate = [], [], []
        for module, node in targets.items():
            b = branch.b_per_node[module]
            b_name = lora_b_name(branch.layer, module)
            add_lora_input(graph, b_name, io_dtype, [rank_dim, b.shape[1]], (0, b.shape[1]))
            if lora_add and fuse_int4 and fusable(node, initializers):
                replaced[node.name] = helper.make_node(
                    "MatMulNBitsLora",
                    [*node.input, a_name, b_name],
                    list(node.output),
                    name=f"{node.name}Lora",
                    domain=LORA_ADD_DOMAIN,
                )
                continue
            separate.append(node)
            base_output, product, summed = (
                node.output[0],
                f"{stem}/{module}/B/output_0",
                f"{stem}/{module}/Add/output_0",
            )
            for consumer, index in consumers.get(base_output, []):
                consumer.input[index] = summed
            sums.append(summed)
            pair = [base_output, b_name]  # the first pair is y1, x, A, B1
            lora_add_inputs += pair if lora_add_inputs else [base_output, activations, a_name, b_name]
            if not lora_add:
                inserted_after.setdefault(node.name, []).extend(
                    [
                        helper.make_node("MatMul", [a_output, b_name], [product], name=f"{stem}/{module}/B"),
                        helper.make_node(
                            "Add", [base_output, product], [summed], name=f"{stem}/{module}/Add"
                        ),
                    ]
                )
        if lora_add and separate:
            last = max(separate, key=lambda node: position[node.name])
            inserted_after.setdefault(last.name, []).append(
                helper.make_node(
                    "LoraAdd", lora_add_inputs, sums, name=f"{stem}/LoraAdd", domain=LORA_ADD_DOMAIN
                )
            )
    if (
        lora_add
        and (inserted_after or replaced)
        and all(o.domain != LORA_ADD_DOMAIN for o in model.opset_import)
    ):
        model.opset_import.append(helper.make_opsetid(LORA_ADD_DOMAIN, 1))
    ordered = []
    for node in graph.node:
        ordered += [replaced.get(node.name, node), *inserted_after.get(node.name, [])]
    del graph.node[:]
    graph.node.extend(in_dependency_order(ordered))
    return adapter_parameters(graph, branches)


def in_dependency_order(nodes: list) -> list:
    """``nodes`` moved as little as needed for each to come after the nodes whose outputs it reads (Kahn's
    algorithm taking the earliest ready node first): unchanged when they already are."""
    import heapq

    producer = {name: index for index, node in enumerate(nodes) for name in node.output if name}
    readers: dict[int, list[int]] = {}
    waiting = []
    for index, node in enumerate(nodes):
        read = {producer[name] for name in node.input if name in producer}
        waiting.append(len(read))
        for source in read:
            readers.setdefault(source, []).append(index)
    ready = [index for index, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    ordered = []
    while ready:
        index = heapq.heappop(ready)
        ordered.append(nodes[index])
        for reader in readers.get(index, []):
            waiting[reader] -= 1
            if waiting[reader] == 0:
                heapq.heappush(ready, reader)
    if len(ordered) != len(nodes):
        raise RuntimeError("the grafted graph has a cycle")
    return ordered


def adapter_parameters(graph, branches: list[Branch]) -> dict[str, np.ndarray]:
    """The matrices of ``branches`` for a grafted graph (by this adapter's export, or another adapter's, so
    that one int4 model serves several adapters): the graph's own input names, in its float type.

    A group's A spans the ranks of the modules it adapts, and every B of the group multiplies it; so within
    a group the graph branches from, an int4 node this adapter leaves alone gets a zero B of that rank (the
    graph's empty default would not fit). A group the graph has no branch for is an error: its linears were
    not adapted when the base was exported (the default adapts every decoder linear).
    """
    import numpy as np
    from onnx import helper

    inputs = {value.name: value.type.tensor_type for value in graph.input}
    node_modules = int4_node_modules(graph)
    parameters: dict[str, np.ndarray] = {}
    for branch in branches:
        if not branch.b_per_node:
            continue  # every B block zero: the graph's empty defaults compute the same nothing
        a_name = lora_a_name(branch.layer, branch.group)
        if a_name not in inputs:
            raise UserError(
                f"the exported model has no LoRA branch for layer {branch.layer}'s {branch.group} linears, "
                "which this adapter adapts: export the base with an adapter on those linears"
            )
        numpy_dtype = helper.tensor_dtype_to_np_dtype(inputs[a_name].elem_type)
        parameters[a_name] = branch.a.astype(numpy_dtype)
        for module in node_modules[(branch.layer, branch.group)]:
            b_name = lora_b_name(branch.layer, module)
            if b_name not in inputs:
                if module in branch.b_per_node:
                    raise UserError(
                        f"the exported model has no LoRA input {b_name}, which this adapter adapts"
                    )
                continue
            columns = inputs[b_name].shape.dim[1].dim_value
            b = branch.b_per_node.get(module, np.zeros((branch.a.shape[1], columns)))
            parameters[b_name] = np.ascontiguousarray(b, dtype=numpy_dtype)
    return parameters


def add_lora_input(graph, name: str, dtype: int, shape: list, empty_shape: tuple[int, int]) -> None:
    """A graph input whose default (an initializer of the same name) is an empty matrix."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph.input.append(helper.make_tensor_value_info(name, dtype, shape))
    graph.initializer.append(
        numpy_helper.from_array(np.zeros(empty_shape, dtype=helper.tensor_dtype_to_np_dtype(dtype)), name)
    )


def write_merged_model(model, parameters: dict[str, np.ndarray], target: Path) -> None:
    """A copy of the grafted ``model`` (an onnx ModelProto loaded without its external data) with
    ``parameters`` as its LoRA matrices' initializers instead of inputs: the adapter merged, its branches
    unchanged. Written beside the model, it shares the external int4 weight file (the references are copied
    as they are), so it costs the adapter's bytes on disk.

    Why: ONNX Runtime's run-time adapters (``og.Adapters``) feed every matrix to each decoding step; on an
    H100 with CUDA graphs that decoded at a third of the speed of the same matrices held as initializers
    (Phi-3.5-mini-shaped: 86 against 259 tokens/s; SmolLM2: 216 against 481; benchmarks/gpu_lab.py). The
    adapter file stays the switchable form; this graph is the fast one for the adapter it was exported with.
    """
    import onnx
    from onnx import numpy_helper

    merged = onnx.ModelProto()
    merged.CopyFrom(model)
    graph = merged.graph
    for index, initializer in enumerate(graph.initializer):
        if initializer.name in parameters:
            graph.initializer[index].CopyFrom(
                numpy_helper.from_array(parameters[initializer.name], initializer.name)
            )
    inputs = [value for value in graph.input if value.name not in parameters]
    del graph.input[:]
    graph.input.extend(inputs)
    onnx.save(merged, str(target))


def write_adapter(parameters: dict[str, np.ndarray], path: Path) -> None:
    """Save the branches' matrices in ONNX Runtime's adapter format."""
    import onnxruntime as ort

    adapter = ort.AdapterFormat()
    adapter.set_parameters(
        {name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in parameters.items()}
    )
    adapter.export_adapter(str(path))


def read_lora(adapter_dir: Path) -> dict[str, LoraMatrices]:
    """The adapter's matrices per linear, with PEFT's scaling folded into B as its LoRA layers apply it.

    Read from the adapter's own files, without building the model it was trained on (a 3.8 B model costs
    15 GB and most of a minute to build): the rank is A's, alpha comes from ``alpha_pattern`` matched by
    PEFT's own rule, and rsLoRA divides by the rank's square root. Whether the matrices fit the checkpoint
    is checked against its config when the branches are built.
    """
    import math

    from peft import PeftConfig
    from peft.utils import load_peft_weights
    from peft.utils.other import get_pattern_key

    config = PeftConfig.from_pretrained(str(adapter_dir))
    unsupported = {
        "peft_type other than LORA": config.peft_type != "LORA",
        "use_dora": getattr(config, "use_dora", False),
        "trained biases (bias / lora_bias)": getattr(config, "bias", "none") != "none"
        or getattr(config, "lora_bias", False),
        "modules_to_save": bool(getattr(config, "modules_to_save", None)),
        "trainable_token_indices": bool(getattr(config, "trainable_token_indices", None)),
    }
    if problems := [name for name, present in unsupported.items() if present]:
        raise UserError(
            f"the adapter in {adapter_dir} uses {', '.join(problems)}; only plain LoRA is exported"
        )
    weights = load_peft_weights(str(adapter_dir), device="cpu")
    lora = {}
    for key, a in weights.items():
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        if not PEFT_LINEAR.match(module) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise UserError(f"the adapter holds {key}; only LoRA on the decoder's linear layers is exported")
        if key.endswith(".lora_B.weight"):
            continue
        rank = a.shape[0]
        alpha = config.alpha_pattern.get(
            get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha
        )
        scaling = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
        b = weights[key.removesuffix("lora_A.weight") + "lora_B.weight"].float() * scaling
        lora[module] = LoraMatrices(a=a.float().T.contiguous().numpy(), b=b.T.contiguous().numpy())
    if not lora:
        raise UserError(f"the adapter in {adapter_dir} holds no LoRA matrices")
    return lora


def graph_and_branches(model_dir: Path, checkpoint_dir: Path, lora: dict[str, LoraMatrices]):
    """The exported graph of ``model_dir`` (not its weights) and ``lora`` grouped onto its int4 nodes, with
    the sizes of the checkpoint the adapter was trained on."""
    import onnx

    model = onnx.load(str(model_dir / MODEL_FILE), load_external_data=False)
    sizes = part_sizes(json.loads((checkpoint_dir / "config.json").read_text()))
    return model, group_branches(lora, int4_node_modules(model.graph), sizes)


def export_adapter(checkpoint_dir: Path, adapter_dir: Path, model_dir: Path, target: Path) -> Path:
    """Another adapter trained on ``checkpoint_dir``, written as an .onnx_adapter for the model exported
    in ``model_dir``: the int4 model is exported once and each further adapter costs only its own file,
    switched at run time (``og.Adapters``)."""
    model, branches = graph_and_branches(model_dir, checkpoint_dir, read_lora(adapter_dir))
    write_adapter(adapter_parameters(model.graph, branches), target)
    return target


def add_lora_branches(model, branches: list[Branch], out_dir: Path, *, lora_add: bool = False) -> None:
    """Graft the branches onto ``model`` (as olivepress's operators with ``lora_add``) and save it, write their
    matrices (in the graph's float type) as the adapter file, and the graph with them merged beside it
    (:func:`write_merged_model`). The external weight data is not touched."""
    import onnx

    parameters = graft_branches(model, branches, lora_add=lora_add)
    onnx.save(model, str(out_dir / MODEL_FILE))
    write_adapter(parameters, out_dir / ADAPTER_FILE)
    write_merged_model(model, parameters, out_dir / MERGED_MODEL_FILE)
