"""olivepress.LoraAdd on CUDA: the same numbers as y + (x @ A) @ B, in any shape the export gives it."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    if "OLIVEPRESS_ORT_INCLUDE" not in os.environ or not (
        shutil.which("nvcc") or os.path.isdir("/usr/local/cuda")
    ):
        pytest.skip("building LoraAdd needs nvcc and $OLIVEPRESS_ORT_INCLUDE (ONNX Runtime's C API header)")
    from olivepress.lora_kernel import build_lora_add

    return build_lora_add(tmp_path_factory.mktemp("kernels"))


def lora_add_session(library, cuda_graph: bool = False):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    node = helper.make_node("LoraAdd", ["y", "x", "A", "B"], ["out"], domain="olivepress")
    shapes = {"y": ["batch", "rows", "n"], "x": ["batch", "rows", "k"], "A": ["k", "r"], "B": ["r", "n"]}
    graph = helper.make_graph(
        [node],
        "lora_add",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT16, shape) for name, shape in shapes.items()],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT16, None)],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("olivepress", 1)]
    )
    model.ir_version = 10
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    provider = ("CUDAExecutionProvider", {"enable_cuda_graph": "1" if cuda_graph else "0"})
    return ort.InferenceSession(model.SerializeToString(), options, providers=[provider])


def operands(rows: int, k: int, n: int, r: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "y": rng.standard_normal((1, rows, n)).astype(np.float16),
        "x": rng.standard_normal((1, rows, k)).astype(np.float16),
        "A": (rng.standard_normal((k, r)) * 0.05).astype(np.float16),
        "B": (rng.standard_normal((r, n)) * 0.05).astype(np.float16),
    }


def expected(feed: dict[str, np.ndarray]) -> np.ndarray:
    as32 = {name: value.astype(np.float32) for name, value in feed.items()}
    return as32["y"] + (as32["x"] @ as32["A"]) @ as32["B"]


@pytest.mark.parametrize(
    ("rows", "k", "n", "r"),
    [(1, 3072, 9216, 16), (1, 300, 700, 20), (7, 512, 1000, 48), (1, 256, 512, 0), (3, 64, 96, 1)],
)
def test_lora_add_is_y_plus_x_a_b(library, rows, k, n, r):
    feed = operands(rows, k, n, r)
    got = lora_add_session(library).run(["out"], feed)[0].astype(np.float32)
    want = expected(feed)
    assert got.shape == want.shape
    # float16 output: half a unit in the last place of values up to ~5, plus fp32 summation order
    np.testing.assert_allclose(got, want, atol=5e-3 * max(1.0, float(np.abs(want).max())), rtol=2e-3)
    if r:
        assert not np.allclose(got, feed["y"].astype(np.float32), atol=1e-3)  # the branch added something


def test_lora_add_replays_in_a_cuda_graph(library):
    import onnxruntime as ort

    session = lora_add_session(library, cuda_graph=True)
    feed = operands(1, 512, 1024, 16, seed=1)
    bound = {name: ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0) for name, value in feed.items()}
    out = ort.OrtValue.ortvalue_from_shape_and_type((1, 1, 1024), np.float16, "cuda", 0)
    binding = session.io_binding()
    for name, value in bound.items():
        binding.bind_ortvalue_input(name, value)
    binding.bind_ortvalue_output("out", out)
    for _ in range(3):  # a regular run, the capture, a replay
        session.run_with_iobinding(binding)
    np.testing.assert_allclose(out.numpy().astype(np.float32), expected(feed), atol=5e-3 * 5, rtol=2e-3)
