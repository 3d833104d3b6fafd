"""olivepress.LoraAdd on CUDA: the same numbers as y + (x @ A) @ B, in any shape the export gives it, run after
run, node after node, in and out of CUDA graphs, with its decode kernel (lora_add_split, a grid-wide barrier
over state kept between launches) and without it.

The check is tight on purpose: y is small and (x @ A) @ B of unit size, so a kernel that drops one row of A
among 8192 is off by ~1% of the branch, where the tolerance is float16's rounding of the output (~0.05%)
plus fp32 summation. A kernel that deadlocks (a grid barrier whose blocks are not all resident) ends the run
after HANG_SECONDS with every thread's traceback, instead of hanging the machine's session.
"""

from __future__ import annotations

import faulthandler
import importlib.util
import math
import re

import numpy as np
import pytest

HANG_SECONDS = 120  # covers the first test's nvcc build (~15 s) and CUDA start-up
HAS_PYTEST_TIMEOUT = importlib.util.find_spec("pytest_timeout") is not None

pytestmark = [pytest.mark.gpu]
if HAS_PYTEST_TIMEOUT:  # its thread method ends a run stuck in C code (a spinning kernel) and prints why
    pytestmark.append(pytest.mark.timeout(HANG_SECONDS, method="thread"))

FIXED_RANKS = (8, 16, 24, 32, 48, 64)  # compiled kernels; any other rank takes lora_add_any_rank
OTHER_RANKS = (12, 1, 0)
# (rows, K, N): 1-3 rows take the split kernel, more lora_add_rows (blocks of 4 rows: 5 and 37 leave one);
# K and N include values that are not multiples of a pass over A or of the 256 columns of a block
ROW_SHAPES = [
    (1, 3072, 3072),
    (2, 1000, 1000),
    (3, 576, 1536),
    (5, 777, 192),
    (37, 1536, 576),
    (300, 1000, 700),
]
# Phi-3.5-mini (rank 16 adapter, branches grouped by input) and SmolLM2 sizes, and N wider than
# (SMs x 256) so that split blocks take several column tiles
MODEL_SHAPES = {
    "qkv": (1, 3072, 9216, 48),
    "qkv-2rows": (2, 3072, 9216, 48),
    "q": (1, 3072, 3072, 16),
    "kv-gqa": (1, 3072, 1024, 16),
    "o": (1, 3072, 3072, 16),
    "gate_up": (1, 3072, 16384, 32),
    "up": (1, 3072, 8192, 16),
    "down": (1, 8192, 3072, 16),
    "down-rank64": (1, 8192, 3072, 64),
    "smollm2-q": (1, 576, 576, 16),
    "smollm2-kv": (1, 576, 192, 16),
    "smollm2-gate_up": (1, 576, 3072, 32),
    "smollm2-down": (1, 1536, 576, 16),
    "wide": (1, 1000, 40000, 16),
    "wide-2rows": (2, 1000, 40000, 8),
    "down-prefill": (300, 8192, 3072, 16),
    "gate_up-prefill": (37, 3072, 16384, 32),
    "qkv-prefill": (300, 3072, 9216, 48),
}


@pytest.fixture(autouse=True)
def hang_guard():
    """Without pytest-timeout: faulthandler's watchdog thread dumps every thread's stack and exits the process
    (a test stuck in a CUDA synchronize never returns to Python, so no signal handler would run)."""
    if HAS_PYTEST_TIMEOUT:
        yield
        return
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def cuda_session(graph, library, cuda_graph: bool):
    """A CUDA session of ``graph`` with the library of LoraAdd and MatMulNBitsLora registered."""
    import onnxruntime as ort
    from onnx import helper

    model = helper.make_model(
        graph,
        opset_imports=[
            helper.make_opsetid("", 17),
            helper.make_opsetid("olivepress", 1),
            helper.make_opsetid("com.microsoft", 1),  # MatMulNBits, beside MatMulNBitsLora
        ],
    )
    model.ir_version = 10
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    provider = ("CUDAExecutionProvider", {"enable_cuda_graph": "1" if cuda_graph else "0"})
    return ort.InferenceSession(model.SerializeToString(), options, providers=[provider])


