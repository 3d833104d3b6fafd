"""olivepress.MatMulNBitsLora on CUDA: x @ dequant(W) + (x @ A) @ B from a MatMulNBits node's own int4
initializers, checked against float64 numpy and against ONNX Runtime's MatMulNBits followed by LoraAdd in
the same session: decoding (int4_lora_decode, with its grid barrier for the branch) and prompts
(int4_gemm_rows), every block size the export can choose, compiled ranks and others, in and out of CUDA
graphs. The decode kernel sums 16 products at a time in float16 (x scaled by a power of two first), so it is
held to ONNX Runtime's own int4 kernel's error, not to float16 rounding of the output alone.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from tests.gpu.test_lora_kernel import cuda_session, hang_guard  # noqa: F401 (hang_guard: autouse here too)

pytestmark = [pytest.mark.gpu]

# (rows, K, N, block_size, r): Phi-3.5-mini's and SmolLM2's linears, K padded to whole blocks (72 of 32:
# one block and a half), every block size, compiled ranks, another rank and none; 2 to 300 rows are prompts
CASES = {
    "qkv": (1, 3072, 9216, 32, 16),
    "o": (1, 3072, 3072, 32, 16),
    "gate_up": (1, 3072, 16384, 32, 16),
    "down": (1, 8192, 3072, 32, 16),
    "smollm2-kv": (1, 576, 192, 32, 16),
    "smollm2-down": (1, 1536, 576, 32, 16),
    "padded-k": (1, 72, 40, 32, 16),
    "block16": (1, 3072, 3072, 16, 8),
    "block64-r64": (1, 3072, 3072, 64, 64),
    "block128-r48": (1, 3072, 3072, 128, 48),
    "r24": (1, 1536, 1000, 32, 24),
    "r32": (1, 3072, 1024, 32, 32),
    "r12-any-rank": (1, 3072, 3072, 32, 12),
    "r0": (1, 3072, 3072, 32, 0),
    "2rows": (2, 3072, 3072, 32, 16),
    "5rows": (5, 3072, 3072, 32, 16),
    "37rows-padded": (37, 72, 40, 32, 16),
    "130rows-down": (130, 8192, 3072, 32, 16),
    "300rows-block128": (300, 1000, 700, 128, 12),
}


def int4_operands(rows: int, k: int, n: int, block: int, r: int, seed: int = 0) -> dict[str, np.ndarray]:
    """MatMulNBits' initializers (levels 0..15, zero points 0..15, scales that make x @ W of unit size) and
    x, A, B (the branch of unit size too)."""
    rng = np.random.default_rng(seed)
    blocks = -(-k // block)
    levels = rng.integers(0, 16, size=(n, blocks * block), dtype=np.uint8)
    levels[:, k:] = 0  # the padding past K (the builder writes zeros)
    zeros = rng.integers(0, 16, size=(n, blocks), dtype=np.uint8)
    zeros_padded = np.zeros((n, 2 * ((blocks + 1) // 2)), dtype=np.uint8)
    zeros_padded[:, :blocks] = zeros
    return {
        "W": (levels[:, 0::2] | (levels[:, 1::2] << 4)).reshape(n, blocks, block // 2),
        "scales": (rng.random((n, blocks)) * 2 / (8 * math.sqrt(k))).astype(np.float16).reshape(-1),
        "zero_points": (zeros_padded[:, 0::2] | (zeros_padded[:, 1::2] << 4)).reshape(-1),
        "levels": levels,
        "zeros": zeros,
        "x": rng.standard_normal((1, rows, k)).astype(np.float16),
        "A": (rng.standard_normal((k, r)) / math.sqrt(k)).astype(np.float16),
        "B": (rng.standard_normal((r, n)) / math.sqrt(max(r, 1))).astype(np.float16),
    }


def reference(operands: dict[str, np.ndarray], block: int) -> np.ndarray:
    """x @ ((levels - zero) * scale).T + (x @ A) @ B in float64."""
    f64 = np.float64
    k = operands["x"].shape[-1]
    n, padded = operands["levels"].shape
    scales = operands["scales"].astype(f64).reshape(n, -1)
    per_input = np.repeat(scales, block, axis=1)[:, :padded]
    zeros = np.repeat(operands["zeros"].astype(f64), block, axis=1)[:, :padded]
    weights = ((operands["levels"].astype(f64) - zeros) * per_input)[:, :k]
    x = operands["x"].astype(f64)
    return x @ weights.T + (x @ operands["A"].astype(f64)) @ operands["B"].astype(f64)


def both_session(library, operands: dict[str, np.ndarray], block: int, cuda_graph: bool = False):
    """One model, two outputs from the same initializers: "fused" (MatMulNBitsLora) and "stock"
    (com.microsoft.MatMulNBits, then LoraAdd)."""
    from onnx import TensorProto, helper, numpy_helper

    n, k = operands["levels"].shape[0], operands["x"].shape[-1]
    int4 = ["x", "W", "scales", "zero_points"]
    nodes = [
        helper.make_node("MatMulNBitsLora", [*int4, "A", "B"], ["fused"], domain="olivepress"),
        helper.make_node(
            "MatMulNBits", int4, ["y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=block
        ),
        helper.make_node("LoraAdd", ["y", "x", "A", "B"], ["stock"], domain="olivepress"),
    ]
    graph = helper.make_graph(
        nodes,
        "matmul_nbits_lora",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", "rows", k]),
            helper.make_tensor_value_info("A", TensorProto.FLOAT16, [k, "r"]),
            helper.make_tensor_value_info("B", TensorProto.FLOAT16, ["r", n]),
        ],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT16, None) for name in ("fused", "stock")],
        initializer=[numpy_helper.from_array(operands[name], name) for name in int4[1:]],
    )
    return cuda_session(graph, library, cuda_graph)


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / max(float(np.abs(want).max()), 1e-6))


def check(session, operands: dict[str, np.ndarray], block: int) -> np.ndarray:
    """The fused output against float64, within twice ONNX Runtime's own error (and 1.5e-3 of the output's
    scale, float16 rounding of sums of unit size); the branch must show."""
    feed = {name: operands[name] for name in ("x", "A", "B")}
    fused, stock = session.run(["fused", "stock"], feed)
    want = reference(operands, block)
    assert fused.shape == want.shape
    fused_error, stock_error = relative_error(fused, want), relative_error(stock, want)
    assert fused_error <= max(2 * stock_error, 1.5e-3), (
        f"fused {fused_error:.3g}, ONNX Runtime {stock_error:.3g}"
    )
    if operands["A"].shape[1]:
        branch_only = (operands["x"].astype(np.float64) @ operands["A"]) @ operands["B"]
        assert relative_error(fused, want - branch_only) > 10 * fused_error, "the branch was not added"
    return fused


def launches(text: str) -> list[str]:
    """The kernels OLIVEPRESS_LORA_ADD_TRACE=1 reported for MatMulNBitsLora, in order."""
    return re.findall(r"olivepress MatMulNBitsLora: .*?: ([\w +]+?) grid", text)


@pytest.mark.parametrize(("rows", "k", "n", "block", "r"), CASES.values(), ids=CASES.keys())
def test_int4_product_and_branch(library, rows, k, n, block, r):
    operands = int4_operands(rows, k, n, block, r, seed=rows + k + n + r)
    check(both_session(library, operands, block), operands, block)


def test_trace_names_the_kernels_each_shape_takes(library, monkeypatch, capfd):
    """Decoding with a compiled rank runs one kernel (the branch inside); any other rank adds LoraAdd's
    any-rank kernel, rank 0 nothing; prompts take the tensor-core kernel and LoraAdd's row kernel."""
    monkeypatch.setenv("OLIVEPRESS_LORA_ADD_TRACE", "1")
    cases = [
        ((1, 3072, 3072, 32, 16), "decode with branch"),
        ((1, 3072, 3072, 32, 12), "decode + any_rank branch"),
        ((1, 3072, 3072, 32, 0), "decode"),
        ((5, 3072, 3072, 32, 16), "rows + rows branch"),
    ]
    for shape, _ in cases:
        operands = int4_operands(*shape, seed=sum(shape))
        check(both_session(library, operands, shape[3]), operands, shape[3])
    assert launches(capfd.readouterr().err) == [kernel for _, kernel in cases]


