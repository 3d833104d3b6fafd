"""GPU memory of an ONNX Runtime GenAI model, read from the driver (NVML), each model alone in a fresh process.

ONNX Runtime's CUDA allocations are not torch's, so ``torch.cuda`` cannot see them; NVML's device-wide
``used`` memory can. The method, and why:

* **A fresh process per model.** ONNX Runtime GenAI keeps one CUDA allocator per process, shared by every
  model it loads (``EnsureDeviceOrtInit`` in its ``model.cpp``: KV cache, inputs, outputs, adapters), and
  ONNX Runtime's BFC arenas keep what they once allocated. In one process the second model would reuse
  memory the first one freed and look smaller than it is; evaluate also keeps all three models loaded at
  once. So each variant is loaded, run for one generation and measured in a child process of its own.
* **Device-wide used memory, before and after.** The child reads the device's used memory before it
  touches CUDA, then after loading and at every generated piece of text while the generator (and its KV
  cache) is alive, and once more after; the number is the largest increase. Per-process figures
  (``nvmlDeviceGetComputeRunningProcesses``) are not used: in a container NVML reports host process ids,
  which do not match ``os.getpid()``.

Limits: the figure includes the child's CUDA context and the cuBLAS/cuDNN workspaces ONNX Runtime creates
(a few hundred MiB, the same for every variant), so compare variants with each other, not with the bytes
on disk. Memory another process allocates on the same device during the measurement is counted too: the
parent waits while the child runs, but run nothing else on the GPU. NVML samples are instants, so a
transient allocation freed between two samples is missed; ONNX Runtime's arenas do not give memory back, so
a sample after the generation still holds their high-water mark. The device is CUDA device 0 of this
process: ``CUDA_VISIBLE_DEVICES``'s first entry (an index or a ``GPU-`` UUID), else NVML's device 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MIB = 2**20


def nvml_device():
    """NVML's handle of the device this process's CUDA device 0 is (see the module docstring)."""
    import pynvml

    pynvml.nvmlInit()
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    if first.startswith("GPU-"):
        return pynvml.nvmlDeviceGetHandleByUUID(first)
    return pynvml.nvmlDeviceGetHandleByIndex(int(first) if first.isdigit() else 0)


def device_used_bytes(handle) -> int:
    import pynvml

    return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)


def variant_peak_mib(
    model_dir: Path,
    adapter_file: Path | None,
    prompt: str,
    text_template: str | None,
    max_new_tokens: int,
) -> float:
    """The most device memory the model (with ``adapter_file`` active) added, loading it and generating
    up to ``max_new_tokens`` for ``prompt`` (evaluate's warm-up generation), measured in a fresh process."""
    with tempfile.TemporaryDirectory(prefix="gpu-memory-") as scratch:
        result_file = Path(scratch) / "result.json"
        command = [sys.executable, "-m", "olivepress.gpu_memory", str(model_dir), prompt, str(result_file)]
        command += ["--max-new-tokens", str(max_new_tokens)]
        if adapter_file is not None:
            command += ["--adapter", str(adapter_file)]
        if text_template is not None:
            command += ["--text-template", text_template]
        run = subprocess.run(command, capture_output=True, text=True)
        if run.returncode != 0 or not result_file.is_file():
            raise RuntimeError(f"measuring the GPU memory of {model_dir} failed:\n{run.stderr[-4000:]}")
        return json.loads(result_file.read_text())["peak_mib"]


def measure_in_this_process(
    model_dir: Path,
    adapter_file: Path | None,
    prompt: str,
    text_template: str | None,
    max_new_tokens: int,
) -> float:
    """The child's side of :func:`variant_peak_mib`; call it before anything in this process uses CUDA."""
    from olivepress.genai import open_model, prompt_token_ids, stream_generate

    handle = nvml_device()
    before = device_used_bytes(handle)
    loaded = open_model(model_dir, adapter_file)
    samples = [device_used_bytes(handle)]
    ids = prompt_token_ids(loaded, prompt, text_template)
    stream_generate(loaded, ids, max_new_tokens, lambda _text: samples.append(device_used_bytes(handle)))
    samples.append(device_used_bytes(handle))
    return (max(samples) - before) / MIB


def main() -> None:
    parser = argparse.ArgumentParser(description="write the GPU memory one model adds to a JSON file")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("prompt")
    parser.add_argument("result_file", type=Path)
    parser.add_argument("--adapter", type=Path)
    parser.add_argument("--text-template")
    parser.add_argument("--max-new-tokens", type=int, required=True)
    args = parser.parse_args()
    peak = measure_in_this_process(
        args.model_dir, args.adapter, args.prompt, args.text_template, args.max_new_tokens
    )
    args.result_file.write_text(json.dumps({"peak_mib": peak}))


if __name__ == "__main__":
    main()
