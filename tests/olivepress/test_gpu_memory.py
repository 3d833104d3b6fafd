"""The GPU memory probe's logic with NVML and the model faked (the real thing runs in tests/gpu)."""

from pathlib import Path

import pytest

from olivepress import genai, gpu_memory


@pytest.mark.parametrize(
    ("visible", "expected"),
    [(None, ("index", 0)), ("2,3", ("index", 2)), ("GPU-abc, GPU-def", ("uuid", "GPU-abc"))],
)
def test_the_device_is_the_first_visible_one(monkeypatch, visible, expected):
    import pynvml

    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda index: ("index", index))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByUUID", lambda uuid: ("uuid", uuid))
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert gpu_memory.nvml_device() == expected


def test_the_peak_is_the_largest_sample_over_the_reading_before_loading(monkeypatch):
    readings = iter([1000, 1300, 1500, 1700, 1600])  # MiB: before, loaded, two pieces, after
    monkeypatch.setattr(gpu_memory, "nvml_device", lambda: "device")
    monkeypatch.setattr(gpu_memory, "device_used_bytes", lambda handle: next(readings) * gpu_memory.MIB)
    monkeypatch.setattr(genai, "open_model", lambda model_dir, adapter: "loaded")
    monkeypatch.setattr(genai, "prompt_token_ids", lambda loaded, prompt, template: [1, 2])

    def generate(loaded, ids, max_new_tokens, on_text):
        on_text("a")
        on_text("b")

    monkeypatch.setattr(genai, "stream_generate", generate)
    assert gpu_memory.measure_in_this_process(Path("m"), None, "hi", None, 4) == 700