def test_split_off_runs_the_branch_after_the_product(library, monkeypatch, capfd):
    monkeypatch.setenv("OLIVEPRESS_LORA_ADD_SPLIT", "0")
    monkeypatch.setenv("OLIVEPRESS_LORA_ADD_TRACE", "1")
    operands = int4_operands(1, 8192, 3072, 32, 16, seed=3)
    check(both_session(library, operands, 32), operands, 32)
    assert launches(capfd.readouterr().err) == ["decode + rows branch"]


def test_runs_after_runs_with_rows_and_ranks_changing(library):
    """One node, one split state: decode, prompt, decode, a new rank (an adapter switch), no adapter."""
    base = int4_operands(1, 3072, 9216, 32, 16, seed=11)
    session = both_session(library, base, 32)
    for step, (rows, r) in enumerate([(1, 16), (1, 16), (7, 16), (1, 16), (1, 48), (1, 0), (1, 16), (1, 16)]):
        fresh = int4_operands(rows, 3072, 9216, 32, r, seed=11)  # same weights (same seed), new x, A, B
        rng = np.random.default_rng(100 + step)
        fresh["x"] = rng.standard_normal(fresh["x"].shape).astype(np.float16)
        check(session, fresh, 32)


@pytest.mark.parametrize(("k", "n", "r"), [(3072, 9216, 16), (8192, 3072, 16), (3072, 16384, 64)])
def test_replays_in_a_cuda_graph(library, monkeypatch, capfd, k, n, r):
    """A regular run, the capture, then replays with new x (and once new A and B) copied into the bound
    buffers: the kernel's state must be right at every replay; the trace shows the branch ran inside."""
    import onnxruntime as ort

    monkeypatch.setenv("OLIVEPRESS_LORA_ADD_TRACE", "1")
    operands = int4_operands(1, k, n, 32, r, seed=k + n)
    session = both_session(library, operands, 32, cuda_graph=True)
    bound = {name: ort.OrtValue.ortvalue_from_numpy(operands[name], "cuda", 0) for name in ("x", "A", "B")}
    outputs = {
        name: ort.OrtValue.ortvalue_from_shape_and_type((1, 1, n), np.float16, "cuda", 0)
        for name in ("fused", "stock")
    }
    binding = session.io_binding()
    for name, value in bound.items():
        binding.bind_ortvalue_input(name, value)
    for name, value in outputs.items():
        binding.bind_ortvalue_output(name, value)
    current = dict(operands)
    for step in range(12):
        rng = np.random.default_rng(900 + step)
        changed = {"x": rng.standard_normal(operands["x"].shape).astype(np.float16)}
        if step == 6:  # an adapter switch: new A and B in the same buffers
            changed["A"] = (rng.standard_normal(operands["A"].shape) / math.sqrt(k)).astype(np.float16)
            changed["B"] = (rng.standard_normal(operands["B"].shape) / math.sqrt(r)).astype(np.float16)
        for name, value in changed.items():
            current[name] = value
            bound[name].update_inplace(value)
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        want = reference(current, 32)
        fused_error = relative_error(outputs["fused"].numpy(), want)
        stock_error = relative_error(outputs["stock"].numpy(), want)
        assert fused_error <= max(2 * stock_error, 1.5e-3), (step, fused_error, stock_error)
    kernels = launches(capfd.readouterr().err)
    assert kernels and set(kernels) == {"decode with branch"}, kernels


def test_malformed_inputs_are_refused(library):
    operands = int4_operands(1, 60, 40, 32, 16)  # K = 60: not a multiple of 8
    with pytest.raises(Exception, match="multiple of 8"):
        check(both_session(library, operands, 32), operands, 32)
