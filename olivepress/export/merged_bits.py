"""The merged graph's LoRA branches in 8 bits, for the cpu target.

A CPU decoding one token reads every weight once, so a branch costs what its matrices weigh. In float32 the
adapter's matrices (rank 16 on every decoder linear) weigh about a third of SmolLM2's int4 layers. In the
merged graph (``model.adapter.onnx``) those matrices are constants, so each branch product can be an 8-bit
``MatMulNBits`` (blocks of 16 inputs, one scale each, symmetric): under a third of the bytes. On 2 cores the
quickstart's model decoded with its adapter at 96.7 instead of 90.8 tokens/s (0.82x adapter off instead of
0.77x; benchmarks/cpu_decode.py), held-out loss 3.247 against 3.248. The rest of the adapter's cost is not
its bytes; its 420 extra nodes a token are the likely remainder (not measured). The ``.onnx_adapter`` file
stays float: ``og.Adapters`` feeds its matrices to the graph's inputs as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

BITS = 8
BLOCK_SIZE = 16  # the smallest block MatMulNBits takes; a B product has only the rank (16) as inputs


def symmetric_blocks(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``weight`` ([K, N], float) as MatMulNBits' 8-bit B ([N, blocks, BLOCK_SIZE] uint8, K zero-padded to
    whole blocks) and its scales ([N * blocks]): each block of K inputs of a column rounded to ``scale * (q -
    128)``, 128 being the operator's zero point when none is given, the scale its largest magnitude / 127."""
    import numpy as np

    k, n = weight.shape
    blocks = -(-k // BLOCK_SIZE)
    padded = np.zeros((blocks * BLOCK_SIZE, n), dtype=np.float32)
    padded[:k] = weight
    grouped = padded.T.reshape(n, blocks, BLOCK_SIZE)
    scales = np.abs(grouped).max(axis=2) / 127
    safe = np.where(scales == 0, 1, scales)[:, :, None]
    q = (np.clip(np.rint(grouped / safe), -127, 127) + 128).astype(np.uint8)
    return q, scales.astype(weight.dtype).reshape(-1)


def quantize_merged_branches(merged_file: Path) -> int:
    """Rewrite the LoRA products of ``merged_file`` (a merged graph: the adapter's matrices inline, the int4
    layers in external data, neither read nor written here) with at least a block of inputs as 8-bit
    MatMulNBits nodes, in place. Returns how many products were rewritten."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(merged_file), load_external_data=False)
    graph = model.graph
    initializers = {initializer.name: initializer for initializer in graph.initializer}
    rewritten = []
    for index, node in enumerate(graph.node):
        if "_lora/" not in node.name or node.op_type != "MatMul" or node.input[1] not in initializers:
            continue
        matrix = initializers[node.input[1]]
        weight = numpy_helper.to_array(matrix)
        # a B product of rank < 16 would be padded to a block: in 8 bits it would weigh more
        if weight.shape[0] < BLOCK_SIZE:
            continue
        q, scales = symmetric_blocks(weight)
        graph.initializer.extend(
            [
                numpy_helper.from_array(q, f"{matrix.name}_Q8"),
                numpy_helper.from_array(scales, f"{matrix.name}_scales"),
            ]
        )
        graph.node[index].CopyFrom(
            helper.make_node(
                "MatMulNBits",
                [node.input[0], f"{matrix.name}_Q8", f"{matrix.name}_scales"],
                list(node.output),
                name=node.name,
                domain="com.microsoft",
                K=weight.shape[0],
                N=weight.shape[1],
                bits=BITS,
                block_size=BLOCK_SIZE,
                accuracy_level=4,  # int8 activations, as the builder's int4 nodes on CPU
            )
        )
        rewritten.append(matrix.name)
    kept = [initializer for initializer in graph.initializer if initializer.name not in rewritten]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.save(model, str(merged_file))
    return len(rewritten)