def lora_add_session(library, cuda_graph: bool = False, two_nodes: bool = False):
    """One LoraAdd node (y, x, A, B -> out), or two in sequence: out1 = LoraAdd(y, x, A, B), then
    out = LoraAdd(out1, out1, A2, B2) (the second reads the first's output as both its input and its base)."""
    from onnx import TensorProto, helper

    shapes = {"y": ["batch", "rows", "n"], "x": ["batch", "rows", "k"], "A": ["k", "r"], "B": ["r", "n"]}
    if two_nodes:
        shapes |= {"A2": ["n", "r2"], "B2": ["r2", "n"]}
        nodes = [
            helper.make_node("LoraAdd", ["y", "x", "A", "B"], ["out1"], domain="olivepress"),
            helper.make_node("LoraAdd", ["out1", "out1", "A2", "B2"], ["out"], domain="olivepress"),
        ]
    else:
        nodes = [helper.make_node("LoraAdd", ["y", "x", "A", "B"], ["out"], domain="olivepress")]
    graph = helper.make_graph(
        nodes,
        "lora_add",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT16, shape) for name, shape in shapes.items()],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT16, None)],
    )
    return cuda_session(graph, library, cuda_graph)


@pytest.fixture(scope="module")
def shared_session(library):
    """One session for the shape tests: its node's split state then serves every shape and rank in turn."""
    return lora_add_session(library)


def operands(rows: int, k: int, n: int, r: int, seed: int = 0, batch: int = 1) -> dict[str, np.ndarray]:
    """y small, x @ A and (x @ A) @ B of unit size, whatever K and r."""
    rng = np.random.default_rng(seed)
    return {
        "y": (rng.standard_normal((batch, rows, n)) * 0.5).astype(np.float16),
        "x": rng.standard_normal((batch, rows, k)).astype(np.float16),
        "A": (rng.standard_normal((k, r)) / math.sqrt(max(k, 1))).astype(np.float16),
        "B": (rng.standard_normal((r, n)) / math.sqrt(max(r, 1))).astype(np.float16),
    }


