"""What a LoRA branch costs at batch-1 decoding on CUDA, form by form, with CUDA graphs (run on a GPU).

A synthetic decoder stack isolates the branches from the rest of a model: ``--layers`` layers, each two
int4 linears (``MatMulNBits``, hidden → intermediate → hidden, Phi-3.5-mini's sizes by default), replayed
through one captured CUDA graph as ONNX Runtime GenAI replays a decode step. Every form puts one branch on
each linear; the table gives tokens/s and the microseconds each form adds per branch over the stack
without branches. The forms:

* ``none``: no branches (the int4 stack alone).
* ``empty``: the exported graph with no adapter active (A is [in, 0], B is [0, out]).
* ``matmul``: the export's form: ``MatMul(x, A)``, ``MatMul(·, B)``, ``Add`` onto the int4 output.
* ``fused_t``: A stored transposed and multiplied by ``com.microsoft.FusedMatMul`` (transB), a different
  cuBLAS path for the skinny ``x @ A``.
* ``add_only`` and ``b_only``: parts of ``matmul`` (a constant added; a constant ``x @ A`` times B, added),
  to tell which of its three kernels costs what.
* ``split_k``: ``x @ A`` as a batched product over ``--split`` slices of the input (free reshapes) and a
  ``ReduceSum``: more thread blocks for the long, skinny product.
* ``gemm``: 2-D ``Gemm`` of ``x @ A`` by B with the int4 output as C (beta 1), the Add folded into cuBLAS.
* ``lora_add``: olivepress's own ``LoraAdd`` CUDA operator (``olivepress/export/kernel.py``), the branch in
  one kernel; built with nvcc when ``$OLIVEPRESS_ORT_INCLUDE`` names ONNX Runtime's C API headers. Its output
  is checked against ``matmul``'s.
* ``lora_add_nosplit``: the same library with ``OLIVEPRESS_LORA_ADD_SPLIT=0`` set while the session is made:
  decoding without the split kernel (every block computing x @ A over all of A).
* ``fused``: olivepress's ``MatMulNBitsLora``: each int4 linear and its branch in one kernel (the int4
  product is olivepress's own GEMV, not ONNX Runtime's). Checked against ``matmul``.
* ``fused_empty``: ``MatMulNBitsLora`` with no adapter (r = 0): olivepress's int4 GEMV alone, against
  ``none`` (ONNX Runtime's); checked against ``none``.
* ``lora_add_baseline``: ``LoraAdd`` built from another source, ``--baseline-source`` (an earlier version of
  ``kernels/lora_add.cu``), timed in the same run as the current one. Added to the forms when given.

The ``group_*`` forms and ``lora_add_pairs`` time a group instead: linears that read the same x (an MLP's
gate and up, hidden → intermediate each), whose LoRA A matrices the export concatenates (A is [hidden,
2 rank], each B [2 rank, intermediate]); their sum goes to down (no branch) and a LayerNormalization. Their
column is µs per group (per layer) over ``group_none``; their LoraAdd forms are checked against
``group_matmul`` (max_abs_difference_vs_matmul is against it):

* ``group_none``: the gate/up/down stack without branches.
* ``group_matmul``: the export's form: ``MatMul(x, A)`` once, then ``MatMul(·, B_i)`` and ``Add`` per linear.
* ``group_lora_add``: one ``LoraAdd(y_i, x, A, B_i)`` per linear (two launches, x @ A computed twice).
* ``lora_add_pairs``: one ``LoraAdd(y1, x, A, B1, y2, B2)`` for both (one launch, x @ A once).

    python benchmarks/lora_branch_forms.py --out benchmarks/results/lora_branch_forms.json
    git show d80d21a:olivepress/kernels/lora_add.cu > /tmp/old.cu
    python benchmarks/lora_branch_forms.py --forms none,matmul,lora_add,lora_add_nosplit \\
        --baseline-source /tmp/old.cu --out benchmarks/results/lora_branch_forms.json
    python benchmarks/lora_branch_forms.py --forms group_none,group_matmul,group_lora_add,lora_add_pairs \\
        --out /tmp/lora_add_pairs.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

SPLIT = 16  # slices of the input for split_k
FORMS = (
    "none",
    "empty",
    "add_only",
    "b_only",
    "matmul",
    "split_k",
    "fused_t",
    "gemm",
    "lora_add",
    "lora_add_nosplit",
    "group_none",
    "group_matmul",
    "group_lora_add",
    "lora_add_pairs",
    "fused",
    "fused_empty",
)
LORA_ADD_FORMS = ("lora_add", "lora_add_nosplit", "lora_add_baseline")  # the LoraAdd operator's graph
FUSED_FORMS = ("fused", "fused_empty")  # MatMulNBitsLora in place of MatMulNBits (and the branch)
# forms of the gate/up group stack (build_group), with the LoraAdd ones and the one they are checked against
GROUP_FORMS = ("group_none", "group_matmul", "group_lora_add", "lora_add_pairs")
GROUP_LORA_ADD_FORMS = ("group_lora_add", "lora_add_pairs")
# what each LoraAdd form sets while its session is made (the operator reads it when it makes its kernels)
LORA_ADD_ENVIRONMENT = {"lora_add_nosplit": {"OLIVEPRESS_LORA_ADD_SPLIT": "0"}}


def int4_weights(inits, name: str, k: int, n: int, block: int, rng) -> list[str]:
    """Random int4 initializers of a k → n linear as the export writes them (uint8 zero points, as AWQ's
    asymmetric grid gives): the names of W, scales and zero points."""
    from onnx import numpy_helper

    blocks = k // block
    packed = rng.integers(0, 256, size=(n, blocks, block // 2), dtype=np.uint8)
    scales = (rng.random(n * blocks, dtype=np.float32) * 1e-3).astype(np.float16)
    zero_points = rng.integers(0, 256, size=n * ((blocks + 1) // 2), dtype=np.uint8)
    names = [f"{name}.q", f"{name}.s", f"{name}.z"]
    inits += [
        numpy_helper.from_array(value, key)
        for value, key in zip((packed, scales, zero_points), names, strict=True)
    ]
    return names


def int4_linear(nodes, inits, name: str, x: str, k: int, n: int, block: int, rng) -> str:
    from onnx import helper

    weights = int4_weights(inits, name, k, n, block, rng)
    nodes.append(
        helper.make_node(
            "MatMulNBits",
            [x, *weights],
            [f"{name}.y"],
            domain="com.microsoft",
            K=k,
            N=n,
            bits=4,
            block_size=block,
        )
    )
    return f"{name}.y"


def fused_linear(
    form: str, nodes, inits, name: str, x: str, k: int, n: int, block: int, rank: int, rng
) -> str:
    """A k → n int4 linear and its branch as one MatMulNBitsLora node, drawing the same weights and the same A
    and B as ``int4_linear`` then ``branch`` (so that ``fused`` is checked against ``matmul``)."""
    from onnx import helper, numpy_helper

    weights = int4_weights(inits, name, k, n, block, rng)
    r = 0 if form == "fused_empty" else rank
    a = (rng.standard_normal((k, r), dtype=np.float32) * 1e-2).astype(np.float16)
    b = (rng.standard_normal((r, n), dtype=np.float32) * 1e-2).astype(np.float16)
    inits += [numpy_helper.from_array(a, f"{name}.A"), numpy_helper.from_array(b, f"{name}.B")]
    nodes.append(
        helper.make_node(
            "MatMulNBitsLora", [x, *weights, f"{name}.A", f"{name}.B"], [f"{name}.sum"], domain="olivepress"
        )
    )
    return f"{name}.sum"


def branch(form: str, nodes, inits, name: str, x: str, y: str, k: int, n: int, rank: int, rng) -> str:
    """The output of linear ``y`` (input ``x``, k → n) with a LoRA branch of ``form`` added."""
    from onnx import helper, numpy_helper

    if form == "none":
        return y
    r = 0 if form == "empty" else rank
    a = (rng.standard_normal((k, r), dtype=np.float32) * 1e-2).astype(np.float16)
    b = (rng.standard_normal((r, n), dtype=np.float32) * 1e-2).astype(np.float16)
    inits.append(numpy_helper.from_array(b, f"{name}.B"))
    if form == "add_only":
        inits.append(numpy_helper.from_array(b[:1][None], f"{name}.delta"))
        nodes.append(helper.make_node("Add", [y, f"{name}.delta"], [f"{name}.sum"]))
        return f"{name}.sum"
    if form == "b_only":
        inits.append(numpy_helper.from_array(a[:1][None], f"{name}.xa"))
    if form == "split_k":
        parts = SPLIT
        inits.append(numpy_helper.from_array(a.reshape(parts, k // parts, r), f"{name}.Ak"))
        inits.append(
            numpy_helper.from_array(np.array([parts, 1, k // parts], dtype=np.int64), f"{name}.kshape")
        )
        inits.append(numpy_helper.from_array(np.array([0], dtype=np.int64), f"{name}.axis"))
        nodes.append(helper.make_node("Reshape", [x, f"{name}.kshape"], [f"{name}.xk"]))
        nodes.append(helper.make_node("MatMul", [f"{name}.xk", f"{name}.Ak"], [f"{name}.pk"]))
        nodes.append(
            helper.make_node("ReduceSum", [f"{name}.pk", f"{name}.axis"], [f"{name}.xa"], keepdims=1)
        )
    if form in LORA_ADD_FORMS:
        inits.append(numpy_helper.from_array(a, f"{name}.A"))
        nodes.append(
            helper.make_node(
                "LoraAdd", [y, x, f"{name}.A", f"{name}.B"], [f"{name}.sum"], domain="olivepress"
            )
        )
        return f"{name}.sum"
    if form in ("empty", "matmul"):
        inits.append(numpy_helper.from_array(a, f"{name}.A"))
        nodes.append(helper.make_node("MatMul", [x, f"{name}.A"], [f"{name}.xa"]))
    elif form == "fused_t":
        inits.append(numpy_helper.from_array(np.ascontiguousarray(a.T), f"{name}.At"))
        nodes.append(
            helper.make_node(
                "FusedMatMul", [x, f"{name}.At"], [f"{name}.xa"], domain="com.microsoft", transB=1
            )
        )
    if form == "gemm":
        inits.append(numpy_helper.from_array(a, f"{name}.A"))
        inits.append(numpy_helper.from_array(np.array([1, k], dtype=np.int64), f"{name}.in2d"))
        inits.append(numpy_helper.from_array(np.array([1, n], dtype=np.int64), f"{name}.out2d"))
        inits.append(numpy_helper.from_array(np.array([1, 1, n], dtype=np.int64), f"{name}.out3d"))
        nodes.append(helper.make_node("Reshape", [x, f"{name}.in2d"], [f"{name}.x2"]))
        nodes.append(helper.make_node("MatMul", [f"{name}.x2", f"{name}.A"], [f"{name}.xa"]))
        nodes.append(helper.make_node("Reshape", [y, f"{name}.out2d"], [f"{name}.y2"]))
        nodes.append(helper.make_node("Gemm", [f"{name}.xa", f"{name}.B", f"{name}.y2"], [f"{name}.s2"]))
        nodes.append(helper.make_node("Reshape", [f"{name}.s2", f"{name}.out3d"], [f"{name}.sum"]))
        return f"{name}.sum"
    nodes.append(helper.make_node("MatMul", [f"{name}.xa", f"{name}.B"], [f"{name}.delta"]))
    nodes.append(helper.make_node("Add", [y, f"{name}.delta"], [f"{name}.sum"]))
    return f"{name}.sum"


def build(form: str, layers: int, hidden: int, intermediate: int, rank: int, block: int, path: Path) -> None:
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    x = "x"
    for layer in range(layers):
        if form in FUSED_FORMS:
            up = fused_linear(form, nodes, inits, f"l{layer}.up", x, hidden, intermediate, block, rank, rng)
            x = fused_linear(form, nodes, inits, f"l{layer}.down", up, intermediate, hidden, block, rank, rng)
            continue
        up = int4_linear(nodes, inits, f"l{layer}.up", x, hidden, intermediate, block, rng)
        up = branch(form, nodes, inits, f"l{layer}.up", x, up, hidden, intermediate, rank, rng)
        down = int4_linear(nodes, inits, f"l{layer}.down", up, intermediate, hidden, block, rng)
        x = branch(form, nodes, inits, f"l{layer}.down", up, down, intermediate, hidden, rank, rng)
    save_stack(nodes, inits, x, form, hidden, path)


def build_group(
    form: str, layers: int, hidden: int, intermediate: int, rank: int, block: int, path: Path
) -> None:
    """``layers`` layers of gate and up (int4, hidden → intermediate, both reading x), their sum, down (int4,
    intermediate → hidden) and a LayerNormalization (every layer's x of unit scale, as in a model: the int4
    stack alone would shrink it to nothing or grow it to inf over the layers, and the check against
    ``group_matmul`` would see no branch); gate and up carry the LoRA branches of ``form``, sharing one A of
    2 ``rank`` columns. Every form draws the same weights."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits = [], []
    inits.append(numpy_helper.from_array(np.ones(hidden, dtype=np.float16), "norm.scale"))
    inits.append(numpy_helper.from_array(np.zeros(hidden, dtype=np.float16), "norm.bias"))
    x = "x"
    r = 2 * rank
    for layer in range(layers):
        name = f"l{layer}"
        ys = [
            int4_linear(nodes, inits, f"{name}.{part}", x, hidden, intermediate, block, rng)
            for part in ("gate", "up")
        ]
        a = (rng.standard_normal((hidden, r), dtype=np.float32) * 1e-2).astype(np.float16)
        bs = [
            (rng.standard_normal((r, intermediate), dtype=np.float32) * 1e-2).astype(np.float16) for _ in ys
        ]
        if form != "group_none":
            inits.append(numpy_helper.from_array(a, f"{name}.A"))
            inits += [numpy_helper.from_array(b, f"{name}.B{i}") for i, b in enumerate(bs, start=1)]
        sums = [f"{name}.sum{i}" for i in (1, 2)]
        if form == "group_none":
            sums = ys
        elif form == "group_matmul":
            nodes.append(helper.make_node("MatMul", [x, f"{name}.A"], [f"{name}.xa"]))
            for i, (y, out) in enumerate(zip(ys, sums, strict=True), start=1):
                nodes.append(helper.make_node("MatMul", [f"{name}.xa", f"{name}.B{i}"], [f"{name}.delta{i}"]))
                nodes.append(helper.make_node("Add", [y, f"{name}.delta{i}"], [out]))
        elif form == "group_lora_add":
            for i, (y, out) in enumerate(zip(ys, sums, strict=True), start=1):
                inputs = [y, x, f"{name}.A", f"{name}.B{i}"]
                nodes.append(helper.make_node("LoraAdd", inputs, [out], domain="olivepress"))
        elif form == "lora_add_pairs":
            inputs = [ys[0], x, f"{name}.A", f"{name}.B1", ys[1], f"{name}.B2"]
            nodes.append(helper.make_node("LoraAdd", inputs, sums, domain="olivepress"))
        else:
            raise ValueError(f"no group form {form}")
        nodes.append(helper.make_node("Add", sums, [f"{name}.both"]))
        down = int4_linear(nodes, inits, f"{name}.down", f"{name}.both", intermediate, hidden, block, rng)
        nodes.append(
            helper.make_node("LayerNormalization", [down, "norm.scale", "norm.bias"], [f"{name}.norm"])
        )
        x = f"{name}.norm"
    save_stack(nodes, inits, x, form, hidden, path)


