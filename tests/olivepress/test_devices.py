"""device and targets decided on the machine that runs the flow, before any compute."""

import pytest

from olivepress import devices
from olivepress.config import load_config
from olivepress.errors import UserError


def test_auto_computes_on_the_cpu_where_no_gpu_is_visible():
    assert not devices.cuda_visible(), "these tests run on a machine without a GPU"
    decided = devices.decided(load_config())
    assert (decided.device, decided.targets) == ("cpu", ["cpu"])


def test_auto_computes_on_a_visible_gpu_and_still_builds_for_the_cpu(monkeypatch):
    monkeypatch.setattr(devices, "cuda_visible", lambda: True)
    decided = devices.decided(load_config())
    assert (decided.device, decided.targets) == ("gpu", ["cpu"])


def test_a_gpu_device_without_a_gpu_is_refused_naming_the_setting():
    with pytest.raises(UserError, match=r"^device: gpu, but this machine shows no CUDA device"):
        devices.decided(load_config(overrides={"device": "gpu"}))


def test_a_cuda_target_without_a_gpu_is_refused_naming_the_setting(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(UserError, match=r"^targets: cuda .* \(CUDA_VISIBLE_DEVICES=''\); leave cuda out"):
        devices.decided(load_config(overrides={"targets": ["cpu", "cuda"]}))


def test_a_cuda_target_needs_the_cuda_build_of_onnxruntime_genai(monkeypatch):
    monkeypatch.setattr(devices, "cuda_visible", lambda: True)
    assert not devices.genai_has_cuda(), "the CPU build is installed here"
    with pytest.raises(UserError, match=r"^targets: cuda needs ONNX Runtime GenAI's CUDA build"):
        devices.decided(load_config(overrides={"targets": ["cuda"]}))
