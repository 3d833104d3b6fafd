"""Could an adapter live in MatMulNBits' zero points? What one int4 MatMulNBits costs on CUDA by the type of
its zero points (uint8, as the builder writes them, or float16, which a QA-LoRA adapter merged into them
needs), held as a constant or as an overridable initializer (a graph input an adapter file could replace),
with onnxruntime's default kernel and with fpA_intB (``ep.cuda.fpa_intb_gemm``).

A chain of ``--layers`` MatMulNBits (``--size`` × ``--size``, batch 1, fp16) runs through I/O binding on the
GPU; microseconds per operator, the mean of ``--runs`` runs after a warm-up. Writes JSON, prints a table.

    python benchmarks/matmulnbits_zero_points.py --out matmulnbits_zero_points.json     # on the GPU machine
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from pathlib import Path


def chain(size: int, block_size: int, layers: int, zero_point_type: str, overridable: bool, seed: int = 0):
    """An ONNX model of ``layers`` MatMulNBits in a row with random int4 weights, scales and zero points."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    blocks = size // block_size
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, size])]
    nodes, initializers, previous = [], [], "x"
    for layer in range(layers):
        weight = rng.integers(0, 255, size=(size, blocks, block_size // 2), dtype=np.uint8)
        scales = (rng.random(size * blocks, dtype=np.float32) * 0.01).astype(np.float16)
        if zero_point_type == "uint8":  # two 4-bit zero points a byte
            zero_points = rng.integers(0, 255, size=(size * ((blocks + 1) // 2),), dtype=np.uint8)
        else:
            zero_points = (rng.random(size * blocks, dtype=np.float32) * 15).astype(np.float16)
        names = [f"weight{layer}", f"scales{layer}", f"zero_points{layer}"]
        for name, value in zip(names, (weight, scales, zero_points), strict=True):
            initializers.append(numpy_helper.from_array(value, name))
        if overridable:
            element = TensorProto.UINT8 if zero_point_type == "uint8" else TensorProto.FLOAT16
            inputs.append(helper.make_tensor_value_info(names[2], element, list(zero_points.shape)))
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                [previous, *names],
                [f"y{layer}"],
                domain="com.microsoft",
                K=size,
                N=size,
                bits=4,
                block_size=block_size,
            )
        )
        previous = f"y{layer}"
    output = helper.make_tensor_value_info(previous, TensorProto.FLOAT16, [1, size])
    graph = helper.make_graph(nodes, "chain", inputs, [output], initializers)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=9), rng


def microseconds_per_operator(
    args: argparse.Namespace, zero_point_type: str, overridable: bool, fpa_intb: bool
):
    import numpy as np
    import onnxruntime as ort
    from onnx import numpy_helper

    model, rng = chain(args.size, args.block_size, args.layers, zero_point_type, overridable)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the overridable initializers' warning, once per input
    if fpa_intb:
        options.add_session_config_entry("ep.cuda.fpa_intb_gemm", "1")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CUDAExecutionProvider"])
    binding = session.io_binding()
    x = rng.random((1, args.size), dtype=np.float32).astype(np.float16)
    binding.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
    for extra in session.get_inputs()[1:]:  # the overridable zero points, fed from the GPU
        value = next(i for i in model.graph.initializer if i.name == extra.name)
        array = numpy_helper.to_array(value)
        binding.bind_ortvalue_input(extra.name, ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0))
    binding.bind_output(session.get_outputs()[0].name, "cuda")
    for _ in range(20):
        session.run_with_iobinding(binding)
    started = time.perf_counter()
    for _ in range(args.runs):
        session.run_with_iobinding(binding)
    return (time.perf_counter() - started) / args.runs / args.layers * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=3072, help="K = N (Phi-3.5-mini's hidden size)")
    parser.add_argument("--block-sizes", default="32,128")
    parser.add_argument("--layers", type=int, default=64)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/matmulnbits_zero_points.json"))
    args = parser.parse_args()

    import onnxruntime as ort
    import torch

    rows = {}
    for block_size in [int(size) for size in args.block_sizes.split(",")]:
        args.block_size = block_size
        for zero_point_type in ("uint8", "float16"):
            for overridable in (False, True):
                for fpa_intb in (False, True):
                    name = (
                        f"group {block_size}, {zero_point_type} zero points, "
                        f"{'overridable' if overridable else 'constant'}, {'fpA_intB' if fpa_intb else 'default'}"
                    )
                    rows[name] = round(
                        microseconds_per_operator(args, zero_point_type, overridable, fpa_intb), 2
                    )
                    print(f"{name:<64} {rows[name]:>8.2f} µs", flush=True)
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0),
        "onnxruntime": ort.__version__,
        "settings": {"size": args.size, "layers": args.layers, "runs": args.runs},
        "microseconds_per_operator": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