def branch(y: np.ndarray, x: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """y + (x @ A) @ B in float64, from the float16 operands the kernel reads."""
    f64 = np.float64
    return y.astype(f64) + (x.astype(f64) @ a.astype(f64)) @ b.astype(f64)


def expected(feed: dict[str, np.ndarray]) -> np.ndarray:
    out = branch(feed["y"], feed["x"], feed["A"], feed["B"])
    if "A2" in feed:  # the second node reads the first's float16 output
        out1 = out.astype(np.float16)
        out = branch(out1, out1, feed["A2"], feed["B2"])
    return out


def assert_matches(got: np.ndarray, want: np.ndarray, relative: float = 6e-4) -> None:
    """Element by element: float16 rounds the output by at most 2^-11 (4.9e-4) of its value; fp32 sums add
    ~1e-6 of the output's scale. `relative` is looser where an error is carried through float16 twice."""
    got = got.astype(np.float64)
    assert got.shape == want.shape
    scale = max(float(np.abs(want).max()), 1.0)
    error = np.abs(got - want)
    bound = relative * np.abs(want) + 2e-4 * scale
    worst = int(np.argmax(error - bound))
    assert np.all(error <= bound), (
        f"{int(np.sum(error > bound))} of {error.size} values off; worst at {np.unravel_index(worst, error.shape)}: "
        f"got {got.flat[worst]}, want {want.flat[worst]} (max error {error.max():.3g}, output scale {scale:.3g})"
    )


def check_run(session, feed: dict[str, np.ndarray]) -> np.ndarray:
    got = session.run(["out"], feed)[0]
    want = expected(feed)
    assert_matches(got, want)
    if feed["A"].shape[1] and feed["A"].shape[0]:  # the branch added what it should, not nothing
        branch = np.abs(want - feed["y"]).mean()
        assert np.abs(got.astype(np.float64) - feed["y"]).mean() > 0.5 * branch > 0
    return got


def launches(text: str) -> list[str]:
    """The kernels OLIVEPRESS_LORA_ADD_TRACE=1 reported, in order."""
    return re.findall(r"olivepress LoraAdd: .*?: (\w+) grid", text)


@pytest.mark.parametrize("r", FIXED_RANKS + OTHER_RANKS)
@pytest.mark.parametrize(("rows", "k", "n"), ROW_SHAPES, ids=[f"{s[0]}x{s[1]}x{s[2]}" for s in ROW_SHAPES])
def test_lora_add_is_y_plus_x_a_b(shared_session, rows, k, n, r):
    check_run(shared_session, operands(rows, k, n, r, seed=rows * 1000 + r))


@pytest.mark.parametrize(("rows", "k", "n", "r"), MODEL_SHAPES.values(), ids=MODEL_SHAPES.keys())
def test_lora_add_in_model_shapes(shared_session, rows, k, n, r):
    check_run(shared_session, operands(rows, k, n, r, seed=k + n + r))


def test_lora_add_with_batch_dimension(shared_session):
    """rows are the product of the leading dimensions: [2, 1] decodes two sequences (split), [3, 50] prefills."""
    check_run(shared_session, operands(1, 3072, 3072, 16, seed=5, batch=2))
    check_run(shared_session, operands(50, 1536, 576, 32, seed=6, batch=3))


def test_lora_add_runs_after_runs(library):
    """One fresh session (one node, one split state), run after run with new values, and with the rows and
    the rank changing under it (an adapter switch changes A and B): stale xa or barrier state would show."""
    session = lora_add_session(library)
    plan = [
        (1, 16),
        (1, 16),
        (2, 16),
        (1, 16),
        (300, 16),
        (1, 16),
        (4, 16),
        (1, 48),
        (1, 48),
        (1, 0),
        (1, 16),
    ]
    for step, (rows, r) in enumerate(plan):
        check_run(session, operands(rows, 3072, 9216, r, seed=100 + step))
    for step in range(6):  # the same operands' shapes, only x and y changing
        feed = operands(1, 8192, 3072, 16, seed=7)
        feed |= {
            key: value for key, value in operands(1, 8192, 3072, 16, seed=200 + step).items() if key in "xy"
        }
        check_run(session, feed)


def test_concurrent_runs_of_one_session(library):
    """Two threads running one session at once: ONNX Runtime may give each run a stream of its own (its pool
    of streams), and the node keeps a split state per stream (one shared state would mix the two runs' sums). Rank 16 at K = 8192: 32
    blocks a grid, so two grids fit on the GPU together."""
    from concurrent.futures import ThreadPoolExecutor

    session = lora_add_session(library)

    def runs(thread: int) -> None:
        for step in range(20):
            check_run(session, operands(1, 8192, 3072, 16, seed=700 + 100 * thread + step))

    with ThreadPoolExecutor(2) as pool:
        for done in [pool.submit(runs, thread) for thread in range(2)]:
            done.result()


@pytest.mark.parametrize("rows", [1, 2, 37])
def test_two_lora_add_nodes_in_sequence(library, rows):
    """Two nodes, each with its own split state; the second reads the first's output."""
    session = lora_add_session(library, two_nodes=True)
    for step in range(6):
        feed = operands(rows, 3072, 3072, 16, seed=300 + step)
        second = operands(1, 3072, 3072, 48, seed=400 + step)
        feed |= {"A2": second["A"], "B2": second["B"]}
        got = session.run(["out"], feed)[0]
        assert_matches(got, expected(feed), relative=2e-3)


def graph_binding(session, feed: dict[str, np.ndarray], out_shape: tuple[int, ...]):
    import onnxruntime as ort

    bound = {name: ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0) for name, value in feed.items()}
    out = ort.OrtValue.ortvalue_from_shape_and_type(out_shape, np.float16, "cuda", 0)
    binding = session.io_binding()
    for name, value in bound.items():
        binding.bind_ortvalue_input(name, value)
    binding.bind_ortvalue_output("out", out)
    return binding, bound, out


