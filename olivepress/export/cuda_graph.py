"""CUDA graphs for a built model: control flow removed where it can be, CUDA graphs off where it cannot."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from olivepress.genai import MODEL_FILE, edit_genai_config

if TYPE_CHECKING:
    from pathlib import Path

log = logging.getLogger(__name__)

CONTROL_FLOW_OPS = ("If", "Loop", "Scan")


def prepare_cuda_graph(model_dir: Path) -> None:
    """Make the built graph capturable in a CUDA graph, or else run the model without one.

    ONNX Runtime refuses graph capture on a graph with control-flow nodes, when the model loads: a run that
    asked for CUDA graphs would fail. LongRoPE models' (Phi-3, Phi-3.5) one ``If`` is replaced
    (:func:`select_rope_caches_without_if`); any other control flow turns ``enable_cuda_graph`` off in
    genai_config.json, with a warning, so the model still runs, only slower.
    """
    import onnx

    model_path = model_dir / MODEL_FILE
    model = onnx.load(str(model_path), load_external_data=False)
    if select_rope_caches_without_if(model.graph, model_dir):
        onnx.save(model, str(model_path))
    control_flow = sorted({node.op_type for node in model.graph.node if node.op_type in CONTROL_FLOW_OPS})
    if control_flow:
        edit_genai_config(model_dir, disable_cuda_graph)
        log.warning(
            "%s holds control-flow nodes (%s), which ONNX Runtime cannot capture in a CUDA graph: "
            "the model runs without CUDA graphs (enable_cuda_graph 0)",
            model_path,
            ", ".join(control_flow),
        )


def disable_cuda_graph(config: dict) -> None:
    """An edit of genai_config.json (:func:`olivepress.genai.edit_genai_config`): every provider's CUDA
    graphs off."""
    for options in config["model"]["decoder"]["session_options"]["provider_options"]:
        for provider in options.values():
            if "enable_cuda_graph" in provider:
                provider["enable_cuda_graph"] = "0"


def select_rope_caches_without_if(graph, model_dir: Path) -> bool:
    """Replace the builder's LongRoPE cache choice, an ``If``, by a ``Gather`` from both caches stacked.

    For LongRoPE the builder makes short-factor cos/sin caches of T = original_max_position_embeddings rows
    and long-factor ones of context_length rows, and its ``If`` (then: long, else: short; the caches are
    ``Constant`` nodes of its branches) picks the long ones once the sequence outgrows T. Here each cache
    becomes ``Gather(stacked, index)`` with ``stacked`` = [else cache zero-padded to the then cache's rows,
    then cache]: GroupQueryAttention reads rows only below the total length, so the short cache's padding
    is never read. The index is 1 when any row's length (GroupQueryAttention's ``seqlens_k`` + 1) is past T,
    not when the attention mask's width is, as the builder compares: with CUDA graphs ONNX Runtime GenAI
    decodes with a mask as wide as max_length, so the width would switch to the long cache for every decoded
    token of a run allowed past T, after a prompt that used the short one. Without graphs the two agree
    (the longest row is unpadded), so the logits are the builder's.

    The cost is a copy of each chosen cache per forward pass (Phi-3.5 in fp16: 2 x 12.6 MB read and written,
    some 20 us on an H100, about 1% of a decode step) and both caches at full length in model.onnx and in
    GPU memory (50 MB for Phi-3.5). CPU exports keep the builder's ``If``: it copies nothing, where these
    copies would cost a CPU more.

    Returns whether the graph changed; an ``If`` of any other shape is left as it is.
    """
    changed = False
    for node in [node for node in graph.node if node.op_type == "If"]:
        if choice := rope_cache_choice(graph, node, model_dir):
            replace_rope_cache_if(graph, node, *choice)
            changed = True
    return changed


def replace_rope_cache_if(graph, node, seqlens_k: str, threshold: int, caches: list) -> None:
    """The replacement :func:`select_rope_caches_without_if` describes. Its ops and types all have CUDA
    kernels at the builder's opset (ReduceSum on int64 as in the builder's own mask subgraph; not ReduceMax,
    whose int32 CUDA kernel for opset 20 is uncertain): a node left to the CPU would bring a copy, and ONNX
    Runtime refuses graph capture on a graph with copies too."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    condition, outputs, prefix = node.input[0], list(node.output), node.name.rsplit("/", 1)[0]
    new_nodes = []

    def add(op_type: str, inputs: list[str], name: str, **attributes) -> str:
        output = f"{prefix}/{name}/output_0"
        new_nodes.append(helper.make_node(op_type, inputs, [output], f"{prefix}/{name}", **attributes))
        return output

    # seqlens_k is int32 (GroupQueryAttention's type), each row's length - 1
    threshold_name, zero_name = f"{prefix}/long_rows/threshold", f"{prefix}/long_rows/zero"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(threshold - 1, np.int32), threshold_name),
            numpy_helper.from_array(np.array(0, np.int64), zero_name),
        ]
    )
    past_t = add("Greater", [seqlens_k, threshold_name], "long_rows/Greater")
    as_int = add("Cast", [past_t], "long_rows/Cast", to=onnx.TensorProto.INT64)
    count = add("ReduceSum", [as_int], "long_rows/ReduceSum", keepdims=0)
    any_past_t = add("Greater", [count, zero_name], "long_rows/Greater_1")
    index = add("Cast", [any_past_t], "long_rows/Cast_1", to=onnx.TensorProto.INT64)
    for output, (small, large) in zip(outputs, caches, strict=True):
        rows = max(len(small), len(large))
        padded = [
            np.pad(cache, [(0, rows - len(cache))] + [(0, 0)] * (cache.ndim - 1)) for cache in (small, large)
        ]
        graph.initializer.append(numpy_helper.from_array(np.stack(padded), f"{output}/stacked"))
        new_nodes.append(
            helper.make_node(
                "Gather", [f"{output}/stacked", index], [output], f"{prefix}/{output}/Gather", axis=0
            )
        )
    nodes = [other for other in graph.node if other is not node]
    first_user = next(at for at, other in enumerate(nodes) if set(other.input) & set(outputs))
    nodes[first_user:first_user] = new_nodes
    graph.ClearField("node")
    graph.node.extend(nodes)
    remove_unused(graph, [condition])


