"""GPU tests: they run only where CUDA works for torch, ONNX Runtime and ONNX Runtime GenAI alike, and skip
with the reason everywhere else (CI runs ``-m "not gpu"``; on the lent GPU machine run ``-m gpu``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import make_lora_adapter


def missing_cuda() -> str | None:
    """Why CUDA cannot run here, or None when it can."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device: torch.cuda.is_available() is False"
    import onnxruntime
    import onnxruntime_genai as og

    if not og.is_cuda_available():
        return "onnxruntime-genai is built without CUDA (install olivepress[gpu]: onnxruntime-genai-cuda)"
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider (install olivepress[gpu]: onnxruntime-gpu)"
    return None


@pytest.fixture(scope="session", autouse=True)
def cuda_required():
    """Session-scoped and autouse, so a machine without CUDA skips before any model is built."""
    if reason := missing_cuda():
        pytest.skip(reason)


@pytest.fixture(scope="session")
def cuda_adapter_dir(tiny_int4_dir, tmp_path_factory) -> Path:
    return make_lora_adapter(tiny_int4_dir, tmp_path_factory.mktemp("cuda-lora"))


@pytest.fixture(
    scope="session",
    params=[(False, "off"), (True, "off"), (True, "on")],
    ids=["eager", "cuda-graph", "cuda-graph-lora-add"],
)
def cuda_export_dir(request, tiny_int4_dir, cuda_adapter_dir, tmp_path_factory) -> Path:
    """The tiny int4 model and its adapter exported for CUDA as the optimize step exports them, without and
    with CUDA graphs (optimize.cuda_graph, on by default with device gpu), and with the branches as
    olivepress's LoraAdd operator (optimize.lora_kernel)."""
    import os

    from olivepress.export.folder import export_onnx

    cuda_graph, lora_kernel = request.param
    if lora_kernel == "on" and not os.environ.get("OLIVEPRESS_ORT_INCLUDE"):
        pytest.skip("LoraAdd needs $OLIVEPRESS_ORT_INCLUDE (ONNX Runtime's C API header) to be built")
    out = tmp_path_factory.mktemp("onnx-cuda")
    return export_onnx(
        tiny_int4_dir, cuda_adapter_dir, out, target="cuda", cuda_graph=cuda_graph, lora_kernel=lora_kernel
    ).model_dir


@pytest.fixture(scope="session")
def library(tmp_path_factory):
    """The LoraAdd / MatMulNBitsLora library, built once for the kernel tests."""
    if "OLIVEPRESS_ORT_INCLUDE" not in os.environ or not (
        shutil.which("nvcc") or os.path.isdir("/usr/local/cuda")
    ):
        pytest.skip("building LoraAdd needs nvcc and $OLIVEPRESS_ORT_INCLUDE (ONNX Runtime's C API header)")
    from olivepress.export.kernel import build_lora_add

    return build_lora_add(tmp_path_factory.mktemp("kernels"))