@pytest.mark.parametrize(
    ("rows", "k", "n", "r", "two_nodes"),
    [
        (1, 3072, 9216, 48, False),
        (1, 8192, 3072, 16, False),
        (1, 1000, 40000, 16, False),
        (2, 3072, 16384, 32, False),
        (1, 3072, 3072, 16, True),
    ],
    ids=["qkv", "down", "wide", "gate_up-2rows", "two-nodes"],
)
def test_lora_add_replays_in_a_cuda_graph(library, monkeypatch, capfd, rows, k, n, r, two_nodes):
    """The first run is regular, the second captures and replays, the rest replay: 14 runs with new x, y (and
    once new A and B) copied into the bound buffers each time. The kernel's arguments are frozen in the graph;
    its state is not, and must be right at every replay. The trace shows the capture took the split kernel
    (the first run made the stream's state)."""
    monkeypatch.setenv("OLIVEPRESS_LORA_ADD_TRACE", "1")
    session = lora_add_session(library, cuda_graph=True, two_nodes=two_nodes)
    feed = operands(rows, k, n, r, seed=500)
    if two_nodes:
        second = operands(1, n, n, 16, seed=501)
        feed |= {"A2": second["A"], "B2": second["B"]}
    binding, bound, out = graph_binding(session, feed, (1, rows, n))
    for step in range(14):
        fresh = operands(rows, k, n, r, seed=600 + step)
        changing = "xyAB" if step == 7 else "xy"
        for name in changing:
            feed[name] = fresh[name]
            bound[name].update_inplace(fresh[name])
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        assert_matches(out.numpy(), expected(feed), relative=2e-3 if two_nodes else 6e-4)
    kernels = launches(capfd.readouterr().err)
    # the regular run and the capture print; replays do not call the operator
    assert kernels and set(kernels) == {"split"}, kernels


def test_split_off_gives_the_same_numbers(library, shared_session, monkeypatch, capfd):
    """OLIVEPRESS_LORA_ADD_SPLIT=0 (read when the session makes its kernels) runs lora_add_rows for decoding."""
    monkeypatch.setenv("OLIVEPRESS_LORA_ADD_SPLIT", "0")
    monkeypatch.setenv("OLIVEPRESS_LORA_ADD_TRACE", "1")
    session = lora_add_session(library)
    for rows, k, n, r in [(1, 8192, 3072, 16), (1, 3072, 9216, 48), (2, 3072, 16384, 32), (1, 576, 192, 8)]:
        feed = operands(rows, k, n, r, seed=k + r)
        unsplit = check_run(session, feed).astype(np.float64)
        split = shared_session.run(["out"], feed)[0].astype(np.float64)  # made before the variable was set
        assert np.abs(unsplit - split).max() <= 4e-3 * max(float(np.abs(split).max()), 1.0)
    assert set(launches(capfd.readouterr().err)) == {"rows"}


def test_trace_names_the_kernel_each_shape_takes(library, monkeypatch, capfd):
    """What the other tests rely on: decoding with a compiled rank takes the split kernel, many rows
    lora_add_rows, any other rank lora_add_any_rank."""
    monkeypatch.setenv("OLIVEPRESS_LORA_ADD_TRACE", "1")
    session = lora_add_session(library)
    cases = [((1, 3072, 3072, 16), "split"), ((4, 3072, 3072, 64), "split"), ((5, 3072, 3072, 16), "rows")]
    cases += [
        ((1, 3072, 3072, 12), "any_rank"),
        ((1, 3072, 3072, 0), "any_rank"),
        ((300, 576, 576, 8), "rows"),
    ]
    for (rows, k, n, r), _ in cases:
        check_run(session, operands(rows, k, n, r, seed=rows + r))
    assert launches(capfd.readouterr().err) == [kernel for _, kernel in cases]


def test_unaligned_a_takes_the_any_rank_kernel(library, monkeypatch, capfd):
    """A bound 2 bytes past a 16-byte boundary: the 16-byte loads of the compiled ranks would fault or read
    wrong words, so the operator takes lora_add_any_rank."""
    import onnxruntime as ort

    monkeypatch.setenv("OLIVEPRESS_LORA_ADD_TRACE", "1")
    session = lora_add_session(library)
    feed = operands(1, 3072, 3072, 16, seed=9)
    padded = np.concatenate([np.zeros(1, np.float16), feed["A"].ravel()])  # A from element 1: 2 bytes in
    a_buffer = ort.OrtValue.ortvalue_from_numpy(padded, "cuda", 0)
    a_pointer = a_buffer.data_ptr() + 2
    assert a_pointer % 16 != 0
    others = {name: ort.OrtValue.ortvalue_from_numpy(feed[name], "cuda", 0) for name in "yxB"}
    out = ort.OrtValue.ortvalue_from_shape_and_type((1, 1, 3072), np.float16, "cuda", 0)
    binding = session.io_binding()
    for name, value in others.items():
        binding.bind_ortvalue_input(name, value)
    binding.bind_input("A", "cuda", 0, np.float16, list(feed["A"].shape), a_pointer)
    binding.bind_ortvalue_output("out", out)
    session.run_with_iobinding(binding)
    binding.synchronize_outputs()
    assert_matches(out.numpy(), expected(feed))
    assert launches(capfd.readouterr().err) == ["any_rank"]