def rope_cache_choice(graph, node, model_dir: Path) -> tuple[str, int, list] | None:
    """``(seqlens_k, T, [(else cache, then cache) per output])`` when ``node`` is the builder's LongRoPE
    ``If``: it feeds only GroupQueryAttention nodes, its condition is ``Greater(length, T)`` and each branch
    output is a ``Constant`` of the same dtype and row size in both branches; else None."""
    consumers = [user for user in graph.node if set(user.input) & set(node.output)]
    seqlens_k = {user.input[5] for user in consumers if user.op_type == "GroupQueryAttention"}
    if (
        not consumers
        or len(seqlens_k) != 1
        or any(user.op_type != "GroupQueryAttention" for user in consumers)
    ):
        return None
    condition = next((other for other in graph.node if node.input[0] in other.output), None)
    if condition is None or condition.op_type != "Greater":
        return None
    threshold = constant_array(graph, condition.input[1], model_dir)
    if threshold is None or threshold.size != 1:
        return None
    branches = {attribute.name: attribute.g for attribute in node.attribute}
    small, large = (
        [constant_array(branches[branch], output.name, model_dir) for output in branches[branch].output]
        for branch in ("else_branch", "then_branch")
    )
    caches = list(zip(small, large, strict=True))
    for short, long in caches:
        if short is None or long is None or short.dtype != long.dtype or short.shape[1:] != long.shape[1:]:
            return None
    return seqlens_k.pop(), int(threshold.item()), caches


def constant_array(graph, name: str, model_dir: Path):
    """The value of ``name`` when an initializer or a ``Constant`` node's ``value`` of ``graph`` holds it
    (external data read from ``model_dir``), else None."""
    from onnx import numpy_helper

    tensors = [initializer for initializer in graph.initializer if initializer.name == name] + [
        attribute.t
        for node in graph.node
        if node.op_type == "Constant" and node.output[0] == name
        for attribute in node.attribute
        if attribute.name == "value"
    ]
    return numpy_helper.to_array(tensors[0], str(model_dir)) if tensors else None


def remove_unused(graph, names: list[str]) -> None:
    """Remove the nodes and initializers behind ``names`` that nothing reads any more, and theirs in turn
    (ONNX Runtime warns about every unused initializer)."""
    while names:
        name = names.pop()
        if any(name in node.input for node in graph.node) or any(
            name == output.name for output in graph.output
        ):
            continue
        for initializer in [initializer for initializer in graph.initializer if initializer.name == name]:
            graph.initializer.remove(initializer)
        for node in [node for node in graph.node if name in node.output]:
            if not any(output in other.input for other in graph.node for output in node.output):
                names.extend(node.input)
                graph.node.remove(node)