def save_stack(nodes: list, inits: list, x: str, form: str, hidden: int, path: Path) -> None:
    """The stack's nodes as a model from x [1, 1, hidden] to y (``x``'s last value), weights beside it."""
    import onnx
    from onnx import TensorProto, helper

    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(
        nodes,
        form,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 1, hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 1, hidden])],
        inits,
    )
    opsets = [helper.make_opsetid(domain, 1) for domain in ("com.microsoft", "olivepress")]
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), *opsets])
    model.ir_version = 10  # what onnxruntime 1.2x-1.31 loads; newer onnx writes a newer one
    onnx.save(model, path, save_as_external_data=True, location=f"{path.name}.data")


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def session_for(path: Path, library: Path | None, cuda_graph: bool, env: dict[str, str] | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if library is not None:
        options.register_custom_ops_library(str(library))
    providers = [("CUDAExecutionProvider", {"enable_cuda_graph": "1" if cuda_graph else "0"})]
    with environment(env or {}):
        return ort.InferenceSession(str(path), options, providers=providers)


def output_of(path: Path, hidden: int, library: Path | None, env: dict[str, str] | None = None) -> np.ndarray:
    """The stack's output for a fixed input, without graph capture."""
    session = session_for(path, library, cuda_graph=False, env=env)
    x = np.linspace(-1, 1, hidden, dtype=np.float32).astype(np.float16).reshape(1, 1, hidden)
    return session.run(["y"], {"x": x})[0].astype(np.float32)


def tokens_per_second(
    path: Path, hidden: int, steps: int, repeats: int, library: Path | None, env: dict[str, str] | None = None
) -> list[float]:
    """Runs per second of one captured-graph replay (one decode step's worth), ``repeats`` times."""
    import onnxruntime as ort

    session = session_for(path, library, cuda_graph=True, env=env)
    x = ort.OrtValue.ortvalue_from_numpy(np.full((1, 1, hidden), 0.01, dtype=np.float16), "cuda", 0)
    y = ort.OrtValue.ortvalue_from_shape_and_type((1, 1, hidden), np.float16, "cuda", 0)
    binding = session.io_binding()
    binding.bind_ortvalue_input("x", x)
    binding.bind_ortvalue_output("y", y)
    for _ in range(3):  # a regular run, the capture, a replay
        session.run_with_iobinding(binding)
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(steps):
            session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        rates.append(steps / (time.perf_counter() - started))
    return rates


def gpu_name() -> str:
    import subprocess

    query = ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader", "--id=0"]
    return subprocess.run(query, capture_output=True, text=True, check=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=3072)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--forms", default=",".join(FORMS))
    parser.add_argument(
        "--baseline-source",
        type=Path,
        help="another lora_add.cu to time beside the current one, as the form lora_add_baseline",
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/lora-branch-forms"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lora_branch_forms.json"))
    args = parser.parse_args()

    import onnxruntime as ort

    args.work.mkdir(parents=True, exist_ok=True)
    forms = args.forms.split(",")
    if args.baseline_source is not None and "lora_add_baseline" not in forms:
        forms.append("lora_add_baseline")
    libraries: dict[str, Path] = {}  # form -> the LoraAdd library its sessions register
    if any(form in LORA_ADD_FORMS + GROUP_LORA_ADD_FORMS + FUSED_FORMS for form in forms):
        from olivepress.export.kernel import build_lora_add

        current = build_lora_add(args.work / "kernels")
        libraries = {"lora_add": current, "lora_add_nosplit": current}
        libraries |= dict.fromkeys(GROUP_LORA_ADD_FORMS + FUSED_FORMS, current)
        if "lora_add_baseline" in forms:
            if args.baseline_source is None:
                parser.error("the form lora_add_baseline needs --baseline-source")
            libraries["lora_add_baseline"] = build_lora_add(
                args.work / "kernels", source=args.baseline_source
            )
    results = {}
    for form in forms:
        path = args.work / f"{form}.onnx"
        builder = build_group if form in GROUP_FORMS else build
        builder(form, args.layers, args.hidden, args.intermediate, args.rank, args.block_size, path)
        library, env = libraries.get(form), LORA_ADD_ENVIRONMENT.get(form)
        try:
            rates = tokens_per_second(path, args.hidden, args.steps, args.repeats, library, env)
            results[form] = {"runs_per_s": [round(r, 1) for r in rates], "median": float(np.median(rates))}
        except Exception as error:  # a form this build of onnxruntime cannot capture is a finding too
            results[form] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    checked = []
    for forms_checked, reference_form, builder in [
        ((*LORA_ADD_FORMS, "fused"), "matmul", build),
        (("fused_empty",), "none", build),
        (GROUP_LORA_ADD_FORMS, "group_matmul", build_group),
    ]:
        these = [form for form in forms_checked if "median" in results.get(form, {})]
        if not these:
            continue
        checked += these
        reference = args.work / f"{reference_form}.onnx"  # the same weights
        if not reference.is_file():
            builder(
                reference_form,
                args.layers,
                args.hidden,
                args.intermediate,
                args.rank,
                args.block_size,
                reference,
            )
        expected = output_of(reference, args.hidden, None)
        scale = float(np.abs(expected).max()) or 1.0
        for form in these:
            got = output_of(
                args.work / f"{form}.onnx", args.hidden, libraries[form], LORA_ADD_ENVIRONMENT.get(form)
            )
            results[form]["checked_against"] = reference_form
            results[form]["max_abs_difference_vs_matmul"] = float(np.abs(got - expected).max())
            results[form]["relative_to_output_scale"] = float(np.abs(got - expected).max()) / scale
    branches = 2 * args.layers
    base = results.get("none", {}).get("median")
    group_base = results.get("group_none", {}).get("median")  # one group (gate and up) per layer
    width = max(10, *(len(form) for form in results))
    print(f"{'form':<{width}} {'steps/s':>9} {'µs/step':>9} {'µs/branch':>10} {'µs/group':>9}")
    for form, row in results.items():
        if "median" not in row:
            print(f"{form:<{width}} {row['error']}")
            continue
        per_step = 1e6 / row["median"]
        if form in GROUP_FORMS:
            row["us_per_group"] = (per_step - 1e6 / group_base) / args.layers if group_base else None
            extra = f"{'':10} {row['us_per_group']:9.2f}" if row["us_per_group"] is not None else ""
        else:
            row["us_per_branch"] = (per_step - 1e6 / base) / branches if base else None
            extra = f"{row['us_per_branch']:10.2f}" if row["us_per_branch"] is not None else ""
        print(f"{form:<{width}} {row['median']:9.1f} {per_step:9.1f} {extra}")
    for form in checked:
        reference_form = results[form]["checked_against"]
        print(
            f"{form} against {reference_form}: max difference {results[form]['relative_to_output_scale']:.2e} "
            "of the output's scale"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "onnxruntime": ort.__version__,
                "device": gpu_name(),
                "settings": {k: str(v) for k, v in vars(args).items()},
                "forms": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