# ---- several (y, B) pairs sharing x and A: out_i = y_i + (x @ A) @ B_i in one launch ------------------------

PAIR_NAMES = ("y1", "x", "A", "B1", "y2", "B2", "y3", "B3")  # the operator's inputs, in order
# (rows, K, (N1, N2, ...), r): grouped linears of Phi-3.5-mini (q, k, v of a GQA model; gate and up) and
# SmolLM2, prefill rows (lora_add_rows, 37 = 9 blocks of 4 and one of 1), N that are no multiple of the 256
# columns of a tile (a tile never spans two outputs), ranks that take lora_add_any_rank (12, 1, 0) or rank 64
PAIR_SHAPES = {
    "qkv": (1, 3072, (3072, 1024, 1024), 48),
    "gate_up": (1, 3072, (8192, 8192), 32),
    "smollm2-qkv": (1, 576, (576, 192, 192), 48),
    "smollm2-gate_up": (1, 576, (1536, 1536), 32),
    "qkv-2rows": (2, 3072, (3072, 1024, 1024), 16),
    "gate_up-4rows": (4, 3072, (8192, 8192), 64),
    "qkv-prefill": (37, 3072, (3072, 1024, 1024), 16),
    "gate_up-prefill": (37, 576, (1536, 1536), 32),
    "odd-n": (1, 1000, (700, 300, 5), 8),
    "odd-n-prefill": (5, 777, (257, 1, 511), 24),
    "wide": (1, 1000, (40000, 20000), 16),
    "rank12": (1, 3072, (3072, 1024, 1024), 12),
    "rank12-prefill": (37, 576, (576, 192), 12),
    "rank1": (3, 576, (576, 192, 192), 1),
    "rank0": (1, 3072, (3072, 1024, 1024), 0),
    "rank0-prefill": (37, 3072, (8192, 8192), 0),
    "down-rank64": (1, 8192, (3072, 3072), 64),
}


def pairs_session(library, pairs: int, outputs: int | None = None, cuda_graph: bool = False, inputs=None):
    """One LoraAdd node of `pairs` pairs: inputs y1, x, A, B1[, y2, B2[, y3, B3]], outputs out1[, out2[, out3]]
    (`outputs` and `inputs` override the counts, to build malformed nodes)."""
    from onnx import TensorProto, helper

    names = list(inputs or PAIR_NAMES[: 2 + 2 * pairs])
    outs = [f"out{i + 1}" for i in range(pairs if outputs is None else outputs)]
    shapes = {"x": ["batch", "rows", "k"], "A": ["k", "r"]}
    for i in range(1, 4):
        shapes |= {f"y{i}": ["batch", "rows", f"n{i}"], f"B{i}": ["r", f"n{i}"]}
    graph = helper.make_graph(
        [helper.make_node("LoraAdd", names, outs, domain="olivepress")],
        "lora_add_pairs",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT16, shapes[name]) for name in names],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT16, None) for name in outs],
    )
    return cuda_session(graph, library, cuda_graph)


def pair_operands(rows: int, k: int, ns, r: int, seed: int = 0, batch: int = 1) -> dict[str, np.ndarray]:
    """x, A and each pair's y_i, B_i, scaled as operands' (each branch of unit size)."""
    rng = np.random.default_rng(seed)
    feed = {
        "x": rng.standard_normal((batch, rows, k)).astype(np.float16),
        "A": (rng.standard_normal((k, r)) / math.sqrt(max(k, 1))).astype(np.float16),
    }
    for i, n in enumerate(ns, start=1):
        feed[f"y{i}"] = (rng.standard_normal((batch, rows, n)) * 0.5).astype(np.float16)
        feed[f"B{i}"] = (rng.standard_normal((r, n)) / math.sqrt(max(r, 1))).astype(np.float16)
    return feed


