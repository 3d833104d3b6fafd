"""Where a run computes and what it builds for, decided on the machine that runs it before any compute.

``device`` (auto, cpu, gpu) is where quantize and finetune run; ``targets`` (cpu, cuda) are the runtimes
optimize builds for and evaluate gates on. A deployment's run form is filled in on one machine and runs on
another (a GPU worker), so ``auto`` is decided here, when the run starts, and a setting this machine cannot
serve is refused here, naming the setting, instead of failing a step after minutes of compute.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from olivepress.errors import UserError

if TYPE_CHECKING:
    from olivepress.config import RunConfig


def cuda_visible() -> bool:
    """A CUDA device is visible to this process (torch's view, which CUDA_VISIBLE_DEVICES narrows)."""
    import torch

    return torch.cuda.is_available()


def genai_has_cuda() -> bool:
    """The installed ONNX Runtime GenAI runs the CUDA provider (onnxruntime-genai-cuda, not the CPU build)."""
    import onnxruntime_genai as og

    return bool(getattr(og, "is_cuda_available", lambda: False)())


def decided(config: RunConfig) -> RunConfig:
    """``config`` with ``device`` decided for this machine (auto: gpu when CUDA is visible, else cpu); a gpu
    device or a cuda target this machine cannot serve is a UserError naming the setting."""
    visible = cuda_visible()
    where = (
        f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r}"
        if "CUDA_VISIBLE_DEVICES" in os.environ
        else "no CUDA device"
    )
    if config.device == "gpu" and not visible:
        raise UserError(
            f"device: gpu, but this machine shows no CUDA device ({where}); set device to cpu or auto"
        )
    if "cuda" in config.targets:
        if not visible:
            raise UserError(
                f"targets: cuda is built for and gated on a GPU, but this machine shows no CUDA device "
                f"({where}); leave cuda out of targets (--target cpu) or run on a GPU worker"
            )
        if not genai_has_cuda():
            raise UserError(
                "targets: cuda needs ONNX Runtime GenAI's CUDA build (pip install 'olivepress[gpu]': "
                "onnxruntime-genai-cuda), but the installed onnxruntime-genai runs on the CPU only"
            )
    device = config.device if config.device != "auto" else ("gpu" if visible else "cpu")
    return config.model_copy(update={"device": device})