def pair_count(feed: dict[str, np.ndarray]) -> int:
    return sum(1 for name in feed if name.startswith("y"))


def expected_pairs(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [
        branch(feed[f"y{i}"], feed["x"], feed["A"], feed[f"B{i}"]) for i in range(1, pair_count(feed) + 1)
    ]


def check_pairs(session, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Every output against numpy, and each one's branch really added (a pair left as y would show)."""
    count = pair_count(feed)
    got = session.run([f"out{i}" for i in range(1, count + 1)], feed)
    for i, (out, want) in enumerate(zip(got, expected_pairs(feed), strict=True), start=1):
        assert_matches(out, want)
        y = feed[f"y{i}"]
        if feed["A"].shape[1] and feed["A"].shape[0] and y.size:
            added = np.abs(want - y).mean()
            assert np.abs(out.astype(np.float64) - y).mean() > 0.5 * added > 0, f"out{i} lacks its branch"
        elif y.size:
            assert np.array_equal(out, y), f"out{i} is not y{i} with no adapter active"
    return got


@pytest.fixture(scope="module")
def pair_sessions(library):
    """One session per pair count, shared by the shape tests (each node's split state serves every shape)."""
    return {pairs: pairs_session(library, pairs) for pairs in (2, 3)}


@pytest.mark.parametrize(("rows", "k", "ns", "r"), PAIR_SHAPES.values(), ids=PAIR_SHAPES.keys())
def test_lora_add_pairs_are_each_y_plus_x_a_b(pair_sessions, rows, k, ns, r):
    check_pairs(pair_sessions[len(ns)], pair_operands(rows, k, ns, r, seed=rows + k + sum(ns) + r))


def test_lora_add_pairs_with_batch_dimension(pair_sessions):
    check_pairs(pair_sessions[3], pair_operands(1, 3072, (3072, 1024, 1024), 48, seed=11, batch=2))
    check_pairs(pair_sessions[2], pair_operands(50, 576, (1536, 1536), 32, seed=12, batch=3))


def test_lora_add_pairs_match_one_pair_nodes(library, shared_session):
    """A node of three pairs gives what three nodes of one pair give, bit for bit up to fp32 summation order
    (the split kernel sums x @ A over its blocks with atomics: the order varies)."""
    feed = pair_operands(1, 3072, (3072, 1024, 1024), 48, seed=13)
    grouped = pairs_session(library, 3).run(["out1", "out2", "out3"], feed)
    for i in range(1, 4):
        alone = shared_session.run(
            ["out"], {"y": feed[f"y{i}"], "x": feed["x"], "A": feed["A"], "B": feed[f"B{i}"]}
        )
        scale = max(float(np.abs(alone[0]).max()), 1.0)
        assert np.abs(grouped[i - 1].astype(np.float64) - alone[0]).max() <= 2e-3 * scale


def test_lora_add_pairs_runs_after_runs(library):
    """One fresh node of three pairs, run after run with new values, rows and ranks (stale xa or barrier state
    would show), then only x and the y changing."""
    session = pairs_session(library, 3)
    ns = (3072, 1024, 1024)
    plan = [(1, 48), (1, 48), (2, 48), (1, 48), (37, 48), (1, 16), (4, 16), (1, 0), (1, 12), (1, 64), (1, 48)]
    for step, (rows, r) in enumerate(plan):
        check_pairs(session, pair_operands(rows, 3072, ns, r, seed=800 + step))
    fixed = pair_operands(1, 3072, ns, 48, seed=850)
    for step in range(6):
        fresh = pair_operands(1, 3072, ns, 48, seed=860 + step)
        feed = fixed | {name: value for name, value in fresh.items() if name not in ("A", "B1", "B2", "B3")}
        check_pairs(session, feed)


@pytest.mark.parametrize(
    ("rows", "k", "ns", "r"),
    [(1, 3072, (8192, 8192), 32), (1, 3072, (3072, 1024, 1024), 48), (2, 576, (1536, 1536), 16)],
    ids=["gate_up", "qkv", "smollm2-gate_up-2rows"],
)
def test_lora_add_pairs_replay_in_a_cuda_graph(library, monkeypatch, capfd, rows, k, ns, r):
    """As test_lora_add_replays_in_a_cuda_graph, with every pair's y and output bound: 14 runs, new x and y
    each time (new A and B once), every output checked at every replay; the capture took the split kernel."""
    import onnxruntime as ort

    monkeypatch.setenv("OLIVEPRESS_LORA_ADD_TRACE", "1")
    count = len(ns)
    session = pairs_session(library, count, cuda_graph=True)
    feed = pair_operands(rows, k, ns, r, seed=900)
    bound = {name: ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0) for name, value in feed.items()}
    outs = [ort.OrtValue.ortvalue_from_shape_and_type((1, rows, n), np.float16, "cuda", 0) for n in ns]
    binding = session.io_binding()
    for name, value in bound.items():
        binding.bind_ortvalue_input(name, value)
    for i, out in enumerate(outs, start=1):
        binding.bind_ortvalue_output(f"out{i}", out)
    for step in range(14):
        fresh = pair_operands(rows, k, ns, r, seed=910 + step)
        for name, value in fresh.items():
            if step == 7 or name == "x" or name.startswith("y"):
                feed[name] = value
                bound[name].update_inplace(value)
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        for out, want in zip(outs, expected_pairs(feed), strict=True):
            assert_matches(out.numpy(), want)
    kernels = launches(capfd.readouterr().err)
    assert kernels and set(kernels) == {"split"}, kernels


def test_trace_names_the_kernel_pairs_take(library, monkeypatch, capfd):
    """Decoding a group takes the split kernel (one launch for every pair), prefill lora_add_rows, rank 12
    lora_add_any_rank; the trace gives each pair's N; with OLIVEPRESS_LORA_ADD_SPLIT=0 decoding takes
    lora_add_rows, with the same numbers."""
    monkeypatch.setenv("OLIVEPRESS_LORA_ADD_TRACE", "1")
    session = pairs_session(library, 3)
    ns = (3072, 1024, 1024)
    cases = [
        ((1, 48), "split"),
        ((4, 16), "split"),
        ((37, 16), "rows"),
        ((1, 12), "any_rank"),
        ((1, 0), "any_rank"),
    ]
    split_outputs = []
    for (rows, r), _ in cases:
        split_outputs.append(check_pairs(session, pair_operands(rows, 3072, ns, r, seed=rows + r)))
    err = capfd.readouterr().err
    assert launches(err) == [kernel for _, kernel in cases]
    assert "rows 1 k 3072 n 3072+1024+1024 r 48: split" in err

    monkeypatch.setenv("OLIVEPRESS_LORA_ADD_SPLIT", "0")
    unsplit = pairs_session(library, 3)
    got = check_pairs(unsplit, pair_operands(1, 3072, ns, 48, seed=49))
    for mine, theirs in zip(got, split_outputs[0], strict=True):
        scale = max(float(np.abs(theirs).max()), 1.0)
        assert np.abs(mine.astype(np.float64) - theirs).max() <= 4e-3 * scale
    assert launches(capfd.readouterr().err) == ["rows"]


@pytest.mark.parametrize(
    ("inputs", "outputs", "message"),
    [
        (PAIR_NAMES[:5], 2, "y2 is given without B2"),
        (PAIR_NAMES[:7], 3, "y3 is given without B3"),
        (PAIR_NAMES[:6], 1, "2 \\(y, B\\) pair\\(s\\) has as many outputs, not 1"),
        (PAIR_NAMES[:4], 2, "1 \\(y, B\\) pair\\(s\\) has as many outputs, not 2"),
    ],
    ids=["y2-without-B2", "y3-without-B3", "an-output-missing", "an-output-too-many"],
)
def test_lora_add_rejects_pairs_that_do_not_match(library, inputs, outputs, message):
    """A malformed node fails its run with a message (not a crash, not a wrong output)."""
    session = pairs_session(library, 0, outputs=outputs, inputs=inputs)
    feed = pair_operands(1, 576, (576, 192, 192), 16, seed=3)
    with pytest.raises(Exception, match=message):
        session.run([f"out{i}" for i in range(1, outputs + 1)], {name: feed[name] for name in inputs})
